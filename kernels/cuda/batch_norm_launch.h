#pragma once
// Host side of the CUDA batch-norm operators: argument checks, layout, dtype and activation
// dispatch, output and workspace allocation, and which kernel runs when, with which launch configuration
// and arguments. It is written once against a small backend, so that the real launchers
// (batch_norm_kernel.cu: <<<>>> on the current stream) and the emulated kernel tests
// (tests/cpp/emulator: CPU tensors, the same kernel bodies run by the CPU emulator) execute the
// same sequence; a launch bug cannot hide in a test-only copy of it.
//
// A backend provides
//   using DeviceGuard = ...;                      constructible from the input's at::Device
//   int num_sms() const;                          multiprocessors, for the grid heuristics
//   const cuda_launch::Tuning& tuning() const;    the launchers' knobs (defaults on a GPU)
//   template <auto kernel, typename... Args>
//   void launch(const cuda_launch::LaunchConfig& cfg, Args... args) const;
// where launch runs `kernel(args...)` on grid (cfg.grid_x, cfg.grid_y), block (cfg.block_x,
// cfg.block_y) with cfg.shared_bytes of dynamic shared memory. Tensors are allocated with
// at::empty / at::zeros on the input's device by both backends.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "batch_norm_kernel.cuh"
#include "checks.h"
#include "launch_config.h"

namespace custom_bn {
namespace cuda_launch {
namespace detail {

// Partial results of a split reduction and the zeroed arrival counters of its last-block merge.
struct ReduceWorkspace {
  at::Tensor partial;
  at::Tensor counters;

  template <typename acc_t>
  acc_t* partial_ptr() const {
    return partial.data_ptr<acc_t>();
  }
  // The kernels count with unsigned atomics; int32 is the tensor dtype of the same width.
  unsigned* counters_ptr() const { return reinterpret_cast<unsigned*>(counters.data_ptr<int>()); }
};

inline ReduceWorkspace reduce_workspace(const LaunchConfig& cfg, const Geometry& g, int fields,
                                        const at::TensorOptions& acc_options) {
  return {at::empty({fields * partial_slots(cfg, g)}, acc_options),
          at::zeros({counters(cfg)}, acc_options.dtype(at::kInt))};
}

template <typename param_t>
param_t* optional_ptr(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->data_ptr<param_t>() : nullptr;
}

// weight and bias as the kernels index them: dense [C] arrays (a view such as w[::2] is copied;
// the running stats, written in place, keep their strides instead).
inline c10::optional<at::Tensor> dense(const c10::optional<at::Tensor>& t) {
  return given(t) ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

inline int64_t optional_stride(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->stride(0) : 0;
}

template <typename acc_t>
acc_t* ptr_or_null(const at::Tensor* t) {
  return t != nullptr ? t->data_ptr<acc_t>() : nullptr;
}

// Runs f(param_t{}) with param_t the C++ type of the per-channel tensors: the input's own type,
// or float for float16/bfloat16 input (the only two choices checks.h admits).
template <typename scalar_t, typename F>
void dispatch_param_type(at::ScalarType param_dtype, F&& f) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    f(scalar_t{});
  } else if (param_dtype == at::kFloat) {
    f(float{});
  } else {
    f(scalar_t{});
  }
}

// Runs f(std::integral_constant<Activation, kAct>{}) with kAct == act: where the activation
// becomes the kernels' template parameter, once per launch sequence.
template <typename F>
void dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kIdentity:
      return f(std::integral_constant<Activation, Activation::kIdentity>{});
    case Activation::kRelu:
      return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kLeakyRelu:
      return f(std::integral_constant<Activation, Activation::kLeakyRelu>{});
    case Activation::kElu:
      return f(std::integral_constant<Activation, Activation::kElu>{});
    case Activation::kSilu:
      return f(std::integral_constant<Activation, Activation::kSilu>{});
  }
  TORCH_CHECK(false, "custom_bn: unknown activation ", static_cast<int>(act));
}

