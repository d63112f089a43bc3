// The CPU kernels of the batch-norm operators (plain, fused and in-place forward and backward): argument
// checks, outputs, per-channel parameters in the accumulation type and the running-stat update.
// The arithmetic runs in the copy of batch_norm_kernel.cpp chosen for this CPU
// (cpu_capability.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "batch_norm_kernel.h"
#include "checks.h"
#include "common/batch_norm_math.h"
#include "cpu_capability.h"

namespace custom_bn {
namespace {

// Per-channel tensor as a contiguous tensor of the accumulation dtype, or undefined when absent
// (the kernels then use 1 for weight and 0 for bias).
at::Tensor channel_values(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!given(t)) return at::Tensor();
  // The common case needs no conversion: skip the dispatcher calls (per-call overhead counts on
  // small inputs).
  if (t->scalar_type() == acc && t->is_contiguous()) return *t;
  return t->to(acc).contiguous();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// running = (1 - m) running + m batch in place, in the accumulation type of the input. The
// running stats may be strided views.
template <typename acc_t>
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const acc_t* mean,
                          const std::vector<double>& var, double count, double momentum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, running_mean.scalar_type(), "custom_bn_running_stats", [&] {
        scalar_t* rm = running_mean.data_ptr<scalar_t>();
        scalar_t* rv = running_var.data_ptr<scalar_t>();
        const int64_t sm = running_mean.stride(0), sv = running_var.stride(0);
        const acc_t m = acc_t(momentum);
        for (int64_t c = 0; c < running_mean.size(0); ++c) {
          rm[c * sm] = scalar_t(running_update(acc_t(rm[c * sm]), mean[c], m));
          const acc_t unbiased = acc_t(unbiased_variance(var[c], count));
          rv[c * sv] = scalar_t(running_update(acc_t(rv[c * sv]), unbiased, m));
        }
      });
}

