#pragma once
// Interface between the CPU operator (batch_norm_cpu.cpp: checks, allocation, running stats) and
// the arithmetic (batch_norm_kernel.cpp), which is compiled once per instruction-set level
// (kernels/cpu/cpu_capabilities.txt) into the namespaces DEFAULT, AVX2 and AVX512. The operator
// calls the copy chosen for the running CPU (cpu_capability.h). Only raw pointers and plain
// structs cross this line, so the per-ISA objects hold no tensor code of their own.
#include <c10/core/ScalarType.h>

#include "common/activation.h"
#include "common/geometry.h"

namespace custom_bn::cpu {

// Per-channel arrays (weight, bias, mean, invstd) are contiguous [C] arrays of the accumulation
// type (float for float16/bfloat16 input, else the input's type); x, y, dy, dx are contiguous in
// the layout of g and have the input's type.
struct ForwardArgs {
  c10::ScalarType dtype;
  Geometry g;
  const void* x;
  void* y;
  const void* weight;  // nullptr: 1
  const void* bias;    // nullptr: 0
  const void* running_mean;  // evaluation only: the statistics that normalize
  const void* running_var;
  // Written with the statistics used: in training the batch mean and 1/sqrt(var + eps), with
  // var (double) the biased batch variance; in evaluation the running mean and
  // 1/sqrt(running_var + eps).
  void* mean;
  void* invstd;
  double* var;
  bool training;
  double eps;
  // The fused epilogue y = act(BN(x) + residual): residual nullptr for none.
  const void* residual;
  Activation activation;
  double activation_param;
};

struct BackwardArgs {
  c10::ScalarType dtype;
  Geometry g;
  const void* dy;
  const void* x;
  void* dx;            // nullptr: grad_input not requested
  const void* weight;  // nullptr: 1
  const void* mean;
  const void* invstd;
  void* grad_weight;  // nullptr when not requested: sum(dy * (x - mean)) * invstd
  void* grad_bias;    // nullptr when not requested: sum(dy)
  bool training;
  // The fused epilogue's backward: dy goes through act'(z), z = x * alpha + beta + residual
  // recomputed with the forward's alpha/beta (from weight, bias, mean, invstd). dres (nullptr
  // when not requested) receives dy * act'(z), the residual's gradient.
  const void* bias;  // nullptr: 0
  const void* residual;
  void* dres;
  Activation activation;
  double activation_param;
  // The in-place mode: x holds the forward's output y, from which dy' and x are recovered by
  // inverting the activation and the affine map (no residual, dres nullptr).
  bool from_output = false;
  // The distributed (SyncBatchNorm) split of the backward:
  //  - sums_out (nullptr: not wanted) receives this batch's sums: C values sum(dy'), then C
  //    values sum(dy' (x - mean)) (the layout of given_sums too);
  //  - given_sums (nullptr: reduce here) are the sums of the whole distributed batch, of
  //    `count` values per channel: grad_input uses them instead of reducing this batch.
  double* sums_out = nullptr;
  const double* given_sums = nullptr;
  int64_t count = 0;
};

// The statistics of a batch alone (SyncBatchNorm's first step): per channel the mean and the
// biased variance, in double; zero for an empty batch.
struct StatsArgs {
  c10::ScalarType dtype;
  Geometry g;
  const void* x;
  double* mean;
  double* var;
};

struct Kernels {
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  void (*stats)(const StatsArgs&);
  const char* capability;  // "DEFAULT", "AVX2" or "AVX512": the CPU_CAPABILITY it was built for
  bool openmp;             // compiled with OpenMP: at::parallel_for uses torch's thread pool
};

namespace DEFAULT {
extern const Kernels kernels;
}
namespace AVX2 {
extern const Kernels kernels;
}
namespace AVX512 {
extern const Kernels kernels;
}

}  // namespace custom_bn::cpu
