// custom_bn::batch_norm from C++ against at::batch_norm: outputs, saved statistics, running
// statistics and, through C++ autograd only (no Python anywhere), the gradients of input,
// weight and bias.
#include <gtest/gtest.h>
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
using custom_bn::testing::opt;
using custom_bn::testing::tensors_close;
using custom_bn::testing::tolerance_for;

constexpr double kMomentum = 0.3;  // large enough that a wrong running update shows
constexpr double kEps = 1e-3;      // large enough that a dropped or misplaced eps shows

struct Case {
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  bool channels_last;
  bool training;
  bool affine;
  bool running_stats;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return std::string(c.dtype == torch::kDouble ? "double" : "float") + "_" +
         custom_bn::testing::shape_name(c.shape) + (c.channels_last ? "_channels_last" : "") +
         (c.training ? "_train" : "_eval") + (c.affine ? "_affine" : "_noaffine") +
         (c.running_stats ? "_stats" : "_nostats");
}

// Readable parameters in gtest's failure messages instead of a byte dump.
void PrintTo(const Case& c, std::ostream* os) {
  *os << c10::toString(c.dtype) << " " << custom_bn::testing::shape_name(c.shape)
      << (c.channels_last ? " channels_last" : "") << (c.training ? " train" : " eval")
      << (c.affine ? " affine" : " no-affine") << (c.running_stats ? " stats" : " no-stats");
}

std::vector<Case> all_cases() {
  const std::vector<std::vector<int64_t>> shapes = {
      {16, 5}, {4, 3, 7}, {3, 4, 5, 6}, {2, 3, 3, 4, 5}};
  std::vector<Case> cases;
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    for (const auto& shape : shapes) {
      for (bool channels_last : {false, true}) {
        if (channels_last && shape.size() < 4) continue;
        for (bool affine : {true, false}) {
          cases.push_back({dtype, shape, channels_last, true, affine, true});
          cases.push_back({dtype, shape, channels_last, true, affine, false});
          cases.push_back({dtype, shape, channels_last, false, affine, true});
        }
      }
    }
  }
  return cases;
}

// The arguments of one call, created once so the custom and the ATen call see equal values.
struct Args {
  torch::Tensor input, weight, bias, running_mean, running_var;

  static Args make(const Case& c) {
    const int64_t C = c.shape[1];
    const auto opts = torch::TensorOptions().dtype(c.dtype);
    Args a;
    a.input = channel_varied_input(c.shape, c.dtype);
    if (c.channels_last) a.input = a.input.contiguous(channels_last_format(a.input.dim()));
    if (c.affine) {
      a.weight = torch::rand({C}, opts) + 0.5;
      a.bias = torch::randn({C}, opts);
    }
    if (c.running_stats) {
      a.running_mean = torch::randn({C}, opts);
      a.running_var = torch::rand({C}, opts) + 0.5;
    }
    return a;
  }

  // Independent copies (running stats are written in place; grads need fresh leaves).
  Args clone(bool requires_grad) const {
    auto copy_of = [&](const torch::Tensor& t) {
      return t.defined() ? t.detach().clone().requires_grad_(requires_grad) : torch::Tensor();
    };
    Args a;
    a.input = input.detach().clone(torch::MemoryFormat::Preserve).requires_grad_(requires_grad);
    a.weight = copy_of(weight);
    a.bias = copy_of(bias);
    a.running_mean = running_mean.defined() ? running_mean.clone() : torch::Tensor();
    a.running_var = running_var.defined() ? running_var.clone() : torch::Tensor();
    return a;
  }

  std::vector<torch::Tensor> differentiable() const {
    std::vector<torch::Tensor> out = {input};
    if (weight.defined()) out.push_back(weight);
    if (bias.defined()) out.push_back(bias);
    return out;
  }
};

torch::Tensor run_custom(Args& a, bool training) {
  return custom_bn::batch_norm(a.input, opt(a.weight), opt(a.bias), opt(a.running_mean),
                               opt(a.running_var), training, kMomentum, kEps);
}

torch::Tensor run_aten(Args& a, bool training) {
  return at::batch_norm(a.input, opt(a.weight), opt(a.bias), opt(a.running_mean),
                        opt(a.running_var), training, kMomentum, kEps, /*cudnn_enabled=*/false);
}

class BatchNormParity : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

