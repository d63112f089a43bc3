// Run-time choice among the copies of the CPU kernels compiled for each instruction-set level.
// The choice follows ATen's (at::get_cpu_capability(), which reads the CPU and honours the
// ATEN_CPU_CAPABILITY override), so custom_bn and torch's own kernels use the same vector width,
// and a library built on any machine runs on any x86-64 CPU.
#include "cpu_capability.h"

#include <ATen/Version.h>
#include <torch/headeronly/version.h>

#include <algorithm>

#include "build_info.h"

namespace custom_bn {
namespace cpu {

namespace {

// Compiled levels, lowest first: the levels of kernels/cpu/cpu_capabilities.txt, whose
// namespaces batch_norm_kernel.h declares. CUSTOM_BN_CPU_X86 is defined by the build when it
// compiled the x86 levels; other architectures get the portable copy only.
constexpr const Kernels* kCompiled[] = {
    &DEFAULT::kernels,
#if defined(CUSTOM_BN_CPU_X86) && CUSTOM_BN_CPU_X86
    &AVX2::kernels,
    &AVX512::kernels,
#endif
};

const Kernels* choose() {
  std::string aten = at::get_cpu_capability();
  if (aten == "NO AVX") aten = "DEFAULT";  // older torch's name for the portable level
  const Kernels* best = kCompiled[0];
  for (const Kernels* k : kCompiled) {
    if (aten == k->capability) best = k;
  }
  return best;
}

}  // namespace

const Kernels& selected_kernels() {
  static const Kernels* const chosen = choose();
  return *chosen;
}

}  // namespace cpu

std::string cpu_capability() { return cpu::selected_kernels().capability; }

std::vector<std::string> cpu_capabilities_compiled() {
  std::vector<std::string> names;
  for (const cpu::Kernels* k : cpu::kCompiled) names.emplace_back(k->capability);
  return names;
}

bool built_with_openmp() { return cpu::selected_kernels().openmp; }

bool built_with_cuda() { return CUSTOM_BN_WITH_CUDA; }

// CUSTOM_BN_CUDA_ARCHS is set by both builds as the compute capabilities joined by '_' (80_90).
#define CUSTOM_BN_STRINGIFY(x) #x
#define CUSTOM_BN_EXPAND_STRINGIFY(x) CUSTOM_BN_STRINGIFY(x)
#ifndef CUSTOM_BN_CUDA_ARCHS
#define CUSTOM_BN_CUDA_ARCHS
#endif

std::vector<std::string> cuda_architectures() {
  std::vector<std::string> archs;
  const std::string list = CUSTOM_BN_EXPAND_STRINGIFY(CUSTOM_BN_CUDA_ARCHS);
  size_t start = 0;
  while (start < list.size()) {
    const size_t end = std::min(list.find('_', start), list.size());
    if (end > start) archs.push_back("sm_" + list.substr(start, end - start));
    start = end + 1;
  }
  return archs;
}

std::string torch_version_compiled_against() { return TORCH_VERSION; }

}  // namespace custom_bn
