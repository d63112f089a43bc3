#pragma once
// torch::nn modules for LibTorch programs (installed as <custom_bn/nn/batch_norm.h>):
// custom_bn::nn::BatchNorm1d/2d/3d, drop-ins for torch::nn::BatchNorm1d/2d/3d that run the
// custom_bn operators. Same options type, same parameter and buffer names (weight, bias,
// running_mean, running_var, num_batches_tracked), so a serialized torch::nn::BatchNorm loads
// into them and back.
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/options/batchnorm.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstddef>
#include <optional>
#include <ostream>
#include <string>

// Relative to this file, so the include works both in the source tree and in the installed
// include/custom_bn/ tree without extra include directories.
#include "../ops/batch_norm.h"

namespace custom_bn::nn {

// torch::nn's options, reused so code can switch module types without touching its options:
// num_features, eps=1e-5, momentum=0.1 (std::nullopt: cumulative average), affine=true,
// track_running_stats=true.
using BatchNormOptions = torch::nn::BatchNormOptions;
using BatchNorm1dOptions = torch::nn::BatchNormOptions;
using BatchNorm2dOptions = torch::nn::BatchNormOptions;
using BatchNorm3dOptions = torch::nn::BatchNormOptions;

// Shared implementation of BatchNorm{1,2,3}d; D is the number of spatial dimensions the module
// is named after (BatchNorm1d also takes (N, C) input, as torch::nn's does).
template <size_t D, typename Derived>
class BatchNormImplBase : public torch::nn::Cloneable<Derived> {
 public:
  explicit BatchNormImplBase(const BatchNormOptions& options_);

  // (Re)creates parameters and buffers from options (Cloneable::clone relies on this).
  void reset() override;
  // Zeroes running_mean and num_batches_tracked, sets running_var to one.
  void reset_running_stats();
  // reset_running_stats(), weight = 1, bias = 0.
  void reset_parameters();

  // input: (N, C) or (N, C, L) for BatchNorm1d, (N, C, H, W) for BatchNorm2d, (N, C, D, H, W)
  // for BatchNorm3d, with C = num_features. Batch statistics are used in training mode or when
  // track_running_stats is false, running statistics otherwise. num_batches_tracked advances
  // only after the operator succeeded, so a rejected input changes no state.
  torch::Tensor forward(const torch::Tensor& input);

  void pretty_print(std::ostream& stream) const override;

  BatchNormOptions options;
  torch::Tensor weight;               // [C], defined when options.affine()
  torch::Tensor bias;                 // [C], defined when options.affine()
  torch::Tensor running_mean;         // [C], defined when options.track_running_stats()
  torch::Tensor running_var;          // [C], defined when options.track_running_stats()
  torch::Tensor num_batches_tracked;  // int64 scalar, defined when track_running_stats()