TEST_P(BatchNormParity, OutputAndRunningStatsMatchATen) {
  const Case& c = GetParam();
  const auto tol = tolerance_for(c.dtype);
  const Args args = Args::make(c);
  Args mine = args.clone(false);
  Args ref = args.clone(false);

  const torch::Tensor y = run_custom(mine, c.training);
  const torch::Tensor y_ref = run_aten(ref, c.training);

  EXPECT_TRUE(tensors_close(y, y_ref, tol)) << "output";
  if (c.running_stats) {
    EXPECT_TRUE(tensors_close(mine.running_mean, ref.running_mean, tol)) << "running_mean";
    EXPECT_TRUE(tensors_close(mine.running_var, ref.running_var, tol)) << "running_var";
    if (c.training) {
      EXPECT_FALSE(torch::equal(mine.running_mean, args.running_mean))
          << "running_mean was not updated in training mode";
    } else {
      EXPECT_TRUE(torch::equal(mine.running_mean, args.running_mean))
          << "running_mean changed in evaluation mode";
      EXPECT_TRUE(torch::equal(mine.running_var, args.running_var))
          << "running_var changed in evaluation mode";
    }
  }
  if (c.channels_last) {
    EXPECT_TRUE(y.is_contiguous(channels_last_format(y.dim())))
        << "a channels-last input must give a channels-last output";
  }
}

TEST_P(BatchNormParity, SavedStatisticsMatchATen) {
  const Case& c = GetParam();
  const auto tol = tolerance_for(c.dtype);
  const Args args = Args::make(c);
  Args mine = args.clone(false);
  Args ref = args.clone(false);

  const auto [y, save_mean, save_invstd] = custom_bn::batch_norm_forward(
      mine.input, opt(mine.weight), opt(mine.bias), opt(mine.running_mean),
      opt(mine.running_var), c.training, kMomentum, kEps);
  ASSERT_EQ(save_mean.sizes(), torch::IntArrayRef({c.shape[1]}));
  ASSERT_EQ(save_invstd.sizes(), torch::IntArrayRef({c.shape[1]}));
  if (c.training) {
    const auto [y_ref, mean_ref, invstd_ref] = at::native_batch_norm(
        ref.input, opt(ref.weight), opt(ref.bias), opt(ref.running_mean), opt(ref.running_var),
        true, kMomentum, kEps);
    EXPECT_TRUE(tensors_close(y, y_ref, tol)) << "output";
    EXPECT_TRUE(tensors_close(save_mean, mean_ref, tol)) << "save_mean";
    EXPECT_TRUE(tensors_close(save_invstd, invstd_ref, tol)) << "save_invstd";
  } else {
    // Evaluation mode saves what it normalized with: the running statistics.
    EXPECT_TRUE(tensors_close(save_mean, args.running_mean, tol)) << "save_mean";
    EXPECT_TRUE(tensors_close(save_invstd, (args.running_var + kEps).rsqrt(), tol))
        << "save_invstd";
  }
}

TEST_P(BatchNormParity, GradientsThroughCppAutogradMatchATen) {
  const Case& c = GetParam();
  const auto tol = tolerance_for(c.dtype);
  const Args args = Args::make(c);
  Args mine = args.clone(true);
  Args ref = args.clone(true);

  const torch::Tensor y = run_custom(mine, c.training);
  const torch::Tensor y_ref = run_aten(ref, c.training);
  ASSERT_TRUE(y.requires_grad()) << "custom_bn::batch_norm output is not part of the graph";
  const torch::Tensor grad_output = torch::randn_like(y_ref);

  const auto grads = torch::autograd::grad({y}, mine.differentiable(), {grad_output});
  const auto grads_ref = torch::autograd::grad({y_ref}, ref.differentiable(), {grad_output});
  ASSERT_EQ(grads.size(), grads_ref.size());
  const char* names[] = {"grad_input", "grad_weight", "grad_bias"};
  for (size_t i = 0; i < grads.size(); ++i) {
    ASSERT_TRUE(grads[i].defined()) << names[i] << " is undefined";
    EXPECT_TRUE(tensors_close(grads[i], grads_ref[i], tol)) << names[i];
  }
}

INSTANTIATE_TEST_SUITE_P(CPU, BatchNormParity, ::testing::ValuesIn(all_cases()), case_name);

TEST(BatchNormAutograd, BackwardAccumulatesIntoLeafGrads) {
  torch::manual_seed(1);
  const auto x0 = channel_varied_input({4, 3, 5, 5}, torch::kDouble);
  auto x = x0.clone().requires_grad_();
  auto w = torch::rand({3}, torch::kDouble).add_(0.5).requires_grad_();
  auto b = torch::randn({3}, torch::kDouble).requires_grad_();
  auto x_ref = x0.clone().requires_grad_();
  auto w_ref = w.detach().clone().requires_grad_();
  auto b_ref = b.detach().clone().requires_grad_();

  // A scalar loss that is not a plain sum, so grad_output varies per element.
  (custom_bn::batch_norm(x, w, b, std::nullopt, std::nullopt, true).pow(3).sum()).backward();
  (at::batch_norm(x_ref, w_ref, b_ref, {}, {}, true, 0.1, 1e-5, false).pow(3).sum()).backward();

  const auto tol = tolerance_for(torch::kDouble);
  EXPECT_TRUE(tensors_close(x.grad(), x_ref.grad(), tol)) << "input.grad";
  EXPECT_TRUE(tensors_close(w.grad(), w_ref.grad(), tol)) << "weight.grad";
  EXPECT_TRUE(tensors_close(b.grad(), b_ref.grad(), tol)) << "bias.grad";
}

