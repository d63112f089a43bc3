// SyncBatchNorm's CUDA launch sequences instantiated with the emulator backend (a file of their
// own, so that this instantiation compiles in parallel with the forward's and the backward's).
#include "cuda/batch_norm_launch.h"
#include "emulated_batch_norm.h"

namespace custom_bn {
namespace emulator {

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const EmulatedDevice& device,
                                                    const at::Tensor& input) {
  return cuda_launch::batch_norm_stats(EmulatorBackend(device), input);
}

at::Tensor batch_norm_backward_reduce(const EmulatedDevice& device, const at::Tensor& grad_output,
                                      const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& residual,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      c10::string_view activation, double activation_param) {
  return cuda_launch::batch_norm_backward_reduce(EmulatorBackend(device), grad_output, input,
                                                 weight, bias, residual, mean, invstd, activation,
                                                 activation_param);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt(
    const EmulatedDevice& device, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& sums, int64_t count, c10::string_view activation, double activation_param,
    std::array<bool, 2> output_mask) {
  return cuda_launch::batch_norm_backward_elemt(EmulatorBackend(device), grad_output, input,
                                                weight, bias, residual, mean, invstd, sums, count,
                                                activation, activation_param, output_mask);
}

}  // namespace emulator
}  // namespace custom_bn
