// The emulator itself, on small kernels written here: CUDA semantics of barriers, shuffles and
// shared memory, and every misuse it promises to report (divergence around a barrier or a
// shuffle, invalid launch configurations, shared-memory overruns, a block waiting for another)
// as an EmulatorError with a clear message instead of a hang or a wrong answer.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "cuda/device_primitives.cuh"

namespace custom_bn {
namespace {

namespace emu = dev::emu;
using emu::Dim2;
using emu::EmulatorError;

// The launch fails with an EmulatorError whose message contains every fragment.
::testing::AssertionResult fails_with(const std::function<void()>& launch,
                                      std::initializer_list<const char*> fragments) {
  try {
    launch();
  } catch (const EmulatorError& e) {
    const std::string message = e.what();
    for (const char* f : fragments) {
      if (message.find(f) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks \"" << f << "\": " << message;
      }
    }
    return ::testing::AssertionSuccess() << message;
  }
  return ::testing::AssertionFailure() << "the launch did not fail";
}

// Each block reverses its slice through shared memory: right only if the barrier orders every
// write before every read.
void reverse_kernel(const int* in, int* out) {
  int* s = dev::dynamic_shared<int>();
  const int t = dev::linear_thread_idx();
  const int n = dev::block_threads();
  const int base = dev::block_idx_x() * n;
  s[t] = in[base + t];
  dev::sync_threads();
  out[base + t] = s[n - 1 - t];
}

std::vector<int> run_reverse(Dim2 grid, Dim2 block) {
  const int n = static_cast<int>(grid.x * block.x * block.y);
  std::vector<int> in(n), out(n, -7);
  for (int i = 0; i < n; ++i) in[i] = 3 * i + 1;
  emu::launch(grid, block, block.x * block.y * int64_t(sizeof(int)), &reverse_kernel, in.data(),
              out.data());
  return out;
}

bool reversed(const std::vector<int>& out, int block_threads) {
  for (size_t i = 0; i < out.size(); ++i) {
    const size_t block = i / block_threads, t = i % block_threads;
    if (out[i] != 3 * int(block * block_threads + (block_threads - 1 - t)) + 1) return false;
  }
  return true;
}

TEST(Emulator, BarrierOrdersSharedMemoryUnderEverySchedule) {
  for (auto order : {emu::ThreadOrder::kForward, emu::ThreadOrder::kReverse,
                     emu::ThreadOrder::kRandom}) {
    for (int resident : {1, 3}) {
      emu::Schedule s;
      s.order = order;
      s.resident_blocks = resident;
      emu::ScopedSchedule scoped(s);
      EXPECT_TRUE(reversed(run_reverse({5, 1}, {16, 4}), 64));
    }
  }
}

// The same kernel without its barrier goes wrong, and the mutation reports that it struck.
TEST(Emulator, DroppedBarrierChangesTheResult) {
  emu::Schedule s;
  s.order = emu::ThreadOrder::kForward;
  emu::ScopedSchedule scoped(s);
  emu::ScopedMutation drop({emu::Primitive::kSyncThreads, "reverse_kernel", 0});
  EXPECT_FALSE(reversed(run_reverse({2, 1}, {32, 1}), 32));
  EXPECT_EQ(drop.hits(), 64);
}

struct Triple {
  float a, b, c;
};

void shuffle_kernel(double* xor_out, double* down_out, Triple* triple_out, int lane_mask,
                    unsigned delta) {
  const int t = dev::linear_thread_idx();
  const double v = 100.0 * dev::block_idx_x() + t;
  xor_out[t] = dev::shfl_xor(dev::kFullWarpMask, v, lane_mask);
  down_out[t] = dev::shfl_down(dev::kFullWarpMask, v, delta);
  const Triple mine{float(t), float(-t), 0.5f};
  triple_out[t] = dev::shfl_xor(dev::kFullWarpMask, mine, 1);
}

TEST(Emulator, ShufflesFollowCudaSemantics) {
  const int n = 64;  // two warps of an (8, 8) block: warps are runs of 32 linear indices
  std::vector<double> x(n), d(n);
  std::vector<Triple> tr(n);
  emu::launch(Dim2{1, 1}, Dim2{8, 8}, 0, &shuffle_kernel, x.data(), d.data(), tr.data(), 5, 3u);
  for (int t = 0; t < n; ++t) {
    const int lane = t % 32, warp = t / 32;
    EXPECT_EQ(x[t], double(warp * 32 + (lane ^ 5))) << t;
    // Beyond the warp shfl_down returns the caller's own value.
    EXPECT_EQ(d[t], double(lane + 3 < 32 ? t + 3 : t)) << t;
    EXPECT_EQ(tr[t].a, float(warp * 32 + (lane ^ 1))) << t;
    EXPECT_EQ(tr[t].b, -float(warp * 32 + (lane ^ 1))) << t;
  }
}

void sum_kernel(const float* in, float* out) {
  float v = in[dev::linear_thread_idx()];
  for (int m = 16; m > 0; m /= 2) v += dev::shfl_xor(dev::kFullWarpMask, v, m);
  dev::sync_warp(dev::kFullWarpMask);
  if (dev::lane_idx() == 0) dev::atomic_add(out, v);
}

TEST(Emulator, WarpReductionsAndAtomics) {
  std::vector<float> in(256);
  for (int i = 0; i < 256; ++i) in[i] = float(i);
  float out = 0;
  emu::launch(Dim2{1, 1}, Dim2{16, 16}, 0, &sum_kernel, in.data(), &out);
  EXPECT_EQ(out, 255.0f * 256.0f / 2.0f);
}

void early_exit_kernel(int limit) {
  if (dev::thread_idx_x() >= limit) return;
  dev::sync_threads();
}

TEST(Emulator, ThreadsExitingBeforeABarrierAreReported) {
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{2, 1}, Dim2{64, 1}, 0, &early_exit_kernel, 20); },
                         {"early_exit_kernel", "cannot make progress", "44 thread(s) have exited",
                          "20 thread(s) wait at __syncthreads in early_exit_kernel",
                          "test_emulator.cpp:"}));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5))
      << "divergence must be reported at once, not after a timeout";
  // The emulator stays usable after a failed launch.
  EXPECT_TRUE(reversed(run_reverse({2, 1}, {32, 2}), 64));
}

