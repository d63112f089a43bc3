// CUDA launchers of custom_bn::batch_norm_forward / batch_norm_backward, of their fused
// variants batch_norm_act_forward / batch_norm_act_backward, of the in-place
// batch_norm_act_inplace_forward / batch_norm_act_inplace_backward and of SyncBatchNorm's
// batch_norm_stats / batch_norm_backward_reduce / batch_norm_backward_elemt: the real GPU backend
// of the launch sequence in batch_norm_launch.h (the emulated kernel tests in tests/cpp/emulator
// run that same sequence with a CPU backend). Kernel bodies are in batch_norm_kernel.cuh,
// grid/block/shared-memory choices in launch_config.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "batch_norm_launch.h"

namespace custom_bn {
namespace {

// Launches on the current stream of the device selected by DeviceGuard.
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;

  int num_sms() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

  const cuda_launch::Tuning& tuning() const {
    static const cuda_launch::Tuning defaults;
    return defaults;
  }

  template <auto kernel, typename... Args>
  void launch(const cuda_launch::LaunchConfig& cfg, Args... args) const {
    const dim3 grid(static_cast<unsigned>(cfg.grid_x), static_cast<unsigned>(cfg.grid_y));
    const dim3 block(static_cast<unsigned>(cfg.block_x), static_cast<unsigned>(cfg.block_y));
    kernel<<<grid, block, static_cast<size_t>(cfg.shared_bytes),
             at::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  return cuda_launch::batch_norm_forward(CudaBackend{}, input, weight, bias, running_mean,
                                         running_var, training, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double /*eps: folded into save_invstd*/,
    std::array<bool, 3> output_mask) {
  return cuda_launch::batch_norm_backward(CudaBackend{}, grad_output, input, weight, save_mean,
                                          save_invstd, training, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double momentum, double eps, c10::string_view activation,
    double activation_param) {
  const Activation act = parse_activation("custom_bn.batch_norm", activation);
  return cuda_launch::batch_norm_act_forward(CudaBackend{}, input, weight, bias, running_mean,
                                             running_var, residual, training, momentum, eps, act,
                                             activation_param);
}

at::Tensor batch_norm_inference_cuda(const at::Tensor& input,
                                     const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& running_mean,
                                     const at::Tensor& running_var,
                                     const c10::optional<at::Tensor>& residual, double eps,
                                     c10::string_view activation, double activation_param) {
  return std::get<0>(batch_norm_act_forward_cuda(input, weight, bias, running_mean, running_var,
                                                 residual, /*training=*/false, 0.0, eps,
                                                 activation, activation_param));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double /*eps: folded into save_invstd*/,
    c10::string_view activation, double activation_param, std::array<bool, 4> output_mask) {
  const Activation act = parse_activation("custom_bn.batch_norm_backward", activation);
  return cuda_launch::batch_norm_act_backward(CudaBackend{}, grad_output, input, weight, bias,
                                              residual, save_mean, save_invstd, training, act,
                                              activation_param, output_mask);
}

// The in-place operators take the activation's name: batch_norm_launch.h checks that it is
// invertible.
std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward_cuda(
    at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param) {
  return cuda_launch::batch_norm_act_inplace_forward(CudaBackend{}, input, weight, bias,
                                                     running_mean, running_var, training,
                                                     momentum, eps, activation, activation_param);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    double /*eps: folded into save_invstd*/, c10::string_view activation,
    double activation_param, std::array<bool, 3> output_mask) {
  return cuda_launch::batch_norm_act_inplace_backward(CudaBackend{}, grad_output, output, weight,
                                                      bias, save_mean, save_invstd, training,
                                                      activation, activation_param, output_mask);
}

// SyncBatchNorm's pieces. Like the in-place operators they take the activation's name, so that
// it is parsed after the other checks, in the CPU operators' order.
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  return cuda_launch::batch_norm_stats(CudaBackend{}, input);
}

at::Tensor batch_norm_backward_reduce_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                           const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& residual,
                                           const at::Tensor& mean, const at::Tensor& invstd,
                                           c10::string_view activation,
                                           double activation_param) {
  return cuda_launch::batch_norm_backward_reduce(CudaBackend{}, grad_output, input, weight, bias,
                                                 residual, mean, invstd, activation,
                                                 activation_param);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cuda(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& sums, int64_t count, c10::string_view activation, double activation_param,
    std::array<bool, 2> output_mask) {
  return cuda_launch::batch_norm_backward_elemt(CudaBackend{}, grad_output, input, weight, bias,
                                                residual, mean, invstd, sums, count, activation,
                                                activation_param, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CUDA, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cuda);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cuda);
  m.impl("batch_norm_inference", &batch_norm_inference_cuda);
  m.impl("batch_norm_act_inplace_forward", &batch_norm_act_inplace_forward_cuda);
  m.impl("batch_norm_act_inplace_backward", &batch_norm_act_inplace_backward_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda);
}

}  // namespace custom_bn
