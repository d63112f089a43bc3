#pragma once
// The contiguous layout (N, C, *): N*C runs of hw values, run r holding channel r % C.
// Reductions of runs and pieces of runs, and the per-run affine map.
// Included only by batch_norm_kernel.cpp, which is compiled once per CPU_CAPABILITY: everything
// here lands in that copy's namespace.
#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "common/batch_norm_math.h"
#include "common/geometry.h"
#include "common/welford.h"
#include "activation_vec.h"
#include "vectorized.h"

namespace custom_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Values of a contiguous statistics chunk: its two passes run while it sits in L1.
constexpr int64_t kChunk = 4096;

// Corrected two-pass statistics of n <= kChunk contiguous values: the second pass also sums the
// deviations, and subtracting (sum d)^2 / n removes the effect of the first-pass mean's
// rounding error on M2.
template <typename scalar_t>
WelfordStats<double> chunk_stats(const scalar_t* x, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    const auto [a, b] = IO::load2(x + i);
    s0 += a;
    s1 += b;
  }
  acc_t sum = horizontal_sum(s0 + s1);
  for (int64_t j = i; j < n; ++j) sum += acc_t(x[j]);
  const acc_t mean = sum / acc_t(n);

  const Vec vmean(mean);
  Vec dev0(acc_t(0)), dev1(acc_t(0)), m0(acc_t(0)), m1(acc_t(0));
  for (int64_t j = 0; j < i; j += IO::kStep) {
    const auto [a, b] = IO::load2(x + j);
    const Vec d0 = a - vmean, d1 = b - vmean;
    dev0 += d0;
    dev1 += d1;
    m0 = at::vec::fmadd(d0, d0, m0);
    m1 = at::vec::fmadd(d1, d1, m1);
  }
  acc_t m2 = horizontal_sum(m0 + m1), dev = horizontal_sum(dev0 + dev1);
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - mean;
    dev += d;
    m2 += d * d;
  }
  // An Inf in the chunk makes the deviations NaN: keep the plain mean then (Inf, as torch's),
  // and let M2 carry the NaN. No clamp at 0: a NaN or Inf must reach the variance, as in torch.
  const double dev_mean = std::isfinite(dev) ? double(dev) / double(n) : 0.0;
  return {double(mean) + dev_mean, double(m2) - double(dev) * dev_mean, double(n)};
}

template <typename scalar_t>
WelfordStats<double> run_stats(const scalar_t* x, int64_t n) {
  WelfordStats<double> s;
  for (int64_t off = 0; off < n; off += kChunk) {
    s = welford_merge(s, chunk_stats(x + off, std::min(kChunk, n - off)));
  }
  return s;
}

// out[i] = act(a[i] * ka + (b[i] - shift) * kb + kc) for i < n: one channel's values
// (contiguous layout), the b term only when b is given. The forward passes the residual as b
// (shift 0, kb 1): z = x * alpha + (r + beta), the order the fused backward recomputes z in.
template <typename scalar_t, typename acc_t,
          typename Act = VecActivation<Activation::kIdentity, acc_t>>
void affine_run(scalar_t* out, const scalar_t* a, const scalar_t* b, acc_t ka, acc_t kc,
                acc_t shift, acc_t kb, int64_t n, const Act& act = {}) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using Pair = typename IO::Pair;
  const Vec vka(ka), vkb(kb), vkc(kc), vshift(shift);
  const auto step = [&](int64_t i, auto count) CBN_CPU_ALWAYS_INLINE {
    const Pair x = IO::load(a + i, count);
    Vec t0 = vkc, t1 = vkc;
    if (b) {
      const Pair y = IO::load(b + i, count);
      t0 = at::vec::fmadd(y.first - vshift, vkb, vkc);
      t1 = at::vec::fmadd(y.second - vshift, vkb, vkc);
    }
    Pair z{at::vec::fmadd(x.first, vka, t0), at::vec::fmadd(x.second, vka, t1)};
    act.forward_inplace(z);
    IO::store(out + i, z, count);
  };
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) step(i, std::true_type{});
  if (i < n) step(i, n - i);
}

