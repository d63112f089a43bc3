// custom_bn::nn::BatchNorm1d/2d/3d: the torch::nn module contract (parameters, buffers,
// train/eval, momentum=nullopt as cumulative average) around custom_bn::batch_norm.
#include "nn/batch_norm.h"

#include <torch/nn/init.h>
#include <torch/utils.h>

#include <optional>

#include "checks.h"

namespace custom_bn::nn {
namespace {

// Modules keep disabled parameters/buffers as undefined tensors; the operator's contract for
// "not given" is an empty optional.
std::optional<torch::Tensor> if_defined(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

}  // namespace

template <size_t D, typename Derived>
BatchNormImplBase<D, Derived>::BatchNormImplBase(const BatchNormOptions& options_)
    : options(options_) {
  // Qualified: a virtual call from a constructor must not look further down the hierarchy.
  BatchNormImplBase::reset();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset() {
  const int64_t C = options.num_features();
  TORCH_CHECK(C > 0, "custom_bn::nn::BatchNorm", D, "d: num_features must be positive, got ", C);
  if (options.affine()) {
    weight = this->register_parameter("weight", torch::empty({C}));
    bias = this->register_parameter("bias", torch::empty({C}));
  } else {
    weight = this->register_parameter("weight", torch::Tensor(), /*requires_grad=*/false);
    bias = this->register_parameter("bias", torch::Tensor(), /*requires_grad=*/false);
  }
  if (options.track_running_stats()) {
    running_mean = this->register_buffer("running_mean", torch::zeros({C}));
    running_var = this->register_buffer("running_var", torch::ones({C}));
    num_batches_tracked =
        this->register_buffer("num_batches_tracked", torch::zeros({}, torch::kLong));
  } else {
    running_mean = this->register_buffer("running_mean", torch::Tensor());
    running_var = this->register_buffer("running_var", torch::Tensor());
    num_batches_tracked = this->register_buffer("num_batches_tracked", torch::Tensor());
  }
  reset_parameters();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset_running_stats() {
  if (!options.track_running_stats()) return;
  torch::NoGradGuard no_grad;
  running_mean.zero_();
  running_var.fill_(1);
  num_batches_tracked.zero_();
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::reset_parameters() {
  reset_running_stats();
  if (options.affine()) {
    torch::nn::init::ones_(weight);
    torch::nn::init::zeros_(bias);
  }
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::check_input_dim(const torch::Tensor& input) const {
  TORCH_CHECK(input.defined(), "custom_bn::nn::BatchNorm", D,
              "d: input must be a defined tensor");
  const int64_t dim = input.dim();
  if constexpr (D == 1) {
    TORCH_CHECK_VALUE(dim == 2 || dim == 3,
                      "custom_bn::nn::BatchNorm1d: input must be 2-D (N, C) or 3-D (N, C, L), got ",
                      dim, "-D input of shape ", describe_shape(input));
  } else {
    constexpr int64_t expected = static_cast<int64_t>(D) + 2;
    TORCH_CHECK_VALUE(dim == expected, "custom_bn::nn::BatchNorm", D, "d: input must be ", expected,
                      "-D ", D == 2 ? "(N, C, H, W)" : "(N, C, D, H, W)", ", got ", dim,
                      "-D input of shape ", describe_shape(input));
  }
}

template <size_t D, typename Derived>
torch::Tensor BatchNormImplBase<D, Derived>::forward(const torch::Tensor& input) {
  return normalize(input, "identity", std::nullopt, std::nullopt);
}

template <size_t D, typename Derived>
torch::Tensor BatchNormImplBase<D, Derived>::normalize(
    const torch::Tensor& input, const std::string& activation,
    std::optional<double> activation_param, const std::optional<torch::Tensor>& residual) {
  check_input_dim(input);
  const bool update_running_stats =
      this->is_training() && options.track_running_stats() && num_batches_tracked.defined();
  double momentum = options.momentum().value_or(0.0);
  if (update_running_stats && !options.momentum().has_value()) {
    // Cumulative moving average: this batch gets weight 1/n, n counting this batch. torch::nn
    // increments the counter first and divides by it; we divide by count + 1 and increment only
    // once the operator has accepted the input.
    momentum = 1.0 / static_cast<double>(num_batches_tracked.item<int64_t>() + 1);
  }
  torch::Tensor output = custom_bn::batch_norm_act(
      input, if_defined(weight), if_defined(bias), if_defined(running_mean),
      if_defined(running_var),
      /*training=*/this->is_training() || !options.track_running_stats(), momentum,
      options.eps(), activation, activation_param, residual);
  if (update_running_stats) {
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
  }
  return output;
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::pretty_print(std::ostream& stream) const {
  print_options(stream, "BatchNorm");
  stream << ')';
}

template <size_t D, typename Derived>
void BatchNormImplBase<D, Derived>::print_options(std::ostream& stream, const char* name) const {
  stream << std::boolalpha << "custom_bn::nn::" << name << D << "d(" << options.num_features()
         << ", eps=" << options.eps() << ", momentum=";
  if (options.momentum().has_value()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << options.affine()
         << ", track_running_stats=" << options.track_running_stats();
}

template class BatchNormImplBase<1, BatchNorm1dImpl>;
template class BatchNormImplBase<2, BatchNorm2dImpl>;
template class BatchNormImplBase<3, BatchNorm3dImpl>;

template <size_t D, typename Derived>
BatchNormActImplBase<D, Derived>::BatchNormActImplBase(const BatchNormActOptions& options_)
    : BatchNormImplBase<D, Derived>(options_.batch_norm()),
      activation(options_.activation()),
      activation_param(options_.activation_param()) {
  resolve_activation_param(activation, activation_param);  // rejects bad options now
}

template <size_t D, typename Derived>
torch::Tensor BatchNormActImplBase<D, Derived>::forward(
    const torch::Tensor& input, const std::optional<torch::Tensor>& residual) {
  return this->normalize(input, activation, activation_param, residual);
}

template <size_t D, typename Derived>
void BatchNormActImplBase<D, Derived>::pretty_print(std::ostream& stream) const {
  this->print_options(stream, "BatchNormAct");
  stream << ", activation=" << activation;
  if (activation_param.has_value()) stream << ", activation_param=" << *activation_param;
  stream << ')';
}

template class BatchNormImplBase<1, BatchNormAct1dImpl>;
template class BatchNormImplBase<2, BatchNormAct2dImpl>;
template class BatchNormImplBase<3, BatchNormAct3dImpl>;
template class BatchNormActImplBase<1, BatchNormAct1dImpl>;
template class BatchNormActImplBase<2, BatchNormAct2dImpl>;
template class BatchNormActImplBase<3, BatchNormAct3dImpl>;

}  // namespace custom_bn::nn
