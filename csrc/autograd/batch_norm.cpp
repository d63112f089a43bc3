// Autograd kernels of the batch-norm operators, so that custom_bn::batch_norm is differentiable
// from a LibTorch program without Python.
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"
#include "ops/batch_norm.h"

namespace custom_bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor undefined_if_empty_mask(const at::Tensor& t, bool wanted) {
  return wanted ? t : at::Tensor();
}

// The operator writes the running statistics in training mode; the ADInplaceOrView key is a
// fallthrough for custom operators, so their version counters are moved here.
void bump_running_stat_versions(const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var, bool training) {
  if (training && given(running_mean)) {
    torch::autograd::impl::bump_version(*running_mean);
    torch::autograd::impl::bump_version(*running_var);
  }
}

bool requires_grad(const c10::optional<at::Tensor>& t) { return given(t) && t->requires_grad(); }

// The operators' C++ autograd is reverse-mode only; the Python face supplies forward mode.
void check_no_tangent(const char* op, std::initializer_list<const c10::optional<at::Tensor>*> ts) {
  for (const auto* t : ts) {
    TORCH_CHECK(!given(*t) || !(*t)->_fw_grad(/*level=*/0).defined(), op,
                ": the operator's C++ autograd has no forward-mode derivative; for forward-mode "
                "AD (torch.autograd.forward_ad, torch.func.jvp) call "
                "custom_bn.functional.batch_norm or the custom_bn modules, which provide it");
  }
}

c10::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, bool training,
                               double momentum, double eps) {
    at::Tensor output, save_mean, save_invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, save_mean, save_invstd) = batch_norm_forward(
          input, weight, bias, running_mean, running_var, training, momentum, eps);
    }
    bump_running_stat_versions(running_mean, running_var, training);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = given(bias);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    return {output, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts only the tensors that were passed: a missing weight shifts bias.
    const bool has_weight = saved[1].defined();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask = {
        ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    variable_list result(8);
    if (!grads[0].defined()) return result;
    const c10::optional<at::Tensor> weight =
        saved[1].defined() ? c10::optional<at::Tensor>(saved[1]) : c10::nullopt;
    auto [grad_input, grad_weight, grad_bias] = batch_norm_backward(
        grads[0], saved[0], weight, saved[2], saved[3], ctx->saved_data["training"].toBool(),
        ctx->saved_data["eps"].toDouble(), mask);
    result[0] = undefined_if_empty_mask(grad_input, mask[0]);
    result[1] = undefined_if_empty_mask(grad_weight, mask[1]);
    result[2] = undefined_if_empty_mask(grad_bias, mask[2]);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  const c10::optional<at::Tensor> x = input;
  check_no_tangent("custom_bn.batch_norm_forward", {&x, &weight, &bias});
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    auto out = BatchNormFunction::apply(input, weight, bias, running_mean, running_var,
                                        training, momentum, eps);
    return {out[0], out[1], out[2]};
  }
  // Nothing to record: skip the autograd node. Besides saving its cost, this is what lets the
  // Python face call this operator inside a torch.func transform, where functorch refuses any
  // C++ autograd::Function (python/custom_bn/_transforms.py supplies the derivatives there).
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out =
      batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps);
  bump_running_stat_versions(running_mean, running_var, training);
  return out;
}

// dy * act'(z) with differentiable ATen ops (the comparisons' masks carry no derivative, as in
// torch's threshold/leaky_relu/elu backward).
at::Tensor activation_grad_differentiable(Activation act, double param, const at::Tensor& dy,
                                          const at::Tensor& z) {
  switch (act) {
    case Activation::kRelu:
      return dy * (z > 0).to(dy.scalar_type());
    case Activation::kLeakyRelu:
      return at::where(z > 0, dy, dy * param);
    case Activation::kElu:
      return at::where(z <= 0, dy * param * z.exp(), dy);
    case Activation::kSilu: {
      const at::Tensor s = z.sigmoid();
      return dy * s * (1 + z * (1 - s));
    }
    default:
      return dy;
  }
}