// The forward of input (contiguous in its memory format) into output (input's layout; may be
// input itself: every pass reads an element before writing it, and the statistics are complete
// before the first output is written). Returns (save_mean, save_invstd). Arguments checked.
std::tuple<at::Tensor, at::Tensor> forward_into(
    const at::Tensor& input, at::Tensor& output, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& residual, bool training,
    double momentum, double eps, Activation act, double activation_param) {
  const auto acc = accumulate_dtype(input.scalar_type());
  const Geometry g = geometry_of(input, batch_norm_memory_format(input));
  at::Tensor save_mean = at::empty({g.c}, input.options().dtype(acc));
  at::Tensor save_invstd = at::empty({g.c}, input.options().dtype(acc));

  if (input.numel() == 0 && (training || g.c == 0)) {
    // No values: zero statistics, running stats left alone. (Evaluation statistics do not
    // depend on the batch: the kernel reports them and normalizes nothing.)
    save_mean.zero_();
    save_invstd.zero_();
    return {save_mean, save_invstd};
  }
  const at::Tensor w = channel_values(weight, acc);
  const at::Tensor b = channel_values(bias, acc);
  const at::Tensor rm = training ? at::Tensor() : channel_values(running_mean, acc);
  const at::Tensor rv = training ? at::Tensor() : channel_values(running_var, acc);
  std::vector<double> var(g.c);
  cpu::selected_kernels().forward({input.scalar_type(), g, input.const_data_ptr(),
                                   output.data_ptr(), data_or_null(w), data_or_null(b),
                                   data_or_null(rm), data_or_null(rv), save_mean.data_ptr(),
                                   save_invstd.data_ptr(), var.data(), training, eps,
                                   data_or_null(residual), act, activation_param});
  if (training && given(running_mean)) {
    at::Tensor rm_out = *running_mean, rv_out = *running_var;
    AT_DISPATCH_FLOATING_TYPES(acc, "custom_bn_running_stats", [&] {
      update_running_stats<scalar_t>(rm_out, rv_out, save_mean.const_data_ptr<scalar_t>(), var,
                                     double(g.count()), momentum);
    });
  }
  return {save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(
    const at::Tensor& input_arg, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual_arg,
    bool training, double momentum, double eps, c10::string_view activation,
    double activation_param) {
  check_batch_norm_forward_args(input_arg, weight, bias, running_mean, running_var, training,
                                momentum, eps);
  check_residual("custom_bn.batch_norm", input_arg, residual_arg);
  const Activation act = parse_activation("custom_bn.batch_norm", activation);
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  const at::Tensor residual = given(residual_arg) ? residual_arg->contiguous(fmt) : at::Tensor();
  at::Tensor output = at::empty_like(input, input.options(), fmt);
  auto [save_mean, save_invstd] = forward_into(input, output, weight, bias, running_mean,
                                               running_var, residual, training, momentum, eps,
                                               act, activation_param);
  return {output, save_mean, save_invstd};
}

at::Tensor batch_norm_inference_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& running_mean, const at::Tensor& running_var,
                                    const c10::optional<at::Tensor>& residual, double eps,
                                    c10::string_view activation, double activation_param) {
  return std::get<0>(batch_norm_act_forward_cpu(input, weight, bias, running_mean, running_var,
                                                residual, /*training=*/false, 0.0, eps,
                                                activation, activation_param));
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward_cpu(
    at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param) {
  check_batch_norm_forward_args(input, weight, bias, running_mean, running_var, training,
                                momentum, eps);
  const Activation act =
      parse_inplace_activation("custom_bn.batch_norm", activation, activation_param);
  // A tensor that is not dense in its memory format is computed in a dense copy, copied back.
  at::Tensor dense = input.contiguous(batch_norm_memory_format(input));
  auto stats = forward_into(dense, dense, weight, bias, running_mean, running_var, at::Tensor(),
                            training, momentum, eps, act, activation_param);
  if (!dense.is_same(input)) input.copy_(dense);
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  return batch_norm_act_forward_cpu(input, weight, bias, running_mean, running_var, c10::nullopt,
                                    training, momentum, eps, "identity", 0.0);
}

// SyncBatchNorm's split of the backward (cpu::BackwardArgs): this batch's sums written to `out`
// ([2, C] doubles), or the whole batch's `given` with its `count`.
struct SplitSums {
  double* out = nullptr;
  const double* given = nullptr;
  int64_t count = 0;
};

// The backward kernels on checked arguments; x is the input, or in the in-place mode the
// output (from_output).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_checked(
    const at::Tensor& grad_output_arg, const at::Tensor& x_arg,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual_arg, const at::Tensor& save_mean_arg,
    const at::Tensor& save_invstd_arg, bool training, Activation act, double activation_param,
    std::array<bool, 4> output_mask, bool from_output, SplitSums split = {}) {
  const auto fmt = batch_norm_memory_format(x_arg);
  // The residual enters only through z (act'(z)); the identity never reads it.
  const at::Tensor residual = given(residual_arg) && act != Activation::kIdentity
                                  ? residual_arg->contiguous(fmt)
                                  : at::Tensor();
  const at::Tensor x = x_arg.contiguous(fmt);
  const at::Tensor grad_output = grad_output_arg.contiguous(fmt);
  const at::Tensor save_mean = save_mean_arg.contiguous();
  const at::Tensor save_invstd = save_invstd_arg.contiguous();
  const auto acc = accumulate_dtype(x.scalar_type());
  const auto param_dtype = channel_gradient_dtype(x, weight);
  const Geometry g = geometry_of(x, fmt);

  at::Tensor grad_input = output_mask[0] ? at::empty_like(x, x.options(), fmt)
                                          : unrequested_gradient(x);
  // Computed in the accumulation dtype; zero for an empty batch.
  const auto channel_grad = [&](bool wanted) {
    if (!wanted) return at::Tensor();
    return x.numel() == 0 ? at::zeros({g.c}, x.options().dtype(acc))
                          : at::empty({g.c}, x.options().dtype(acc));
  };
  at::Tensor grad_weight = channel_grad(output_mask[1]);
  at::Tensor grad_bias = channel_grad(output_mask[2]);
  at::Tensor grad_residual = output_mask[3] ? at::empty_like(x, x.options(), fmt)
                                            : unrequested_gradient(x);
  if (x.numel() > 0) {
    const at::Tensor w = channel_values(weight, acc);
    const at::Tensor b = channel_values(bias, acc);
    cpu::selected_kernels().backward(
        {x.scalar_type(), g, grad_output.const_data_ptr(), x.const_data_ptr(),
         output_mask[0] ? grad_input.data_ptr() : nullptr, data_or_null(w),
         save_mean.const_data_ptr(), save_invstd.const_data_ptr(),
         output_mask[1] ? grad_weight.data_ptr() : nullptr,
         output_mask[2] ? grad_bias.data_ptr() : nullptr, training, data_or_null(b),
         data_or_null(residual), output_mask[3] ? grad_residual.data_ptr() : nullptr, act,
         activation_param, from_output, split.out, split.given, split.count});
  }
  const auto finish = [&](const at::Tensor& t) {
    return t.defined() ? t.to(param_dtype) : unrequested_gradient(x);
  };
  return {grad_input, finish(grad_weight), finish(grad_bias), grad_residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double /*eps*/,
    c10::string_view activation, double activation_param, std::array<bool, 4> output_mask) {
  constexpr const char* op = "custom_bn.batch_norm_backward";
  check_batch_norm_backward_args(grad_output, input, weight, save_mean, save_invstd);
  check_channel_counts(op, input, {{&bias, "bias"}});
  check_channel_tensors(op, input, {{&weight, "weight"}, {&bias, "bias"}});
  check_residual(op, input, residual);
  return backward_checked(grad_output, input, weight, bias, residual, save_mean, save_invstd,
                          training, parse_activation(op, activation), activation_param,
                          output_mask, /*from_output=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double /*eps*/,
    c10::string_view activation, double activation_param, std::array<bool, 3> output_mask) {
  constexpr const char* op = "custom_bn.batch_norm_backward";
  check_batch_norm_backward_args(grad_output, output, weight, save_mean, save_invstd);
  check_channel_counts(op, output, {{&bias, "bias"}});
  check_channel_tensors(op, output, {{&weight, "weight"}, {&bias, "bias"}});
  const Activation act = parse_inplace_activation(op, activation, activation_param);
  check_inplace_weight(op, weight);
  auto [grad_input, grad_weight, grad_bias, unused] = backward_checked(
      grad_output, output, weight, bias, c10::nullopt, save_mean, save_invstd, training, act,
      activation_param, {output_mask[0], output_mask[1], output_mask[2], false},
      /*from_output=*/true);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  auto [grad_input, grad_weight, grad_bias, unused] = batch_norm_act_backward_cpu(
      grad_output, input, weight, c10::nullopt, c10::nullopt, save_mean, save_invstd, training,
      eps, "identity", 0.0, {output_mask[0], output_mask[1], output_mask[2], false});
  return {grad_input, grad_weight, grad_bias};
}

// ---------------------------------------------------------------- SyncBatchNorm's pieces

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& input_arg) {
  check_input("custom_bn.batch_norm_stats", input_arg);
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  const Geometry g = geometry_of(input, fmt);
  at::Tensor mean = at::zeros({g.c}, input.options().dtype(at::kDouble));
  at::Tensor var = at::zeros({g.c}, input.options().dtype(at::kDouble));
  if (input.numel() > 0) {
    cpu::selected_kernels().stats({input.scalar_type(), g, input.const_data_ptr(),
                                   mean.data_ptr<double>(), var.data_ptr<double>()});
  }
  const auto acc = accumulate_dtype(input.scalar_type());
  return {mean.to(acc), var.to(acc)};
}

at::Tensor batch_norm_backward_reduce_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                          const c10::optional<at::Tensor>& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const c10::optional<at::Tensor>& residual,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          c10::string_view activation, double activation_param) {
  const Activation act =
      check_split_backward_args("custom_bn.batch_norm_backward_reduce", grad_output, input,
                                weight, bias, residual, mean, invstd, activation)
          .second;
  at::Tensor sums = at::zeros({2, input.size(1)}, input.options().dtype(at::kDouble));
  backward_checked(grad_output, input, weight, bias, residual, mean, invstd, /*training=*/true,
                   act, activation_param, {false, false, false, false}, /*from_output=*/false,
                   {sums.data_ptr<double>()});
  return sums.to(accumulate_dtype(input.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt_cpu(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& sums, int64_t count, c10::string_view activation, double activation_param,
    std::array<bool, 2> output_mask) {
  constexpr const char* op = "custom_bn.batch_norm_backward_elemt";
  const Activation act = check_split_backward_args(op, grad_output, input, weight, bias,
                                                   residual, mean, invstd, activation)
                             .second;
  check_given_sums(op, input, sums, count);
  const at::Tensor given = sums.to(at::kDouble).contiguous();
  auto [grad_input, unused_w, unused_b, grad_residual] = backward_checked(
      grad_output, input, weight, bias, residual, mean, invstd, /*training=*/true, act,
      activation_param, {output_mask[0], false, false, output_mask[1]}, /*from_output=*/false,
      {nullptr, given.const_data_ptr<double>(), count});
  return {grad_input, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("batch_norm_inference", &batch_norm_inference_cpu);
  m.impl("batch_norm_act_inplace_forward", &batch_norm_act_inplace_forward_cpu);
  m.impl("batch_norm_act_inplace_backward", &batch_norm_act_inplace_backward_cpu);
}

}  // namespace custom_bn