// Runs f(index_t{}) with the narrowest index type that addresses every element of `input`.
template <typename F>
void dispatch_index_type(const at::Tensor& input, const Tuning& tuning, F&& f) {
  if (input.numel() < tuning.max_numel_32bit_index) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

struct ForwardArgs {
  const at::Tensor& input;  // contiguous in the chosen memory format
  const at::Tensor& output;
  const at::Tensor& save_mean;
  const at::Tensor& save_invstd;  // undefined: not requested (batch_norm_stats)
  const c10::optional<at::Tensor>& weight;
  const c10::optional<at::Tensor>& bias;
  const c10::optional<at::Tensor>& running_mean;
  const c10::optional<at::Tensor>& running_var;
  const c10::optional<at::Tensor>& residual;  // contiguous in input's memory format
  bool training;
  double momentum;
  double eps;
  Activation activation;
  double activation_param;
  Geometry g;
  const at::Tensor* save_var = nullptr;  // the biased variance; null: not requested (the forward)
};

template <typename scalar_t, typename param_t, typename index_t, typename Backend>
void launch_collect_stats(const Backend& backend, const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg =
      collect_stats_launch(g, sizeof(acc_t), backend.num_sms(), backend.tuning());
  const ReduceWorkspace ws = reduce_workspace(cfg, g, 3, a.save_mean.options());
  const cuda_kernels::CollectStats<scalar_t, param_t, acc_t> policy{
      a.input.const_data_ptr<scalar_t>(),
      a.save_mean.data_ptr<acc_t>(),
      a.save_invstd.defined() ? a.save_invstd.data_ptr<acc_t>() : nullptr,
      ptr_or_null<acc_t>(a.save_var),
      optional_ptr<param_t>(a.running_mean),
      optional_ptr<param_t>(a.running_var),
      optional_stride(a.running_mean),
      optional_stride(a.running_var),
      static_cast<acc_t>(a.momentum),
      static_cast<acc_t>(a.eps)};
  if (g.layout == Layout::kContiguous) {
    backend.template launch<
        &cuda_kernels::batch_norm_collect_stats_contiguous_kernel<scalar_t, param_t, acc_t,
                                                                  index_t>>(
        cfg, policy, index_t(g.n), index_t(g.c), index_t(g.hw), cfg.splits_n,
        ws.partial_ptr<acc_t>(), ws.counters_ptr());
  } else {
    backend.template launch<
        &cuda_kernels::batch_norm_collect_stats_channels_last_kernel<scalar_t, param_t, acc_t,
                                                                     index_t>>(
        cfg, policy, index_t(g.rows()), index_t(g.c), ws.partial_ptr<acc_t>(),
        ws.counters_ptr());
  }
}

template <typename scalar_t, typename param_t, typename Backend>
void launch_eval_stats(const Backend& backend, const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaunchConfig cfg = per_channel_launch(a.g.c, backend.tuning());
  backend.template launch<&cuda_kernels::batch_norm_eval_stats_kernel<param_t, acc_t>>(
      cfg, a.running_mean->const_data_ptr<param_t>(), a.running_mean->stride(0),
      a.running_var->const_data_ptr<param_t>(), a.running_var->stride(0),
      static_cast<acc_t>(a.eps), a.save_mean.data_ptr<acc_t>(), a.save_invstd.data_ptr<acc_t>(),
      a.g.c);
}

template <Activation kAct, typename scalar_t, typename param_t, typename index_t,
          typename Backend>
void launch_transform(const Backend& backend, const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg = elementwise_launch(g, backend.num_sms(), backend.tuning());
  const scalar_t* x = a.input.const_data_ptr<scalar_t>();
  const scalar_t* r = given(a.residual) ? a.residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y = a.output.data_ptr<scalar_t>();
  const acc_t* mean = a.save_mean.const_data_ptr<acc_t>();
  const acc_t* invstd = a.save_invstd.const_data_ptr<acc_t>();
  const param_t* w = optional_ptr<param_t>(a.weight);
  const param_t* b = optional_ptr<param_t>(a.bias);
  const acc_t act_param = static_cast<acc_t>(a.activation_param);
  if (g.layout == Layout::kContiguous) {
    backend.template launch<&cuda_kernels::batch_norm_transform_contiguous_kernel<
        kAct, scalar_t, param_t, acc_t, index_t>>(cfg, x, r, y, mean, invstd, w, b, act_param,
                                                  index_t(g.n), index_t(g.c), index_t(g.hw),
                                                  cfg.splits_n);
  } else {
    backend.template launch<&cuda_kernels::batch_norm_transform_channels_last_kernel<
        kAct, scalar_t, param_t, acc_t, index_t>>(cfg, x, r, y, mean, invstd, w, b, act_param,
                                                  index_t(g.rows()), index_t(g.c));
  }
}

// The forward after its checks: act(BN(input) + residual) written into output, both contiguous
// in fmt; returns (save_mean, save_invstd). output may be input itself (the in-place mode): the
// statistics kernel has read all of input before the transform, a later launch on the same
// stream, overwrites it.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> forward_into(
    const Backend& backend, const at::Tensor& input, const at::Tensor& output,
    at::MemoryFormat fmt, at::ScalarType param_dtype, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual_arg,
    bool training, double momentum, double eps, Activation activation,
    double activation_param) {
  const auto acc_options = input.options().dtype(accumulate_dtype(input.scalar_type()));
  const Geometry g = geometry_of(input, fmt);
  at::Tensor save_mean = at::empty({g.c}, acc_options);
  at::Tensor save_invstd = at::empty({g.c}, acc_options);
  if (g.c == 0) return {save_mean, save_invstd};

  // An empty batch has no statistics: training reports zeros and leaves the running stats
  // alone; evaluation statistics do not depend on the batch, so they are reported as usual.
  if (input.numel() == 0 && training) {
    save_mean.zero_();
    save_invstd.zero_();
    return {save_mean, save_invstd};
  }

  const auto weight_dense = dense(weight), bias_dense = dense(bias);
  // The kernels index the residual as they index the input.
  const c10::optional<at::Tensor> residual =
      given(residual_arg) ? c10::optional<at::Tensor>(residual_arg->contiguous(fmt))
                          : c10::nullopt;
  const ForwardArgs args{input,        output,       save_mean,   save_invstd, weight_dense,
                         bias_dense,   running_mean, running_var, residual,    training,
                         momentum,     eps,          activation,  activation_param, g};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "custom_bn_batch_norm_forward_cuda", [&] {
        dispatch_param_type<scalar_t>(param_dtype, [&](auto param_tag) {
          using param_t = decltype(param_tag);
          if (!training) launch_eval_stats<scalar_t, param_t>(backend, args);
          if (input.numel() == 0) return;
          dispatch_index_type(input, backend.tuning(), [&](auto index_tag) {
            using index_t = decltype(index_tag);
            if (training) launch_collect_stats<scalar_t, param_t, index_t>(backend, args);
            dispatch_activation(activation, [&](auto act_tag) {
              launch_transform<decltype(act_tag)::value, scalar_t, param_t, index_t>(backend,
                                                                                      args);
            });
          });
        });
      });
  return {save_mean, save_invstd};
}

}  // namespace detail

