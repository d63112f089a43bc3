#pragma once
// Shared by the GoogleTest files: reference comparisons and input construction.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace custom_bn::testing {

struct Tolerance {
  double rtol;
  double atol;
};

// float64 is compared almost exactly; float32 allows for different summation orders over a few
// thousand values; float16 and bfloat16 for a rounding or two of their 11 and 8 bits.
inline Tolerance tolerance_for(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kDouble: return {1e-9, 1e-10};
    case torch::kHalf: return {2e-3, 1e-3};
    case torch::kBFloat16: return {1.6e-2, 1e-2};
    default: return {1e-4, 1e-5};
  }
}

// gtest assertion: same shape, dtype and values within tolerance; the message shows the worst
// element so that a failure says by how much.
inline ::testing::AssertionResult tensors_close(const torch::Tensor& actual,
                                                const torch::Tensor& expected, Tolerance tol) {
  if (!actual.defined() || !expected.defined()) {
    if (actual.defined() == expected.defined()) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "one tensor is undefined: actual " << (actual.defined() ? "defined" : "undefined")
           << ", expected " << (expected.defined() ? "defined" : "undefined");
  }
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.scalar_type() != expected.scalar_type()) {
    return ::testing::AssertionFailure()
           << "dtype " << actual.scalar_type() << " != expected " << expected.scalar_type();
  }
  const auto a = actual.detach().to(torch::kDouble).cpu();
  const auto e = expected.detach().to(torch::kDouble).cpu();
  if (torch::allclose(a, e, tol.rtol, tol.atol)) return ::testing::AssertionSuccess();
  const auto excess = (a - e).abs() - tol.rtol * e.abs();
  const int64_t worst = excess.flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure()
         << "max |actual - expected| = " << (a - e).abs().max().item<double>()
         << " (rtol " << tol.rtol << ", atol " << tol.atol << "); worst at flat index " << worst
         << ": actual " << a.flatten()[worst].item<double>() << ", expected "
         << e.flatten()[worst].item<double>();
}

// Random input whose channels have different, non-zero means and scales, so a kernel that mixes
// up channels or drops the mean is caught.
inline torch::Tensor channel_varied_input(std::vector<int64_t> shape, torch::ScalarType dtype,
                                          torch::Device device = torch::kCPU) {
  const auto opts = torch::TensorOptions().dtype(dtype).device(device);
  std::vector<int64_t> channel_shape(shape.size(), 1);
  channel_shape[1] = shape[1];
  const auto scale = torch::linspace(0.5, 3.0, shape[1], opts).reshape(channel_shape);
  const auto shift = torch::linspace(-2.0, 5.0, shape[1], opts).reshape(channel_shape);
  return torch::randn(shape, opts) * scale + shift;
}

// An optional tensor argument from a tensor that may be undefined (nullopt then).
inline std::optional<torch::Tensor> opt(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

inline torch::MemoryFormat channels_last_format(int64_t dim) {
  return dim == 5 ? torch::MemoryFormat::ChannelsLast3d : torch::MemoryFormat::ChannelsLast;
}

inline std::string shape_name(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? "x" : "") << shape[i];
  return os.str();
}

// Runs `call`, which must throw c10::Error whose message contains every fragment.
inline ::testing::AssertionResult throws_c10_error_mentioning(
    const std::function<void()>& call, std::initializer_list<const char*> fragments) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    for (const char* fragment : fragments) {
      if (message.find(fragment) == std::string::npos) {
        return ::testing::AssertionFailure()
               << "c10::Error message lacks \"" << fragment << "\": " << message;
      }
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-c10 exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

}  // namespace custom_bn::testing
