#pragma once
// What this build of custom_bn contains and which CPU code path it runs (installed as
// <custom_bn/build_info.h>; Python: custom_bn.build_info()).
#include <string>
#include <vector>

namespace custom_bn {

// Instruction-set level of the CPU kernels in use: "DEFAULT", "AVX2" or "AVX512". Chosen once,
// at the first call, as ATen's own kernels are: the level at::get_cpu_capability() reports
// (the best the running CPU supports, or the one the environment variable ATEN_CPU_CAPABILITY =
// default|avx2|avx512 names; like ATen, custom_bn trusts that override), falling back to
// DEFAULT when this library was not compiled for it.
std::string cpu_capability();

// Every level the CPU kernels were compiled for.
std::vector<std::string> cpu_capabilities_compiled();

// Whether the CPU kernels were compiled with OpenMP, so that at::parallel_for runs them on
// torch's intra-op thread pool (torch.set_num_threads / at::set_num_threads).
bool built_with_openmp();

// Whether the CUDA kernels were compiled into this library.
bool built_with_cuda();

// The GPU architectures the CUDA kernels were compiled for, e.g. {"sm_80", "sm_90"} (empty
// without CUDA).
std::vector<std::string> cuda_architectures();

// The LibTorch version this library was compiled against (its headers' TORCH_VERSION). The
// library must run with that same torch.
std::string torch_version_compiled_against();

}  // namespace custom_bn
