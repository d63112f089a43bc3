#pragma once
// Argument validation shared by every backend. Each message names the argument, what was
// expected and what was given. All checks run before any kernel touches memory, so a bad call
// leaves running statistics untouched.
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <sstream>
#include <string>
#include <utility>

#include "../kernels/common/activation.h"
#include "../kernels/common/geometry.h"

namespace custom_bn {

inline std::string describe_shape(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// dtype of save_mean / save_invstd and of the arithmetic: float for half/bfloat16 inputs.
inline at::ScalarType accumulate_dtype(at::ScalarType input_dtype) {
  return is_reduced_float(input_dtype) ? at::kFloat : input_dtype;
}

// Memory format of outputs and gradients, torch's choice for batch norm: a contiguous input
// stays contiguous, a dense channels-last one channels-last (also where the strides fit both,
// e.g. N = 1 or H = 1), and any other input takes suggest_memory_format() (so a sliced
// channels-last input stays channels-last). The fake kernels in python/custom_bn/_meta.py apply
// the same rule.
inline at::MemoryFormat batch_norm_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return input.suggest_memory_format();
}

// input (already contiguous in fmt = batch_norm_memory_format(input)) as the kernels see it.
inline Geometry geometry_of(const at::Tensor& input, at::MemoryFormat fmt) {
  Geometry g;
  g.n = input.size(0);
  g.c = input.size(1);
  for (int64_t d = 2; d < input.dim(); ++d) g.hw *= input.size(d);
  g.layout = choose_layout(fmt != at::MemoryFormat::Contiguous, g.hw);
  return g;
}

// Number of values per channel: N * prod(spatial) (also when C = 0, as torch counts them).
inline int64_t values_per_channel(const at::Tensor& input) {
  int64_t n = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) n *= input.size(d);
  return n;
}

inline void check_input(const char* op, const at::Tensor& input, const char* name = "input") {
  TORCH_CHECK(input.defined(), op, ": ", name, " must be a defined tensor");
  // As torch: any rank from 2 on, (N, C, *); every dim after C is spatial.
  TORCH_CHECK(input.dim() >= 2, op, ": ", name,
              " must have shape (N, C, *) with at least 2 dims, got ",
              input.dim(), "-D ", name, " of shape ", describe_shape(input));
  const auto dt = input.scalar_type();
  // NotImplementedError, as torch raises for an integer, bool or complex input.
  TORCH_CHECK_NOT_IMPLEMENTED(
      dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ",
      name, " must be a floating-point tensor (float64, float32, float16 or bfloat16), got ", dt);
}

// weight, bias, running_mean, running_var: shape [C], on input's device, and one shared dtype
// that is either input's dtype or float32 (the latter for float16/bfloat16 input). The element
// counts are checked first, the rest after the running-stat checks, as torch orders them.
using NamedChannelTensors =
    std::initializer_list<std::pair<const c10::optional<at::Tensor>*, const char*>>;

inline void check_channel_counts(const char* op, const at::Tensor& input,
                                 NamedChannelTensors tensors) {
  const int64_t C = input.size(1);
  for (const auto& [t, name] : tensors) {
    if (!t->has_value() || !(*t)->defined()) continue;
    // From size(d), not numel(): while torch.compile traces with symbolic shapes, numel() of
    // a tensor throws where size(d) does not.
    int64_t count = 1;
    for (int64_t d = 0; d < (*t)->dim(); ++d) count *= (*t)->size(d);
    TORCH_CHECK(count == C, op, ": ", name, " must have shape [C]=[", C,
                "] where C = input.size(1), got shape ", describe_shape(**t));
  }
}

