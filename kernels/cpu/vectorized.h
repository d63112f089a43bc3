#pragma once
// Building blocks of the CPU kernels shared by both layouts: vector loads and stores in the
// accumulation type, the partial results of the reductions, the coefficients of the elementwise
// passes.
// Included only by batch_norm_kernel.cpp, which is compiled once per CPU_CAPABILITY: everything
// here lands in that copy's namespace.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

// The per-step lambdas and loads of the vector loops: called from two places each (whole steps
// and the masked tail), GCC may otherwise keep them out of line, and their accumulators then
// go through memory on every step (measured: the backward at about half speed).
#define CBN_CPU_ALWAYS_INLINE __attribute__((always_inline))

namespace custom_bn::cpu {
namespace CPU_CAPABILITY {
namespace {


using at::vec::Vectorized;

// Fewer elements per task cost more in threading than they save.
constexpr int64_t kGrain = 32768;
// Split reductions aim at this many tasks per thread, for load balance.
constexpr int64_t kTasksPerThread = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Loads and stores of scalar_t values as pairs of vectors of the accumulation type: a step is
// 2 vectors' worth of values, which is one vector of float16/bfloat16 (converted in one go) and
// gives the reductions two independent accumulator chains.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using Pair = std::pair<Vec, Vec>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kStep = 2 * kWidth;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static_assert(!kReduced || Vectorized<scalar_t>::size() == kStep);

  // A step is loaded or stored whole (count: std::true_type) or, for the last step of a row or
  // run, only its first `count` < kStep values (count: int64_t); masked lanes load as 0.
  template <typename Count>
  static constexpr bool kWhole = std::is_same_v<Count, std::true_type>;

  // Per-channel values (acc_t arrays: coefficients, accumulators).
  template <typename Count>
  static Pair load_acc(const acc_t* p, Count count) {
    if constexpr (kWhole<Count>) {
      return {Vec::loadu(p), Vec::loadu(p + kWidth)};
    } else {
      return {Vec::loadu(p, std::min<int64_t>(count, kWidth)),
              count > kWidth ? Vec::loadu(p + kWidth, count - kWidth) : Vec(acc_t(0))};
    }
  }
  template <typename Count>
  static void store_acc(acc_t* p, const Pair& v, Count count) {
    if constexpr (kWhole<Count>) {
      v.first.store(p);
      v.second.store(p + kWidth);
    } else {
      v.first.store(p, std::min<int64_t>(count, kWidth));
      if (count > kWidth) v.second.store(p + kWidth, count - kWidth);
    }
  }

  // Tensor values: float16/bfloat16 converted to float and back, one vector at a time.
  template <typename Count>
  static Pair load(const scalar_t* p, Count count) {
    if constexpr (!kReduced) {
      return load_acc(p, count);
    } else if constexpr (kWhole<Count>) {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
      return {lo, hi};
    } else {
      const auto [lo, hi] =
          at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count));
      return {lo, hi};
    }
  }
  template <typename Count>
  static void store(scalar_t* p, const Pair& v, Count count) {
    if constexpr (!kReduced) {
      store_acc(p, v, count);
    } else if constexpr (kWhole<Count>) {
      at::vec::convert_from_float<scalar_t>(v.first, v.second).store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v.first, v.second).store(p, count);
    }
  }
  static Pair load2(const scalar_t* p) { return load(p, std::true_type{}); }
};

template <typename acc_t>
acc_t horizontal_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

struct GradSums {
  double dy = 0;   // sum(dy)
  double dot = 0;  // sum(dy * (x - mean))

  void add(const GradSums& o) {
    dy += o.dy;
    dot += o.dot;
  }
};

// out = a * ka + (b - shift) * kb + kc, with the b term only when b is given: the normalize pass
// (a = x; ka = alpha, kc = beta) and the grad_input pass (a = dy, b = x, shift = mean). The
// coefficients are per channel.
template <typename acc_t>
struct Coeffs {
  const acc_t* ka;
  const acc_t* kc;
  const acc_t* shift = nullptr;
  const acc_t* kb = nullptr;
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace custom_bn::cpu
