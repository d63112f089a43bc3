// CUDA launchers of custom_bn::batch_norm_forward and custom_bn::batch_norm_backward: argument
// checks, layout and dtype dispatch, workspaces, launches. The kernel bodies are in
// batch_norm_kernel.cuh and every grid/block/shared-memory choice in launch_config.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "batch_norm_kernel.cuh"
#include "launch_config.h"

namespace custom_bn {
namespace {

using cuda_launch::Geometry;
using cuda_launch::LaunchConfig;
using cuda_launch::Layout;

Geometry geometry_of(const at::Tensor& input, at::MemoryFormat fmt) {
  Geometry g;
  g.n = input.size(0);
  g.c = input.size(1);
  g.hw = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.hw *= input.size(d);
  g.layout = cuda_launch::choose_layout(fmt != at::MemoryFormat::Contiguous, g.hw);
  return g;
}

// 32-bit indexing where it is safe: grid-stride loops overshoot their bound by up to one
// stride (< 2^27 with grid.y <= 65535 and <= 1024 threads), so stay clear of INT32_MAX.
bool use_32bit_index(const at::Tensor& t) { return t.numel() < (int64_t(1) << 30); }

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

dim3 grid_of(const LaunchConfig& cfg) {
  return dim3(static_cast<unsigned>(cfg.grid_x), static_cast<unsigned>(cfg.grid_y));
}
dim3 block_of(const LaunchConfig& cfg) {
  return dim3(static_cast<unsigned>(cfg.block_x), static_cast<unsigned>(cfg.block_y));
}

// Partial results of a split reduction and the zeroed arrival counters of its last-block merge.
struct ReduceWorkspace {
  at::Tensor partial;
  at::Tensor counters;
};

ReduceWorkspace reduce_workspace(const LaunchConfig& cfg, const Geometry& g, int fields,
                                 const at::TensorOptions& acc_options) {
  return {at::empty({fields * cuda_launch::partial_slots(cfg, g)}, acc_options),
          at::zeros({cuda_launch::counters(cfg)}, acc_options.dtype(at::kInt))};
}

unsigned* counters_ptr(const ReduceWorkspace& ws) {
  return reinterpret_cast<unsigned*>(ws.counters.data_ptr<int>());
}

template <typename param_t>
param_t* optional_ptr(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->data_ptr<param_t>() : nullptr;
}

int64_t optional_stride(const c10::optional<at::Tensor>& t) {
  return given(t) ? t->stride(0) : 0;
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

// ---------------------------------------------------------------------------------------------
// Forward.

struct ForwardArgs {
  const at::Tensor& input;  // contiguous in the chosen memory format
  const at::Tensor& output;
  const at::Tensor& save_mean;
  const at::Tensor& save_invstd;
  const c10::optional<at::Tensor>& weight;
  const c10::optional<at::Tensor>& bias;
  const c10::optional<at::Tensor>& running_mean;
  const c10::optional<at::Tensor>& running_var;
  bool training;
  double momentum;
  double eps;
  Geometry g;
};

template <typename scalar_t, typename param_t, typename index_t>
void launch_collect_stats(const ForwardArgs& a, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg = cuda_launch::collect_stats_launch(g, sizeof(acc_t), num_sms());
  const ReduceWorkspace ws = reduce_workspace(cfg, g, 3, a.save_mean.options());
  const cuda_kernels::CollectStats<scalar_t, param_t, acc_t> policy{
      a.input.const_data_ptr<scalar_t>(),
      a.save_mean.data_ptr<acc_t>(),
      a.save_invstd.data_ptr<acc_t>(),
      optional_ptr<param_t>(a.running_mean),
      optional_ptr<param_t>(a.running_var),
      optional_stride(a.running_mean),
      optional_stride(a.running_var),
      static_cast<acc_t>(a.momentum),
      static_cast<acc_t>(a.eps)};
  acc_t* partial = ws.partial.data_ptr<acc_t>();
  if (g.layout == Layout::kContiguous) {
    cuda_kernels::batch_norm_collect_stats_contiguous_kernel<scalar_t, param_t, acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), cfg.shared_bytes, stream>>>(
            policy, index_t(g.n), index_t(g.c), index_t(g.hw), cfg.splits_n, partial,
            counters_ptr(ws));
  } else {
    cuda_kernels::batch_norm_collect_stats_channels_last_kernel<scalar_t, param_t, acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), cfg.shared_bytes, stream>>>(
            policy, index_t(g.rows()), index_t(g.c), partial, counters_ptr(ws));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename param_t>
void launch_eval_stats(const ForwardArgs& a, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaunchConfig cfg = cuda_launch::per_channel_launch(a.g.c);
  cuda_kernels::batch_norm_eval_stats_kernel<param_t, acc_t>
      <<<grid_of(cfg), block_of(cfg), 0, stream>>>(
          a.running_mean->const_data_ptr<param_t>(), a.running_mean->stride(0),
          a.running_var->const_data_ptr<param_t>(), a.running_var->stride(0),
          static_cast<acc_t>(a.eps), a.save_mean.data_ptr<acc_t>(),
          a.save_invstd.data_ptr<acc_t>(), a.g.c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename param_t, typename index_t>
void launch_transform(const ForwardArgs& a, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg = cuda_launch::elementwise_launch(g, num_sms());
  const scalar_t* x = a.input.const_data_ptr<scalar_t>();
  scalar_t* y = a.output.data_ptr<scalar_t>();
  const acc_t* mean = a.save_mean.const_data_ptr<acc_t>();
  const acc_t* invstd = a.save_invstd.const_data_ptr<acc_t>();
  const param_t* w = optional_ptr<param_t>(a.weight);
  const param_t* b = optional_ptr<param_t>(a.bias);
  if (g.layout == Layout::kContiguous) {
    cuda_kernels::batch_norm_transform_contiguous_kernel<scalar_t, param_t, acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), 0, stream>>>(x, y, mean, invstd, w, b, index_t(g.n),
                                                     index_t(g.c), index_t(g.hw), cfg.splits_n);
  } else {
    cuda_kernels::batch_norm_transform_channels_last_kernel<scalar_t, param_t, acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), 0, stream>>>(x, y, mean, invstd, w, b,
                                                     index_t(g.rows()), index_t(g.c));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename param_t, typename index_t>
void run_forward(const ForwardArgs& a) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (a.training) {
    launch_collect_stats<scalar_t, param_t, index_t>(a, stream);
  } else {
    launch_eval_stats<scalar_t, param_t>(a, stream);
  }
  launch_transform<scalar_t, param_t, index_t>(a, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input_arg, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  const at::ScalarType param_dtype = check_batch_norm_forward_args(
      input_arg, weight, bias, running_mean, running_var, training, momentum, eps);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  const auto acc_options = input.options().dtype(accumulate_dtype(input.scalar_type()));
  const Geometry g = geometry_of(input, fmt);
  at::Tensor output = at::empty_like(input, input.options(), fmt);
  at::Tensor save_mean = at::empty({g.c}, acc_options);
  at::Tensor save_invstd = at::empty({g.c}, acc_options);
  if (g.c == 0) return {output, save_mean, save_invstd};

  if (input.numel() == 0) {
    // No batch statistics exist: report zeros and leave the running stats alone. Evaluation
    // statistics do not depend on the batch, so they are reported as usual.
    if (training) {
      save_mean.zero_();
      save_invstd.zero_();
      return {output, save_mean, save_invstd};
    }
  }

  const ForwardArgs args{input,   output,       save_mean,   save_invstd, weight, bias,
                         running_mean, running_var, training, momentum,    eps,    g};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "custom_bn_batch_norm_forward_cuda", [&] {
        dispatch_param_type<scalar_t>(param_dtype, [&](auto param_tag) {
          using param_t = decltype(param_tag);
          if (input.numel() == 0) {
            launch_eval_stats<scalar_t, param_t>(args, at::cuda::getCurrentCUDAStream());
          } else if (use_32bit_index(input)) {
            run_forward<scalar_t, param_t, int32_t>(args);
          } else {
            run_forward<scalar_t, param_t, int64_t>(args);
          }
        });
      });
  return {output, save_mean, save_invstd};
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct BackwardArgs {
  const at::Tensor& grad_output;  // both contiguous in input's memory format
  const at::Tensor& input;
  const c10::optional<at::Tensor>& weight;
  const at::Tensor& save_mean;
  const at::Tensor& save_invstd;
  bool training;
  Geometry g;
  const at::Tensor* grad_input;   // null: not requested
  const at::Tensor* sum_dy;       // null: no reduction needed
  const at::Tensor* sum_dy_xmu;
  const at::Tensor* grad_weight;  // acc dtype; null: not requested
  const at::Tensor* grad_bias;
};

template <typename acc_t>
acc_t* ptr_or_null(const at::Tensor* t) {
  return t != nullptr ? t->data_ptr<acc_t>() : nullptr;
}

template <typename scalar_t, typename index_t>
void launch_backward_reduce(const BackwardArgs& a, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg = cuda_launch::backward_reduce_launch(g, sizeof(acc_t), num_sms());
  const ReduceWorkspace ws = reduce_workspace(cfg, g, 2, a.save_mean.options());
  const cuda_kernels::BackwardReduce<scalar_t, acc_t> policy{
      a.grad_output.const_data_ptr<scalar_t>(),
      a.input.const_data_ptr<scalar_t>(),
      a.save_mean.const_data_ptr<acc_t>(),
      a.save_invstd.const_data_ptr<acc_t>(),
      ptr_or_null<acc_t>(a.sum_dy),
      ptr_or_null<acc_t>(a.sum_dy_xmu),
      ptr_or_null<acc_t>(a.grad_weight),
      ptr_or_null<acc_t>(a.grad_bias)};
  acc_t* partial = ws.partial.data_ptr<acc_t>();
  if (g.layout == Layout::kContiguous) {
    cuda_kernels::batch_norm_backward_reduce_contiguous_kernel<scalar_t, acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), cfg.shared_bytes, stream>>>(
            policy, index_t(g.n), index_t(g.c), index_t(g.hw), cfg.splits_n, partial,
            counters_ptr(ws));
  } else {
    cuda_kernels::batch_norm_backward_reduce_channels_last_kernel<scalar_t, acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), cfg.shared_bytes, stream>>>(
            policy, index_t(g.rows()), index_t(g.c), partial, counters_ptr(ws));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kTraining, typename scalar_t, typename param_t, typename index_t>
void launch_backward_elementwise(const BackwardArgs& a, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const LaunchConfig cfg = cuda_launch::elementwise_launch(g, num_sms());
  const scalar_t* dy = a.grad_output.const_data_ptr<scalar_t>();
  const scalar_t* x = a.input.const_data_ptr<scalar_t>();
  scalar_t* dx = a.grad_input->data_ptr<scalar_t>();
  const acc_t* mean = a.save_mean.const_data_ptr<acc_t>();
  const acc_t* invstd = a.save_invstd.const_data_ptr<acc_t>();
  const param_t* w = optional_ptr<param_t>(a.weight);
  const acc_t* sum_dy = ptr_or_null<acc_t>(a.sum_dy);
  const acc_t* sum_dy_xmu = ptr_or_null<acc_t>(a.sum_dy_xmu);
  const acc_t count = static_cast<acc_t>(g.count());
  if (g.layout == Layout::kContiguous) {
    cuda_kernels::batch_norm_backward_elementwise_contiguous_kernel<kTraining, scalar_t, param_t,
                                                                    acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), 0, stream>>>(dy, x, dx, mean, invstd, w, sum_dy,
                                                     sum_dy_xmu, count, index_t(g.n),
                                                     index_t(g.c), index_t(g.hw), cfg.splits_n);
  } else {
    cuda_kernels::batch_norm_backward_elementwise_channels_last_kernel<kTraining, scalar_t,
                                                                       param_t, acc_t, index_t>
        <<<grid_of(cfg), block_of(cfg), 0, stream>>>(dy, x, dx, mean, invstd, w, sum_dy,
                                                     sum_dy_xmu, count, index_t(g.rows()),
                                                     index_t(g.c));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename param_t, typename index_t>
void run_backward(const BackwardArgs& a) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (a.sum_dy != nullptr) launch_backward_reduce<scalar_t, index_t>(a, stream);
  if (a.grad_input == nullptr) return;
  if (a.training) {
    launch_backward_elementwise<true, scalar_t, param_t, index_t>(a, stream);
  } else {
    launch_backward_elementwise<false, scalar_t, param_t, index_t>(a, stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output_arg, const at::Tensor& input_arg,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean_arg,
    const at::Tensor& save_invstd_arg, bool training, double /*eps: folded into save_invstd*/,
    std::array<bool, 3> output_mask) {
  check_batch_norm_backward_args(grad_output_arg, input_arg, weight, save_mean_arg,
                                 save_invstd_arg);
  const c10::cuda::CUDAGuard device_guard(input_arg.device());
  const auto fmt = batch_norm_memory_format(input_arg);
  const at::Tensor input = input_arg.contiguous(fmt);
  const at::Tensor grad_output = grad_output_arg.contiguous(fmt);
  const at::Tensor save_mean = save_mean_arg.contiguous();
  const at::Tensor save_invstd = save_invstd_arg.contiguous();
  const auto acc_options = input.options().dtype(accumulate_dtype(input.scalar_type()));
  const auto param_dtype = given(weight) ? weight->scalar_type() : input.scalar_type();
  const Geometry g = geometry_of(input, fmt);
  const at::Tensor empty = input.new_empty({0});

  at::Tensor grad_input = output_mask[0] ? at::empty_like(input, input.options(), fmt) : empty;
  if (input.numel() == 0) {
    const auto zeros = [&](bool wanted) {
      return wanted ? at::zeros({g.c}, input.options().dtype(param_dtype)) : empty;
    };
    return {grad_input, zeros(output_mask[1]), zeros(output_mask[2])};
  }

  // grad_weight / grad_bias need the sums, and so does grad_input in training mode; eval-mode
  // grad_input alone is a pure scale of dy.
  const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);
  at::Tensor sum_dy, sum_dy_xmu, grad_weight_acc, grad_bias_acc;
  if (need_sums) {
    sum_dy = at::empty({g.c}, acc_options);
    sum_dy_xmu = at::empty({g.c}, acc_options);
  }
  if (output_mask[1]) grad_weight_acc = at::empty({g.c}, acc_options);
  if (output_mask[2]) grad_bias_acc = at::empty({g.c}, acc_options);

  const BackwardArgs args{grad_output,
                          input,
                          weight,
                          save_mean,
                          save_invstd,
                          training,
                          g,
                          output_mask[0] ? &grad_input : nullptr,
                          need_sums ? &sum_dy : nullptr,
                          need_sums ? &sum_dy_xmu : nullptr,
                          output_mask[1] ? &grad_weight_acc : nullptr,
                          output_mask[2] ? &grad_bias_acc : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "custom_bn_batch_norm_backward_cuda", [&] {
        dispatch_param_type<scalar_t>(param_dtype, [&](auto param_tag) {
          using param_t = decltype(param_tag);
          if (use_32bit_index(input)) {
            run_backward<scalar_t, param_t, int32_t>(args);
          } else {
            run_backward<scalar_t, param_t, int64_t>(args);
          }
        });
      });

  // The sums are kept in acc_t; the gradients take the parameters' dtype (a no-op copy-free
  // conversion when it already is acc_t).
  return {grad_input, output_mask[1] ? grad_weight_acc.to(param_dtype) : empty,
          output_mask[2] ? grad_bias_acc.to(param_dtype) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(custom_bn, CUDA, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
}

}  // namespace custom_bn
