// Arithmetic of the CPU batch-norm kernels. The build compiles this file once per
// instruction-set level (kernels/cpu/cpu_capabilities.txt): CPU_CAPABILITY names the level, its
// flags make at::vec use that vector width, and everything lands in
// custom_bn::cpu::<CPU_CAPABILITY>. The operator (batch_norm_cpu.cpp) picks one at run time.
//
// Layouts (kernels/common/geometry.h):
//  - contiguous (N, C, *): N*C runs of hw contiguous values; run r holds channel r % C.
//  - channels-last (and any input with hw == 1): R = N*hw rows of C contiguous values.
//
// Memory traffic is what these kernels spend, so the passes over the tensor are counted:
//  - contiguous, training: when the tensors exceed the cache and the channels spread evenly
//    over the threads, one task owns whole channels and normalizes (or, backward, computes dx
//    for) each channel right after its reduction, while the channel is still cached: one pass
//    from memory. Otherwise (tensors that fit in the cache; C = 1, 3, ... with large planes)
//    the runs are cut into pieces so that every thread has work; the pieces' partial results
//    are merged, then a second, elementwise pass follows, both in memory order.
//  - channels-last, training: a reduction pass over (row range x channel block) tiles, whose
//    partial results are merged per channel, then an elementwise pass: the statistics need
//    every row before the first output can be written.
//  - evaluation: one elementwise pass.
// Elementwise passes split evenly over the threads whatever the shape: the flat element range
// (contiguous), tiles of 16 rows x at most 1024 channels (channels-last). Reductions accumulate
// cache-sized chunks in the accumulation type and merge chunks in double with Chan's formula
// (kernels/common/welford.h): contiguous chunks with the corrected two-pass formula,
// channels-last chunks in one pass over values shifted by the tile's running mean. Long or
// large-mean channels thus neither lose precision nor form E[x^2] - E[x]^2. Partial results
// are indexed by task, not by thread, so a result does not depend on which thread ran what.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "batch_norm_kernel.h"
#include "common/batch_norm_math.h"
#include "common/welford.h"

#ifndef CPU_CAPABILITY
#error "batch_norm_kernel.cpp is compiled once per CPU_CAPABILITY (see kernels/cpu/cpu_capabilities.txt)"
#endif
#include "channels_last.h"
#include "contiguous.h"

#define CUSTOM_BN_STRINGIFY_(x) #x
#define CUSTOM_BN_STRINGIFY(x) CUSTOM_BN_STRINGIFY_(x)

namespace custom_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Calls tile(r0, r1, c0, c1) (channels-last: rows x channels) or run(p, len, c) (contiguous:
// flat offset, length, channel) over the whole tensor, split evenly over the threads: the
// driver of every elementwise pass.
template <typename Tile, typename Run>
void parallel_elementwise(const Geometry& g, const Tile& tile, const Run& run) {
  if (g.layout == Layout::kChannelsLast) {
    // Tasks: blocks of kBlockRows rows x blocks of at most kMaxBlockChannels channels.
    const auto [col_blocks, block_channels] = channel_blocks(g);
    const int64_t row_blocks = ceil_div(g.rows(), kBlockRows);
    const int64_t grain = std::max<int64_t>(1, kGrain / (kBlockRows * block_channels));
    at::parallel_for(0, row_blocks * col_blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = (t / col_blocks) * kBlockRows;
        const int64_t c0 = (t % col_blocks) * block_channels;
        tile(r0, std::min(g.rows(), r0 + kBlockRows), c0, std::min(g.c, c0 + block_channels));
      }
    });
  } else {
    at::parallel_for(0, g.n * g.c * g.hw, kGrain, [&](int64_t begin, int64_t end) {
      // Runs follow each other channel by channel: count c along instead of dividing per run.
      int64_t c = (begin / g.hw) % g.c;
      for_each_run_piece(begin, end, g.hw, [&](int64_t run_index, int64_t off, int64_t len) {
        run(run_index * g.hw + off, len, c);
        if (off + len == g.hw && ++c == g.c) c = 0;
      });
    });
  }
}

