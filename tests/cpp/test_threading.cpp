// The library's CPU kernels run on torch's intra-op thread pool, with libtorch's own OpenMP
// runtime, from a LibTorch program (the Python side has tests/python/test_threading.py). The
// threads are observed from outside the kernels: each thread's CPU time in /proc/self/task.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <custom_bn/custom_bn.h>

namespace {

namespace fs = std::filesystem;

std::map<std::string, long> thread_cpu_ticks() {
  std::map<std::string, long> ticks;
  for (const auto& entry : fs::directory_iterator("/proc/self/task")) {
    std::ifstream stat(entry.path() / "stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const auto close = text.rfind(')');
    if (close == std::string::npos) continue;  // the thread ended
    std::istringstream fields(text.substr(close + 1));
    std::vector<std::string> f((std::istream_iterator<std::string>(fields)),
                               std::istream_iterator<std::string>());
    if (f.size() > 12) ticks[entry.path().filename()] = std::stol(f[11]) + std::stol(f[12]);
  }
  return ticks;
}

// CPU time of the second-busiest thread relative to the busiest while fn runs repeatedly.
template <typename F>
double second_thread_share(const F& fn) {
  fn();
  const auto before = thread_cpu_ticks();
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(400);
  while (std::chrono::steady_clock::now() < end) fn();
  std::vector<long> used;
  for (const auto& [tid, t] : thread_cpu_ticks()) {
    used.push_back(t - (before.count(tid) ? before.at(tid) : 0));
  }
  std::sort(used.rbegin(), used.rend());
  if (used.size() < 2 || used[0] <= 0) return 0.0;
  return double(used[1]) / double(used[0]);
}

class Threading : public ::testing::Test {
 protected:
  void SetUp() override { threads_before_ = at::get_num_threads(); }
  void TearDown() override { at::set_num_threads(threads_before_); }
  int threads_before_ = 1;
};

TEST_F(Threading, BuiltWithOpenMPAndLibtorchsRuntimeOnly) {
  EXPECT_TRUE(custom_bn::built_with_openmp());
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> runtimes;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("libgomp") != std::string::npos) {
      runtimes.insert(fs::canonical(line.substr(line.find('/'))).string());
    }
  }
  EXPECT_EQ(runtimes.size(), 1u) << "OpenMP runtimes mapped: " << runtimes.size();
}

TEST_F(Threading, ForwardAndBackwardUseTwoThreads) {
  at::set_num_threads(2);
  // (layout, cache): contiguous input in both of its modes, split passes and whole channels per
  // task (the mode of tensors larger than the cache, forced by declaring no cache), and
  // channels-last.
  const std::vector<std::pair<bool, const char*>> cases = {{false, ""}, {false, "0"}, {true, ""}};
  for (const auto& [channels_last, cache] : cases) {
    if (*cache) setenv("CUSTOM_BN_CPU_CACHE_BYTES", cache, 1);
    auto x = torch::randn({16, 64, 32, 32});
    if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
    const auto dy = torch::randn_like(x);
    const auto [y, mean, invstd] =
        custom_bn::batch_norm_forward(x, {}, {}, {}, {}, true, 0.1, 1e-5);
    EXPECT_GT(second_thread_share([&] {
                custom_bn::batch_norm_forward(x, {}, {}, {}, {}, true, 0.1, 1e-5);
              }),
              0.4)
        << "forward, channels_last=" << channels_last << ", cache bytes '" << cache << "'";
    EXPECT_GT(second_thread_share([&] {
                custom_bn::batch_norm_backward(dy, x, {}, mean, invstd, true, 1e-5,
                                               {true, true, true});
              }),
              0.4)
        << "backward, channels_last=" << channels_last << ", cache bytes '" << cache << "'";
    unsetenv("CUSTOM_BN_CPU_CACHE_BYTES");
  }
}

TEST_F(Threading, OneThreadWhenTorchHasOne) {
  at::set_num_threads(1);
  const auto x = torch::randn({16, 64, 32, 32});
  EXPECT_LT(second_thread_share([&] {
              custom_bn::batch_norm_forward(x, {}, {}, {}, {}, true, 0.1, 1e-5);
            }),
            0.2);
}

TEST(CpuCapability, FollowsATenAndWasCompiled) {
  const auto compiled = custom_bn::cpu_capabilities_compiled();
  ASSERT_FALSE(compiled.empty());
  EXPECT_EQ(compiled.front(), "DEFAULT");
  const std::string chosen = custom_bn::cpu_capability();
  EXPECT_NE(std::find(compiled.begin(), compiled.end(), chosen), compiled.end()) << chosen;
  // The same level as ATen's own kernels whenever this library was compiled for it.
  const std::string aten = at::get_cpu_capability();
  if (std::find(compiled.begin(), compiled.end(), aten) != compiled.end()) {
    EXPECT_EQ(chosen, aten);
  }
}

TEST(BuildInfo, NamesTheTorchAndCudaArchitectures) {
  EXPECT_EQ(custom_bn::torch_version_compiled_against(), std::string(TORCH_VERSION));
  const auto archs = custom_bn::cuda_architectures();
  EXPECT_EQ(custom_bn::built_with_cuda(), !archs.empty());
  for (const auto& arch : archs) {  // sm_80, sm_90 by default: no CMake -real/-virtual suffix
    EXPECT_EQ(arch.rfind("sm_", 0), 0u) << arch;
    EXPECT_EQ(arch.find('-'), std::string::npos) << arch;
  }
}

}  // namespace
