#pragma once
// The channels-last layout (and any input with hw == 1): R = N*hw rows of C values. Reductions
// over tiles of rows x channels, and the per-row affine map.
// Included only by batch_norm_kernel.cpp, which is compiled once per CPU_CAPABILITY: everything
// here lands in that copy's namespace.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common/geometry.h"
#include "common/welford.h"
#include "activation_vec.h"
#include "vectorized.h"

namespace custom_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Channels-last chunks: about this many values (L2-sized), and at most kMaxChunkRows rows, so
// that a channel's float accumulators sum few enough terms to keep float32 accuracy.
constexpr int64_t kRowChunk = 32768;
constexpr int64_t kMaxChunkRows = 512;
// Widest channel block of a channels-last reduction task.
constexpr int64_t kMaxBlockChannels = 1024;

// Channels-last loops walk rows in blocks of kBlockRows and, within a block, one channel step
// (kStep channels, or the last few) at a time: the step's coefficients or accumulators stay in
// registers while the block's rows go by, and a block of rows (a few KiB) stays in L1 until
// its last step.
constexpr int64_t kBlockRows = 16;

// Calls f(row_begin, row_end, c, count) for each block of rows in [r0, r1) and each channel step
// in [c0, c1); count is std::true_type for a whole step, else the number of channels left.
template <typename scalar_t, typename F>
void for_each_block_step(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const F& f) {
  constexpr int64_t kStep = VecIO<scalar_t>::kStep;
  for (int64_t rb = r0; rb < r1; rb += kBlockRows) {
    const int64_t re = std::min(r1, rb + kBlockRows);
    int64_t c = c0;
    for (; c + kStep <= c1; c += kStep) f(rb, re, c, std::true_type{});
    if (c < c1) f(rb, re, c, c1 - c);
  }
}

// out = act(a * ka[c] + (b - shift[c]) * kb[c] + kc[c]) over rows [r0, r1) x channels [c0, c1)
// of a channels-last tensor, row after row: a streaming pass reads and writes memory in order,
// and the coefficients come from L1. The b term only when b is given; without shift/kb it is
// b + kc (the forward's residual: z = x * alpha + (r + beta), as affine_run).
template <typename scalar_t, typename acc_t,
          typename Act = VecActivation<Activation::kIdentity, acc_t>>
void affine_tile(scalar_t* out, const scalar_t* a, const scalar_t* b, const Coeffs<acc_t>& k,
                 int64_t C, int64_t r0, int64_t r1, int64_t c0, int64_t c1, const Act& act = {}) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using Pair = typename IO::Pair;
  const auto step = [&](int64_t p, int64_t c, auto count) CBN_CPU_ALWAYS_INLINE {
    const Pair x = IO::load(a + p, count);
    const Pair ka = IO::load_acc(k.ka + c, count), kc = IO::load_acc(k.kc + c, count);
    Vec t0 = kc.first, t1 = kc.second;
    if (b) {
      const Pair y = IO::load(b + p, count);
      if (k.shift) {
        const Pair shift = IO::load_acc(k.shift + c, count), kb = IO::load_acc(k.kb + c, count);
        t0 = at::vec::fmadd(y.first - shift.first, kb.first, t0);
        t1 = at::vec::fmadd(y.second - shift.second, kb.second, t1);
      } else {
        t0 = y.first + t0;
        t1 = y.second + t1;
      }
    }
    Pair z{at::vec::fmadd(x.first, ka.first, t0), at::vec::fmadd(x.second, ka.second, t1)};
    act.forward_inplace(z);
    IO::store(out + p, z, count);
  };
  for (int64_t r = r0; r < r1; ++r) {
    int64_t c = c0;
    for (; c + IO::kStep <= c1; c += IO::kStep) step(r * C + c, c, std::true_type{});
    if (c < c1) step(r * C + c, c, c1 - c);
  }
}

// The fused backward on a channels-last tensor: z = x * alpha[c] + (r + beta[c]) recomputed as
// the forward computed it, dz = dy * act'(z) (r: the residual, or nullptr).
template <typename scalar_t, typename Act>
struct TileGrad {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Pair = typename IO::Pair;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* r;
  const acc_t* alpha;
  const acc_t* beta;
  const Act& act;

