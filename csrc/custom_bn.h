#pragma once
// Umbrella header of the custom_bn C++ API (installed as <custom_bn/custom_bn.h>):
//   custom_bn::batch_norm, batch_norm_forward, batch_norm_backward  (ops/batch_norm.h)
//   custom_bn::batch_norm_act, batch_norm_act_forward/_backward     (ops/batch_norm.h)
//   custom_bn::batch_norm_act_ (in place)                            (ops/batch_norm.h)
//   custom_bn::batch_norm_stats, batch_norm_backward_reduce/_elemt  (ops/sync_batch_norm.h)
//   custom_bn::nn::BatchNorm1d/2d/3d, BatchNormAct1d/2d/3d          (nn/batch_norm.h)
//   custom_bn::nn::load_state_dict, save_state_dict (Python exchange) (nn/state_dict.h)
//   custom_bn::cpu_capability, built_with_openmp, ...                (build_info.h)
// Link CustomBN::custom_bn (find_package(CustomBN)); the operators are registered with the
// dispatcher when libcustom_bn is loaded.
#include "build_info.h"
#include "ops/batch_norm.h"
#include "ops/sync_batch_norm.h"
#include "nn/batch_norm.h"
#include "nn/state_dict.h"