// custom_bn::batch_norm_act_forward on the backend's device (contract of ops/batch_norm.h):
// y = act(BN(x) + residual), residual optional.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const Backend& backend, const at::Tensor& input_arg, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double momentum, double eps, Activation activation,
    double activation_param) {
  const at::ScalarType param_dtype = check_batch_norm_forward_args(
      input_arg, weight, bias, running_mean, running_var, training, momentum, eps);
  check_residual("custom_bn.batch_norm", input_arg, residual);
  const typename Backend::DeviceGuard device_guard(input_arg.device());
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  at::Tensor output = at::empty_like(input, input.options(), fmt);
  auto [save_mean, save_invstd] = detail::forward_into(
      backend, input, output, fmt, param_dtype, weight, bias, running_mean, running_var, residual,
      training, momentum, eps, activation, activation_param);
  return {output, save_mean, save_invstd};
}

// custom_bn::batch_norm_act_inplace_forward on the backend's device (contract of
// ops/batch_norm.h): act(BN(input)) written into input; returns (save_mean, save_invstd). It takes
// the activation's name, so that the check that it is invertible belongs to the sequence both
// backends run.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward(
    const Backend& backend, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param) {
  const at::ScalarType param_dtype = check_batch_norm_forward_args(
      input, weight, bias, running_mean, running_var, training, momentum, eps);
  const Activation act =
      parse_inplace_activation("custom_bn.batch_norm", activation, activation_param);
  const typename Backend::DeviceGuard device_guard(input.device());
  const auto fmt = batch_norm_memory_format(input);
  // input itself when it is dense in fmt, and the kernels then read and overwrite it; any other
  // layout is normalized in a dense copy, copied back at the end.
  const at::Tensor dense_input = input.contiguous(fmt);
  auto stats = detail::forward_into(backend, dense_input, dense_input, fmt, param_dtype, weight,
                                    bias, running_mean, running_var, c10::nullopt, training,
                                    momentum, eps, act, activation_param);
  if (!dense_input.is_same(input)) input.copy_(dense_input);
  return stats;
}