// out = act(a * ka + (b - shift) * kb + kc) over the whole tensor (the b term only when b is
// given; without shift/kb it is b + kc).
template <typename scalar_t, typename acc_t, typename Act>
void elementwise(const Geometry& g, scalar_t* out, const scalar_t* a, const scalar_t* b,
                 const Coeffs<acc_t>& k, const Act& act) {
  parallel_elementwise(
      g,
      [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        affine_tile(out, a, b, k, g.c, r0, r1, c0, c1, act);
      },
      [&](int64_t p, int64_t len, int64_t c) {
        affine_run(out + p, a + p, b ? b + p : nullptr, k.ka[c], k.kc[c],
                   k.shift ? k.shift[c] : acc_t(0), k.kb ? k.kb[c] : acc_t(1), len, act);
      });
}

// ------------------------------------------------------------------ operators

template <typename acc_t>
void fold_forward_coeffs(const ForwardArgs& a, int64_t c, acc_t* alpha, acc_t* beta) {
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const acc_t* b = static_cast<const acc_t*>(a.bias);
  const auto k = fold_affine(static_cast<const acc_t*>(a.mean)[c],
                             static_cast<const acc_t*>(a.invstd)[c], w ? w[c] : acc_t(1),
                             b ? b[c] : acc_t(0));
  alpha[c] = k.alpha;
  beta[c] = k.beta;
}

// Stores channel c's batch statistics and folds them into its coefficients.
template <typename acc_t>
void store_batch_stats(const ForwardArgs& a, int64_t c, const WelfordStats<double>& s,
                       acc_t* alpha, acc_t* beta) {
  // Rounding can leave a constant channel's M2 a hair below 0; NaN must stay NaN, as in torch.
  const double var = s.m2 < 0 ? 0.0 : s.m2 / s.count;
  a.var[c] = var;
  static_cast<acc_t*>(a.mean)[c] = acc_t(s.mean);
  static_cast<acc_t*>(a.invstd)[c] = acc_t(1.0 / std::sqrt(var + a.eps));
  fold_forward_coeffs(a, c, alpha, beta);
}

// Per-channel statistics of the whole tensor, reduced in memory order: tiles of rows x channels
// (channels-last) or pieces of runs (contiguous), merged per channel in a fixed order.
template <typename scalar_t>
std::vector<WelfordStats<double>> batch_stats(const Geometry& g, const scalar_t* x) {
  std::vector<WelfordStats<double>> stats(g.c);
  if (g.layout == Layout::kChannelsLast) {
    const RowTiles t = row_tiles(g);
    std::vector<WelfordStats<double>> partial(t.ranges * g.c);
    for_each_tile(g, t, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t range) {
      tile_stats(x, g, r0, r1, c0, c1, partial.data() + range * g.c);
    });
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t range = 0; range < t.ranges; ++range) {
        stats[c] = welford_merge(stats[c], partial[range * g.c + c]);
      }
    }
  } else {
    const RunPieces p = run_pieces(g);
    std::vector<WelfordStats<double>> partial(p.tasks);
    for_each_piece(g, p, [&](int64_t task, int64_t off, int64_t len, int64_t) {
      partial[task] = run_stats(x + off, len);
    });
    for (int64_t c = 0; c < g.c; ++c) {
      for_channel_pieces(g, p, partial, c,
                         [&](const auto& part) { stats[c] = welford_merge(stats[c], part); });
    }
  }
  return stats;
}

