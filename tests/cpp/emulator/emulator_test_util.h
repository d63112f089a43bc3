#pragma once
// Comparisons and inputs of the emulated kernel tests.
#include <gtest/gtest.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace custom_bn {
namespace emulator {

struct Tolerance {
  double rtol;
  double atol;  // times max(1, max |expected|): one table serves values ~1 and sums ~N*HW
};

// The pytest suite's table (tests/python/bn_testing.py): float16/bfloat16 as torch's own
// low-precision batch-norm tests.
inline Tolerance tolerance_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {1e-10, 1e-10};
    case at::kFloat: return {1e-5, 1e-5};
    case at::kHalf: return {1e-3, 1e-3};
    default: return {1.6e-2, 1e-2};
  }
}

// actual and expected agree in shape and within tol (compared in float64); on failure the
// message names the worst element, so a wrong index shows where it struck.
inline ::testing::AssertionResult close(const std::string& what, const at::Tensor& actual,
                                        const at::Tensor& expected, Tolerance tol) {
  if (actual.defined() != expected.defined()) {
    return ::testing::AssertionFailure() << what << ": one of the tensors is undefined";
  }
  if (!actual.defined()) return ::testing::AssertionSuccess();
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << what << ": shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const at::Tensor a = actual.to(at::kDouble).contiguous();
  const at::Tensor e = expected.to(at::kDouble).contiguous();
  const double scale = std::max(1.0, e.abs().max().item<double>());
  const at::Tensor excess = (a - e).abs() - (tol.atol * scale + tol.rtol * e.abs());
  // NaN (the poison of unwritten memory) must fail too.
  const at::Tensor bad = excess.gt(0).logical_or(a.isnan()).logical_or(e.isnan());
  if (!bad.any().item<bool>()) return ::testing::AssertionSuccess();
  const int64_t worst = excess.nan_to_num(1e300).flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure()
         << what << ": " << bad.sum().item<int64_t>() << " of " << a.numel()
         << " values differ (rtol " << tol.rtol << ", atol " << tol.atol * scale
         << "); worst at flat index " << worst << ": " << a.flatten()[worst].item<double>()
         << " vs expected " << e.flatten()[worst].item<double>();
}

inline at::MemoryFormat channels_last_format(int64_t dim) {
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Channels with different, non-zero means and scales, so that mixing up channels, dropping the
// mean or summing the wrong values cannot go unnoticed.
inline at::Tensor channel_varied_input(const std::vector<int64_t>& shape, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  std::vector<int64_t> channel_shape(shape.size(), 1);
  channel_shape[1] = shape[1];
  const at::Tensor scale = at::linspace(0.5, 3.0, shape[1], opts).reshape(channel_shape);
  const at::Tensor shift = at::linspace(-2.0, 5.0, shape[1], opts).reshape(channel_shape);
  return (at::randn(shape, opts) * scale + shift).to(dtype);
}

inline std::string shape_name(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s;
}

}  // namespace emulator
}  // namespace custom_bn
