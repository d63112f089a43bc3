#pragma once
// CUDA kernel bodies of custom_bn::batch_norm_act_forward / batch_norm_act_backward (the plain
// batch_norm_forward / batch_norm_backward are their identity, residual-free case, and the
// in-place batch_norm_act_inplace_forward / _backward their output-overwriting mode). Launch shapes
// come from launch_config.h, the launch sequence from batch_norm_launch.h. Only
// device_primitives.cuh and kernels/common are used, so the CPU emulator of tests/cpp/emulator
// runs these same bodies.
//
// Forward (training): collect_stats (Welford per channel, last block merges and finalizes:
// save_mean, save_invstd, running stats) then transform (y = act(x * alpha + (residual + beta))).
// Forward (eval): eval_stats (per channel, from the running stats) then transform.
// Backward: backward_reduce (sum dz, sum dz * (x - mean) with dz = dy * act'(z); last block
// writes them and grad_weight / grad_bias) then backward_elementwise (dx = dz * k_dy +
// (x - mean) * k_x + k_c, grad_residual = dz). The in-place mode runs the same kernels on the
// output y instead of x (transform writes y over x; the backward recovers z and x - mean from y).
// SyncBatchNorm's pieces run one kernel each: batch_norm_stats collect_stats (mean and biased
// variance), batch_norm_backward_reduce backward_reduce, batch_norm_backward_elemt
// backward_elementwise with the whole batch's sums and count.
//
// The activation is a template parameter (kAct): the identity compiles to the plain batch norm,
// and no kernel switches on the activation per element. So is the backward's source (x, or the
// in-place mode's y). The residual is a nullable pointer.
//
// Every reduction splits a channel over grid.y blocks. Each block writes its partial result to
// a workspace and bumps the channel's (or channel tile's) counter; the block that arrives last
// merges the partials. No block ever waits for another, so any grid fits on any device and the
// emulator can run blocks one after another.
#include "../common/activation.h"
#include "../common/batch_norm_math.h"
#include "../common/welford.h"
#include "device_primitives.cuh"

#include <cstdint>