TEST(BatchNormAutograd, WeightAloneRequiringGradMatchesATen) {
  torch::manual_seed(2);
  const auto x = channel_varied_input({6, 4}, torch::kDouble);  // does not require grad
  const auto b = torch::randn({4}, torch::kDouble);
  auto w = torch::rand({4}, torch::kDouble).add_(0.5).requires_grad_();
  auto w_ref = w.detach().clone().requires_grad_();
  const auto grad_output = torch::randn({6, 4}, torch::kDouble);

  const auto y = custom_bn::batch_norm(x, w, b, std::nullopt, std::nullopt, true);
  const auto y_ref = at::batch_norm(x, w_ref, b, {}, {}, true, 0.1, 1e-5, false);
  ASSERT_TRUE(y.requires_grad());
  const auto grad = torch::autograd::grad({y}, {w}, {grad_output});
  const auto grad_ref = torch::autograd::grad({y_ref}, {w_ref}, {grad_output});
  EXPECT_TRUE(tensors_close(grad[0], grad_ref[0], tolerance_for(torch::kDouble)));
}

// Optional arguments shift the positions of the tensors autograd sees; a bias without a weight,
// next to running statistics, must still get its own gradient.
TEST(BatchNormAutograd, BiasWithoutWeightGetsItsGradient) {
  torch::manual_seed(5);
  const auto x0 = channel_varied_input({5, 3, 4}, torch::kDouble);
  for (bool with_stats : {true, false}) {
    auto x = x0.clone().requires_grad_();
    auto b = torch::randn({3}, torch::kDouble).requires_grad_();
    auto x_ref = x0.clone().requires_grad_();
    auto b_ref = b.detach().clone().requires_grad_();
    auto rm = torch::zeros({3}, torch::kDouble), rv = torch::ones({3}, torch::kDouble);
    auto rm_ref = rm.clone(), rv_ref = rv.clone();
    const auto grad_output = torch::randn({5, 3, 4}, torch::kDouble);
    const auto y = custom_bn::batch_norm(x, std::nullopt, b, with_stats ? opt(rm) : std::nullopt,
                                         with_stats ? opt(rv) : std::nullopt, true);
    const auto y_ref = at::batch_norm(x_ref, {}, b_ref, with_stats ? opt(rm_ref) : std::nullopt,
                                      with_stats ? opt(rv_ref) : std::nullopt, true, 0.1, 1e-5,
                                      false);
    const auto grads = torch::autograd::grad({y}, {x, b}, {grad_output}, std::nullopt,
                                             /*create_graph=*/false, /*allow_unused=*/true);
    const auto grads_ref = torch::autograd::grad({y_ref}, {x_ref, b_ref}, {grad_output});
    const auto tol = tolerance_for(torch::kDouble);
    EXPECT_TRUE(tensors_close(grads[0], grads_ref[0], tol)) << "grad_input, stats=" << with_stats;
    EXPECT_TRUE(tensors_close(grads[1], grads_ref[1], tol)) << "grad_bias, stats=" << with_stats;
  }
}

TEST(BatchNormAutograd, SavedStatisticsAreNotDifferentiable) {
  auto x = channel_varied_input({8, 3}, torch::kDouble).requires_grad_();
  const auto [y, save_mean, save_invstd] = custom_bn::batch_norm_forward(
      x, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true, 0.1, 1e-5);
  EXPECT_TRUE(y.requires_grad());
  EXPECT_FALSE(save_mean.requires_grad());
  EXPECT_FALSE(save_invstd.requires_grad());
}

TEST(BatchNormAutograd, NoGraphUnderNoGradGuard) {
  auto x = channel_varied_input({8, 3}, torch::kFloat).requires_grad_();
  torch::NoGradGuard no_grad;
  EXPECT_FALSE(custom_bn::batch_norm(x, {}, {}, {}, {}, true).requires_grad());
}

}  // namespace

// Training writes the running statistics, so their version counters must move whether or not
// autograd records a node (the no-graph path skips the autograd Function). Evaluation only
// reads them.
TEST(BatchNormAutograd, RunningStatVersionsMoveOnlyInTraining) {
  for (const bool grad : {true, false}) {
    auto x = channel_varied_input({8, 3}, torch::kDouble).requires_grad_(grad);
    auto mean = torch::zeros({3}, torch::kDouble);
    auto var = torch::ones({3}, torch::kDouble);
    const auto before = mean._version();
    custom_bn::batch_norm(x, {}, {}, mean, var, /*training=*/true);
    EXPECT_EQ(mean._version(), before + 1) << "requires_grad=" << grad;
    EXPECT_EQ(var._version(), before + 1) << "requires_grad=" << grad;
    custom_bn::batch_norm(x, {}, {}, mean, var, /*training=*/false);
    EXPECT_EQ(mean._version(), before + 1) << "requires_grad=" << grad;
  }
}
