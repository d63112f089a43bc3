// Second-order gradients of custom_bn::batch_norm from C++ (create_graph=true, through the
// differentiable backward of csrc/autograd/batch_norm.cpp) against the same computation on
// at::batch_norm, in float64: the first-order gradients of <y, dy> w.r.t. input, weight and
// bias, then the gradients of a random weighted sum of those w.r.t. input, weight, bias and dy.
// The gradient w.r.t. dy is also checked on its own against a finite difference of the forward.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "test_helpers.h"

namespace {

using custom_bn::testing::channel_varied_input;
using custom_bn::testing::channels_last_format;
using custom_bn::testing::opt;
using custom_bn::testing::tensors_close;

constexpr double kMomentum = 0.3;
constexpr double kEps = 1e-3;  // large enough that a dropped or misplaced eps shows
const custom_bn::testing::Tolerance kTol{1e-10, 1e-10};

struct Case {
  std::vector<int64_t> shape;
  bool channels_last;
  bool training;
  bool affine;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return custom_bn::testing::shape_name(c.shape) + (c.channels_last ? "_channels_last" : "") +
         (c.training ? "_train" : "_eval") + (c.affine ? "_affine" : "_noaffine");
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << custom_bn::testing::shape_name(c.shape) << (c.channels_last ? " channels_last" : "")
      << (c.training ? " train" : " eval") << (c.affine ? " affine" : " no-affine");
}

// (N, C), (N, C, L), 2d, 3d and channels-last 2d; both modes, with and without weight and bias.
std::vector<Case> all_cases() {
  const std::vector<std::pair<std::vector<int64_t>, bool>> layouts = {
      {{8, 3}, false}, {{4, 3, 5}, false}, {{3, 4, 5, 6}, false},
      {{3, 4, 5, 6}, true}, {{2, 3, 3, 4, 5}, false}};
  std::vector<Case> cases;
  for (const auto& [shape, channels_last] : layouts) {
    for (bool training : {true, false}) {
      for (bool affine : {true, false}) cases.push_back({shape, channels_last, training, affine});
    }
  }
  return cases;
}

// The leaves of one computation. Made once per case; each side gets its own copy.
struct Leaves {
  torch::Tensor input, weight, bias, grad_output;  // require grad (weight, bias when affine)
  torch::Tensor running_mean, running_var;

  static Leaves make(const Case& c) {
    const int64_t C = c.shape[1];
    const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
    const auto fmt = c.channels_last ? channels_last_format(static_cast<int64_t>(c.shape.size()))
                                     : torch::MemoryFormat::Contiguous;
    Leaves l;
    l.input = channel_varied_input(c.shape, torch::kDouble).contiguous(fmt);
    l.grad_output = torch::randn(c.shape, f64).contiguous(fmt);
    if (c.affine) {
      l.weight = torch::rand({C}, f64) + 0.5;
      l.bias = torch::randn({C}, f64);
    }
    l.running_mean = torch::randn({C}, f64);
    l.running_var = torch::rand({C}, f64) + 0.5;
    return l;
  }

  Leaves copy() const {
    auto leaf = [](const torch::Tensor& t) {
      return t.defined() ? t.detach().clone(torch::MemoryFormat::Preserve).requires_grad_()
                         : torch::Tensor();
    };
    return {leaf(input), leaf(weight), leaf(bias), leaf(grad_output), running_mean.clone(),
            running_var.clone()};
  }

