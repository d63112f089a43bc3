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

// torch's empty (0,) input, with empty per-channel tensors (C = 0): an empty output.
TEST_F(BatchNormErrors, EmptyOneDimensionalInputIsAcceptedAsByTorch) {
  const auto x = torch::empty({0}, torch::requires_grad());
  const auto empty = torch::empty({0});
  for (bool training : {true, false}) {
    const auto y = custom_bn::batch_norm(x, empty, empty, empty.clone(), empty.clone(), training);
    EXPECT_EQ(y.sizes(), x.sizes());
    EXPECT_EQ(torch::autograd::grad({y.sum()}, {x})[0].sizes(), x.sizes());
  }
}

// As torch's forward: weight and bias of any shape with C elements; their gradients keep that
// shape (torch's own backward fails there) and equal ATen's for the [C] views.
TEST_F(BatchNormErrors, WeightAndBiasOfShapeCx1AreAcceptedAsByTorch) {
  const auto x = torch::randn({4, kC, 5}, torch::kDouble).requires_grad_();
  const auto w = (torch::rand({kC, 1}, torch::kDouble) + 0.5).requires_grad_();
  const auto b = torch::randn({kC, 1}, torch::kDouble).requires_grad_();
  const auto dy = torch::randn({4, kC, 5}, torch::kDouble);
  const auto y = custom_bn::batch_norm(x, w, b, {}, {}, true);
  const auto grads = torch::autograd::grad({y}, {x, w, b}, {dy});
  const auto x_ref = x.detach().requires_grad_();
  const auto w_ref = w.detach().reshape({kC}).requires_grad_();
  const auto b_ref = b.detach().reshape({kC}).requires_grad_();
  const auto y_ref = at::batch_norm(x_ref, w_ref, b_ref, {}, {}, true, 0.1, 1e-5, false);
  const auto grads_ref = torch::autograd::grad({y_ref}, {x_ref, w_ref, b_ref}, {dy});
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-12, 1e-12));
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[i].reshape(grads_ref[i].sizes()), grads_ref[i], 1e-12, 1e-12))
        << "gradient " << i;
  }
  EXPECT_EQ(grads[1].sizes(), w.sizes());
  EXPECT_EQ(grads[2].sizes(), b.sizes());
}

TEST_F(BatchNormErrors, WeightOfWrongSize) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(input, torch::ones({kC + 1}), bias, running_mean, running_var,
                              true);
      },
      {"weight", "[3]", "[4]"});
}

// torch takes weight and bias of any shape with C elements ([C, 1] included); C + 3 elements
// are wrong whatever the shape.
TEST_F(BatchNormErrors, BiasOfWrongSize) {
  expect_rejected(
      [&] {
        custom_bn::batch_norm(input, weight, torch::zeros({kC + 3, 1}), running_mean,
                              running_var, true);
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
  // c10::NotImplementedError (Python's NotImplementedError), the class at::batch_norm throws.
  EXPECT_THROW(custom_bn::batch_norm(torch::randint(0, 10, {4, kC, 5}), std::nullopt,
                                     std::nullopt, running_mean, running_var, true),
               c10::NotImplementedError);
  EXPECT_THROW(at::batch_norm(torch::randint(0, 10, {4, kC, 5}), std::nullopt, std::nullopt,
                              running_mean, running_var, true, 0.1, 1e-5, false),
               c10::NotImplementedError);
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
  EXPECT_TRUE(torch::equal(running_mean, mean_before)) << "running_mean changed in evaluation";
  EXPECT_TRUE(torch::equal(running_var, var_before)) << "running_var changed in evaluation";
}

TEST_F(BatchNormErrors, BadInputDoesNotBreakTheGraph) {
  // A rejected call inside autograd must not leave state behind that breaks the next call: the
  // next call's gradients and running statistics are ATen's.
  auto x = input.clone().requires_grad_();
  auto w = weight.clone().requires_grad_();
  auto b = bias.clone().requires_grad_();
  expect_rejected(
      [&] {
        custom_bn::batch_norm(x, torch::ones({kC + 1}).requires_grad_(), b, running_mean,
                              running_var, true);
      },
      {"weight"});
  EXPECT_FALSE(x.grad().defined()) << "the rejected call left a gradient behind";
  const auto grad_output = torch::randn_like(input);
  custom_bn::batch_norm(x, w, b, running_mean, running_var, true).backward(grad_output);

  auto x_ref = input.clone().requires_grad_();
  auto w_ref = weight.clone().requires_grad_();
  auto b_ref = bias.clone().requires_grad_();
  auto mean_ref = mean_before.clone(), var_ref = var_before.clone();
  at::batch_norm(x_ref, w_ref, b_ref, mean_ref, var_ref, true, 0.1, 1e-5, false)
      .backward(grad_output);
  const auto tol = custom_bn::testing::tolerance_for(torch::kFloat);
  EXPECT_TRUE(custom_bn::testing::tensors_close(x.grad(), x_ref.grad(), tol)) << "input grad";
  EXPECT_TRUE(custom_bn::testing::tensors_close(w.grad(), w_ref.grad(), tol)) << "weight grad";
  EXPECT_TRUE(custom_bn::testing::tensors_close(b.grad(), b_ref.grad(), tol)) << "bias grad";
  EXPECT_TRUE(custom_bn::testing::tensors_close(running_mean, mean_ref, tol)) << "running_mean";
  EXPECT_TRUE(custom_bn::testing::tensors_close(running_var, var_ref, tol)) << "running_var";
}

}  // namespace
