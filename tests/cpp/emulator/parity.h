#pragma once
// One emulated forward + backward of the CUDA operators and the same calls on the CPU kernels
// (custom_bn::batch_norm_forward/backward on CPU, or the fused batch_norm_act_forward/backward),
// each checked directly against ATen in float64 (at::native_batch_norm /
// at::native_batch_norm_backward, and for the fused operators + residual, then at::relu /
// leaky_relu / elu / silu with autograd for their derivative) within a per-dtype bound: outputs,
// saved statistics, running statistics, all requested gradients, and the memory format of
// every result. The in-place operators (batch_norm_act_inplace_forward / _backward) are checked
// the same way, emulated only, against float64 autograd through at::batch_norm and the
// activation.
#include <ATen/core/ScalarType.h>
#include <ATen/core/Tensor.h>
#include <gtest/gtest.h>

#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "common/activation.h"
#include "cuda_emulator.h"
#include "emulator_backend.h"

namespace custom_bn {
namespace emulator {

// A deliberate bug for the harness's own tests (test_deliberate_bugs.cpp): the emulated
// backward differentiates (or, in place, inverts) another activation or parameter than the
// forward applied, recomputes z without the residual, or recovers the in-place input without
// the bias, as a kernel with that bug would.
struct BackwardFault {
  c10::optional<Activation> activation;
  c10::optional<double> activation_param;
  bool drop_residual = false;
  bool drop_bias = false;
};

struct ParityCase {
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::kFloat;
  at::ScalarType param_dtype = at::kFloat;  // weight, bias and running stats
  bool channels_last = false;
  bool training = true;
  bool affine = true;
  bool running_stats = true;
  bool strided_channel_tensors = false;  // weight, bias, running stats as stride-2 views
  double momentum = 0.1;
  double eps = 1e-5;
  // The fused operators y = act(BN(x) + residual) in place of the plain ones. A mask's fourth
  // entry (grad_residual) is theirs; the plain operators' masks leave it false.
  bool fused = false;
  Activation activation = Activation::kIdentity;
  double activation_param = 0.0;  // leaky_relu: negative slope; elu: alpha
  bool residual = false;
  // The in-place operators: input overwritten with act(BN(input)) (no residual), the backward
  // from that output. Their masks are a mask's first three entries.
  bool inplace = false;
  bool mixed_sign_weight = false;  // weight negative in every other channel
  bool strided_input = false;      // input a non-dense view (the in-place copy-back path)
  BackwardFault fault;
  std::vector<std::array<bool, 4>> masks = {{true, true, true, false}};
  EmulatedDevice device;
  dev::emu::Schedule schedule;
  uint64_t seed = 0;

  std::string name() const;
};

// "identity", "relu", ...: the operators' string argument.
const char* activation_name(Activation a);

// ATen's own activation (param: leaky_relu's slope, elu's alpha) of z, differentiable.
at::Tensor aten_activation(Activation a, double param, const at::Tensor& z);

// gtest prints a failing case by its name rather than as bytes.
inline void PrintTo(const ParityCase& c, std::ostream* os) { *os << c.name(); }

// Success, or every mismatch found (an EmulatorError is reported as a failure too).
::testing::AssertionResult check_parity(const ParityCase& c);

// Devices the tests pretend to be. The first is what the real launchers use on an H100; the
// others shrink the blocks and the work per thread so that small shapes already split every
// reduction over many blocks (last-block-done merges) and over several warps.
EmulatedDevice gpu_defaults();
EmulatedDevice many_splits();     // one-warp blocks, a split per handful of values
EmulatedDevice two_warp_splits(); // two-warp blocks: cross-warp block reductions with splits
EmulatedDevice wide_blocks();     // blocks of up to 1024 threads, as large as CUDA allows
EmulatedDevice index64();         // as two_warp_splits, with the 64-bit-index kernels

// The i-th of the interleavings that the cases vary through: thread order, blocks in flight,
// block order, stalling threads and a lagging thread per block.
dev::emu::Schedule schedule_for(size_t i);

}  // namespace emulator
}  // namespace custom_bn
