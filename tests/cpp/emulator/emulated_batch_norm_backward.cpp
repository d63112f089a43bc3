// The CUDA backward launch sequence instantiated with the emulator backend.
#include "cuda/batch_norm_launch.h"
#include "emulated_batch_norm.h"

namespace custom_bn {
namespace emulator {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, std::array<bool, 3> output_mask) {
  return cuda_launch::batch_norm_backward(EmulatorBackend(device), grad_output, input, weight,
                                          save_mean, save_invstd, training, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, Activation activation, double activation_param,
    std::array<bool, 4> output_mask) {
  return cuda_launch::batch_norm_act_backward(EmulatorBackend(device), grad_output, input, weight,
                                              bias, residual, save_mean, save_invstd, training,
                                              activation, activation_param, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    c10::string_view activation, double activation_param, std::array<bool, 3> output_mask) {
  return cuda_launch::batch_norm_act_inplace_backward(EmulatorBackend(device), grad_output, output,
                                                      weight, bias, save_mean, save_invstd,
                                                      training, activation, activation_param,
                                                      output_mask);
}

}  // namespace emulator
}  // namespace custom_bn
