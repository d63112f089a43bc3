// CUDA kernels against ATen on the same device. This machine has no GPU: every test here skips
// with the reason unless torch::cuda::is_available(), and the CPU-only build skips them too.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "test_helpers.h"

namespace {

using custom_bn::testing::channel_varied_input;
using custom_bn::testing::channels_last_format;
using custom_bn::testing::tensors_close;

#define SKIP_WITHOUT_CUDA()                                                             \
  do {                                                                                  \
    if (!CUSTOM_BN_WITH_CUDA) GTEST_SKIP() << "custom_bn was built with WITH_CUDA=OFF"; \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device available";       \
  } while (0)

struct CudaCase {
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  bool channels_last;
  bool training;
};

void PrintTo(const CudaCase& c, std::ostream* os) {
  *os << c10::toString(c.dtype) << " " << custom_bn::testing::shape_name(c.shape)
      << (c.channels_last ? " channels_last" : "") << (c.training ? " train" : " eval");
}

std::string cuda_case_name(const ::testing::TestParamInfo<CudaCase>& info) {
  const auto& c = info.param;
  return std::string(c10::toString(c.dtype)) + "_" + custom_bn::testing::shape_name(c.shape) +
         (c.channels_last ? "_channels_last" : "") + (c.training ? "_train" : "_eval");
}

std::vector<CudaCase> cuda_cases() {
  std::vector<CudaCase> cases;
  const std::vector<std::vector<int64_t>> shapes = {
      {64, 17}, {8, 3, 33}, {4, 17, 9, 11}, {2, 3, 4, 5, 6}, {2, 128, 1, 1}};
  for (auto dtype : {torch::kDouble, torch::kFloat, torch::kHalf, torch::kBFloat16}) {
    for (const auto& shape : shapes) {
      for (bool channels_last : {false, true}) {
        if (channels_last && shape.size() < 4) continue;
        for (bool training : {true, false}) cases.push_back({dtype, shape, channels_last, training});
      }
    }
  }
  return cases;
}

custom_bn::testing::Tolerance cuda_tolerance(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kDouble: return {1e-9, 1e-10};
    case torch::kFloat: return {1e-4, 1e-5};
    case torch::kHalf: return {1e-2, 1e-3};
    default: return {2e-2, 1e-2};  // bfloat16: 8 mantissa bits
  }
}

class CudaParity : public ::testing::TestWithParam<CudaCase> {};

TEST_P(CudaParity, ForwardBackwardAndRunningStatsMatchATen) {
  SKIP_WITHOUT_CUDA();
  const auto& c = GetParam();
  torch::manual_seed(0);
  const torch::Device cuda(torch::kCUDA);
  const int64_t C = c.shape[1];
  // Reduced-precision inputs take float32 parameters and statistics, as torch.nn's do.
  const auto param_dtype =
      (c.dtype == torch::kHalf || c.dtype == torch::kBFloat16) ? torch::kFloat : c.dtype;
  const auto popts = torch::TensorOptions().dtype(param_dtype).device(cuda);
  auto x = channel_varied_input(c.shape, c.dtype, cuda);
  if (c.channels_last) x = x.contiguous(channels_last_format(x.dim()));
  const auto w = torch::rand({C}, popts) + 0.5;
  const auto b = torch::randn({C}, popts);
  const auto rm = torch::randn({C}, popts);
  const auto rv = torch::rand({C}, popts) + 0.5;

  auto x1 = x.clone(torch::MemoryFormat::Preserve).requires_grad_();
  auto w1 = w.clone().requires_grad_(), b1 = b.clone().requires_grad_();
  auto rm1 = rm.clone(), rv1 = rv.clone();
  auto x2 = x.clone(torch::MemoryFormat::Preserve).requires_grad_();
  auto w2 = w.clone().requires_grad_(), b2 = b.clone().requires_grad_();
  auto rm2 = rm.clone(), rv2 = rv.clone();

  const auto y1 = custom_bn::batch_norm(x1, w1, b1, rm1, rv1, c.training, 0.3, 1e-3);
  const auto y2 = at::batch_norm(x2, w2, b2, rm2, rv2, c.training, 0.3, 1e-3, true);
  const auto tol = cuda_tolerance(c.dtype);
  EXPECT_TRUE(tensors_close(y1, y2, tol)) << "output";
  EXPECT_TRUE(tensors_close(rm1, rm2, cuda_tolerance(param_dtype))) << "running_mean";
  EXPECT_TRUE(tensors_close(rv1, rv2, cuda_tolerance(param_dtype))) << "running_var";

  const auto gy = torch::randn_like(y2);
  const auto g1 = torch::autograd::grad({y1}, {x1, w1, b1}, {gy});
  const auto g2 = torch::autograd::grad({y2}, {x2, w2, b2}, {gy});
  EXPECT_TRUE(tensors_close(g1[0], g2[0], tol)) << "grad_input";
  // Parameter gradients are sums over N*HW reduced-precision products.
  const auto param_tol = c.dtype == param_dtype ? tol : custom_bn::testing::Tolerance{2e-2, 2e-2};
  EXPECT_TRUE(tensors_close(g1[1], g2[1], param_tol)) << "grad_weight";
  EXPECT_TRUE(tensors_close(g1[2], g2[2], param_tol)) << "grad_bias";
}

INSTANTIATE_TEST_SUITE_P(CUDA, CudaParity, ::testing::ValuesIn(cuda_cases()), cuda_case_name);

TEST(Cuda, ModuleOnCudaMatchesTorchNN) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(1);
  custom_bn::nn::BatchNorm2d mine(torch::nn::BatchNormOptions(8).momentum(std::nullopt));
  torch::nn::BatchNorm2d theirs(torch::nn::BatchNormOptions(8).momentum(std::nullopt));
  mine->to(torch::kCUDA);
  theirs->to(torch::kCUDA);
  for (int step = 0; step < 3; ++step) {
    const auto x = channel_varied_input({4, 8, 6, 6}, torch::kFloat, torch::kCUDA);
    EXPECT_TRUE(tensors_close(mine->forward(x), theirs->forward(x), {1e-4, 1e-5}));
  }
  EXPECT_TRUE(tensors_close(mine->running_mean, theirs->running_mean, {1e-4, 1e-5}));
  EXPECT_TRUE(tensors_close(mine->running_var, theirs->running_var, {1e-4, 1e-5}));
}

TEST(Cuda, ParametersOnAnotherDeviceAreRejected) {
  SKIP_WITHOUT_CUDA();
  const auto x = torch::randn({4, 3}, torch::TensorOptions().device(torch::kCUDA));
  EXPECT_TRUE(custom_bn::testing::throws_c10_error_mentioning(
      [&] { custom_bn::batch_norm(x, torch::ones({3}), std::nullopt, std::nullopt, std::nullopt, true); },
      {"weight", "device"}));
}

}  // namespace
