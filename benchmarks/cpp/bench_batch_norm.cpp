// custom_bn vs ATen batch norm on the CPU, timed from C++ with Google Benchmark.
//
// For each case below, custom_bn::batch_norm_forward / batch_norm_backward and the ATen operator
// taking the same arguments (at::native_batch_norm / at::native_batch_norm_backward) are
// registered back to back, so consecutive output lines read as a comparison. Inputs are created
// before the timed loop; only the outputs are allocated per call, by both implementations alike:
//   train_forward  batch statistics, running stats updated in place
//   train_backward grad_input, grad_weight, grad_bias (output_mask all true), fed the save_mean /
//                  save_invstd of the same implementation's training forward
//   eval_forward   normalization with the running stats
// Times are wall-clock (the ops run on torch's intra-op thread pool). bytes_per_second counts
// only the compulsory traffic of the big tensor: forward reads x and writes y, backward reads x
// and dy and writes dx; the per-channel tensors are negligible. These tensors (1 to 26 MB) can
// stay in a large last-level cache between iterations, so the rate may exceed DRAM bandwidth.
// Compare the two implementations of a case within one run, not absolute numbers across runs.
//
// Build (CPU only, from the repository root; `make bench-cpp` does the same) and run:
//   export CMAKE_PREFIX_PATH=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
//   cmake -S . -B build/bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DWITH_CUDA=OFF -DBUILD_TESTING=OFF -DCUSTOM_BN_BUILD_BENCHMARKS=ON
//   cmake --build build/bench --target custom_bn_bench
//   CUSTOM_BN_BENCH_THREADS=2 build/bench/benchmarks/cpp/custom_bn_bench --benchmark_min_time=0.2
// CUSTOM_BN_BENCH_THREADS (default 2) sets at::set_num_threads for both implementations. The
// usual Google Benchmark flags apply, e.g. --benchmark_filter=bf16 or
// --benchmark_repetitions=5 --benchmark_report_aggregates_only=true.
#include <custom_bn/custom_bn.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr double kMomentum = 0.1;
constexpr double kEps = 1e-5;

enum class Impl { CustomBN, ATen };
enum class Pass { TrainForward, TrainBackward, EvalForward };

struct Shape {
  std::string name;
  std::vector<int64_t> sizes;
  at::MemoryFormat format;
  at::ScalarType dtype;
};

const std::vector<Shape> kShapes = {
    {"32x64x56x56", {32, 64, 56, 56}, at::MemoryFormat::Contiguous, at::kFloat},
    {"32x64x56x56/channels_last", {32, 64, 56, 56}, at::MemoryFormat::ChannelsLast, at::kFloat},
    {"256x1024", {256, 1024}, at::MemoryFormat::Contiguous, at::kFloat},
    {"8x3x224x224", {8, 3, 224, 224}, at::MemoryFormat::Contiguous, at::kFloat},
    {"32x64x56x56/bf16", {32, 64, 56, 56}, at::MemoryFormat::Contiguous, at::kBFloat16},
};

// Per-channel tensors are float32 for every input dtype, as mixed-precision models keep them.
struct Inputs {
  at::Tensor x, grad_output, weight, bias, running_mean, running_var;

  explicit Inputs(const Shape& shape) {
    const auto big = at::TensorOptions().dtype(shape.dtype).memory_format(shape.format);
    x = at::randn(shape.sizes, big);
    grad_output = at::randn(shape.sizes, big);
    const int64_t channels = shape.sizes[1];
    weight = at::rand({channels}) + 0.5;
    bias = at::randn({channels});
    running_mean = at::zeros({channels});
    running_var = at::ones({channels});
  }
};

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Outputs forward(Impl impl, const Inputs& in, bool training) {
  if (impl == Impl::CustomBN) {
    return custom_bn::batch_norm_forward(in.x, in.weight, in.bias, in.running_mean,
                                         in.running_var, training, kMomentum, kEps);
  }
  return at::native_batch_norm(in.x, in.weight, in.bias, in.running_mean, in.running_var,
                               training, kMomentum, kEps);
}

// `saved` is the (output, save_mean, save_invstd) of the same implementation's training forward.
Outputs backward(Impl impl, const Inputs& in, const Outputs& saved) {
  const auto& [unused_output, save_mean, save_invstd] = saved;
  if (impl == Impl::CustomBN) {
    return custom_bn::batch_norm_backward(in.grad_output, in.x, in.weight, save_mean, save_invstd,
                                          /*training=*/true, kEps, {true, true, true});
  }
  return at::native_batch_norm_backward(in.grad_output, in.x, in.weight, in.running_mean,
                                        in.running_var, save_mean, save_invstd,
                                        /*train=*/true, kEps, {true, true, true});
}

void run_case(benchmark::State& state, const Shape& shape, Pass pass, Impl impl) {
  const Inputs in(shape);
  const Outputs saved = pass == Pass::TrainBackward ? forward(impl, in, /*training=*/true)
                                                    : Outputs{};
  for (auto _ : state) {
    Outputs out = pass == Pass::TrainBackward ? backward(impl, in, saved)
                                              : forward(impl, in, pass == Pass::TrainForward);
    benchmark::DoNotOptimize(out);
  }
  const int64_t tensor_bytes = in.x.numel() * in.x.element_size();
  const int64_t tensors_moved = pass == Pass::TrainBackward ? 3 : 2;
  state.SetBytesProcessed(state.iterations() * tensors_moved * tensor_bytes);
}

int threads_from_env() {
  const char* value = std::getenv("CUSTOM_BN_BENCH_THREADS");
  if (value == nullptr || *value == '\0') return 2;
  char* end = nullptr;
  const long threads = std::strtol(value, &end, 10);
  if (*end != '\0' || threads < 1) {
    std::fprintf(stderr, "CUSTOM_BN_BENCH_THREADS must be a positive integer, got '%s'\n", value);
    std::exit(2);
  }
  return static_cast<int>(threads);
}

void register_cases() {
  const std::pair<Pass, const char*> passes[] = {{Pass::TrainForward, "train_forward"},
                                                 {Pass::TrainBackward, "train_backward"},
                                                 {Pass::EvalForward, "eval_forward"}};
  const std::pair<Impl, const char*> impls[] = {{Impl::CustomBN, "custom_bn"},
                                                {Impl::ATen, "aten"}};
  for (const auto& [pass, pass_name] : passes) {
    for (const Shape& shape : kShapes) {
      for (const auto& [impl, impl_name] : impls) {
        const std::string name = std::string(pass_name) + "/" + shape.name + "/" + impl_name;
        benchmark::RegisterBenchmark(name.c_str(), run_case, shape, pass, impl)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = threads_from_env();
  at::set_num_threads(threads);
  benchmark::AddCustomContext("num_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("custom_bn_cpu_capability", custom_bn::cpu_capability());

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_cases();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
