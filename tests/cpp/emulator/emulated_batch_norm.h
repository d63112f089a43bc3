#pragma once
// custom_bn::batch_norm_forward / batch_norm_backward, the fused batch_norm_act_forward /
// batch_norm_act_backward, the in-place batch_norm_act_inplace_forward / _backward and
// SyncBatchNorm's batch_norm_stats / batch_norm_backward_reduce / batch_norm_backward_elemt as
// the CUDA build runs them (argument checks, launch sequence, launch configurations, kernel
// bodies), executed on CPU tensors by the emulator. Same contract as csrc/ops/batch_norm.h and
// csrc/ops/sync_batch_norm.h (the activation already parsed, as the CUDA launchers pass it,
// except for the in-place and SyncBatchNorm operators, whose launch sequences check the name
// themselves); `device` says which GPU to pretend to be.
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

#include "common/activation.h"
#include "emulator_backend.h"

namespace custom_bn {
namespace emulator {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const EmulatedDevice& device, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, std::array<bool, 3> output_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const EmulatedDevice& device, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double momentum, double eps, Activation activation, double activation_param);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, Activation activation, double activation_param,
    std::array<bool, 4> output_mask);

std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward(
    const EmulatedDevice& device, at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    c10::string_view activation, double activation_param, std::array<bool, 3> output_mask);

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const EmulatedDevice& device,
                                                    const at::Tensor& input);

at::Tensor batch_norm_backward_reduce(const EmulatedDevice& device, const at::Tensor& grad_output,
                                      const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& residual,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      c10::string_view activation, double activation_param);

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& sums, int64_t count, c10::string_view activation, double activation_param,
    std::array<bool, 2> output_mask);

}  // namespace emulator
}  // namespace custom_bn