// custom_bn::batch_norm_forward: the fused forward without residual, activation the identity.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const Backend& backend, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  return batch_norm_act_forward(backend, input, weight, bias, running_mean, running_var,
                                c10::nullopt, training, momentum, eps, Activation::kIdentity,
                                0.0);
}

// custom_bn::batch_norm_stats on the backend's device (contract of ops/sync_batch_norm.h): the
// training forward's statistics kernel alone, asked for the biased variance instead of invstd
// and given no running stats.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const Backend& backend,
                                                    const at::Tensor& input_arg) {
  check_input("custom_bn.batch_norm_stats", input_arg);
  const typename Backend::DeviceGuard device_guard(input_arg.device());
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  const Geometry g = geometry_of(input, fmt);
  const auto acc_options = input.options().dtype(accumulate_dtype(input.scalar_type()));
  // An empty batch has zero statistics (SyncBatchNorm weighs them by a count of 0).
  if (input.numel() == 0) return {at::zeros({g.c}, acc_options), at::zeros({g.c}, acc_options)};
  at::Tensor mean = at::empty({g.c}, acc_options);
  at::Tensor var = at::empty({g.c}, acc_options);
  const at::Tensor none;  // no output and no save_invstd: only the statistics kernel runs
  const c10::optional<at::Tensor> absent;
  const detail::ForwardArgs args{input,  none,   mean,   none,
                                 absent, absent, absent, absent,
                                 absent, /*training=*/true, /*momentum=*/0.0, /*eps=*/0.0,
                                 Activation::kIdentity, /*activation_param=*/0.0, g, &var};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "custom_bn_batch_norm_stats_cuda", [&] {
        // param_t types only the running stats, absent here: acc_t reuses an instantiation of
        // the forward's.
        detail::dispatch_index_type(input, backend.tuning(), [&](auto index_tag) {
          detail::launch_collect_stats<scalar_t, at::opmath_type<scalar_t>,
                                       decltype(index_tag)>(backend, args);
        });
      });
  return {mean, var};
}

// ---------------------------------------------------------------------------------------------
// Backward.