// The fused backward of one channel's values: z = x * alpha + (r + beta) is recomputed as the
// forward computed it and dz = dy * act'(z) (r: the residual, or nullptr). In the in-place
// mode (Act::kFromOutput) x is the output and alpha/beta map act^-1(y) back to x - mean.
template <typename scalar_t, typename Act>
struct RunGrad {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using Pair = typename IO::Pair;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* r;
  Vec alpha, beta;
  const Act& act;

  // dz and x at offset i (out-parameters: GCC moves a returned pair of pairs of vectors
  // through the stack, 8 bytes at a time)
  template <typename Count>
  CBN_CPU_ALWAYS_INLINE void load(int64_t i, Count count, Pair& g, Pair& xv) const {
    g = IO::load(dy + i, count);
    xv = IO::load(x + i, count);
    if constexpr (Act::kFromOutput) {
      // x holds the output y: dz from y, then x - mean = act^-1(y) * alpha + beta.
      act.invert_inplace(g, xv);
      xv = {at::vec::fmadd(xv.first, alpha, beta), at::vec::fmadd(xv.second, alpha, beta)};
    } else if constexpr (!Act::kIdentity) {
      Pair t{beta, beta};
      if (r) {
        const Pair rv = IO::load(r + i, count);
        t = {rv.first + beta, rv.second + beta};
      }
      const Pair z{at::vec::fmadd(xv.first, alpha, t.first),
                   at::vec::fmadd(xv.second, alpha, t.second)};
      act.grad_inplace(g, z);
    }
  }
};

// sum(dz) and sum(dz * (x - mean)) of n values of one channel; src gives dz (dy through the
// activation) and x.
template <typename scalar_t, typename Act>
GradSums run_grad_sums(const RunGrad<scalar_t, Act>& src, int64_t n,
                           at::opmath_type<scalar_t> mean) {
  using R = RunGrad<scalar_t, Act>;
  using Vec = typename R::Vec;
  using acc_t = typename R::acc_t;
  const Vec vmean(mean);
  GradSums total;
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t end = std::min(n, off + kChunk);
    Vec s0(acc_t(0)), s1(acc_t(0)), d0(acc_t(0)), d1(acc_t(0));
    // Masked lanes load dy = 0, hence dz = 0: they add nothing.
    const auto step = [&](int64_t i, auto count) CBN_CPU_ALWAYS_INLINE {
      typename R::Pair g, xv;
      src.load(i, count, g, xv);
      s0 += g.first;
      s1 += g.second;
      d0 = at::vec::fmadd(g.first, xv.first - vmean, d0);
      d1 = at::vec::fmadd(g.second, xv.second - vmean, d1);
    };
    int64_t i = off;
    for (; i + R::IO::kStep <= end; i += R::IO::kStep) step(i, std::true_type{});
    if (i < end) step(i, end - i);
    total.add({double(horizontal_sum(s0 + s1)), double(horizontal_sum(d0 + d1))});
  }
  return total;
}

// dx = dz * k_dy + (x - mean) * k_x + k_c (when dx is given) and dres = dz (when dres is given)
// for n values of one channel.
template <typename scalar_t, typename Act>
void act_grad_input_run(scalar_t* dx, scalar_t* dres, const RunGrad<scalar_t, Act>& src,
                        int64_t n, const BackwardCoeffs<at::opmath_type<scalar_t>>& k) {
  using R = RunGrad<scalar_t, Act>;
  using IO = typename R::IO;
  using Vec = typename R::Vec;
  using Pair = typename R::Pair;
  const Vec k_dy(k.k_dy), k_x(k.k_x), k_c(k.k_c), vmean(k.mean);
  const auto step = [&](int64_t i, auto count) CBN_CPU_ALWAYS_INLINE {
    Pair g, xv;
    src.load(i, count, g, xv);
    if (dres) IO::store(dres + i, g, count);
    if (dx) {
      const Vec t0 = at::vec::fmadd(xv.first - vmean, k_x, k_c);
      const Vec t1 = at::vec::fmadd(xv.second - vmean, k_x, k_c);
      IO::store(dx + i, Pair{at::vec::fmadd(g.first, k_dy, t0), at::vec::fmadd(g.second, k_dy, t1)},
                count);
    }
  };
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) step(i, std::true_type{});
  if (i < n) step(i, n - i);
}

