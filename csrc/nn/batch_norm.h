#pragma once
// torch::nn modules for LibTorch programs (installed as <custom_bn/nn/batch_norm.h>):
// custom_bn::nn::BatchNorm1d/2d/3d, drop-ins for torch::nn::BatchNorm1d/2d/3d that run the
// custom_bn operators. Same options type, same parameter and buffer names (weight, bias,
// running_mean, running_var, num_batches_tracked), so a serialized torch::nn::BatchNorm loads
// into them and back.
#include <torch/nn/cloneable.h>
#include <torch/nn/options/batchnorm.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstddef>
#include <ostream>

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

 private:
  void check_input_dim(const torch::Tensor& input) const;
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

}  // namespace custom_bn::nn