namespace detail {

using cuda_kernels::BackwardSource;

struct BackwardArgs {
  const at::Tensor& grad_output;  // both contiguous in input's memory format
  const at::Tensor& saved;        // x, or the forward's output y in the in-place mode
  const c10::optional<at::Tensor>& weight;
  const c10::optional<at::Tensor>& bias;
  const c10::optional<at::Tensor>& residual;  // as input; none for the identity
  const at::Tensor& save_mean;
  const at::Tensor& save_invstd;
  bool training;
  double activation_param;
  Geometry g;
  const at::Tensor* grad_input;  // null: not requested
  const at::Tensor* grad_residual;
  const at::Tensor* sum_dy;      // null: no sums needed
  const at::Tensor* sum_dy_xmu;
  bool sums_given;  // the sums are SyncBatchNorm's, of the whole batch: no reduction
  int64_t count;    // values per channel behind the sums
  const at::Tensor* grad_weight;  // acc dtype; null: not requested
  const at::Tensor* grad_bias;
};

template <typename scalar_t, typename param_t>
cuda_kernels::EpilogueInputs<scalar_t, param_t, at::opmath_type<scalar_t>> epilogue_inputs(
    const BackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  return {optional_ptr<param_t>(a.weight), optional_ptr<param_t>(a.bias),
          given(a.residual) ? a.residual->const_data_ptr<scalar_t>() : nullptr,
          static_cast<acc_t>(a.activation_param)};
}

template <Activation kAct, BackwardSource kSource, typename scalar_t, typename param_t,
          typename index_t, typename Backend>
void launch_backward_reduce(const Backend& backend, const BackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg =
      backward_reduce_launch(g, sizeof(acc_t), backend.num_sms(), backend.tuning());
  const ReduceWorkspace ws = reduce_workspace(cfg, g, 2, a.save_mean.options());
  const cuda_kernels::BackwardReduce<kAct, kSource, scalar_t, param_t, acc_t> policy{
      a.grad_output.const_data_ptr<scalar_t>(),
      a.saved.const_data_ptr<scalar_t>(),
      a.save_mean.const_data_ptr<acc_t>(),
      a.save_invstd.const_data_ptr<acc_t>(),
      epilogue_inputs<scalar_t, param_t>(a),
      ptr_or_null<acc_t>(a.sum_dy),
      ptr_or_null<acc_t>(a.sum_dy_xmu),
      ptr_or_null<acc_t>(a.grad_weight),
      ptr_or_null<acc_t>(a.grad_bias)};
  if (g.layout == Layout::kContiguous) {
    backend.template launch<&cuda_kernels::batch_norm_backward_reduce_contiguous_kernel<
        kAct, kSource, scalar_t, param_t, acc_t, index_t>>(
        cfg, policy, index_t(g.n), index_t(g.c), index_t(g.hw), cfg.splits_n,
        ws.partial_ptr<acc_t>(), ws.counters_ptr());
  } else {
    backend.template launch<&cuda_kernels::batch_norm_backward_reduce_channels_last_kernel<
        kAct, kSource, scalar_t, param_t, acc_t, index_t>>(
        cfg, policy, index_t(g.rows()), index_t(g.c), ws.partial_ptr<acc_t>(),
        ws.counters_ptr());
  }
}

template <bool kTraining, Activation kAct, BackwardSource kSource, typename scalar_t,
          typename param_t, typename index_t, typename Backend>
void launch_backward_elementwise(const Backend& backend, const BackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg = elementwise_launch(g, backend.num_sms(), backend.tuning());
  const scalar_t* dy = a.grad_output.const_data_ptr<scalar_t>();
  const scalar_t* saved = a.saved.const_data_ptr<scalar_t>();
  const cuda_kernels::ElementwiseGrads<scalar_t> out{
      a.grad_input != nullptr ? a.grad_input->data_ptr<scalar_t>() : nullptr,
      a.grad_residual != nullptr ? a.grad_residual->data_ptr<scalar_t>() : nullptr};
  const acc_t* mean = a.save_mean.const_data_ptr<acc_t>();
  const acc_t* invstd = a.save_invstd.const_data_ptr<acc_t>();
  const auto epilogue = epilogue_inputs<scalar_t, param_t>(a);
  const acc_t* sum_dy = ptr_or_null<acc_t>(a.sum_dy);
  const acc_t* sum_dy_xmu = ptr_or_null<acc_t>(a.sum_dy_xmu);
  const acc_t count = static_cast<acc_t>(a.count);
  if (g.layout == Layout::kContiguous) {
    backend.template launch<&cuda_kernels::batch_norm_backward_elementwise_contiguous_kernel<
        kTraining, kAct, kSource, scalar_t, param_t, acc_t, index_t>>(
        cfg, dy, saved, out, mean, invstd, epilogue, sum_dy, sum_dy_xmu, count, index_t(g.n),
        index_t(g.c), index_t(g.hw), cfg.splits_n);
  } else {
    backend.template launch<&cuda_kernels::batch_norm_backward_elementwise_channels_last_kernel<
        kTraining, kAct, kSource, scalar_t, param_t, acc_t, index_t>>(
        cfg, dy, saved, out, mean, invstd, epilogue, sum_dy, sum_dy_xmu, count,
        index_t(g.rows()), index_t(g.c));
  }
}

template <Activation kAct, BackwardSource kSource, typename scalar_t, typename param_t,
          typename index_t, typename Backend>
void run_backward(const Backend& backend, const BackwardArgs& a) {
  if (a.sum_dy != nullptr && !a.sums_given) {
    launch_backward_reduce<kAct, kSource, scalar_t, param_t, index_t>(backend, a);
  }
  if (a.grad_input == nullptr && a.grad_residual == nullptr) return;
  // grad_residual alone (dz) needs no sums: the eval-mode kernel computes it without them.
  if (a.training && a.grad_input != nullptr) {
    launch_backward_elementwise<true, kAct, kSource, scalar_t, param_t, index_t>(backend, a);
  } else {
    launch_backward_elementwise<false, kAct, kSource, scalar_t, param_t, index_t>(backend, a);
  }
}

// Runs f(std::integral_constant<BackwardSource, source>{}). kOutput is instantiated only for the
// activations the in-place mode admits (parse_inplace_activation).
template <Activation kAct, typename F>
void dispatch_source(BackwardSource source, F&& f) {
  if (source == BackwardSource::kInput) {
    f(std::integral_constant<BackwardSource, BackwardSource::kInput>{});
    return;
  }
  if constexpr (kAct == Activation::kIdentity || kAct == Activation::kLeakyRelu ||
                kAct == Activation::kElu) {
    f(std::integral_constant<BackwardSource, BackwardSource::kOutput>{});
  } else {
    TORCH_INTERNAL_ASSERT(false, "custom_bn: no in-place backward for activation ",
                          static_cast<int>(kAct));
  }
}

// SyncBatchNorm's split of the backward into its two passes: the reduction alone, its sums
// exported into `out` (batch_norm_backward_reduce), or the elementwise pass alone, with the whole
// batch's sums `given` and its `count` of values per channel (batch_norm_backward_elemt). Both
// [2, C] of the accumulation dtype, contiguous; `given` is only read.
struct SplitSums {
  const at::Tensor* out = nullptr;
  const at::Tensor* given = nullptr;
  int64_t count = 0;
};

// The backward after its checks, in either mode: the gradients of act(BN(x) + residual) from
// grad_output and `saved`, which is x (kInput) or the forward's output y (kOutput, no residual).
// output_mask: grad_input, grad_weight, grad_bias, grad_residual.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_from(
    const Backend& backend, BackwardSource source, const at::Tensor& grad_output_arg,
    const at::Tensor& saved_arg, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual_arg,
    const at::Tensor& save_mean_arg, const at::Tensor& save_invstd_arg, bool training,
    at::ScalarType param_dtype, Activation activation, double activation_param,
    std::array<bool, 4> output_mask, SplitSums split = {}) {
  const typename Backend::DeviceGuard device_guard(saved_arg.device());
  const auto fmt = batch_norm_memory_format(saved_arg);
  const at::Tensor saved = saved_arg.contiguous(fmt);
  const at::Tensor grad_output = grad_output_arg.contiguous(fmt);
  const at::Tensor save_mean = save_mean_arg.contiguous();
  const at::Tensor save_invstd = save_invstd_arg.contiguous();
  const auto acc_options = saved.options().dtype(accumulate_dtype(saved.scalar_type()));
  const auto grad_param_dtype = channel_gradient_dtype(saved, weight);
  const Geometry g = geometry_of(saved, fmt);

  const auto gradient_like_input = [&](bool wanted) {
    return wanted ? at::empty_like(saved, saved.options(), fmt) : unrequested_gradient(saved);
  };
  at::Tensor grad_input = gradient_like_input(output_mask[0]);
  at::Tensor grad_residual = gradient_like_input(output_mask[3]);
  if (saved.numel() == 0) {
    if (split.out != nullptr) split.out->zero_();  // nothing to add to SyncBatchNorm's sums
    const auto zeros = [&](bool wanted) {
      return wanted ? at::zeros({g.c}, saved.options().dtype(grad_param_dtype))
                    : unrequested_gradient(saved);
    };
    return {grad_input, zeros(output_mask[1]), zeros(output_mask[2]), grad_residual};
  }

  // grad_weight / grad_bias need the sums, and so does grad_input in training mode; eval-mode
  // grad_input alone is a pure scale of dz, and grad_residual is dz itself.
  const bool need_sums =
      split.out != nullptr || output_mask[1] || output_mask[2] || (training && output_mask[0]);
  at::Tensor sum_dy, sum_dy_xmu, grad_weight_acc, grad_bias_acc;
  if (split.out != nullptr || split.given != nullptr) {
    // The rows of a contiguous [2, C] tensor are [C] arrays: the kernels write or read in place.
    const at::Tensor& sums = split.out != nullptr ? *split.out : *split.given;
    sum_dy = sums.select(0, 0);
    sum_dy_xmu = sums.select(0, 1);
  } else if (need_sums) {
    sum_dy = at::empty({g.c}, acc_options);
    sum_dy_xmu = at::empty({g.c}, acc_options);
  }
  if (output_mask[1]) grad_weight_acc = at::empty({g.c}, acc_options);
  if (output_mask[2]) grad_bias_acc = at::empty({g.c}, acc_options);

  const auto weight_dense = dense(weight), bias_dense = dense(bias);
  // z enters only through act'(z): the identity reads no residual.
  const c10::optional<at::Tensor> residual =
      given(residual_arg) && activation != Activation::kIdentity
          ? c10::optional<at::Tensor>(residual_arg->contiguous(fmt))
          : c10::nullopt;
  const BackwardArgs args{grad_output,
                          saved,
                          weight_dense,
                          bias_dense,
                          residual,
                          save_mean,
                          save_invstd,
                          training,
                          activation_param,
                          g,
                          output_mask[0] ? &grad_input : nullptr,
                          output_mask[3] ? &grad_residual : nullptr,
                          need_sums ? &sum_dy : nullptr,
                          need_sums ? &sum_dy_xmu : nullptr,
                          split.given != nullptr,
                          split.given != nullptr ? split.count : g.count(),
                          output_mask[1] ? &grad_weight_acc : nullptr,
                          output_mask[2] ? &grad_bias_acc : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, saved.scalar_type(), "custom_bn_batch_norm_backward_cuda", [&] {
        dispatch_param_type<scalar_t>(param_dtype, [&](auto param_tag) {
          using param_t = decltype(param_tag);
          dispatch_index_type(saved, backend.tuning(), [&](auto index_tag) {
            using index_t = decltype(index_tag);
            dispatch_activation(activation, [&](auto act_tag) {
              constexpr Activation kAct = decltype(act_tag)::value;
              dispatch_source<kAct>(source, [&](auto source_tag) {
                run_backward<kAct, decltype(source_tag)::value, scalar_t, param_t, index_t>(
                    backend, args);
              });
            });
          });
        });
      });

  // The sums are kept in acc_t; the gradients take the parameters' dtype (no copy when that
  // already is acc_t).
  return {grad_input,
          output_mask[1] ? grad_weight_acc.to(grad_param_dtype) : unrequested_gradient(saved),
          output_mask[2] ? grad_bias_acc.to(grad_param_dtype) : unrequested_gradient(saved),
          grad_residual};
}

}  // namespace detail

