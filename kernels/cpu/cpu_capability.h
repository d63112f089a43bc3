#pragma once
// The copy of the CPU kernels (batch_norm_kernel.h) that this process runs.
#include "batch_norm_kernel.h"

namespace custom_bn::cpu {

const Kernels& selected_kernels();

}  // namespace custom_bn::cpu
