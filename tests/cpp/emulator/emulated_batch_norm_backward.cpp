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

}  // namespace emulator
}  // namespace custom_bn