// custom_bn::batch_norm_act_backward on the backend's device (contract of ops/batch_norm.h):
// z is recomputed from input, residual, weight, bias and the saved statistics; dz = dy * act'(z)
// then takes dy's place in the batch-norm backward, and grad_residual = dz.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, Activation activation,
    double activation_param, std::array<bool, 4> output_mask) {
  constexpr const char* op = "custom_bn.batch_norm_backward";
  check_batch_norm_backward_args(grad_output, input, weight, save_mean, save_invstd);
  check_channel_counts(op, input, {{&bias, "bias"}});
  // The dtype of the pointers weight and bias are read through (either may be absent).
  const at::ScalarType param_dtype =
      check_channel_tensors(op, input, {{&weight, "weight"}, {&bias, "bias"}});
  check_residual(op, input, residual);
  return detail::backward_from(backend, detail::BackwardSource::kInput, grad_output, input,
                               weight, bias, residual, save_mean, save_invstd, training,
                               param_dtype, activation, activation_param, output_mask);
}

// custom_bn::batch_norm_act_inplace_backward on the backend's device (contract of
// ops/batch_norm.h): the backward of batch_norm_act_inplace_forward from its output alone.
// z = act^-1(output) and x - mean = (z - bias) / (weight * save_invstd) take the places of the
// recomputed z and x - mean; the rest is batch_norm_act_backward. Takes the activation's name,
// as the in-place forward does.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    c10::string_view activation, double activation_param, std::array<bool, 3> output_mask) {
  constexpr const char* op = "custom_bn.batch_norm_backward";
  check_batch_norm_backward_args(grad_output, output, weight, save_mean, save_invstd);
  check_channel_counts(op, output, {{&bias, "bias"}});
  const at::ScalarType param_dtype =
      check_channel_tensors(op, output, {{&weight, "weight"}, {&bias, "bias"}});
  const Activation act = parse_inplace_activation(op, activation, activation_param);
  check_inplace_weight(op, weight);
  auto [grad_input, grad_weight, grad_bias, unused] = detail::backward_from(
      backend, detail::BackwardSource::kOutput, grad_output, output, weight, bias, c10::nullopt,
      save_mean, save_invstd, training, param_dtype, act, activation_param,
      {output_mask[0], output_mask[1], output_mask[2], false});
  return {grad_input, grad_weight, grad_bias};
}

