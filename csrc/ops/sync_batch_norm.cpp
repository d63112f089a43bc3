// Schemas of the distributed batch-norm building blocks and the C++ entry points that call the
// dispatcher.
#include "ops/sync_batch_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace custom_bn {

TORCH_LIBRARY_FRAGMENT(custom_bn, m) {
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor? bias, Tensor? residual, Tensor mean, Tensor invstd, str activation, "
      "float activation_param) -> Tensor");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor? bias, Tensor? residual, Tensor mean, Tensor invstd, Tensor sums, int count, "
      "str activation, float activation_param, bool[2] output_mask) -> (Tensor, Tensor)");
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_stats", "")
                       .typed<decltype(batch_norm_stats)>();
  return op.call(input);
}

at::Tensor batch_norm_backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& residual,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      c10::string_view activation, double activation_param) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_backward_reduce", "")
                       .typed<decltype(batch_norm_backward_reduce)>();
  return op.call(grad_output, input, weight, bias, residual, mean, invstd, activation,
                 activation_param);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& sums, int64_t count, c10::string_view activation, double activation_param,
    std::array<bool, 2> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_backward_elemt", "")
                       .typed<decltype(batch_norm_backward_elemt)>();
  return op.call(grad_output, input, weight, bias, residual, mean, invstd, sums, count,
                 activation, activation_param, output_mask);
}

}  // namespace custom_bn
