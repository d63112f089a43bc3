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
  static constexpr bool kFromOutput = false;

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

// The in-place backward's view of an (invertible) activation: it reads the output y where the
// other backward reads x, and gives dz = dy * act'(z) from y and z = act^-1(y)
// (kernels/common/activation.h). Never an identity to the kernels: even act = identity needs
// the affine map back to x.
template <Activation kKind, typename acc_t>
struct VecInverseActivation {
  using Vec = at::vec::Vectorized<acc_t>;
  using Pair = std::pair<Vec, Vec>;
  static constexpr bool kIdentity = false;
  static constexpr bool kFromOutput = true;

  acc_t param = acc_t(0);

  Vec grad_from_output(const Vec& dy, const Vec& y) const {
    const Vec zero(acc_t(0));
    if constexpr (kKind == Activation::kLeakyRelu) {
      return Vec::blendv(dy * Vec(param), dy, y > zero);
    } else if constexpr (kKind == Activation::kElu) {
      return Vec::blendv(dy, dy * (y + Vec(param)), y <= zero);
    } else {
      return dy;
    }
  }

  Vec inverse(const Vec& y) const {
    const Vec zero(acc_t(0));
    if constexpr (kKind == Activation::kLeakyRelu) {
      return Vec::blendv(y / Vec(param), y, y > zero);
    } else if constexpr (kKind == Activation::kElu) {
      const Vec u = at::vec::maximum(y / Vec(param), Vec(elu_inverse_floor<acc_t>()));
      return Vec::blendv(y, u.log1p(), y <= zero);
    } else {
      return y;
    }
  }

  // dy becomes dz and y becomes z.
  void invert_inplace(Pair& dy, Pair& y) const {
    dy.first = grad_from_output(dy.first, y.first);
    dy.second = grad_from_output(dy.second, y.second);
    y.first = inverse(y.first);
    y.second = inverse(y.second);
  }
};

template <typename acc_t, typename F>
void with_inverse_activation(Activation kind, double param, const F& f) {
  const acc_t p = acc_t(param);
  switch (kind) {
    case Activation::kLeakyRelu:
      return f(VecInverseActivation<Activation::kLeakyRelu, acc_t>{p});
    case Activation::kElu:
      return f(VecInverseActivation<Activation::kElu, acc_t>{p});
    default:
      return f(VecInverseActivation<Activation::kIdentity, acc_t>{p});
  }
}

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
