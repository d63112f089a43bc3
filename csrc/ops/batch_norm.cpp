// Schemas of the batch-norm operators and the C++ entry points that call the dispatcher.
#include "ops/batch_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace custom_bn {

TORCH_LIBRARY_FRAGMENT(custom_bn, m) {
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_forward(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? residual, bool training, "
      "float momentum, float eps, str activation, float activation_param) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor save_mean, Tensor save_invstd, bool training, float eps, "
      "str activation, float activation_param, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Evaluation without the training form's mutable running-stat arguments: what traced
  // inference graphs (torch.export, ONNX) call, so that they read the buffers, never write them.
  m.def(
      "batch_norm_inference(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, Tensor? residual, float eps, str activation, float activation_param) "
      "-> Tensor");
  // The in-place mode: input is overwritten with act(BN(input)), and the backward works from
  // that output alone.
  m.def(
      "batch_norm_act_inplace_forward(Tensor(a!) input, Tensor? weight, Tensor? bias, "
      "Tensor(b!)? running_mean, Tensor(c!)? running_var, bool training, float momentum, "
      "float eps, str activation, float activation_param) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_act_inplace_backward(Tensor grad_output, Tensor output, Tensor? weight, "
      "Tensor? bias, Tensor save_mean, Tensor save_invstd, bool training, float eps, "
      "str activation, float activation_param, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double momentum, double eps, c10::string_view activation,
    double activation_param) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_act_forward", "")
                       .typed<decltype(batch_norm_act_forward)>();
  return op.call(input, weight, bias, running_mean, running_var, residual, training, momentum,
                 eps, activation, activation_param);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, c10::string_view activation,
    double activation_param, std::array<bool, 4> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_act_backward", "")
                       .typed<decltype(batch_norm_act_backward)>();
  return op.call(grad_output, input, weight, bias, residual, save_mean, save_invstd, training,
                 eps, activation, activation_param, output_mask);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward(
    at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_act_inplace_forward", "")
                       .typed<decltype(batch_norm_act_inplace_forward)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                 activation, activation_param);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward(
    const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double eps,
    c10::string_view activation, double activation_param, std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_act_inplace_backward", "")
                       .typed<decltype(batch_norm_act_inplace_backward)>();
  return op.call(grad_output, output, weight, bias, save_mean, save_invstd, training, eps,
                 activation, activation_param, output_mask);
}

at::Tensor batch_norm_inference(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                const c10::optional<at::Tensor>& residual, double eps,
                                c10::string_view activation, double activation_param) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("custom_bn::batch_norm_inference", "")
                       .typed<decltype(batch_norm_inference)>();
  return op.call(input, weight, bias, running_mean, running_var, residual, eps, activation,
                 activation_param);
}

double resolve_activation_param(c10::string_view activation, c10::optional<double> param) {
  parse_activation("custom_bn.batch_norm", activation);  // ValueError for an unknown name
  const bool takes_param = activation == "leaky_relu" || activation == "elu";
  TORCH_CHECK_VALUE(takes_param || !param.has_value(),
                    "custom_bn.batch_norm: activation_param is the negative slope of leaky_relu "
                    "or the alpha of elu; activation '", std::string(activation),
                    "' takes none, got ", param.value_or(0.0));
  if (param.has_value()) return *param;
  return activation == "leaky_relu" ? 0.01 : activation == "elu" ? 1.0 : 0.0;
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

at::Tensor batch_norm_act(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& running_mean,
                          const c10::optional<at::Tensor>& running_var, bool training,
                          double momentum, double eps, c10::string_view activation,
                          c10::optional<double> activation_param,
                          const c10::optional<at::Tensor>& residual) {
  if (input.dim() == 1 && input.numel() == 0) {
    return batch_norm_act(input.view({0, 0}), weight, bias, running_mean, running_var, training,
                          momentum, eps, activation, activation_param,
                          given(residual) ? c10::optional<at::Tensor>(residual->view({0, 0}))
                              : residual)
        .view({0});
  }
  if (given(residual) && residual->scalar_type() != input.scalar_type()) {
    // As torch's BN(x) + residual: the promoted dtype (the operators take one dtype).
    const auto common = at::promote_types(input.scalar_type(), residual->scalar_type());
    return batch_norm_act(input.to(common), weight, bias, running_mean, running_var, training,
                          momentum, eps, activation, activation_param, residual->to(common));
  }
  const double param = resolve_activation_param(activation, activation_param);
  if (activation == "identity" && !given(residual)) {
    return batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps);
  }
  const int64_t channels = input.dim() >= 2 ? input.size(1) : -1;
  return std::get<0>(batch_norm_act_forward(
      input, as_channel_vector(weight, channels), as_channel_vector(bias, channels), running_mean,
      running_var, residual, training, momentum, eps, activation,
      param));
}

at::Tensor& batch_norm_act_(at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, bool training,
                            double momentum, double eps, c10::string_view activation,
                            c10::optional<double> activation_param) {
  const int64_t channels = input.dim() >= 2 ? input.size(1) : -1;
  batch_norm_act_inplace_forward(input, as_channel_vector(weight, channels),
                                 as_channel_vector(bias, channels), running_mean, running_var,
                                 training, momentum, eps, activation,
                                 resolve_activation_param(activation, activation_param));
  return input;
}

}  // namespace custom_bn
