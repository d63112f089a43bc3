// Bad input to custom_bn::batch_norm throws c10::Error naming the offending argument, and leaves
// the running statistics exactly as they were.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "test_helpers.h"

namespace {

using custom_bn::testing::throws_c10_error_mentioning;

constexpr int64_t kC = 3;

class BatchNormErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    input = torch::randn({4, kC, 5});
    weight = torch::rand({kC}) + 0.5;
    bias = torch::randn({kC});
    running_mean = torch::randn({kC});
    running_var = torch::rand({kC}) + 0.5;
    mean_before = running_mean.clone();
    var_before = running_var.clone();
  }

  // Expects `call` to throw c10::Error mentioning every fragment, then that the running
  // statistics are bit-for-bit what they were.
  void expect_rejected(const std::function<void()>& call,
                       std::initializer_list<const char*> fragments) {
    EXPECT_TRUE(throws_c10_error_mentioning(call, fragments));
    EXPECT_TRUE(torch::equal(running_mean, mean_before)) << "running_mean changed";
    EXPECT_TRUE(torch::equal(running_var, var_before)) << "running_var changed";
  }

  torch::Tensor input, weight, bias, running_mean, running_var, mean_before, var_before;
};

TEST_F(BatchNormErrors, OneDimensionalInput) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(torch::randn({kC}), weight, bias, running_mean, running_var, true);
      },
      {"input", "1-D"});
}

// torch accepts (N, C, *) of any rank from 2 on; so does custom_bn (not an error any more).
TEST_F(BatchNormErrors, SixDimensionalInputIsAcceptedAsByTorch) {
  const auto x = torch::randn({2, kC, 2, 3, 1, 2}, torch::kDouble);
  const auto w = weight.to(torch::kDouble), b = bias.to(torch::kDouble);
  auto rm = running_mean.to(torch::kDouble), rv = running_var.to(torch::kDouble);
  auto rm_ref = rm.clone(), rv_ref = rv.clone();
  const auto y = custom_bn::batch_norm(x, w, b, rm, rv, true, 0.1, 1e-5);
  const auto y_ref = at::batch_norm(x, w, b, rm_ref, rv_ref, true, 0.1, 1e-5, false);
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(rm, rm_ref, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(rv, rv_ref, 1e-12, 1e-12));
}

TEST_F(BatchNormErrors, WeightOfWrongSize) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(input, torch::ones({kC + 1}), bias, running_mean, running_var,
                              true);
      },
      {"weight", "[3]", "[4]"});
}

TEST_F(BatchNormErrors, BiasOfWrongSize) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(input, weight, torch::zeros({kC, 1}), running_mean, running_var,
                              true);
      },
      {"bias"});
}

TEST_F(BatchNormErrors, ChannelCountDifferentFromRunningStats) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(torch::randn({4, kC + 2, 5}), std::nullopt, std::nullopt,
                              running_mean, running_var, true);
      },
      {"running_mean", "[5]"});
}

TEST_F(BatchNormErrors, IntegerInput) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(torch::randint(0, 10, {4, kC, 5}), std::nullopt, std::nullopt,
                              running_mean, running_var, true);
      },
      {"input", "floating-point", "Long"});
}

TEST_F(BatchNormErrors, BoolInput) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(torch::ones({4, kC}, torch::kBool), std::nullopt, std::nullopt,
                              running_mean, running_var, true);
      },
      {"input", "Bool"});
}

TEST_F(BatchNormErrors, ComplexInput) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(torch::randn({4, kC}, torch::kComplexFloat), std::nullopt,
                              std::nullopt, running_mean, running_var, true);
      },
      {"input", "Complex"});
}

TEST_F(BatchNormErrors, WeightOfOtherDtype) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(input, weight.to(torch::kDouble), bias, running_mean, running_var,
                              true);
      },
      {"weight", "Double"});
}

TEST_F(BatchNormErrors, RunningMeanWithoutRunningVar) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(input, weight, bias, running_mean, std::nullopt, true);
      },
      {"running_mean", "running_var"});
}

TEST_F(BatchNormErrors, RunningVarWithoutRunningMean) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(input, weight, bias, std::nullopt, running_var, true);
      },
      {"running_mean", "running_var"});
}

TEST_F(BatchNormErrors, EvaluationWithoutRunningStats) {
  expect_rejected(
      [&] { custom_bn::batch_norm(input, weight, bias, std::nullopt, std::nullopt, false); },
      {"running_mean", "running_var"});
}

TEST_F(BatchNormErrors, SingleValuePerChannelInTraining) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(torch::randn({1, kC}), weight, bias, running_mean, running_var,
                              true);
      },
      {"more than 1 value per channel", "input"});
  expect_rejected(
      [&] {
        custom_bn::batch_norm(torch::randn({1, kC, 1, 1}), weight, bias, running_mean,
                              running_var, true);
      },
      {"more than 1 value per channel", "input"});
}

TEST_F(BatchNormErrors, SingleValuePerChannelIsFineInEvaluation) {
  // Evaluation normalizes with the running statistics, which exist for any batch size.
  const auto x = torch::randn({1, kC});
  const auto y = custom_bn::batch_norm(x, weight, bias, running_mean, running_var, false);
  const auto y_ref = at::batch_norm(x, weight, bias, running_mean, running_var, false, 0.1, 1e-5,
                                    false);
  EXPECT_TRUE(custom_bn::testing::tensors_close(y, y_ref, {1e-5, 1e-6}));
}

TEST_F(BatchNormErrors, BadInputDoesNotBreakTheGraph) {
  // A rejected call inside autograd must not leave state behind that breaks the next call.
  auto x = input.clone().requires_grad_();
  EXPECT_TRUE(throws_c10_error_mentioning(
      [&] {
        custom_bn::batch_norm(x, torch::ones({kC + 1}), bias, running_mean, running_var, true);
      },
      {"weight"}));
  custom_bn::batch_norm(x, weight, bias, running_mean, running_var, true).sum().backward();
  EXPECT_TRUE(x.grad().defined());
}

}  // namespace
