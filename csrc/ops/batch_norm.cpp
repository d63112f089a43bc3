// Schemas of the batch-norm operators and the C++ entry points that call the dispatcher.
#include "ops/batch_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace custom_bn {

TORCH_LIBRARY_FRAGMENT(custom_bn, m) {
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_forward", "")
                       .typed<decltype(batch_norm_forward)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_backward", "")
                       .typed<decltype(batch_norm_backward)>();
  return op.call(grad_output, input, weight, save_mean, save_invstd, training, eps, output_mask);
}

namespace {

// weight/bias of any shape with C elements, as torch accepts them, viewed as [C] (a
// differentiable reshape: the gradient comes back in the caller's shape). Any other shape is
// left to the operator's check.
c10::optional<at::Tensor> as_channel_vector(const c10::optional<at::Tensor>& t, int64_t channels) {
  if (t.has_value() && t->defined() && t->dim() != 1 && t->numel() == channels) {
    return t->reshape({channels});
  }
  return t;
}

}  // namespace

at::Tensor batch_norm(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, bool training,
                      double momentum, double eps) {
  if (input.dim() == 1 && input.numel() == 0) {
    // torch's empty (0,) input: zero channels; the operators take it as (0, 0).
    return batch_norm(input.view({0, 0}), weight, bias, running_mean, running_var, training,
                      momentum, eps)
        .view({0});
  }
  const int64_t channels = input.dim() >= 2 ? input.size(1) : -1;  // else the op rejects input
  return std::get<0>(batch_norm_forward(input, as_channel_vector(weight, channels),
                                        as_channel_vector(bias, channels), running_mean,
                                        running_var, training, momentum, eps));
}

}  // namespace custom_bn