template <typename scalar_t, typename Act>
void forward_typed(const ForwardArgs& a, const Act& act) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* r = static_cast<const scalar_t*>(a.residual);
  auto* y = static_cast<scalar_t*>(a.y);
  std::vector<acc_t> alpha(g.c), beta(g.c);
  const Coeffs<acc_t> k{alpha.data(), beta.data()};

  if (!a.training) {
    const auto* rm = static_cast<const acc_t*>(a.running_mean);
    const auto* rv = static_cast<const acc_t*>(a.running_var);
    for (int64_t c = 0; c < g.c; ++c) {
      static_cast<acc_t*>(a.mean)[c] = rm[c];
      static_cast<acc_t*>(a.invstd)[c] = acc_t(1) / std::sqrt(rv[c] + acc_t(a.eps));
      fold_forward_coeffs(a, c, alpha.data(), beta.data());
    }
  } else if (whole_channel_tasks(g, (r ? 2 : 1) * g.n * g.c * g.hw * int64_t(sizeof(scalar_t)))) {
    at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        WelfordStats<double> s;
        for (int64_t n = 0; n < g.n; ++n) {
          s = welford_merge(s, run_stats(x + (n * g.c + c) * g.hw, g.hw));
        }
        store_batch_stats(a, c, s, alpha.data(), beta.data());
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t p = (n * g.c + c) * g.hw;
          affine_run(y + p, x + p, r ? r + p : nullptr, alpha[c], beta[c], acc_t(0), acc_t(1),
                     g.hw, act);
        }
      }
    });
    return;
  } else {
    const std::vector<WelfordStats<double>> stats = batch_stats(g, x);
    for (int64_t c = 0; c < g.c; ++c) store_batch_stats(a, c, stats[c], alpha.data(), beta.data());
  }
  elementwise(g, y, x, r, k, act);
}

// Per-channel sums of the backward.
using ChannelSums = std::vector<GradSums>;

template <typename acc_t>
BackwardCoeffs<acc_t> fold_backward_coeffs(const BackwardArgs& a, const ChannelSums& sums,
                                           int64_t c) {
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const int64_t count = a.given_sums ? a.count : a.g.count();
  return fold_backward(static_cast<const acc_t*>(a.mean)[c],
                       static_cast<const acc_t*>(a.invstd)[c], w ? w[c] : acc_t(1),
                       acc_t(sums[c].dy), acc_t(sums[c].dot), acc_t(count), a.training);
}

// What the backward passes read: dy (through the activation, recomputing z from x, residual
// and the forward's coefficients alpha/beta) and x. In the in-place mode (Act::kFromOutput) x
// is the output, and what the passes see as x is x - mean (the caller passes a zero mean).
template <typename scalar_t, typename Act>
struct GradSource {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* r;
  std::vector<acc_t> alpha, beta;  // empty for the identity
  const Act& act;

  GradSource(const BackwardArgs& a, const Act& activation)
      : dy(static_cast<const scalar_t*>(a.dy)),
        x(static_cast<const scalar_t*>(a.x)),
        r(static_cast<const scalar_t*>(a.residual)),
        act(activation) {
    if constexpr (Act::kIdentity) return;
    const acc_t* w = static_cast<const acc_t*>(a.weight);
    const acc_t* b = static_cast<const acc_t*>(a.bias);
    alpha.resize(a.g.c);
    beta.resize(a.g.c);
    for (int64_t c = 0; c < a.g.c; ++c) {
      const acc_t invstd = static_cast<const acc_t*>(a.invstd)[c];
      const acc_t wc = w ? w[c] : acc_t(1), bc = b ? b[c] : acc_t(0);
      // The forward's fold_forward_coeffs, from the same values: the same z, bit for bit. In
      // the in-place mode the inverse map, from z to x - mean.
      const auto k = Act::kFromOutput
                         ? fold_inverse_affine(invstd, wc, bc)
                         : fold_affine(static_cast<const acc_t*>(a.mean)[c], invstd, wc, bc);
      alpha[c] = k.alpha;
      beta[c] = k.beta;
    }
  }

  // Channel c's values from flat offset p (contiguous layout).
  RunGrad<scalar_t, Act> run(int64_t p, int64_t c) const {
    using Vec = typename RunGrad<scalar_t, Act>::Vec;
    const bool id = Act::kIdentity;
    return {dy + p, x + p, r ? r + p : nullptr, Vec(id ? acc_t(0) : alpha[c]),
            Vec(id ? acc_t(0) : beta[c]), act};
  }
  TileGrad<scalar_t, Act> tile() const { return {dy, x, r, alpha.data(), beta.data(), act}; }
};