  // dz and x at element p, channel c (out-parameters: see RunGrad::load)
  template <typename Count>
  CBN_CPU_ALWAYS_INLINE void load(int64_t p, int64_t c, Count count, Pair& g, Pair& xv) const {
    g = IO::load(dy + p, count);
    xv = IO::load(x + p, count);
    if constexpr (Act::kFromOutput) {  // as RunGrad::load
      act.invert_inplace(g, xv);
      const Pair al = IO::load_acc(alpha + c, count), be = IO::load_acc(beta + c, count);
      xv = {at::vec::fmadd(xv.first, al.first, be.first),
            at::vec::fmadd(xv.second, al.second, be.second)};
    } else if constexpr (!Act::kIdentity) {
      const Pair al = IO::load_acc(alpha + c, count);
      Pair t = IO::load_acc(beta + c, count);
      if (r) {
        const Pair rv = IO::load(r + p, count);
        t = {rv.first + t.first, rv.second + t.second};
      }
      const Pair z{at::vec::fmadd(xv.first, al.first, t.first),
                   at::vec::fmadd(xv.second, al.second, t.second)};
      act.grad_inplace(g, z);
    }
  }
};

// Channels in blocks of at most kMaxBlockChannels, as even as possible: (blocks, block width).
std::pair<int64_t, int64_t> channel_blocks(const Geometry& g) {
  const int64_t blocks = ceil_div(g.c, kMaxBlockChannels);
  return {blocks, ceil_div(g.c, blocks)};
}

// Tasks of a channels-last reduction: `ranges` row ranges x `blocks` channel blocks.
struct RowTiles {
  int64_t ranges;
  int64_t range_rows;
  int64_t blocks;
  int64_t block_channels;
};

RowTiles row_tiles(const Geometry& g) {
  const int64_t rows = g.rows();
  const auto [blocks, block_channels] = channel_blocks(g);
  const int64_t numel = rows * g.c;
  // Enough tasks for every thread, none smaller than the grain, none shorter than 8 rows
  // (shorter ones would spend more on merging than on reading).
  const int64_t wanted = std::min(kTasksPerThread * at::get_num_threads(),
                                  std::max<int64_t>(1, numel / kGrain));
  const int64_t ranges =
      std::clamp<int64_t>(ceil_div(wanted, blocks), 1, std::max<int64_t>(1, rows / 8));
  return {ranges, ceil_div(rows, ranges), blocks, block_channels};
}

// Calls f(row_begin, row_end, c0, c1, range) for every tile, in parallel.
template <typename F>
void for_each_tile(const Geometry& g, const RowTiles& t, const F& f) {
  at::parallel_for(0, t.ranges * t.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t range = task / t.blocks, block = task % t.blocks;
      const int64_t r0 = range * t.range_rows, r1 = std::min(g.rows(), r0 + t.range_rows);
      const int64_t c0 = block * t.block_channels, c1 = std::min(g.c, c0 + t.block_channels);
      if (r0 < r1 && c0 < c1) f(r0, r1, c0, c1, range);
    }
  });
}

// Statistics of rows [r0, r1) x channels [c0, c1), written to out[c0, c1), in one pass over
// the data. Each chunk of rows sums d = x - shift and d^2 per channel in the accumulation type,
// where the shift is the tile's first row for the first chunk and the tile's mean so far after
// that; the chunk's (mean, M2) = (shift + sum d / n, sum d^2 - (sum d)^2 / n) is then merged in
// double with Chan's formula. With the shift near the mean the subtraction does not cancel,
// whatever the mean's size (a plain E[x^2] - E[x]^2 would).
template <typename scalar_t>
void tile_stats(const scalar_t* x, const Geometry& g, int64_t r0, int64_t r1, int64_t c0,
                int64_t c1, WelfordStats<double>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using Pair = typename IO::Pair;
  const int64_t width = c1 - c0;
  const int64_t chunk_rows = std::clamp<int64_t>(kRowChunk / width, 1, kMaxChunkRows);
  // Indexed by channel - c0.
  std::vector<acc_t> shift(width), sum(width), sum_sq(width);
  std::vector<WelfordStats<double>> total(width);
  for (int64_t c = 0; c < width; ++c) {
    const acc_t first = acc_t(x[r0 * g.c + c0 + c]);
    shift[c] = std::isfinite(first) ? first : acc_t(0);
  }
  for (int64_t r = r0; r < r1; r += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, r1 - r);
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(sum_sq.begin(), sum_sq.end(), acc_t(0));
    for_each_block_step<scalar_t>(r, r + nr, 0, width, [&](int64_t rb, int64_t re, int64_t c,
                                                           auto count) {
      const Pair k = IO::load_acc(shift.data() + c, count);
      Pair s1 = IO::load_acc(sum.data() + c, count), s2 = IO::load_acc(sum_sq.data() + c, count);
      for (int64_t i = rb; i < re; ++i) {
        const Pair v = IO::load(x + i * g.c + c0 + c, count);
        const Vec d0 = v.first - k.first, d1 = v.second - k.second;
        s1 = {s1.first + d0, s1.second + d1};
        s2 = {at::vec::fmadd(d0, d0, s2.first), at::vec::fmadd(d1, d1, s2.second)};
      }
      IO::store_acc(sum.data() + c, s1, count);
      IO::store_acc(sum_sq.data() + c, s2, count);
    });
    for (int64_t c = 0; c < width; ++c) {
      const double d_mean = double(sum[c]) / double(nr);
      const WelfordStats<double> chunk{double(shift[c]) + d_mean,
                                       double(sum_sq[c]) - double(sum[c]) * d_mean, double(nr)};
      total[c] = welford_merge(total[c], chunk);
      // The next chunk is shifted by the mean so far; an Inf mean (an Inf in the data) would
      // turn every later deviation into NaN, so the shift keeps its last finite value.
      if (std::isfinite(total[c].mean)) shift[c] = acc_t(total[c].mean);
    }
  }
  std::copy(total.begin(), total.end(), out + c0);
}

