#pragma once
// Public C++ API of the distributed batch-norm building blocks (installed as
// <custom_bn/ops/sync_batch_norm.h>). SyncBatchNorm runs them around two collectives of its own
// (python/custom_bn/sync.py):
//   forward:  batch_norm_stats on each process -> all-gather (mean, var, count) -> merge ->
//             batch_norm_act_forward in evaluation mode with the merged statistics;
//   backward: batch_norm_backward_reduce on each process -> all-reduce the sums ->
//             batch_norm_backward_elemt with the global sums and count.
// None of them has a derivative of its own; SyncBatchNorm's autograd Function composes them.
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace custom_bn {

// custom_bn::batch_norm_stats: per-channel mean and biased variance of input (N, C, *) alone, in
// the accumulation dtype (float for float16/bfloat16 input); zeros for an empty batch.
std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input);

// custom_bn::batch_norm_backward_reduce: this process's sums for the backward of
// act(BN(x) + residual) normalized with (mean, invstd): a [2, C] tensor of the accumulation
// dtype, row 0 sum(dy'), row 1 sum(dy' * (x - mean)), where dy' = dy * act'(z).
at::Tensor batch_norm_backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& residual,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      c10::string_view activation, double activation_param);

// custom_bn::batch_norm_backward_elemt: (grad_input, grad_residual) of this process's elements
// from the sums of the whole batch (`sums` as batch_norm_backward_reduce returns them, summed
// over the processes) and its number of values per channel, `count`. Masked-out gradients are
// empty tensors.
std::tuple<at::Tensor, at::Tensor> batch_norm_backward_elemt(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& sums, int64_t count, c10::string_view activation, double activation_param,
    std::array<bool, 2> output_mask);

}  // namespace custom_bn