// custom_bn::batch_norm_backward: the fused backward without residual, activation the identity.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, std::array<bool, 3> output_mask) {
  auto [grad_input, grad_weight, grad_bias, unused] = batch_norm_act_backward(
      backend, grad_output, input, weight, c10::nullopt, c10::nullopt, save_mean, save_invstd,
      training, Activation::kIdentity, 0.0,
      {output_mask[0], output_mask[1], output_mask[2], false});
  return {grad_input, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// SyncBatchNorm's backward pieces: backward_from split into its two passes (SplitSums).

namespace detail {

}  // namespace detail

// custom_bn::batch_norm_backward_reduce on the backend's device (contract of
// ops/sync_batch_norm.h): the backward's reduction alone, [2, C] = (sum dz, sum dz * (x - mean)).
template <typename Backend>
at::Tensor batch_norm_backward_reduce(const Backend& backend, const at::Tensor& grad_output,
                                      const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& residual,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      c10::string_view activation, double activation_param) {
  const auto [param_dtype, act] = check_split_backward_args(
      "custom_bn.batch_norm_backward_reduce", grad_output, input, weight, bias, residual, mean,
      invstd, activation);
  const at::Tensor sums =
      at::empty({2, input.size(1)}, input.options().dtype(accumulate_dtype(input.scalar_type())));
  detail::backward_from(backend, detail::BackwardSource::kInput, grad_output, input, weight, bias,
                        residual, mean, invstd, /*training=*/true, param_dtype, act,
                        activation_param, {false, false, false, false}, {&sums});
  return sums;
}

// custom_bn::batch_norm_backward_elemt on the backend's device (contract of
// ops/sync_batch_norm.h): the training backward's elementwise pass alone, from the whole batch's
// sums and count; output_mask: grad_input, grad_residual.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt(
    const Backend& backend, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& sums, int64_t count, c10::string_view activation, double activation_param,
    std::array<bool, 2> output_mask) {
  constexpr const char* op = "custom_bn.batch_norm_backward_elemt";
  const auto [param_dtype, act] = check_split_backward_args(
      op, grad_output, input, weight, bias, residual, mean, invstd, activation);
  check_given_sums(op, input, sums, count);
  // The kernels read the sums as acc_t arrays (the all-reduce may have run in another dtype).
  const at::Tensor given = sums.to(accumulate_dtype(input.scalar_type())).contiguous();
  auto [grad_input, unused_w, unused_b, grad_residual] = detail::backward_from(
      backend, detail::BackwardSource::kInput, grad_output, input, weight, bias, residual, mean,
      invstd, /*training=*/true, param_dtype, act, activation_param,
      {output_mask[0], false, false, output_mask[1]}, {nullptr, &given, count});
  return {grad_input, grad_residual};
}

}  // namespace cuda_launch
}  // namespace custom_bn