// grad_input (and grad_residual) of len values of channel c from flat offset p (contiguous).
template <typename scalar_t, typename Act>
void grad_input_run(const BackwardArgs& a, const GradSource<scalar_t, Act>& src, int64_t p,
                    int64_t c, int64_t len, const BackwardCoeffs<at::opmath_type<scalar_t>>& k) {
  auto* dx = static_cast<scalar_t*>(a.dx);
  auto* dres = static_cast<scalar_t*>(a.dres);
  if (Act::kIdentity && !dres) {
    affine_run(dx + p, src.dy + p, a.training ? src.x + p : nullptr, k.k_dy, k.k_c, k.mean,
               k.k_x, len);
  } else {
    act_grad_input_run(dx ? dx + p : nullptr, dres ? dres + p : nullptr, src.run(p, c), len, k);
  }
}

// The reductions of the backward into sums; when fuse_second_pass allows it, also the second
// pass (grad_input, grad_residual) of each channel right after its sums (contiguous layout,
// whole channels per task). Returns whether the second pass was done.
template <typename scalar_t, typename Act>
bool backward_sums(const BackwardArgs& a, const GradSource<scalar_t, Act>& src,
                   ChannelSums& sums, bool fuse_second_pass) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  auto* dx = static_cast<scalar_t*>(a.dx);
  auto* dres = static_cast<scalar_t*>(a.dres);
  const auto* mean = static_cast<const acc_t*>(a.mean);

  if (g.layout == Layout::kChannelsLast) {
    const RowTiles t = row_tiles(g);
    std::vector<GradSums> partial(t.ranges * g.c);
    const auto tile = src.tile();
    for_each_tile(g, t, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t range) {
      tile_grad_sums(tile, g, mean, r0, r1, c0, c1, partial.data() + range * g.c);
    });
    for (int64_t c = 0; c < g.c; ++c) {
      GradSums s;
      for (int64_t range = 0; range < t.ranges; ++range) s.add(partial[range * g.c + c]);
      sums[c] = s;
    }
    return false;
  }
  const int64_t tensors = 2 + (src.r ? 1 : 0);
  if (whole_channel_tasks(g, tensors * g.n * g.c * g.hw * int64_t(sizeof(scalar_t)))) {
    // Sums, then grad_input of the same channel while x and dy are cached.
    at::parallel_for(0, g.c, channel_grain(g), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        GradSums s;
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t p = (n * g.c + c) * g.hw;
          s.add(run_grad_sums(src.run(p, c), g.hw, mean[c]));
        }
        sums[c] = s;
        if (!fuse_second_pass || (!dx && !dres)) continue;
        const auto k = fold_backward_coeffs<acc_t>(a, sums, c);
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t p = (n * g.c + c) * g.hw;
          grad_input_run(a, src, p, c, g.hw, k);
        }
      }
    });
    return fuse_second_pass && (dx || dres);
  }
  const RunPieces p = run_pieces(g);
  std::vector<GradSums> partial(p.tasks);
  for_each_piece(g, p, [&](int64_t task, int64_t off, int64_t len, int64_t c) {
    partial[task] = run_grad_sums(src.run(off, c), len, mean[c]);
  });
  for (int64_t c = 0; c < g.c; ++c) {
    GradSums s;
    for_channel_pieces(g, p, partial, c, [&](const GradSums& part) { s.add(part); });
    sums[c] = s;
  }
  return false;
}