void two_barriers_kernel() {
  if (dev::thread_idx_x() % 2 == 0) {
    dev::sync_threads();
  } else {
    dev::sync_threads();
  }
}

TEST(Emulator, DifferentBarriersAreReported) {
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{1, 1}, Dim2{32, 1}, 0, &two_barriers_kernel); },
                         {"divergent __syncthreads", "two_barriers_kernel"}));
}

void half_warp_shuffle_kernel(bool other_site) {
  float v = float(dev::lane_idx());
  if (dev::lane_idx() < 16) {
    v = dev::shfl_xor(dev::kFullWarpMask, v, 1);
  } else if (other_site) {
    v = dev::shfl_xor(dev::kFullWarpMask, v, 2);
  }
  (void)v;
}

TEST(Emulator, DivergentShufflesAreReported) {
  EXPECT_TRUE(
      fails_with([] { emu::launch(Dim2{1, 1}, Dim2{32, 1}, 0, &half_warp_shuffle_kernel, false); },
                 {"cannot make progress", "16 thread(s) have exited",
                  "16 thread(s) wait at __shfl_xor_sync in half_warp_shuffle_kernel"}));
  EXPECT_TRUE(
      fails_with([] { emu::launch(Dim2{1, 1}, Dim2{32, 1}, 0, &half_warp_shuffle_kernel, true); },
                 {"divergent warp operation", "half_warp_shuffle_kernel"}));
}

void masked_shuffle_kernel(unsigned mask, int lane_mask) {
  if (((mask >> dev::lane_idx()) & 1u) == 0) return;
  (void)dev::shfl_xor(mask, 1.0f, lane_mask);
}

TEST(Emulator, ShuffleMasksAreChecked) {
  // Half warps shuffling among themselves is fine ...
  emu::launch(Dim2{1, 1}, Dim2{32, 1}, 0, &masked_shuffle_kernel, 0x0000ffffu, 8);
  // ... reading a lane outside the mask is not,
  EXPECT_TRUE(fails_with(
      [] { emu::launch(Dim2{1, 1}, Dim2{32, 1}, 0, &masked_shuffle_kernel, 0x0000ffffu, 16); },
      {"not in the mask"}));
  // nor is a full mask in a block that does not consist of whole warps.
  EXPECT_TRUE(fails_with(
      [] { emu::launch(Dim2{1, 1}, Dim2{48, 1}, 0, &masked_shuffle_kernel, 0xffffffffu, 1); },
      {"not whole warps"}));
}

