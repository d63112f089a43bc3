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
  const auto requires_grad = [](const c10::optional<at::Tensor>& t) {
    return given(t) && t->requires_grad();
  };
  const auto has_tangent = [](const c10::optional<at::Tensor>& t) {
    return given(t) && t->_fw_grad(/*level=*/0).defined();
  };
  TORCH_CHECK(!has_tangent(input) && !has_tangent(weight) && !has_tangent(bias),
              "custom_bn.batch_norm_forward: the operator's C++ autograd has no forward-mode "
              "derivative; for forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) call "
              "custom_bn.functional.batch_norm or the custom_bn modules, which provide it");
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

// The backward expressed with differentiable ATen ops, used only when the backward itself is
// being differentiated (double backward). In training mode the statistics are recomputed from
// input so that their dependence on input is part of the graph, as for torch.nn's batch norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_differentiable(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  check_batch_norm_backward_args(grad_output, input, weight, save_mean, save_invstd);
  const auto acc = accumulate_dtype(input.scalar_type());
  std::vector<int64_t> reduce_dims = {0};
  std::vector<int64_t> channel_shape(input.dim(), 1);
  channel_shape[1] = input.size(1);
  for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);

  const at::Tensor x = input.to(acc);
  const at::Tensor dy = grad_output.to(acc);
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
  if (given(weight)) scale = scale * weight->to(acc).reshape(channel_shape);

  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    at::Tensor g = dy;
    if (training) {
      g = dy - dy.mean(reduce_dims, true) - xhat * (dy * xhat).mean(reduce_dims, true);
    }
    grad_input = (g * scale).to(input.scalar_type())
                     .contiguous(batch_norm_memory_format(input));
  }
  const auto param_dtype = channel_gradient_dtype(input, weight);
  if (output_mask[1]) grad_weight = (dy * xhat).sum(reduce_dims).to(param_dtype);
  if (output_mask[2]) grad_bias = dy.sum(reduce_dims).to(param_dtype);
  return {output_mask[0] ? grad_input : unrequested_gradient(input),
          output_mask[1] ? grad_weight : unrequested_gradient(input),
          output_mask[2] ? grad_bias : unrequested_gradient(input)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  // Differentiated in reverse mode (create_graph) or in forward mode (a dual tangent, e.g.
  // torch.func.jacfwd over jacrev): the kernel has no derivative of its own.
  const auto differentiated = [](const at::Tensor& t) {
    return (at::GradMode::is_enabled() && t.requires_grad()) ||
           t._fw_grad(/*level=*/0).defined();
  };
  const bool differentiate = differentiated(grad_output) || differentiated(input) ||
                             (given(weight) && differentiated(*weight)) ||
                             differentiated(save_mean) || differentiated(save_invstd);
  if (differentiate) {
    return batch_norm_backward_differentiable(grad_output, input, weight, save_mean, save_invstd,
                                              training, eps, output_mask);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, training, eps,
                             output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, Autograd, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace custom_bn