// The backward expressed with differentiable ATen ops, used only when the backward itself is
// being differentiated (double backward). In training mode the statistics are recomputed from
// input so that their dependence on input is part of the graph, as for torch.nn's batch norm;
// the fused epilogue's pre-activation z is recomputed the same way.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_differentiable(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, Activation act, double param,
    std::array<bool, 4> output_mask) {
  check_batch_norm_backward_args(grad_output, input, weight, save_mean, save_invstd);
  const auto acc = accumulate_dtype(input.scalar_type());
  std::vector<int64_t> reduce_dims = {0};
  std::vector<int64_t> channel_shape(input.dim(), 1);
  channel_shape[1] = input.size(1);
  for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);
  const auto channel = [&](const c10::optional<at::Tensor>& t) {
    return t->to(acc).reshape(channel_shape);
  };

  const at::Tensor x = input.to(acc);
  at::Tensor mean, invstd;
  if (training) {
    mean = x.mean(reduce_dims, /*keepdim=*/true);
    const at::Tensor var = (x - mean).square().mean(reduce_dims, /*keepdim=*/true);
    invstd = (var + eps).rsqrt();
  } else {
    mean = save_mean.reshape(channel_shape);
    invstd = save_invstd.reshape(channel_shape);
  }
  const at::Tensor xhat = (x - mean) * invstd;
  at::Tensor scale = invstd;
  if (given(weight)) scale = scale * channel(weight);

  at::Tensor dy = grad_output.to(acc);
  if (act != Activation::kIdentity) {
    at::Tensor z = given(weight) ? xhat * channel(weight) : xhat;
    if (given(bias)) z = z + channel(bias);
    if (given(residual)) z = z + residual->to(acc);
    dy = activation_grad_differentiable(act, param, dy, z);
  }

  const auto fmt = batch_norm_memory_format(input);
  at::Tensor grad_input, grad_weight, grad_bias, grad_residual;
  if (output_mask[0]) {
    at::Tensor g = dy;
    if (training) {
      g = dy - dy.mean(reduce_dims, true) - xhat * (dy * xhat).mean(reduce_dims, true);
    }
    grad_input = (g * scale).to(input.scalar_type()).contiguous(fmt);
  }
  const auto param_dtype = channel_gradient_dtype(input, weight);
  if (output_mask[1]) grad_weight = (dy * xhat).sum(reduce_dims).to(param_dtype);
  if (output_mask[2]) grad_bias = dy.sum(reduce_dims).to(param_dtype);
  if (output_mask[3]) grad_residual = dy.to(input.scalar_type()).contiguous(fmt);
  return {output_mask[0] ? grad_input : unrequested_gradient(input),
          output_mask[1] ? grad_weight : unrequested_gradient(input),
          output_mask[2] ? grad_bias : unrequested_gradient(input),
          output_mask[3] ? grad_residual : unrequested_gradient(input)};
}

