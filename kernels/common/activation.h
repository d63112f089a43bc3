#pragma once
// The activations of the fused epilogue y = act(BN(x) [+ residual]), per element, shared by the
// CPU kernels (scalar tails, the vectorized forms in kernels/cpu/activation_vec.h follow the
// same formulas) and the CUDA kernels.
//
// Each activation has:
//  - forward(z);
//  - grad(dy, z): dy * act'(z), the derivative at the pre-activation z (the fused backward
//    recomputes z from x, so it needs no saved output);
//  - grad_from_output(dy, y) and inverse(y): the derivative and z from the output alone, for the
//    in-place mode. Only activations that are strictly increasing (identity, leaky_relu with a
//    positive slope, elu with a positive alpha) have them; csrc/checks.h rejects the others.
// The branches follow torch's kernels (relu/threshold: y > 0; leaky_relu: z > 0; elu: z <= 0),
// so NaN propagates the way it does in torch.nn.
#include <cmath>

#include "host_device.h"

namespace custom_bn {

enum class Activation : int { kIdentity = 0, kRelu, kLeakyRelu, kElu, kSilu };

template <typename acc_t>
struct ActivationParams {
  Activation kind = Activation::kIdentity;
  acc_t param = acc_t(0);  // leaky_relu: negative slope; elu: alpha
};

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t activation_forward(Activation kind, acc_t param, acc_t z) {
  switch (kind) {
    case Activation::kRelu:
      return z < acc_t(0) ? acc_t(0) : z;
    case Activation::kLeakyRelu:
      return z > acc_t(0) ? z : z * param;
    case Activation::kElu:
      return z <= acc_t(0) ? param * ::expm1(z) : z;
    case Activation::kSilu:
      return z / (acc_t(1) + ::exp(-z));
    default:
      return z;
  }
}

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t activation_grad(Activation kind, acc_t param, acc_t dy, acc_t z) {
  switch (kind) {
    case Activation::kRelu:
      return z > acc_t(0) ? dy : acc_t(0);
    case Activation::kLeakyRelu:
      return z > acc_t(0) ? dy : dy * param;
    case Activation::kElu:
      return z <= acc_t(0) ? dy * param * ::exp(z) : dy;
    case Activation::kSilu: {
      const acc_t s = acc_t(1) / (acc_t(1) + ::exp(-z));
      return dy * s * (acc_t(1) + z * (acc_t(1) - s));
    }
    default:
      return dy;
  }
}

// In-place mode (invertible activations only; param > 0).
template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t activation_grad_from_output(Activation kind, acc_t param,
                                                             acc_t dy, acc_t y) {
  switch (kind) {
    case Activation::kLeakyRelu:
      return y > acc_t(0) ? dy : dy * param;
    case Activation::kElu:
      return y <= acc_t(0) ? dy * (y + param) : dy;
    default:
      return dy;
  }
}

// Where elu saturates (y within rounding of -alpha, z below about -17 in float32), z cannot be
// recovered: log1p(-1) would be -inf, and dy * (y + alpha) = 0 times -inf a NaN. The argument is
// kept above -1 so that z stays finite (its own derivative there is 0 anyway).
template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t elu_inverse_floor() {
  return acc_t(-1) + acc_t(sizeof(acc_t) == 4 ? 1.1920928955078125e-07 : 2.220446049250313e-16);
}

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t elu_inverse_arg(acc_t u) {
  return u < elu_inverse_floor<acc_t>() ? elu_inverse_floor<acc_t>() : u;  // NaN stays NaN
}

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE acc_t activation_inverse(Activation kind, acc_t param, acc_t y) {
  switch (kind) {
    case Activation::kLeakyRelu:
      return y > acc_t(0) ? y : y / param;
    case Activation::kElu:
      return y <= acc_t(0) ? ::log1p(elu_inverse_arg(y / param)) : y;
    default:
      return y;
  }
}

}  // namespace custom_bn