  // What the first-order gradients are taken with respect to.
  std::vector<torch::Tensor> differentiable() const {
    std::vector<torch::Tensor> out = {input};
    if (weight.defined()) out.push_back(weight);
    if (bias.defined()) out.push_back(bias);
    return out;
  }
};

using BatchNorm = std::function<torch::Tensor(const Leaves&, bool training)>;

torch::Tensor custom(const Leaves& l, bool training) {
  return custom_bn::batch_norm(l.input, opt(l.weight), opt(l.bias), l.running_mean,
                               l.running_var, training, kMomentum, kEps);
}

torch::Tensor aten(const Leaves& l, bool training) {
  return at::batch_norm(l.input, opt(l.weight), opt(l.bias), l.running_mean, l.running_var,
                        training, kMomentum, kEps, /*cudnn_enabled=*/false);
}

struct Derivatives {
  std::vector<torch::Tensor> first;   // d<y, dy> / d(input, weight, bias)
  std::vector<torch::Tensor> second;  // d<v, first> / d(input, weight, bias, dy)
};

// `weights` has one tensor per first-order gradient: the random weighted sum differentiated
// again. A leaf the first-order gradients do not depend on (the input in evaluation mode)
// gets zeros, whether autograd reports it as unused or as zero.
Derivatives derivatives(const BatchNorm& bn, const Leaves& l, bool training,
                        const std::vector<torch::Tensor>& weights) {
  const torch::Tensor y = bn(l, training);
  const std::vector<torch::Tensor> wrt = l.differentiable();
  Derivatives d;
  d.first = torch::autograd::grad({y}, wrt, {l.grad_output}, /*retain_graph=*/true,
                                  /*create_graph=*/true);
  torch::Tensor weighted_sum = torch::zeros({}, torch::kDouble);
  for (size_t i = 0; i < d.first.size(); ++i) {
    weighted_sum = weighted_sum + (d.first[i] * weights[i]).sum();
  }
  std::vector<torch::Tensor> wrt_and_dy = wrt;
  wrt_and_dy.push_back(l.grad_output);
  d.second = torch::autograd::grad({weighted_sum}, wrt_and_dy, {}, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true);
  for (size_t i = 0; i < d.second.size(); ++i) {
    if (!d.second[i].defined()) d.second[i] = torch::zeros_like(wrt_and_dy[i]);
  }
  return d;
}

std::vector<torch::Tensor> random_weights(const Leaves& l) {
  std::vector<torch::Tensor> weights;
  for (const auto& t : l.differentiable()) weights.push_back(torch::randn_like(t));
  return weights;
}

class DoubleBackward : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

TEST_P(DoubleBackward, MatchesATen) {
  const Case& c = GetParam();
  const Leaves leaves = Leaves::make(c);
  const Leaves mine = leaves.copy(), ref = leaves.copy();
  const std::vector<torch::Tensor> weights = random_weights(leaves);

  const Derivatives d = derivatives(custom, mine, c.training, weights);
  const Derivatives d_ref = derivatives(aten, ref, c.training, weights);

  const std::vector<std::string> names = c.affine
                                             ? std::vector<std::string>{"input", "weight", "bias"}
                                             : std::vector<std::string>{"input"};
  ASSERT_EQ(d.first.size(), names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_TRUE(tensors_close(d.first[i], d_ref.first[i], kTol)) << "grad of " << names[i];
  }
  ASSERT_EQ(d.second.size(), names.size() + 1);
  for (size_t i = 0; i <= names.size(); ++i) {
    const std::string of = i < names.size() ? names[i] : "grad_output";
    EXPECT_TRUE(tensors_close(d.second[i], d_ref.second[i], kTol))
        << "second-order grad w.r.t. " << of;
  }
  // The training case is not trivially satisfied: the second-order input gradient exists.
  if (c.training) EXPECT_GT(d_ref.second[0].abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(tensors_close(mine.running_mean, ref.running_mean, kTol)) << "running_mean";
  EXPECT_TRUE(tensors_close(mine.running_var, ref.running_var, kTol)) << "running_var";
}

// The first-order gradients are J^T dy (J the forward's Jacobian w.r.t. input, weight, bias), so
// the gradient of <v, J^T dy> w.r.t. dy is J v: the forward's derivative along v, here a central
// difference of ATen's forward (exact up to rounding in evaluation, where the forward is
// bilinear; O(h^2) in training).
TEST_P(DoubleBackward, GradWrtGradOutputIsTheForwardsDirectionalDerivative) {
  const Case& c = GetParam();
  const Leaves leaves = Leaves::make(c);
  const std::vector<torch::Tensor> weights = random_weights(leaves);
  const Derivatives d = derivatives(custom, leaves.copy(), c.training, weights);

  constexpr double h = 1e-5;
  auto forward_at = [&](double step) {
    torch::NoGradGuard no_grad;
    Leaves l = leaves.copy();  // fresh running stats: the training forward updates them
    const auto wrt = l.differentiable();
    for (size_t i = 0; i < wrt.size(); ++i) wrt[i].add_(weights[i] * step);
    return aten(l, c.training);
  };
  const torch::Tensor directional = (forward_at(h) - forward_at(-h)) / (2 * h);
  EXPECT_TRUE(tensors_close(d.second.back(), directional, {1e-7, 1e-7}));
}

INSTANTIATE_TEST_SUITE_P(CPU, DoubleBackward, ::testing::ValuesIn(all_cases()), case_name);

}  // namespace