 protected:
  void check_input_dim(const torch::Tensor& input) const;
  // The module's batch norm with the fused epilogue act(BN(input) + residual).
  torch::Tensor normalize(const torch::Tensor& input, const std::string& activation,
                          std::optional<double> activation_param,
                          const std::optional<torch::Tensor>& residual);
  // "custom_bn::nn::BatchNorm2d(64, eps=..., ..." without the closing parenthesis.
  void print_options(std::ostream& stream, const char* name) const;
};

class BatchNorm1dImpl : public BatchNormImplBase<1, BatchNorm1dImpl> {
 public:
  using BatchNormImplBase<1, BatchNorm1dImpl>::BatchNormImplBase;
};

class BatchNorm2dImpl : public BatchNormImplBase<2, BatchNorm2dImpl> {
 public:
  using BatchNormImplBase<2, BatchNorm2dImpl>::BatchNormImplBase;
};

class BatchNorm3dImpl : public BatchNormImplBase<3, BatchNorm3dImpl> {
 public:
  using BatchNormImplBase<3, BatchNorm3dImpl>::BatchNormImplBase;
};

// The three instantiations live in libcustom_bn.
extern template class BatchNormImplBase<1, BatchNorm1dImpl>;
extern template class BatchNormImplBase<2, BatchNorm2dImpl>;
extern template class BatchNormImplBase<3, BatchNorm3dImpl>;

// Module holders: custom_bn::nn::BatchNorm2d bn(BatchNorm2dOptions(64).momentum(std::nullopt));
TORCH_MODULE(BatchNorm1d);
TORCH_MODULE(BatchNorm2d);
TORCH_MODULE(BatchNorm3d);

// BatchNorm's options (as torch::nn::BatchNormOptions) plus the fused epilogue's activation
// ("relu" by default; "identity", "leaky_relu", "elu", "silu") and its parameter (leaky_relu's
// negative slope, default 0.01; elu's alpha, default 1.0):
// BatchNormActOptions(64).momentum(0.01).activation("elu").activation_param(0.5).
struct BatchNormActOptions {
  /* implicit */ BatchNormActOptions(int64_t num_features) : num_features_(num_features) {}
  // The BatchNorm part.
  BatchNormOptions batch_norm() const {
    return BatchNormOptions(num_features_)
        .eps(eps_)
        .momentum(momentum_)
        .affine(affine_)
        .track_running_stats(track_running_stats_);
  }
  TORCH_ARG(int64_t, num_features);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(std::optional<double>, momentum) = 0.1;
  TORCH_ARG(bool, affine) = true;
  TORCH_ARG(bool, track_running_stats) = true;
  TORCH_ARG(std::string, activation) = "relu";
  TORCH_ARG(std::optional<double>, activation_param) = std::nullopt;
};

// custom_bn::nn::BatchNormAct1d/2d/3d: BatchNorm + residual + activation fused,
// forward(input, residual) = act(BN(input) + residual). Same parameters and buffers as
// BatchNorm (a serialized torch::nn::BatchNorm loads into them); the twins of the Python
// custom_bn.BatchNormAct1d/2d/3d.
template <size_t D, typename Derived>
class BatchNormActImplBase : public BatchNormImplBase<D, Derived> {
 public:
  // ValueError (c10::ValueError) for an unknown activation or a parameter it does not take.
  explicit BatchNormActImplBase(const BatchNormActOptions& options_);

  // input as BatchNorm's; residual: none or input's shape.
  torch::Tensor forward(const torch::Tensor& input,
                        const std::optional<torch::Tensor>& residual = std::nullopt);

  void pretty_print(std::ostream& stream) const override;

  std::string activation;
  std::optional<double> activation_param;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(std::optional<torch::Tensor>())})
};

class BatchNormAct1dImpl : public BatchNormActImplBase<1, BatchNormAct1dImpl> {
 public:
  using BatchNormActImplBase<1, BatchNormAct1dImpl>::BatchNormActImplBase;
};

class BatchNormAct2dImpl : public BatchNormActImplBase<2, BatchNormAct2dImpl> {
 public:
  using BatchNormActImplBase<2, BatchNormAct2dImpl>::BatchNormActImplBase;
};

class BatchNormAct3dImpl : public BatchNormActImplBase<3, BatchNormAct3dImpl> {
 public:
  using BatchNormActImplBase<3, BatchNormAct3dImpl>::BatchNormActImplBase;
};

extern template class BatchNormImplBase<1, BatchNormAct1dImpl>;
extern template class BatchNormImplBase<2, BatchNormAct2dImpl>;
extern template class BatchNormImplBase<3, BatchNormAct3dImpl>;
extern template class BatchNormActImplBase<1, BatchNormAct1dImpl>;
extern template class BatchNormActImplBase<2, BatchNormAct2dImpl>;
extern template class BatchNormActImplBase<3, BatchNormAct3dImpl>;

TORCH_MODULE(BatchNormAct1d);
TORCH_MODULE(BatchNormAct2d);
TORCH_MODULE(BatchNormAct3d);

}  // namespace custom_bn::nn
