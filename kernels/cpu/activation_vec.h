#pragma once
// The epilogue activations (kernels/common/activation.h) on at::vec vectors, one type per
// activation so that the kernels are instantiated once per activation and the identity costs
// nothing. Included only by batch_norm_kernel.cpp (through contiguous.h / channels_last.h).
#include <ATen/cpu/vec/vec.h>

#include <utility>

#include "common/activation.h"

namespace custom_bn::cpu {
namespace CPU_CAPABILITY {
namespace {

template <Activation kKind, typename acc_t>
struct VecActivation {
  using Vec = at::vec::Vectorized<acc_t>;
  using Pair = std::pair<Vec, Vec>;
  static constexpr bool kIdentity = kKind == Activation::kIdentity;

  acc_t param = acc_t(0);

  Vec forward(const Vec& z) const {
    const Vec zero(acc_t(0));
    if constexpr (kKind == Activation::kRelu) {
      return Vec::blendv(z, zero, z < zero);
    } else if constexpr (kKind == Activation::kLeakyRelu) {
      return Vec::blendv(z * Vec(param), z, z > zero);
    } else if constexpr (kKind == Activation::kElu) {
      return Vec::blendv(z, z.expm1() * Vec(param), z <= zero);
    } else if constexpr (kKind == Activation::kSilu) {
      return z / (Vec(acc_t(1)) + z.neg().exp());
    } else {
      return z;
    }
  }

  // dy * act'(z)
  Vec grad(const Vec& dy, const Vec& z) const {
    const Vec zero(acc_t(0));
    if constexpr (kKind == Activation::kRelu) {
      return Vec::blendv(zero, dy, z > zero);
    } else if constexpr (kKind == Activation::kLeakyRelu) {
      return Vec::blendv(dy * Vec(param), dy, z > zero);
    } else if constexpr (kKind == Activation::kElu) {
      return Vec::blendv(dy, dy * Vec(param) * z.exp(), z <= zero);
    } else if constexpr (kKind == Activation::kSilu) {
      const Vec one(acc_t(1));
      const Vec s = one / (one + z.neg().exp());
      return dy * s * (one + z * (one - s));
    } else {
      return dy;
    }
  }

  // In place on the pairs of vectors the loops hold (no pair is returned by value: GCC may
  // move such a return through the stack).
  void forward_inplace(Pair& z) const {
    if constexpr (!kIdentity) {
      z.first = forward(z.first);
      z.second = forward(z.second);
    }
  }
  void grad_inplace(Pair& dy, const Pair& z) const {
    if constexpr (!kIdentity) {
      dy.first = grad(dy.first, z.first);
      dy.second = grad(dy.second, z.second);
    }
  }
};

// Calls f(VecActivation<kind, acc_t>{param}) with the activation as a compile-time type.
template <typename acc_t, typename F>
void with_activation(Activation kind, double param, const F& f) {
  const acc_t p = acc_t(param);
  switch (kind) {
    case Activation::kRelu:
      return f(VecActivation<Activation::kRelu, acc_t>{p});
    case Activation::kLeakyRelu:
      return f(VecActivation<Activation::kLeakyRelu, acc_t>{p});
    case Activation::kElu:
      return f(VecActivation<Activation::kElu, acc_t>{p});
    case Activation::kSilu:
      return f(VecActivation<Activation::kSilu, acc_t>{p});
    default:
      return f(VecActivation<Activation::kIdentity, acc_t>{p});
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace custom_bn::cpu
