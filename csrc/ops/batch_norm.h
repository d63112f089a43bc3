#pragma once
// Public C++ API of the batch-norm operators (installed as <custom_bn/ops/batch_norm.h>).
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <tuple>

namespace custom_bn {

// custom_bn::batch_norm_forward. input: (N, C, *), any number of spatial dims. Returns
// (output, save_mean, save_invstd); save_* have shape [C] and the accumulation dtype (float for
// float16/bfloat16 input). In training mode they are the batch statistics and running_mean /
// running_var (when given) are updated in place with momentum, running_var with the unbiased
// variance; in evaluation mode they are running_mean and 1/sqrt(running_var + eps).
// Differentiable through the Autograd kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps);

// custom_bn::batch_norm_backward. save_mean / save_invstd are what batch_norm_forward returned for
// the same input, training and eps. Returns (grad_input, grad_weight, grad_bias); a gradient whose
// output_mask entry is false is returned as an empty tensor (shape [0]). Differentiable (double
// backward), like torch.nn's batch norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, std::array<bool, 3> output_mask);

// Drop-in for at::batch_norm / torch.nn.functional.batch_norm: returns the normalized output and
// updates running_mean / running_var in place when training. Differentiable. As torch, it also
// takes weight/bias of any shape with C elements (gradients keep that shape) and the empty 1-D
// input of shape (0,) (zero channels).
at::Tensor batch_norm(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, bool training,
                      double momentum = 0.1, double eps = 1e-5);

// The fused epilogue y = act(BN(x) [+ residual]) in one pass (activation: "identity", "relu",
// "leaky_relu", "elu" or "silu"; activation_param: the negative slope of leaky_relu, the alpha
// of elu; residual: input's shape and dtype, or none). custom_bn::batch_norm_act_forward:
// otherwise as batch_norm_forward (same statistics, running-stat update and save_* outputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double momentum, double eps, c10::string_view activation,
    double activation_param);

// custom_bn::batch_norm_act_backward: (grad_input, grad_weight, grad_bias, grad_residual) of
// batch_norm_act_forward, which it recomputes the pre-activation from (weight, bias and
// residual as given to the forward). Masked-out gradients are empty tensors. Differentiable.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, double eps, c10::string_view activation,
    double activation_param, std::array<bool, 4> output_mask);

// The in-place mode, custom_bn::batch_norm_act_inplace_forward: overwrites input with
// act(BN(input)) and returns (save_mean, save_invstd), otherwise as batch_norm_act_forward
// without residual. Only invertible activations: "identity", "leaky_relu" with a positive slope,
// "elu" with a positive alpha (c10::ValueError otherwise). Differentiable: the backward reads
// only the output (and weight, bias, save_*), so weight must have no zero entries when a graph
// is recorded (c10::ValueError).
std::tuple<at::Tensor, at::Tensor> batch_norm_act_inplace_forward(
    at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double activation_param);

// custom_bn::batch_norm_act_inplace_backward: (grad_input, grad_weight, grad_bias) of
// batch_norm_act_inplace_forward from its output, which it inverts: z = act^-1(output),
// x_hat = (z - bias) / weight. Masked-out gradients are empty tensors. Not differentiable
// (the in-place forward overwrote the input that a double backward would need).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_inplace_backward(
    const at::Tensor& grad_output, const at::Tensor& output,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, double eps,
    c10::string_view activation, double activation_param, std::array<bool, 3> output_mask);

// custom_bn::batch_norm_inference: act(BN(input) + residual) normalized with the running
// statistics, which the schema does not mark as written (evaluation mode of
// batch_norm_act_forward, output only). Traced inference graphs call it. Differentiable.
at::Tensor batch_norm_inference(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                const c10::optional<at::Tensor>& residual, double eps,
                                c10::string_view activation, double activation_param);

// activation_param as given, or the activation's default (leaky_relu 0.01, elu 1.0); a value
// for an activation that takes none is a ValueError (c10::ValueError).
double resolve_activation_param(c10::string_view activation, c10::optional<double> param);

// act(batch_norm(input, ...) + residual), differentiable (also twice), with the conveniences of
// batch_norm (weight/bias of any shape with C elements, the empty (0,) input); a residual of
// another floating dtype computes both in the promoted dtype, as torch's BN(x) + residual.
at::Tensor batch_norm_act(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& running_mean,
                          const c10::optional<at::Tensor>& running_var, bool training,
                          double momentum = 0.1, double eps = 1e-5,
                          c10::string_view activation = "relu",
                          c10::optional<double> activation_param = c10::nullopt,
                          const c10::optional<at::Tensor>& residual = c10::nullopt);

// act(batch_norm(input, ...)) written into input, which is returned (the in-place module's
// function). Differentiable (once): autograd records the overwrite, so a caller that saved the
// old input for another backward gets autograd's "modified by an inplace operation" error.
// Default activation leaky_relu (relu is not invertible).
at::Tensor& batch_norm_act_(at::Tensor& input, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, bool training,
                            double momentum = 0.1, double eps = 1e-5,
                            c10::string_view activation = "leaky_relu",
                            c10::optional<double> activation_param = c10::nullopt);

}  // namespace custom_bn
