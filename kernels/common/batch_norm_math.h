#pragma once
// Per-channel scalar math shared by the CPU and CUDA kernels: everything that happens once per
// channel (folding statistics and affine parameters into FMA coefficients, the running-stat
// update). The per-element work is then a single fused multiply-add.
#include "host_device.h"

namespace custom_bn {

// y = x * alpha + beta  ==  (x - mean) * invstd * w + b
template <typename acc_t>
struct AffineCoeffs {
  acc_t alpha;
  acc_t beta;
};

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE AffineCoeffs<acc_t> fold_affine(acc_t mean, acc_t invstd, acc_t w,
                                                           acc_t b) {
  const acc_t alpha = invstd * w;
  return {alpha, b - mean * alpha};
}

// The in-place backward recovers the centred input from the pre-activation z = x_hat * w + b:
// x - mean = (z - b) / (w * invstd) = z * alpha + beta. (w = 0 is rejected before.)
template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE AffineCoeffs<acc_t> fold_inverse_affine(acc_t invstd, acc_t w,
                                                                   acc_t b) {
  const acc_t alpha = acc_t(1) / (w * invstd);
  return {alpha, -b * alpha};
}

// The running-stat update of torch.nn: r = (1 - m) r + m batch, variance unbiased (n / (n - 1)).
// Training with n == 1 is rejected by the argument checks; the guard only avoids dividing by
// zero.
template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t unbiased_variance(acc_t biased_var, acc_t count) {
  return count > acc_t(1) ? biased_var * count / (count - acc_t(1)) : biased_var;
}

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t running_update(acc_t running, acc_t batch, acc_t momentum) {
  return running * (acc_t(1) - momentum) + batch * momentum;
}

// Backward in training mode: dx = dy * k_dy + (x - mean) * k_x + k_c, where
//   k_dy = w * invstd
//   k_x  = -w * invstd^3 * sum(dy * (x - mean)) / n
//   k_c  = -k_dy * sum(dy) / n
// x is centred before the multiply: folding mean into k_c (x * k_x - mean * k_x) cancels
// catastrophically in float when |mean| >> std. In eval mode the statistics are constants, so
// k_x = k_c = 0.
template <typename acc_t>
struct BackwardCoeffs {
  acc_t k_dy;
  acc_t k_x;
  acc_t k_c;
  acc_t mean;
};

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE BackwardCoeffs<acc_t> fold_backward(acc_t mean, acc_t invstd, acc_t w,
                                                               acc_t sum_dy, acc_t sum_dy_xmu,
                                                               acc_t count, bool training) {
  const acc_t k_dy = w * invstd;
  if (!training) return {k_dy, acc_t(0), acc_t(0), mean};
  const acc_t inv_n = acc_t(1) / count;
  const acc_t k_x = -k_dy * invstd * invstd * sum_dy_xmu * inv_n;
  return {k_dy, k_x, -k_dy * sum_dy * inv_n, mean};
}

}  // namespace custom_bn