// Calls f(run, offset, length) for each piece of the flat range [begin, end) cut at the
// boundaries of runs of run_length values.
template <typename F>
void for_each_run_piece(int64_t begin, int64_t end, int64_t run_length, const F& f) {
  int64_t run = begin / run_length;  // one division per call: runs may be a single row
  int64_t offset = begin - run * run_length;
  while (begin < end) {
    const int64_t length = std::min(run_length - offset, end - begin);
    f(run, offset, length);
    begin += length;
    ++run;
    offset = 0;
  }
}

// Bytes of cache that a second pass over a tensor can hit: the environment variable
// CUSTOM_BN_CPU_CACHE_BYTES, else the last-level cache (L3, else L2) that the C library reports.
int64_t cache_bytes() {
  if (const char* env = std::getenv("CUSTOM_BN_CPU_CACHE_BYTES")) return std::atoll(env);
  static const int64_t reported = [] {
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    for (const int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
      const long bytes = sysconf(name);
      if (bytes > 0) return int64_t(bytes);
    }
#endif
    return int64_t(8) << 20;
  }();
  return reported;
}

// Whole channels per task, each channel's second pass (normalize, grad_input) right after its
// reduction while it is cached, when the channels spread evenly over the threads and the
// tensors read (`bytes`) do not fit in the cache. Otherwise the split mode's two passes in
// memory order are faster: they stream, and the second one hits the cache; whole-channel
// tasks hop between N runs of hw values, which the hardware prefetchers follow poorly.
bool whole_channel_tasks(const Geometry& g, int64_t bytes) {
  const int64_t threads = at::get_num_threads();
  const bool balanced = g.c >= threads && (g.c % threads == 0 || g.c >= 8 * threads);
  return balanced && bytes > cache_bytes();
}

int64_t channel_grain(const Geometry& g) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.count()));
}

// The split mode: each of the N*C runs is cut into `parts` pieces of at most `length` values;
// task t covers piece t % parts of run t / parts.
struct RunPieces {
  int64_t parts;
  int64_t length;
  int64_t tasks;
};

RunPieces run_pieces(const Geometry& g) {
  const int64_t runs = g.n * g.c;
  const int64_t wanted = ceil_div(kTasksPerThread * at::get_num_threads(), runs);
  const int64_t parts = std::clamp<int64_t>(wanted, 1, ceil_div(g.hw, kChunk));
  const int64_t length = ceil_div(g.hw, parts);
  return {parts, length, runs * parts};
}

// Calls f(task, offset, length, channel) for every task of the split mode, in parallel; f
// stores its partial result by task index.
template <typename F>
void for_each_piece(const Geometry& g, const RunPieces& p, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / p.length);
  at::parallel_for(0, p.tasks, grain, [&](int64_t begin, int64_t end) {
    // Divisions once per call, then counted along (a piece can be as short as one plane).
    int64_t run = begin / p.parts, part = begin % p.parts, channel = run % g.c;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t off = part * p.length;
      const int64_t len = std::min(p.length, g.hw - off);
      if (len > 0) f(t, run * g.hw + off, len, channel);
      if (++part == p.parts) {
        part = 0;
        ++run;
        if (++channel == g.c) channel = 0;
      }
    }
  });
}

// Pieces of channel c, in a fixed order: piece k of run (n, c) is task (n * C + c) * parts + k.
template <typename T, typename F>
void for_channel_pieces(const Geometry& g, const RunPieces& p, const std::vector<T>& partial,
                        int64_t c, const F& f) {
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t k = 0; k < p.parts; ++k) f(partial[(n * g.c + c) * p.parts + k]);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace custom_bn::cpu