// Whether a backward is itself being differentiated: in reverse mode (create_graph) or in
// forward mode (a dual tangent, e.g. torch.func.jacfwd over jacrev). The kernels have no
// derivative of their own.
bool differentiated(const at::Tensor& t) {
  return (at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined();
}
bool differentiated(const c10::optional<at::Tensor>& t) { return given(t) && differentiated(*t); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  if (differentiated(grad_output) || differentiated(input) || differentiated(weight) ||
      differentiated(save_mean) || differentiated(save_invstd)) {
    auto [gi, gw, gb, unused] = batch_norm_backward_differentiable(
        grad_output, input, weight, c10::nullopt, c10::nullopt, save_mean, save_invstd, training,
        eps, Activation::kIdentity, 0.0, {output_mask[0], output_mask[1], output_mask[2], false});
    return {gi, gw, gb};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training, eps,
                             output_mask);
}

// act(BN(x) + residual) fused. Saves input, weight, bias, the residual (only when the
// activation needs the pre-activation z back) and the statistics; the backward recomputes z.
class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var,
                               const c10::optional<at::Tensor>& residual, bool training,
                               double momentum, double eps, c10::string_view activation,
                               double activation_param) {
    at::Tensor output, save_mean, save_invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(output, save_mean, save_invstd) =
          batch_norm_act_forward(input, weight, bias, running_mean, running_var, residual,
                                 training, momentum, eps, activation, activation_param);
    }
    bump_running_stat_versions(running_mean, running_var, training);
    const bool linear = parse_activation("custom_bn.batch_norm", activation) ==
                        Activation::kIdentity;
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            linear ? at::Tensor() : residual.value_or(at::Tensor()), save_mean,
                            save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["activation_param"] = activation_param;
    ctx->saved_data["has_running_stats"] = given(running_mean);
    ctx->saved_data["has_residual"] = given(residual);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    return {output, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts only the tensors that were passed.
    const bool has_weight = saved[1].defined(), has_bias = saved[2].defined();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const int64_t stats = ctx->saved_data["has_running_stats"].toBool() ? 2 : 0;
    const int64_t bias_index = 1 + has_weight;
    const int64_t residual_index = bias_index + has_bias + stats;
    const auto activation = ctx->saved_data["activation"].toStringRef();
    const bool linear = activation == "identity";
    const bool residual_grad = has_residual && ctx->needs_input_grad(residual_index);
    // With the identity the residual's gradient is grad_output itself.
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0),
                                      has_weight && ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(bias_index),
                                      residual_grad && !linear};
    variable_list result(11);
    if (!grads[0].defined()) return result;
    auto [grad_input, grad_weight, grad_bias, grad_residual] = batch_norm_act_backward(
        grads[0], saved[0], optional_of(saved[1]), optional_of(saved[2]), optional_of(saved[3]),
        saved[4], saved[5], ctx->saved_data["training"].toBool(),
        ctx->saved_data["eps"].toDouble(), activation,
        ctx->saved_data["activation_param"].toDouble(), mask);
    result[0] = undefined_if_empty_mask(grad_input, mask[0]);
    result[1] = undefined_if_empty_mask(grad_weight, mask[1]);
    result[2] = undefined_if_empty_mask(grad_bias, mask[2]);
    if (residual_grad) result[5] = linear ? grads[0] : grad_residual;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double momentum, double eps, c10::string_view activation,
    double activation_param) {
  const c10::optional<at::Tensor> x = input;
  check_no_tangent("custom_bn.batch_norm_act_forward", {&x, &weight, &bias, &residual});
  if (at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) ||
                                     requires_grad(bias) || requires_grad(residual))) {
    auto out = BatchNormActFunction::apply(input, weight, bias, running_mean, running_var,
                                           residual, training, momentum, eps, activation,
                                           activation_param);
    return {out[0], out[1], out[2]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = batch_norm_act_forward(input, weight, bias, running_mean, running_var, residual,
                                    training, momentum, eps, activation, activation_param);
  bump_running_stat_versions(running_mean, running_var, training);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, c10::string_view activation,
    double activation_param, std::array<bool, 4> output_mask) {
  if (differentiated(grad_output) || differentiated(input) || differentiated(weight) ||
      differentiated(bias) || differentiated(residual) || differentiated(save_mean) ||
      differentiated(save_invstd)) {
    check_residual("custom_bn.batch_norm_backward", input, residual);
    return batch_norm_backward_differentiable(
        grad_output, input, weight, bias, residual, save_mean, save_invstd, training, eps,
        parse_activation("custom_bn.batch_norm_backward", activation), activation_param,
        output_mask);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return batch_norm_act_backward(grad_output, input, weight, bias, residual, save_mean,
                                 save_invstd, training, eps, activation, activation_param,
                                 output_mask);
}

// The in-place mode: the forward overwrites input with its output and saves only that output
// (plus weight, bias and the statistics); the backward inverts the activation and the affine
// map. The statistics leave through stats_out, not as outputs: a Function that modifies a view
// in place may return only that view (autograd's rule for rebasing a view's history).
class BatchNormActInplaceFunction
    : public torch::autograd::Function<BatchNormActInplaceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, bool training,
                               double momentum, double eps, c10::string_view activation,
                               double activation_param,
                               std::tuple<at::Tensor, at::Tensor>* stats_out) {
    at::Tensor output = input;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      *stats_out = batch_norm_act_inplace_forward(output, weight, bias, running_mean,
                                                  running_var, training, momentum, eps,
                                                  activation, activation_param);
    }
    torch::autograd::impl::bump_version(output);
    bump_running_stat_versions(running_mean, running_var, training);
    ctx->mark_dirty({output});
    const auto& [save_mean, save_invstd] = *stats_out;
    ctx->save_for_backward({output, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["activation_param"] = activation_param;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = saved[1].defined(), has_bias = saved[2].defined();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0),
                                      has_weight && ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(1 + has_weight)};
    variable_list result(11);
    if (!grads[0].defined()) return result;
    auto [grad_input, grad_weight, grad_bias] = batch_norm_act_inplace_backward(
        grads[0], saved[0], optional_of(saved[1]), optional_of(saved[2]), saved[3], saved[4],
        ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["activation_param"].toDouble(), mask);
    result[0] = undefined_if_empty_mask(grad_input, mask[0]);
    result[1] = undefined_if_empty_mask(grad_weight, mask[1]);
    result[2] = undefined_if_empty_mask(grad_bias, mask[2]);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward_autograd(
    at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param) {
  const c10::optional<at::Tensor> x = input;
  check_no_tangent("custom_bn.batch_norm_act_inplace_forward", {&x, &weight, &bias});
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    // Said now, before the input is gone, rather than by the backward.
    check_inplace_weight("custom_bn.batch_norm", weight);
    std::tuple<at::Tensor, at::Tensor> stats;
    BatchNormActInplaceFunction::apply(input, weight, bias, running_mean, running_var, training,
                                       momentum, eps, activation, activation_param, &stats);
    return stats;
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  auto stats = batch_norm_act_inplace_forward(input, weight, bias, running_mean, running_var,
                                              training, momentum, eps, activation,
                                              activation_param);
  torch::autograd::impl::bump_version(input);
  bump_running_stat_versions(running_mean, running_var, training);
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double eps,
    c10::string_view activation, double activation_param, std::array<bool, 3> output_mask) {
  TORCH_CHECK(!(differentiated(grad_output) || differentiated(output) || differentiated(weight) ||
                differentiated(bias)),
              "custom_bn.batch_norm_act_inplace_backward: the in-place mode has no double "
              "backward (its input, which second derivatives depend on, was overwritten); use "
              "BatchNormAct / custom_bn.functional.batch_norm(..., activation=...) for "
              "create_graph=True or torch.func transforms");
  at::AutoDispatchBelowADInplaceOrView guard;
  return batch_norm_act_inplace_backward(grad_output, output, weight, bias, save_mean,
                                         save_invstd, training, eps, activation,
                                         activation_param, output_mask);
}

// batch_norm_inference: the evaluation mode of the fused forward, whose derivative it shares
// (batch_norm_act_backward with the running statistics as the saved ones). The forward calls
// the operator itself below autograd, so that a tracer under autograd (torch.export) records
// batch_norm_inference, not the training operator with its running-stat write.
class BatchNormInferenceFunction : public torch::autograd::Function<BatchNormInferenceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               const c10::optional<at::Tensor>& residual, double eps,
                               c10::string_view activation, double activation_param) {
    at::Tensor output;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      output = batch_norm_inference(input, weight, bias, running_mean, running_var, residual, eps,
                                    activation, activation_param);
    }
    const auto acc = accumulate_dtype(input.scalar_type());
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            residual.value_or(at::Tensor()), running_mean.detach().to(acc),
                            (running_var.detach().to(acc) + eps).rsqrt()});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["activation_param"] = activation_param;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = saved[1].defined(), has_bias = saved[2].defined();
    const bool has_residual = saved[3].defined();
    const int64_t bias_index = 1 + has_weight;
    const int64_t residual_index = bias_index + has_bias + 2;
    const std::array<bool, 4> mask = {
        ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(bias_index),
        has_residual && ctx->needs_input_grad(residual_index)};
    variable_list result(9);
    if (!grads[0].defined()) return result;
    auto [gi, gw, gb, gr] = batch_norm_act_backward(
        grads[0], saved[0], optional_of(saved[1]), optional_of(saved[2]), optional_of(saved[3]),
        saved[4], saved[5], /*training=*/false, ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["activation_param"].toDouble(), mask);
    result[0] = undefined_if_empty_mask(gi, mask[0]);
    result[1] = undefined_if_empty_mask(gw, mask[1]);
    result[2] = undefined_if_empty_mask(gb, mask[2]);
    result[5] = undefined_if_empty_mask(gr, mask[3]);
    return result;
  }
};

at::Tensor batch_norm_inference_autograd(const at::Tensor& input,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const at::Tensor& running_mean,
                                         const at::Tensor& running_var,
                                         const c10::optional<at::Tensor>& residual, double eps,
                                         c10::string_view activation, double activation_param) {
  const c10::optional<at::Tensor> x = input;
  check_no_tangent("custom_bn.batch_norm_inference", {&x, &weight, &bias, &residual});
  if (at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) ||
                                     requires_grad(bias) || requires_grad(residual))) {
    return BatchNormInferenceFunction::apply(input, weight, bias, running_mean, running_var,
                                             residual, eps, activation, activation_param)[0];
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return batch_norm_inference(input, weight, bias, running_mean, running_var, residual, eps,
                              activation, activation_param);
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) {
  m.impl("batch_norm_inference", &batch_norm_inference_autograd);
  m.impl("batch_norm_act_inplace_forward", &batch_norm_act_inplace_forward_autograd);
  m.impl("batch_norm_act_inplace_backward", &batch_norm_act_inplace_backward_autograd);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_autograd);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_autograd);
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace custom_bn
