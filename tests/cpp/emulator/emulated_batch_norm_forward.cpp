// The CUDA forward launch sequence instantiated with the emulator backend. Forward and backward
// live in two files only so that the two heavy instantiations compile in parallel.
#include "cuda/batch_norm_launch.h"
#include "emulated_batch_norm.h"

namespace custom_bn {
namespace emulator {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const EmulatedDevice& device, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  return cuda_launch::batch_norm_forward(EmulatorBackend(device), input, weight, bias,
                                         running_mean, running_var, training, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const EmulatedDevice& device, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double momentum, double eps, Activation activation, double activation_param) {
  return cuda_launch::batch_norm_act_forward(EmulatorBackend(device), input, weight, bias,
                                             running_mean, running_var, residual, training,
                                             momentum, eps, activation, activation_param);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward(
    const EmulatedDevice& device, at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param) {
  return cuda_launch::batch_norm_act_inplace_forward(EmulatorBackend(device), input, weight, bias,
                                                     running_mean, running_var, training,
                                                     momentum, eps, activation, activation_param);
}

}  // namespace emulator
}  // namespace custom_bn