namespace custom_bn {
namespace cuda_kernels {
inline namespace CBN_KERNEL_NAMESPACE {

// ---------------------------------------------------------------------------------------------
// Reduction values: how a thread's partial result is combined, moved through a warp shuffle
// and stored field by field (structure of arrays, `stride` apart) in shared or global scratch.

template <typename acc_t_>
struct WelfordOp {
  using acc_t = acc_t_;
  using value_t = WelfordStats<acc_t>;

  CBN_DEVICE static value_t identity() { return value_t{}; }
  CBN_DEVICE static value_t combine(const value_t& a, const value_t& b) {
    return welford_merge(a, b);
  }
  CBN_DEVICE static value_t shfl_xor(const value_t& v, int lane_mask) {
    value_t r;
    r.mean = dev::shfl_xor(dev::kFullWarpMask, v.mean, lane_mask);
    r.m2 = dev::shfl_xor(dev::kFullWarpMask, v.m2, lane_mask);
    r.count = dev::shfl_xor(dev::kFullWarpMask, v.count, lane_mask);
    return r;
  }
  CBN_DEVICE static void store(acc_t* buf, int64_t stride, int64_t i, const value_t& v) {
    buf[i] = v.mean;
    buf[stride + i] = v.m2;
    buf[2 * stride + i] = v.count;
  }
  CBN_DEVICE static value_t load(const acc_t* buf, int64_t stride, int64_t i) {
    value_t v;
    v.mean = buf[i];
    v.m2 = buf[stride + i];
    v.count = buf[2 * stride + i];
    return v;
  }
};

// dy is the gradient at the pre-activation z here (dz = dy * act'(z)); for the identity, the
// output's gradient itself.
template <typename acc_t>
struct GradSums {
  acc_t sum_dy = acc_t(0);
  acc_t sum_dy_xmu = acc_t(0);  // sum of dy * (x - mean)
};

template <typename acc_t_>
struct GradSumsOp {
  using acc_t = acc_t_;
  using value_t = GradSums<acc_t>;

  CBN_DEVICE static value_t identity() { return value_t{}; }
  CBN_DEVICE static value_t combine(const value_t& a, const value_t& b) {
    value_t r;
    r.sum_dy = a.sum_dy + b.sum_dy;
    r.sum_dy_xmu = a.sum_dy_xmu + b.sum_dy_xmu;
    return r;
  }
  CBN_DEVICE static value_t shfl_xor(const value_t& v, int lane_mask) {
    value_t r;
    r.sum_dy = dev::shfl_xor(dev::kFullWarpMask, v.sum_dy, lane_mask);
    r.sum_dy_xmu = dev::shfl_xor(dev::kFullWarpMask, v.sum_dy_xmu, lane_mask);
    return r;
  }
  CBN_DEVICE static void store(acc_t* buf, int64_t stride, int64_t i, const value_t& v) {
    buf[i] = v.sum_dy;
    buf[stride + i] = v.sum_dy_xmu;
  }
  CBN_DEVICE static value_t load(const acc_t* buf, int64_t stride, int64_t i) {
    value_t v;
    v.sum_dy = buf[i];
    v.sum_dy_xmu = buf[stride + i];
    return v;
  }
};

// ---------------------------------------------------------------------------------------------
// Block-level building blocks.

// Butterfly: every lane ends with the warp's result, so no lane needs a broadcast afterwards.
template <typename Op>
CBN_DEVICE typename Op::value_t warp_reduce(typename Op::value_t v) {
  for (int lane_mask = dev::kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
    v = Op::combine(v, Op::shfl_xor(v, lane_mask));
  }
  return v;
}

// Reduces over all threads of the block; the result is valid in warp 0. The block must consist
// of whole warps (launch_config.h guarantees it). scratch: one entry per warp and field.
template <typename Op>
CBN_DEVICE typename Op::value_t block_reduce(typename Op::value_t v,
                                             typename Op::acc_t* scratch) {
  const int lane = dev::lane_idx();
  const int warp = dev::warp_idx();
  const int num_warps = dev::block_threads() / dev::kWarpSize;
  v = warp_reduce<Op>(v);
  // A previous reduction in this block may still be reading the scratch.
  dev::sync_threads();
  if (lane == 0) Op::store(scratch, num_warps, warp, v);
  dev::sync_threads();
  if (warp == 0) {
    v = lane < num_warps ? Op::load(scratch, num_warps, lane) : Op::identity();
    v = warp_reduce<Op>(v);
  }
  return v;
}

// Reduces over threadIdx.y separately for each threadIdx.x (a channel in the channels-last
// kernels); the result is valid where threadIdx.y == 0. Works for any block.y: each step folds
// the upper half of the live rows onto the lower half. scratch: one entry per thread and field.
template <typename Op>
CBN_DEVICE typename Op::value_t column_reduce(typename Op::value_t v,
                                              typename Op::acc_t* scratch) {
  const int tx = dev::thread_idx_x();
  const int ty = dev::thread_idx_y();
  const int bx = dev::block_dim_x();
  const int stride = dev::block_threads();
  const int slot = ty * bx + tx;
  dev::sync_threads();
  Op::store(scratch, stride, slot, v);
  dev::sync_threads();
  for (int live = dev::block_dim_y(); live > 1;) {
    const int half = (live + 1) / 2;
    if (ty < live - half) {
      v = Op::combine(v, Op::load(scratch, stride, slot + half * bx));
      Op::store(scratch, stride, slot, v);
    }
    dev::sync_threads();
    live = half;
  }
  return v;
}

// Last-block-done: called by every thread of a block after it wrote its partial result; returns
// true (in all threads) only in the block that arrives last of `expected` blocks on *counter.
// That block then sees every other block's partial.
CBN_DEVICE bool arrive_last(unsigned* counter, int expected) {
  CBN_STATIC_SHARED(int, arrived_last, 1);
  dev::thread_fence();  // release this thread's partial before the block is counted
  dev::sync_threads();
  if (dev::linear_thread_idx() == 0) {
    const unsigned before = dev::atomic_add(counter, 1u);
    arrived_last[0] = before == static_cast<unsigned>(expected - 1) ? 1 : 0;
  }
  dev::sync_threads();
  const bool last = arrived_last[0] != 0;
  if (last) dev::thread_fence();  // acquire side: read the partials only after the count
  return last;
}

// ---------------------------------------------------------------------------------------------
// Iteration over the values of one channel (contiguous) or one channel per thread
// (channels-last) that belong to this block and thread.

// Contiguous: block (blockIdx.x = channel c, blockIdx.y = split) walks n with threadIdx.y and
// the splits_n splits along N, and HW with threadIdx.x and the remaining splits along HW, so
// consecutive threads read consecutive addresses and no element index is ever divided.
template <typename index_t, typename F>
CBN_DEVICE void for_each_contiguous(index_t N, index_t C, index_t HW, int splits_n, F&& f) {
  const index_t c = dev::block_idx_x();
  const int split = dev::block_idx_y();
  const int splits_s = dev::grid_dim_y() / splits_n;
  const index_t n_begin = index_t(split % splits_n) * dev::block_dim_y() + dev::thread_idx_y();
  const index_t n_step = index_t(splits_n) * dev::block_dim_y();
  const index_t s_begin = index_t(split / splits_n) * dev::block_dim_x() + dev::thread_idx_x();
  const index_t s_step = index_t(splits_s) * dev::block_dim_x();
  for (index_t n = n_begin; n < N; n += n_step) {
    const index_t base = (n * C + c) * HW;
    for (index_t s = s_begin; s < HW; s += s_step) f(base + s);
  }
}

// Channels-last: thread column c = blockIdx.x * blockDim.x + threadIdx.x, rows strided by
// blockDim.y * gridDim.y. Callers skip c >= C.
template <typename index_t, typename F>
CBN_DEVICE void for_each_channels_last(index_t rows, index_t C, index_t c, F&& f) {
  const index_t r_step = index_t(dev::grid_dim_y()) * dev::block_dim_y();
  for (index_t r = index_t(dev::block_idx_y()) * dev::block_dim_y() + dev::thread_idx_y();
       r < rows; r += r_step) {
    f(r * C + c);
  }
}

template <typename index_t>
CBN_DEVICE index_t channels_last_channel() {
  return index_t(dev::block_idx_x()) * dev::block_dim_x() + dev::thread_idx_x();
}

// ---------------------------------------------------------------------------------------------
// Generic split reductions. A Policy supplies:
//   Op                                 the reduction value (WelfordOp / GradSumsOp)
//   Channel channel(c)                 per-channel constants the accumulation needs
//   accumulate(value&, Channel, off)   folds the element at offset `off` in
//   finalize(c, value)                 consumes the channel's total (one thread per channel)
// partial: Op fields of partial_slots() values each; counters: zeroed, one per block column.

template <typename Policy, typename index_t>
CBN_DEVICE void reduce_contiguous(const Policy& p, index_t N, index_t C, index_t HW, int splits_n,
                                  typename Policy::Op::acc_t* partial, unsigned* counters) {
  using Op = typename Policy::Op;
  using acc_t = typename Op::acc_t;
  const index_t c = dev::block_idx_x();
  const int split = dev::block_idx_y();
  const int splits = dev::grid_dim_y();
  const int tid = dev::linear_thread_idx();
  acc_t* scratch = dev::dynamic_shared<acc_t>();

  const auto channel = p.channel(c);
  typename Op::value_t v = Op::identity();
  for_each_contiguous(N, C, HW, splits_n, [&](index_t off) { p.accumulate(v, channel, off); });
  v = block_reduce<Op>(v, scratch);

  // Partials of channel c are adjacent, so the merging block reads them contiguously.
  const int64_t slots = int64_t(C) * splits;
  if (tid == 0) Op::store(partial, slots, int64_t(c) * splits + split, v);
  if (!arrive_last(counters + c, splits)) return;

  v = Op::identity();
  for (int j = tid; j < splits; j += dev::block_threads()) {
    v = Op::combine(v, Op::load(partial, slots, int64_t(c) * splits + j));
  }
  v = block_reduce<Op>(v, scratch);
  if (tid == 0) p.finalize(c, v);
}

template <typename Policy, typename index_t>
CBN_DEVICE void reduce_channels_last(const Policy& p, index_t rows, index_t C,
                                     typename Policy::Op::acc_t* partial, unsigned* counters) {
  using Op = typename Policy::Op;
  using acc_t = typename Op::acc_t;
  const index_t c = channels_last_channel<index_t>();
  const bool in_range = c < C;
  const int ty = dev::thread_idx_y();
  const int split = dev::block_idx_y();
  const int splits = dev::grid_dim_y();
  acc_t* scratch = dev::dynamic_shared<acc_t>();

  typename Op::value_t v = Op::identity();
  if (in_range) {
    const auto channel = p.channel(c);
    for_each_channels_last(rows, C, c, [&](index_t off) { p.accumulate(v, channel, off); });
  }
  v = column_reduce<Op>(v, scratch);

  // Partials of one split are adjacent along channels, so both the writes here and the reads
  // of the merging block are coalesced across threadIdx.x.
  const int64_t slots = int64_t(C) * splits;
  if (ty == 0 && in_range) Op::store(partial, slots, int64_t(split) * C + c, v);
  if (!arrive_last(counters + dev::block_idx_x(), splits)) return;

  v = Op::identity();
  if (in_range) {
    for (int j = ty; j < splits; j += dev::block_dim_y()) {
      v = Op::combine(v, Op::load(partial, slots, int64_t(j) * C + c));
    }
  }
  v = column_reduce<Op>(v, scratch);
  if (ty == 0 && in_range) p.finalize(c, v);
}

template <typename param_t, typename acc_t>
CBN_DEVICE acc_t channel_value_or(const param_t* values, int64_t c, acc_t fallback) {
  return values != nullptr ? static_cast<acc_t>(values[c]) : fallback;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Batch statistics of the training forward, and of batch_norm_stats (SyncBatchNorm). The
// channel's total yields save_mean and the requested ones of save_invstd, the biased variance and
// the in-place running-stat update (running stats may be strided views).
template <typename scalar_t, typename param_t, typename acc_t>
struct CollectStats {
  using Op = WelfordOp<acc_t>;
  struct Channel {};

  const scalar_t* input;
  acc_t* save_mean;
  acc_t* save_invstd;  // null: not requested (batch_norm_stats)
  acc_t* save_var;     // null: not requested (the forward)
  param_t* running_mean;  // null: no running stats
  param_t* running_var;
  int64_t running_mean_stride;
  int64_t running_var_stride;
  acc_t momentum;
  acc_t eps;

  CBN_DEVICE Channel channel(int64_t) const { return {}; }

  template <typename index_t>
  CBN_DEVICE void accumulate(WelfordStats<acc_t>& s, Channel, index_t off) const {
    welford_push(s, static_cast<acc_t>(input[off]));
  }

  CBN_DEVICE void finalize(int64_t c, const WelfordStats<acc_t>& s) const {
    const acc_t var = s.m2 / s.count;
    save_mean[c] = s.mean;
    // Exactly the variance the forward normalizes with: not recoverable from invstd and eps.
    if (save_var != nullptr) save_var[c] = var;
    // Once per channel, so the exact reciprocal square root (not rsqrt's approximation) is cheap.
    if (save_invstd != nullptr) save_invstd[c] = acc_t(1) / dev::sqrt(var + eps);
    if (running_mean != nullptr) {
      param_t& rm = running_mean[c * running_mean_stride];
      param_t& rv = running_var[c * running_var_stride];
      rm = static_cast<param_t>(running_update(static_cast<acc_t>(rm), s.mean, momentum));
      rv = static_cast<param_t>(
          running_update(static_cast<acc_t>(rv), unbiased_variance(var, s.count), momentum));
    }
  }
};

template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_collect_stats_contiguous_kernel(
    CollectStats<scalar_t, param_t, acc_t> policy, index_t N, index_t C, index_t HW,
    int splits_n, acc_t* partial, unsigned* counters) {
  reduce_contiguous(policy, N, C, HW, splits_n, partial, counters);
}

template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_collect_stats_channels_last_kernel(
    CollectStats<scalar_t, param_t, acc_t> policy, index_t rows, index_t C, acc_t* partial,
    unsigned* counters) {
  reduce_channels_last(policy, rows, C, partial, counters);
}

// Evaluation statistics: save_mean = running_mean, save_invstd = 1 / sqrt(running_var + eps).
template <typename param_t, typename acc_t>
CBN_KERNEL void batch_norm_eval_stats_kernel(const param_t* running_mean,
                                             int64_t running_mean_stride,
                                             const param_t* running_var,
                                             int64_t running_var_stride, acc_t eps,
                                             acc_t* save_mean, acc_t* save_invstd, int64_t C) {
  const int64_t step = int64_t(dev::grid_dim_x()) * dev::block_dim_x();
  for (int64_t c = int64_t(dev::block_idx_x()) * dev::block_dim_x() + dev::thread_idx_x(); c < C;
       c += step) {
    save_mean[c] = static_cast<acc_t>(running_mean[c * running_mean_stride]);
    save_invstd[c] =
        acc_t(1) / dev::sqrt(static_cast<acc_t>(running_var[c * running_var_stride]) + eps);
  }
}

template <typename param_t, typename acc_t>
CBN_DEVICE AffineCoeffs<acc_t> forward_coeffs(int64_t c, const acc_t* mean, const acc_t* invstd,
                                              const param_t* weight, const param_t* bias) {
  return fold_affine(mean[c], invstd[c], channel_value_or(weight, c, acc_t(1)),
                     channel_value_or(bias, c, acc_t(0)));
}

// z = x * alpha + (residual + beta): the residual joins beta first, so that z stays one fused
// multiply-add per element. The forward and the backward's recomputation of z both call this one
// function, so z is bit for bit the same in both: relu's mask in the backward is the output's.
template <typename scalar_t, typename acc_t, typename index_t>
CBN_DEVICE acc_t pre_activation(const AffineCoeffs<acc_t>& k, acc_t x, const scalar_t* residual,
                                index_t off) {
  const acc_t shift = residual != nullptr ? static_cast<acc_t>(residual[off]) + k.beta : k.beta;
  return x * k.alpha + shift;
}

template <Activation kAct, typename scalar_t, typename acc_t, typename index_t>
CBN_DEVICE scalar_t forward_element(const AffineCoeffs<acc_t>& k, acc_t activation_param,
                                    const scalar_t* input, const scalar_t* residual,
                                    index_t off) {
  const acc_t z = pre_activation(k, static_cast<acc_t>(input[off]), residual, off);
  return static_cast<scalar_t>(activation_forward(kAct, activation_param, z));
}

// y = act(x * alpha + (residual + beta)) in acc_t, residual null for none. output may be input
// itself (the in-place mode): each element is read and then written by the same thread and by no
// other, so the pointers carry no __restrict__.
template <Activation kAct, typename scalar_t, typename param_t, typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_transform_contiguous_kernel(
    const scalar_t* input, const scalar_t* residual, scalar_t* output, const acc_t* mean,
    const acc_t* invstd, const param_t* weight, const param_t* bias, acc_t activation_param,
    index_t N, index_t C, index_t HW, int splits_n) {
  const auto k = forward_coeffs(dev::block_idx_x(), mean, invstd, weight, bias);
  for_each_contiguous(N, C, HW, splits_n, [&](index_t off) {
    output[off] = forward_element<kAct>(k, activation_param, input, residual, off);
  });
}

template <Activation kAct, typename scalar_t, typename param_t, typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_transform_channels_last_kernel(
    const scalar_t* input, const scalar_t* residual, scalar_t* output, const acc_t* mean,
    const acc_t* invstd, const param_t* weight, const param_t* bias, acc_t activation_param,
    index_t rows, index_t C) {
  const index_t c = channels_last_channel<index_t>();
  if (c >= C) return;  // no barrier below
  const auto k = forward_coeffs(c, mean, invstd, weight, bias);
  for_each_channels_last(rows, C, c, [&](index_t off) {
    output[off] = forward_element<kAct>(k, activation_param, input, residual, off);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

// What the backward reads besides dy. kInput: the forward's input x (and the residual), from
// which z is recomputed exactly as the forward computed it. kOutput, the in-place mode: the
// forward's output y, all that is left of x; z = act^-1(y), and x - mean = (z - b) / (w * invstd).
// Only the invertible activations (identity, leaky_relu and elu with a positive parameter, as
// csrc/checks.h admits them) are instantiated for kOutput.
enum class BackwardSource { kInput, kOutput };

// What the backward needs to recompute the forward's z (pre_activation) or to invert it: the
// affine parameters (alpha and beta are folded again from the saved statistics, as the forward
// folded them), the residual (null: none) and the activation's parameter. weight also scales dx.
template <typename scalar_t, typename param_t, typename acc_t>
struct EpilogueInputs {
  const param_t* weight;  // null: 1
  const param_t* bias;    // null: 0
  const scalar_t* residual;
  acc_t activation_param;
};

// One channel's reading of the saved value v (x or y, per kSource) of an element: the gradient
// at z, dz = dy * act'(z), and x - mean. Both backward passes are built from these two alone, so
// the source is the only difference between the two modes.
template <Activation kAct, BackwardSource kSource, typename scalar_t, typename acc_t>
struct ElementSource {
  acc_t mean;  // kInput
  // kInput: z = x * k.alpha + (residual + k.beta); unset for the identity, whose dz is dy (it
  // reads neither x nor the residual). kOutput: x - mean = z * k.alpha + k.beta.
  AffineCoeffs<acc_t> k;
  const scalar_t* residual;  // kInput
  acc_t activation_param;

  template <typename index_t>
  CBN_DEVICE acc_t grad(acc_t dy, acc_t v, index_t off) const {
    if constexpr (kAct == Activation::kIdentity) {
      return dy;
    } else if constexpr (kSource == BackwardSource::kOutput) {
      return activation_grad_from_output(kAct, activation_param, dy, v);
    } else {
      return activation_grad(kAct, activation_param, dy, pre_activation(k, v, residual, off));
    }
  }

  CBN_DEVICE acc_t centred(acc_t v) const {
    if constexpr (kSource == BackwardSource::kOutput) {
      return activation_inverse(kAct, activation_param, v) * k.alpha + k.beta;
    } else {
      return v - mean;
    }
  }
};

template <Activation kAct, BackwardSource kSource, typename scalar_t, typename param_t,
          typename acc_t>
CBN_DEVICE ElementSource<kAct, kSource, scalar_t, acc_t> element_source(
    int64_t c, const acc_t* mean, const acc_t* invstd,
    const EpilogueInputs<scalar_t, param_t, acc_t>& e) {
  if constexpr (kSource == BackwardSource::kOutput) {
    return {acc_t(0),
            fold_inverse_affine(invstd[c], channel_value_or(e.weight, c, acc_t(1)),
                                channel_value_or(e.bias, c, acc_t(0))),
            nullptr, e.activation_param};
  } else if constexpr (kAct == Activation::kIdentity) {
    return {mean[c], {}, nullptr, e.activation_param};
  } else {
    return {mean[c], forward_coeffs(c, mean, invstd, e.weight, e.bias), e.residual,
            e.activation_param};
  }
}

// Per-channel sums of the backward, over dz. The channel's total goes to sum_dy / sum_dy_xmu
// (read by the elementwise kernel) and, when requested, to grad_weight / grad_bias in acc_t.
template <Activation kAct, BackwardSource kSource, typename scalar_t, typename param_t,
          typename acc_t>
struct BackwardReduce {
  using Op = GradSumsOp<acc_t>;
  using Channel = ElementSource<kAct, kSource, scalar_t, acc_t>;

  const scalar_t* grad_output;
  const scalar_t* saved;  // x or y, per kSource
  const acc_t* mean;
  const acc_t* invstd;
  EpilogueInputs<scalar_t, param_t, acc_t> epilogue;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  acc_t* grad_weight;  // null: not requested
  acc_t* grad_bias;    // null: not requested

  CBN_DEVICE Channel channel(int64_t c) const {
    return element_source<kAct, kSource>(c, mean, invstd, epilogue);
  }

  template <typename index_t>
  CBN_DEVICE void accumulate(GradSums<acc_t>& s, const Channel& ch, index_t off) const {
    const acc_t v = static_cast<acc_t>(saved[off]);
    const acc_t dz = ch.grad(static_cast<acc_t>(grad_output[off]), v, off);
    s.sum_dy += dz;
    s.sum_dy_xmu += dz * ch.centred(v);
  }

  CBN_DEVICE void finalize(int64_t c, const GradSums<acc_t>& s) const {
    sum_dy[c] = s.sum_dy;
    sum_dy_xmu[c] = s.sum_dy_xmu;
    if (grad_weight != nullptr) grad_weight[c] = s.sum_dy_xmu * invstd[c];
    if (grad_bias != nullptr) grad_bias[c] = s.sum_dy;
  }
};

template <Activation kAct, BackwardSource kSource, typename scalar_t, typename param_t,
          typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_backward_reduce_contiguous_kernel(
    BackwardReduce<kAct, kSource, scalar_t, param_t, acc_t> policy, index_t N, index_t C,
    index_t HW, int splits_n, acc_t* partial, unsigned* counters) {
  reduce_contiguous(policy, N, C, HW, splits_n, partial, counters);
}

template <Activation kAct, BackwardSource kSource, typename scalar_t, typename param_t,
          typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_backward_reduce_channels_last_kernel(
    BackwardReduce<kAct, kSource, scalar_t, param_t, acc_t> policy, index_t rows, index_t C,
    acc_t* partial, unsigned* counters) {
  reduce_channels_last(policy, rows, C, partial, counters);
}

// Coefficients of dx = dz * k_dy + (x - mean) * k_x + k_c. In eval mode the statistics are
// constants: only k_dy is used and neither the sums nor the mean are read (they may be null).
template <bool kTraining, typename param_t, typename acc_t>
CBN_DEVICE BackwardCoeffs<acc_t> backward_coeffs(int64_t c, const acc_t* mean,
                                                 const acc_t* invstd, const param_t* weight,
                                                 const acc_t* sum_dy, const acc_t* sum_dy_xmu,
                                                 acc_t count) {
  const acc_t w = channel_value_or(weight, c, acc_t(1));
  if (!kTraining) {
    return fold_backward(acc_t(0), invstd[c], w, acc_t(0), acc_t(0), count, false);
  }
  return fold_backward(mean[c], invstd[c], w, sum_dy[c], sum_dy_xmu[c], count, true);
}

// The outputs of the elementwise pass, each null when not requested.
template <typename scalar_t>
struct ElementwiseGrads {
  scalar_t* grad_input;
  scalar_t* grad_residual;  // dz: the residual enters z with slope 1
};

template <bool kTraining, Activation kAct, BackwardSource kSource, typename scalar_t,
          typename acc_t, typename index_t>
CBN_DEVICE void backward_element(const BackwardCoeffs<acc_t>& k,
                                 const ElementSource<kAct, kSource, scalar_t, acc_t>& source,
                                 const scalar_t* grad_output, const scalar_t* saved,
                                 const ElementwiseGrads<scalar_t>& out, index_t off) {
  // Only eval-mode identity gets by without the saved value: its dx is a pure scale of dy.
  acc_t v = acc_t(0);
  if constexpr (kTraining || kAct != Activation::kIdentity) v = static_cast<acc_t>(saved[off]);
  const acc_t dz = source.grad(static_cast<acc_t>(grad_output[off]), v, off);
  if (out.grad_residual != nullptr) out.grad_residual[off] = static_cast<scalar_t>(dz);
  if (out.grad_input == nullptr) return;
  if constexpr (kTraining) {
    out.grad_input[off] =
        static_cast<scalar_t>(dz * k.k_dy + source.centred(v) * k.k_x + k.k_c);
  } else {
    out.grad_input[off] = static_cast<scalar_t>(dz * k.k_dy);
  }
}

template <bool kTraining, Activation kAct, BackwardSource kSource, typename scalar_t,
          typename param_t, typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_backward_elementwise_contiguous_kernel(
    const scalar_t* grad_output, const scalar_t* saved, ElementwiseGrads<scalar_t> out,
    const acc_t* mean, const acc_t* invstd, EpilogueInputs<scalar_t, param_t, acc_t> epilogue,
    const acc_t* sum_dy, const acc_t* sum_dy_xmu, acc_t count, index_t N, index_t C, index_t HW,
    int splits_n) {
  const int64_t c = dev::block_idx_x();
  const auto k =
      backward_coeffs<kTraining>(c, mean, invstd, epilogue.weight, sum_dy, sum_dy_xmu, count);
  const auto source = element_source<kAct, kSource>(c, mean, invstd, epilogue);
  for_each_contiguous(N, C, HW, splits_n, [&](index_t off) {
    backward_element<kTraining>(k, source, grad_output, saved, out, off);
  });
}

template <bool kTraining, Activation kAct, BackwardSource kSource, typename scalar_t,
          typename param_t, typename acc_t, typename index_t>
CBN_KERNEL void batch_norm_backward_elementwise_channels_last_kernel(
    const scalar_t* grad_output, const scalar_t* saved, ElementwiseGrads<scalar_t> out,
    const acc_t* mean, const acc_t* invstd, EpilogueInputs<scalar_t, param_t, acc_t> epilogue,
    const acc_t* sum_dy, const acc_t* sum_dy_xmu, acc_t count, index_t rows, index_t C) {
  const index_t c = channels_last_channel<index_t>();
  if (c >= C) return;  // no barrier below
  const auto k =
      backward_coeffs<kTraining>(c, mean, invstd, epilogue.weight, sum_dy, sum_dy_xmu, count);
  const auto source = element_source<kAct, kSource>(c, mean, invstd, epilogue);
  for_each_channels_last(rows, C, c, [&](index_t off) {
    backward_element<kTraining>(k, source, grad_output, saved, out, off);
  });
}

}  // namespace CBN_KERNEL_NAMESPACE
}  // namespace cuda_kernels
}  // namespace custom_bn