// Shape, device and dtype; returns the dtype shared by the per-channel tensors (input's own
// when none is given).
inline at::ScalarType check_channel_tensors(const char* op, const at::Tensor& input,
                                            NamedChannelTensors tensors) {
  c10::optional<at::ScalarType> shared;
  const char* first_name = nullptr;
  for (const auto& [t, name] : tensors) {
    if (!t->has_value() || !(*t)->defined()) continue;
    TORCH_CHECK((*t)->dim() == 1, op, ": ", name, " must have shape [C]=[", input.size(1),
                "] where C = input.size(1), got shape ", describe_shape(**t));
    TORCH_CHECK((*t)->device() == input.device(), op, ": ", name,
                " must be on the same device as input (", input.device(), "), got ",
                (*t)->device());
    const auto dt = (*t)->scalar_type();
    const bool ok = dt == input.scalar_type() ||
                    (dt == at::kFloat && is_reduced_float(input.scalar_type()));
    TORCH_CHECK(ok, op, ": ", name, " must have dtype ", input.scalar_type(),
                is_reduced_float(input.scalar_type()) ? " or Float" : "",
                " to match input, got ", dt);
    if (!shared) {
      shared = dt;
      first_name = name;
    } else {
      TORCH_CHECK(*shared == dt, op, ": ", name, " must have the same dtype as ", first_name,
                  " (", *shared, "), got ", dt);
    }
  }
  return shared.value_or(input.scalar_type());
}

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// dtype of grad_weight / grad_bias: weight's, or without a weight the accumulation dtype. (A
// bias may be float32 for float16 input while no weight says so; autograd casts a float32
// gradient to a float16 bias exactly, whereas a float16 gradient would lose a float32 bias's
// precision.)
inline at::ScalarType channel_gradient_dtype(const at::Tensor& input,
                                            const c10::optional<at::Tensor>& weight) {
  return given(weight) ? weight->scalar_type() : accumulate_dtype(input.scalar_type());
}

// A gradient whose output_mask entry is false: a fresh empty tensor per output, since outputs of
// an operator must not alias each other.
inline at::Tensor unrequested_gradient(const at::Tensor& input) { return input.new_empty({0}); }

// Returns the dtype of weight/bias/running stats (see check_channel_tensors).
inline at::ScalarType check_batch_norm_forward_args(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps) {
  constexpr const char* op = "custom_bn.batch_norm";
  check_input(op, input);
  // In torch's order (a call with several faults raises what torch raises): the batch size and
  // eps (ValueError), the per-channel element counts, a missing running stat in evaluation mode
  // (RuntimeError), one running stat without the other (ValueError), then shapes, devices and
  // dtypes.
  TORCH_CHECK_VALUE(!training || values_per_channel(input) != 1, op,
              ": Expected more than 1 value per channel when training, got input size ",
              describe_shape(input));
  // As torch.nn.functional.batch_norm: eps > 0 in training, eps >= 0 in evaluation.
  TORCH_CHECK_VALUE(training ? eps > 0 : eps >= 0, op, ": eps must be ",
                    training ? "positive in training" : "non-negative", ", got ", eps);
  const NamedChannelTensors tensors = {{&weight, "weight"},
                                       {&bias, "bias"},
                                       {&running_mean, "running_mean"},
                                       {&running_var, "running_var"}};
  check_channel_counts(op, input, tensors);
  TORCH_CHECK(training || (given(running_mean) && given(running_var)), op,
              ": running_mean and running_var must be defined in evaluation mode (training=False), "
              "got running_mean ", given(running_mean) ? "defined" : "None", " and running_var ",
              given(running_var) ? "defined" : "None");
  TORCH_CHECK_VALUE(given(running_mean) == given(running_var), op,
              ": running_mean and running_var must be given together, got running_mean ",
              given(running_mean) ? "defined" : "None", " and running_var ",
              given(running_var) ? "defined" : "None");
  return check_channel_tensors(op, input, tensors);
}

inline void check_batch_norm_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                           const c10::optional<at::Tensor>& weight,
                                           const at::Tensor& save_mean,
                                           const at::Tensor& save_invstd) {
  constexpr const char* op = "custom_bn.batch_norm_backward";
  check_input(op, input);
  TORCH_CHECK(grad_output.defined() && grad_output.sizes() == input.sizes(), op,
              ": grad_output must have input's shape ", describe_shape(input), ", got ",
              grad_output.defined() ? describe_shape(grad_output) : std::string("undefined"));
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op,
              ": grad_output must have input's dtype ", input.scalar_type(), ", got ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op,
              ": grad_output must be on input's device (", input.device(), "), got ",
              grad_output.device());
  const auto acc = accumulate_dtype(input.scalar_type());
  for (const auto& [t, name] :
       {std::pair<const at::Tensor*, const char*>{&save_mean, "save_mean"},
        {&save_invstd, "save_invstd"}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1), op, ": ", name,
                " must have shape [C]=[", input.size(1), "], got ", describe_shape(*t));
    TORCH_CHECK(t->scalar_type() == acc && t->device() == input.device(), op, ": ", name,
                " must be a ", acc, " tensor on ", input.device(), ", got ", t->scalar_type(),
                " on ", t->device());
  }
  check_channel_counts(op, input, {{&weight, "weight"}});
  check_channel_tensors(op, input, {{&weight, "weight"}});
}