void empty_kernel() {}

TEST(Emulator, InvalidLaunchConfigurationsAreRejected) {
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{1, 1}, Dim2{1025, 1}, 0, &empty_kernel); },
                         {"exceeds 1024 threads"}));
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{1, 1}, Dim2{32, 33}, 0, &empty_kernel); },
                         {"exceeds 1024 threads"}));
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{1, 65536}, Dim2{32, 1}, 0, &empty_kernel); },
                         {"grid.y = 65536 exceeds 65535"}));
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{0, 1}, Dim2{32, 1}, 0, &empty_kernel); },
                         {"is empty"}));
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{1, 1}, Dim2{32, 1}, 48 * 1024 + 4, &empty_kernel); },
                         {"48 KiB"}));
}

void overrun_kernel(int count) { dev::dynamic_shared<float>()[count + dev::thread_idx_x()] = 1.0f; }

TEST(Emulator, SharedMemoryOverrunIsReported) {
  EXPECT_TRUE(fails_with([] { emu::launch(Dim2{1, 1}, Dim2{32, 1}, 64, &overrun_kernel, 16); },
                         {"wrote past the 64 bytes of dynamic shared memory"}));
}

void read_unwritten_kernel(float* dynamic_out, double* static_out) {
  CBN_STATIC_SHARED(double, scratch, 4);
  *dynamic_out = dev::dynamic_shared<float>()[3];
  *static_out = scratch[2];
}

TEST(Emulator, UnwrittenSharedMemoryReadsAsNaN) {
  float d = 0;
  double s = 0;
  emu::launch(Dim2{1, 1}, Dim2{32, 1}, 64, &read_unwritten_kernel, &d, &s);
  EXPECT_TRUE(std::isnan(d));
  EXPECT_TRUE(std::isnan(s));
}

void static_shared_kernel(int* out) {
  CBN_STATIC_SHARED(int, block_id, 1);
  if (dev::linear_thread_idx() == 0) block_id[0] = dev::block_idx_x();
  dev::sync_threads();
  out[dev::block_idx_x() * dev::block_threads() + dev::linear_thread_idx()] = block_id[0];
}

TEST(Emulator, StaticSharedMemoryIsPerBlock) {
  emu::Schedule s;
  s.resident_blocks = 4;  // blocks interleave: one storage for all would mix them up
  s.order = emu::ThreadOrder::kRandom;
  emu::ScopedSchedule scoped(s);
  std::vector<int> out(6 * 64, -1);
  emu::launch(Dim2{6, 1}, Dim2{64, 1}, 0, &static_shared_kernel, out.data());
  for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i], int(i / 64)) << i;
}

// Block 0 waits for a flag that block 1 sets: the pattern DESIGN.md forbids. It only completes
// when both blocks happen to be resident together; otherwise the time limit reports it.
void spin_wait_kernel(unsigned* flag) {
  if (dev::linear_thread_idx() != 0) return;
  if (dev::block_idx_x() == 1) {
    dev::atomic_add(flag, 1u);
  } else {
    while (dev::atomic_add(flag, 0u) == 0u) {
    }
  }
}

TEST(Emulator, BlockWaitingForAnotherBlockHitsTheTimeLimit) {
  emu::Schedule s;
  s.resident_blocks = 1;
  s.shuffle_blocks = false;
  s.time_limit_s = 0.3;
  {
    emu::ScopedSchedule scoped(s);
    unsigned flag = 0;
    EXPECT_TRUE(
        fails_with([&] { emu::launch(Dim2{2, 1}, Dim2{32, 1}, 0, &spin_wait_kernel, &flag); },
                   {"did not finish within 0.3 s", "blocks in flight: (0,0)"}));
  }
  s.resident_blocks = 2;
  emu::ScopedSchedule scoped(s);
  unsigned flag = 0;
  emu::launch(Dim2{2, 1}, Dim2{32, 1}, 0, &spin_wait_kernel, &flag);
  EXPECT_EQ(flag, 1u);
}

TEST(Emulator, PrimitivesOutsideAKernelThrow) {
  EXPECT_THROW(dev::thread_idx_x(), EmulatorError);
  EXPECT_THROW(dev::sync_threads(), EmulatorError);
}

}  // namespace
}  // namespace custom_bn