// sum(dz) and sum(dz * (x - mean)) of rows [r0, r1) x channels [c0, c1), written to
// out[c0, c1); src gives dz (dy through the activation) and x.
template <typename scalar_t, typename Act>
void tile_grad_sums(const TileGrad<scalar_t, Act>& src, const Geometry& g,
                    const at::opmath_type<scalar_t>* mean, int64_t r0, int64_t r1, int64_t c0,
                    int64_t c1, GradSums* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Pair = typename IO::Pair;
  const int64_t width = c1 - c0;
  const int64_t chunk_rows = std::clamp<int64_t>(kRowChunk / width, 1, kMaxChunkRows);
  std::vector<acc_t> sum(width), dot(width);  // indexed by channel - c0
  for (int64_t c = c0; c < c1; ++c) out[c] = GradSums{};
  for (int64_t r = r0; r < r1; r += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, r1 - r);
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(dot.begin(), dot.end(), acc_t(0));
    for_each_block_step<scalar_t>(r, r + nr, 0, width, [&](int64_t rb, int64_t re, int64_t c,
                                                           auto count) {
      const Pair m = IO::load_acc(mean + c0 + c, count);
      Pair s = IO::load_acc(sum.data() + c, count), t = IO::load_acc(dot.data() + c, count);
      for (int64_t i = rb; i < re; ++i) {
        Pair gv, xv;
        src.load(i * g.c + c0 + c, c0 + c, count, gv, xv);
        s = {s.first + gv.first, s.second + gv.second};
        t = {at::vec::fmadd(gv.first, xv.first - m.first, t.first),
             at::vec::fmadd(gv.second, xv.second - m.second, t.second)};
      }
      IO::store_acc(sum.data() + c, s, count);
      IO::store_acc(dot.data() + c, t, count);
    });
    for (int64_t c = 0; c < width; ++c) out[c0 + c].add({double(sum[c]), double(dot[c])});
  }
}

// dx = dz * k_dy[c] + (x - mean[c]) * k_x[c] + k_c[c] (when dx is given) and dres = dz (when
// dres is given) over rows [r0, r1) x channels [c0, c1), row after row.
template <typename scalar_t, typename Act>
void act_grad_input_tile(scalar_t* dx, scalar_t* dres, const TileGrad<scalar_t, Act>& src,
                         const Coeffs<at::opmath_type<scalar_t>>& k, int64_t C, int64_t r0,
                         int64_t r1, int64_t c0, int64_t c1) {
  using IO = VecIO<scalar_t>;
  using Pair = typename IO::Pair;
  const auto step = [&](int64_t p, int64_t c, auto count) CBN_CPU_ALWAYS_INLINE {
    Pair g, xv;
    src.load(p, c, count, g, xv);
    if (dres) IO::store(dres + p, g, count);
    if (!dx) return;
    const Pair ka = IO::load_acc(k.ka + c, count), kc = IO::load_acc(k.kc + c, count);
    const Pair m = IO::load_acc(k.shift + c, count), kb = IO::load_acc(k.kb + c, count);
    const Pair t{at::vec::fmadd(xv.first - m.first, kb.first, kc.first),
                 at::vec::fmadd(xv.second - m.second, kb.second, kc.second)};
    IO::store(dx + p,
              Pair{at::vec::fmadd(g.first, ka.first, t.first),
                   at::vec::fmadd(g.second, ka.second, t.second)},
              count);
  };
  for (int64_t r = r0; r < r1; ++r) {
    int64_t c = c0;
    for (; c + IO::kStep <= c1; c += IO::kStep) step(r * C + c, c, std::true_type{});
    if (c < c1) step(r * C + c, c, c1 - c);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace custom_bn::cpu