// The fused epilogue's activation by name (the schemas take a string, as torch's own ops take
// e.g. an approximate="tanh"); ValueError for any other name, as torch for a bad enum string.
inline Activation parse_activation(const char* op, c10::string_view name) {
  if (name == "identity") return Activation::kIdentity;
  if (name == "relu") return Activation::kRelu;
  if (name == "leaky_relu") return Activation::kLeakyRelu;
  if (name == "elu") return Activation::kElu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, op,
                    ": activation must be one of 'identity', 'relu', 'leaky_relu', 'elu', 'silu', "
                    "got '", std::string(name), "'");
}

// The residual of the fused epilogue: input's shape, dtype and device (its memory format may
// differ; the kernels read it in input's).
inline void check_residual(const char* op, const at::Tensor& input,
                           const c10::optional<at::Tensor>& residual) {
  if (!given(residual)) return;
  TORCH_CHECK(residual->sizes() == input.sizes(), op, ": residual must have input's shape ",
              describe_shape(input), ", got ", describe_shape(*residual));
  TORCH_CHECK(residual->scalar_type() == input.scalar_type(), op,
              ": residual must have input's dtype ", input.scalar_type(), ", got ",
              residual->scalar_type());
  TORCH_CHECK(residual->device() == input.device(), op, ": residual must be on input's device (",
              input.device(), "), got ", residual->device());
}

// The in-place mode inverts the activation: only the strictly increasing ones (ValueError
// otherwise).
inline Activation parse_inplace_activation(const char* op, c10::string_view name, double param) {
  const Activation act = parse_activation(op, name);
  const bool invertible = act == Activation::kIdentity ||
                          ((act == Activation::kLeakyRelu || act == Activation::kElu) && param > 0);
  TORCH_CHECK_VALUE(invertible, op,
                    ": the in-place mode recovers its input from the output, so the activation "
                    "must be invertible: 'identity', 'leaky_relu' with a positive slope or 'elu' "
                    "with a positive alpha, got '", std::string(name), "' with activation_param ",
                    param, " (use BatchNormAct for the others)");
  return act;
}

// The in-place backward recovers x_hat = (z - bias) / weight: a zero weight entry makes that
// impossible (ValueError). Negative weights are fine. (One reduction; on a GPU it synchronizes.)
inline void check_inplace_weight(const char* op, const c10::optional<at::Tensor>& weight) {
  if (!given(weight) || weight->numel() == 0) return;
  const int64_t zeros = weight->eq(0).sum().item<int64_t>();
  TORCH_CHECK_VALUE(zeros == 0, op,
                    ": the in-place mode recovers the normalized input as (z - bias) / weight, "
                    "so weight must have no zero entries, got ", zeros, " of ", weight->numel(),
                    " (use BatchNormAct, which keeps its input)");
}

// SyncBatchNorm's backward pieces (batch_norm_backward_reduce / _elemt): batch_norm_act_backward's
// checks with (mean, invstd) in the place of (save_mean, save_invstd), then the activation's
// name. Returns the dtype the per-channel tensors are read as, and the activation.
inline std::pair<at::ScalarType, Activation> check_split_backward_args(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& invstd,
    c10::string_view activation) {
  check_batch_norm_backward_args(grad_output, input, weight, mean, invstd);
  check_channel_counts(op, input, {{&bias, "bias"}});
  const at::ScalarType param_dtype =
      check_channel_tensors(op, input, {{&weight, "weight"}, {&bias, "bias"}});
  check_residual(op, input, residual);
  return {param_dtype, parse_activation(op, activation)};
}

// batch_norm_backward_elemt's whole-batch sums ([2, C], any floating dtype) and count.
inline void check_given_sums(const char* op, const at::Tensor& input, const at::Tensor& sums,
                             int64_t count) {
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 2 && sums.size(1) == input.size(1), op,
              ": sums must have shape [2, C]=[2, ", input.size(1), "], got ",
              describe_shape(sums));
  TORCH_CHECK(sums.is_floating_point() && sums.device() == input.device(), op,
              ": sums must be a floating-point tensor on ", input.device(), ", got ",
              sums.scalar_type(), " on ", sums.device());
  TORCH_CHECK_VALUE(count >= values_per_channel(input), op,
                    ": count (values per channel of the whole batch) must be at least this "
                    "batch's ", values_per_channel(input), ", got ", count);
}

}  // namespace custom_bn