template <typename scalar_t, typename Act>
void backward_typed(const BackwardArgs& a, const Act& act) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  auto* dx = static_cast<scalar_t*>(a.dx);
  auto* dres = static_cast<scalar_t*>(a.dres);
  const GradSource<scalar_t, Act> src(a, act);
  // The sums feed grad_weight/grad_bias and, in training, grad_input: this batch's, or those of
  // the whole distributed batch when given.
  const bool need_sums =
      !a.given_sums && (a.grad_weight || a.grad_bias || a.sums_out || (a.training && dx));
  ChannelSums sums(g.c);  // zero unless computed
  if (a.given_sums) {
    for (int64_t c = 0; c < g.c; ++c) sums[c] = {a.given_sums[c], a.given_sums[g.c + c]};
  }
  const bool second_pass_done =
      need_sums && backward_sums(a, src, sums, /*fuse_second_pass=*/!a.sums_out);
  for (int64_t c = 0; a.sums_out && c < g.c; ++c) {
    a.sums_out[c] = sums[c].dy;
    a.sums_out[g.c + c] = sums[c].dot;
  }

  if ((dx || dres) && !second_pass_done) {
    std::vector<acc_t> k_dy(g.c), k_x(g.c), k_c(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      const auto k = fold_backward_coeffs<acc_t>(a, sums, c);
      k_dy[c] = k.k_dy;
      k_x[c] = k.k_x;
      k_c[c] = k.k_c;
    }
    const auto* mean = static_cast<const acc_t*>(a.mean);
    const Coeffs<acc_t> k{k_dy.data(), k_c.data(), mean, k_x.data()};
    if (Act::kIdentity && !dres) {
      // Plain batch norm: the affine map of dy (and, in training, x).
      elementwise(g, dx, src.dy, a.training ? src.x : nullptr,
                  a.training ? k : Coeffs<acc_t>{k_dy.data(), k_c.data()},
                  VecActivation<Activation::kIdentity, acc_t>{});
    } else {
      const auto tile = src.tile();
      parallel_elementwise(
          g,
          [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
            act_grad_input_tile(dx, dres, tile, k, g.c, r0, r1, c0, c1);
          },
          [&](int64_t p, int64_t len, int64_t c) {
            grad_input_run(a, src, p, c, len,
                           BackwardCoeffs<acc_t>{k_dy[c], k_x[c], k_c[c], mean[c]});
          });
    }
  }
  const auto* invstd = static_cast<const acc_t*>(a.invstd);
  for (int64_t c = 0; c < g.c; ++c) {
    if (a.grad_weight) static_cast<acc_t*>(a.grad_weight)[c] = acc_t(sums[c].dot * invstd[c]);
    if (a.grad_bias) static_cast<acc_t*>(a.grad_bias)[c] = acc_t(sums[c].dy);
  }
}

void forward(const ForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "custom_bn_forward_cpu", [&] {
    with_activation<at::opmath_type<scalar_t>>(
        a.activation, a.activation_param, [&](const auto& act) { forward_typed<scalar_t>(a, act); });
  });
}

void stats(const StatsArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "custom_bn_stats_cpu", [&] {
    const auto stats = batch_stats(a.g, static_cast<const scalar_t*>(a.x));
    for (int64_t c = 0; c < a.g.c; ++c) {
      a.mean[c] = stats[c].count > 0 ? stats[c].mean : 0.0;
      a.var[c] = stats[c].count > 0 ? std::max(stats[c].m2, 0.0) / stats[c].count : 0.0;
    }
  });
}

void backward(const BackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "custom_bn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = [&](const auto& act) { backward_typed<scalar_t>(a, act); };
    if (!a.from_output) return with_activation<acc_t>(a.activation, a.activation_param, run);
    // The passes see x - mean: a zero mean keeps every formula of the ordinary backward.
    const std::vector<acc_t> zero_mean(a.g.c, acc_t(0));
    BackwardArgs centred = a;
    centred.mean = zero_mean.data();
    with_inverse_activation<acc_t>(a.activation, a.activation_param, [&](const auto& act) {
      backward_typed<scalar_t>(centred, act);
    });
  });
}

}  // namespace

#ifdef _OPENMP
constexpr bool kOpenMP = true;
#else
constexpr bool kOpenMP = false;
#endif

const Kernels kernels = {&forward, &backward, &stats, CUSTOM_BN_STRINGIFY(CPU_CAPABILITY),
                         kOpenMP};

}  // namespace CPU_CAPABILITY
}  // namespace custom_bn::cpu
