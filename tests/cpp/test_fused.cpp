// The fused epilogue from C++: custom_bn::batch_norm_act against the ATen composition
// act(at::batch_norm(...) + residual) in float64, for every activation, with and without a
// residual, training and evaluation, contiguous and channels-last: the output, the running
// statistics, the first-order gradients of input, weight, bias and residual, and the
// second-order gradients (create_graph=true) of a random weighted sum of those w.r.t. every
// leaf and grad_output. Then the custom_bn::nn::BatchNormAct modules and the in-place
// custom_bn::batch_norm_act_.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "test_helpers.h"

namespace {

using custom_bn::testing::channel_varied_input;
using custom_bn::testing::channels_last_format;
using custom_bn::testing::opt;
using custom_bn::testing::tensors_close;

constexpr double kMomentum = 0.2;
constexpr double kEps = 1e-3;
const custom_bn::testing::Tolerance kTol{1e-10, 1e-10};

struct Activation {
  std::string name;
  std::optional<double> param;  // as passed to custom_bn
};

struct Case {
  Activation act;
  bool residual;
  bool training;
  bool channels_last;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  std::string param = c.act.param ? "_p" + std::to_string(int(*c.act.param * 100)) : "";
  if (!param.empty() && param[2] == '-') param.replace(2, 1, "m");
  return c.act.name + param + (c.residual ? "_residual" : "") + (c.training ? "_train" : "_eval") +
         (c.channels_last ? "_channels_last" : "");
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.act.name << (c.residual ? " residual" : "") << (c.training ? " train" : " eval")
      << (c.channels_last ? " channels_last" : "");
}

std::vector<Case> all_cases() {
  const std::vector<Activation> acts = {{"identity", std::nullopt}, {"relu", std::nullopt},
                                        {"leaky_relu", std::nullopt}, {"leaky_relu", -0.3},
                                        {"elu", 0.6},                 {"silu", std::nullopt}};
  std::vector<Case> cases;
  for (const auto& act : acts) {
    for (bool residual : {false, true}) {
      for (bool training : {true, false}) {
        for (bool channels_last : {false, true}) cases.push_back({act, residual, training, channels_last});
      }
    }
  }
  return cases;
}

torch::Tensor aten_activation(const Activation& act, const torch::Tensor& z) {
  if (act.name == "relu") return torch::relu(z);
  if (act.name == "leaky_relu") return torch::leaky_relu(z, act.param.value_or(0.01));
  if (act.name == "elu") return torch::elu(z, act.param.value_or(1.0));
  if (act.name == "silu") return torch::silu(z);
  return z;
}

struct Leaves {
  torch::Tensor input, weight, bias, residual, grad_output, running_mean, running_var;

  std::vector<torch::Tensor> differentiable() const {
    std::vector<torch::Tensor> out = {input, weight, bias};
    if (residual.defined()) out.push_back(residual);
    return out;
  }
};

Leaves make_leaves(const Case& c) {
  const std::vector<int64_t> shape = {3, 4, 5, 2};
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const auto fmt = c.channels_last ? channels_last_format(4) : torch::MemoryFormat::Contiguous;
  Leaves l;
  l.input = channel_varied_input(shape, torch::kDouble).contiguous(fmt);
  l.weight = torch::rand({4}, f64) + 0.5;
  l.bias = torch::randn({4}, f64);
  if (c.residual) l.residual = torch::randn(shape, f64);
  l.grad_output = torch::randn(shape, f64).contiguous(fmt);
  l.running_mean = torch::randn({4}, f64);
  l.running_var = torch::rand({4}, f64) + 0.5;
  return l;
}

Leaves copy(const Leaves& l) {
  auto leaf = [](const torch::Tensor& t) {
    return t.defined() ? t.detach().clone(torch::MemoryFormat::Preserve).requires_grad_()
                       : torch::Tensor();
  };
  return {leaf(l.input), leaf(l.weight), leaf(l.bias), leaf(l.residual), leaf(l.grad_output),
          l.running_mean.clone(), l.running_var.clone()};
}

struct Result {
  torch::Tensor output;
  std::vector<torch::Tensor> first, second;
};

template <typename Forward>
Result run(const Forward& forward, const Leaves& l, const std::vector<torch::Tensor>& weights) {
  Result r;
  r.output = forward(l);
  const auto wrt = l.differentiable();
  r.first = torch::autograd::grad({r.output}, wrt, {l.grad_output}, true, true);
  torch::Tensor total = torch::zeros({}, torch::kDouble);
  for (size_t i = 0; i < r.first.size(); ++i) total = total + (r.first[i] * weights[i]).sum();
  auto wrt_and_dy = wrt;
  wrt_and_dy.push_back(l.grad_output);
  r.second = torch::autograd::grad({total}, wrt_and_dy, {}, false, false, /*allow_unused=*/true);
  for (size_t i = 0; i < r.second.size(); ++i) {
    if (!r.second[i].defined()) r.second[i] = torch::zeros_like(wrt_and_dy[i]);
  }
  return r;
}

class FusedParity : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { torch::manual_seed(0); }
};

TEST_P(FusedParity, FirstAndSecondOrderMatchTheATenComposition) {
  const Case& c = GetParam();
  const Leaves leaves = make_leaves(c);
  const Leaves mine = copy(leaves), ref = copy(leaves);
  std::vector<torch::Tensor> weights;
  for (const auto& t : leaves.differentiable()) weights.push_back(torch::randn_like(t));

  const Result got = run(
      [&](const Leaves& l) {
        return custom_bn::batch_norm_act(l.input, l.weight, l.bias, l.running_mean,
                                         l.running_var, c.training, kMomentum, kEps, c.act.name,
                                         c.act.param, opt(l.residual));
      },
      mine, weights);
  const Result want = run(
      [&](const Leaves& l) {
        torch::Tensor z = at::batch_norm(l.input, l.weight, l.bias, l.running_mean,
                                         l.running_var, c.training, kMomentum, kEps, false);
        if (l.residual.defined()) z = z + l.residual;
        return aten_activation(c.act, z);
      },
      ref, weights);

  EXPECT_TRUE(tensors_close(got.output, want.output, kTol)) << "output";
  EXPECT_EQ(got.output.strides(), want.output.strides());
  EXPECT_TRUE(tensors_close(mine.running_mean, ref.running_mean, kTol)) << "running_mean";
  EXPECT_TRUE(tensors_close(mine.running_var, ref.running_var, kTol)) << "running_var";
  const std::vector<std::string> names = {"input", "weight", "bias", "residual", "grad_output"};
  for (size_t i = 0; i < got.first.size(); ++i) {
    EXPECT_TRUE(tensors_close(got.first[i], want.first[i], kTol)) << "grad of " << names[i];
  }
  for (size_t i = 0; i < got.second.size(); ++i) {
    const std::string of = i + 1 == got.second.size() ? "grad_output" : names[i];
    EXPECT_TRUE(tensors_close(got.second[i], want.second[i], kTol))
        << "second-order grad w.r.t. " << of;
  }
}

INSTANTIATE_TEST_SUITE_P(CPU, FusedParity, ::testing::ValuesIn(all_cases()), case_name);

TEST(Fused, RejectsUnknownActivationsAndStrayParametersWithValueErrors) {
  const auto x = torch::randn({4, 3, 5});
  EXPECT_THROW(custom_bn::batch_norm_act(x, {}, {}, {}, {}, true, 0.1, 1e-5, "tanh"),
               c10::ValueError);
  EXPECT_THROW(custom_bn::batch_norm_act(x, {}, {}, {}, {}, true, 0.1, 1e-5, "relu", 0.1),
               c10::ValueError);
  EXPECT_THROW(custom_bn::nn::BatchNormAct2d(
                   custom_bn::nn::BatchNormActOptions(3).activation("silu").activation_param(1.0)),
               c10::ValueError);
  EXPECT_TRUE(custom_bn::testing::throws_c10_error_mentioning(
      [&] {
        custom_bn::batch_norm_act(x, {}, {}, {}, {}, true, 0.1, 1e-5, "relu", std::nullopt,
                                  torch::randn({4, 3, 1}));
      },
      {"residual must have input's shape"}));
}

TEST(Fused, ModuleLoadsTorchBatchNormCheckpointAndMatchesTheComposition) {
  torch::manual_seed(0);
  torch::nn::BatchNorm2d reference(torch::nn::BatchNormOptions(5).momentum(0.3));
  {
    torch::NoGradGuard no_grad;
    reference->weight.uniform_(0.5, 1.5);
    reference->bias.normal_();
  }
  std::stringstream checkpoint;
  torch::save(reference, checkpoint);
  custom_bn::nn::BatchNormAct2d fused(
      custom_bn::nn::BatchNormActOptions(5).momentum(0.3).activation("leaky_relu").activation_param(0.2));
  torch::load(fused, checkpoint);

  std::ostringstream printed;
  printed << *fused;
  EXPECT_EQ(printed.str(),
            "custom_bn::nn::BatchNormAct2d(5, eps=1e-05, momentum=0.3, affine=true, "
            "track_running_stats=true, activation=leaky_relu, activation_param=0.2)");
  const custom_bn::testing::Tolerance tol{1e-5, 1e-5};
  for (int step = 0; step < 2; ++step) {
    const auto x = torch::randn({4, 5, 3, 3}), r = torch::randn({4, 5, 3, 3});
    const auto expected = torch::leaky_relu(reference(x) + r, 0.2);
    EXPECT_TRUE(tensors_close(fused(x, r), expected, tol)) << "step " << step;
  }
  EXPECT_TRUE(tensors_close(fused->running_var, reference->running_var, tol));
  EXPECT_EQ(fused->num_batches_tracked.item<int64_t>(), 2);
  fused->eval();
  reference->eval();
  const auto x = torch::randn({2, 5, 3, 3});
  EXPECT_TRUE(tensors_close(fused(x), torch::leaky_relu(reference(x), 0.2), tol));
  // torch::nn::Sequential calls forward(input) alone: the residual defaults to none.
  torch::nn::Sequential seq(fused);
  EXPECT_TRUE(tensors_close(seq->forward(x), fused(x), {0, 0}));
}

TEST(Inplace, OverwritesTheInputAndMatchesTheATenCompositionFromTheOutputAlone) {
  torch::manual_seed(0);
  for (bool channels_last : {false, true}) {
    for (const Activation& act : {Activation{"leaky_relu", 0.2}, Activation{"elu", 0.5},
                                  Activation{"identity", std::nullopt}}) {
      const Leaves leaves = make_leaves({act, false, true, channels_last});
      const Leaves mine = copy(leaves), ref = copy(leaves);
      {
        torch::NoGradGuard no_grad;
        mine.weight.mul_(-1);  // negative weights invert like positive ones
        ref.weight.mul_(-1);
      }
      torch::Tensor y = mine.input * 1.0;  // a non-leaf, as a conv's output
      const int64_t version = y._version();
      torch::Tensor& out = custom_bn::batch_norm_act_(y, mine.weight, mine.bias, mine.running_mean,
                                                      mine.running_var, true, kMomentum, kEps,
                                                      act.name, act.param);
      EXPECT_EQ(out.data_ptr(), y.data_ptr());
      EXPECT_GT(y._version(), version);
      const auto want = aten_activation(
          act, at::batch_norm(ref.input, ref.weight, ref.bias, ref.running_mean, ref.running_var,
                              true, kMomentum, kEps, false));
      EXPECT_TRUE(tensors_close(y, want, kTol)) << act.name;
      EXPECT_TRUE(tensors_close(mine.running_var, ref.running_var, kTol)) << act.name;
      const auto got_grads = torch::autograd::grad({y}, {mine.input, mine.weight, mine.bias},
                                                   {leaves.grad_output});
      const auto want_grads = torch::autograd::grad({want}, {ref.input, ref.weight, ref.bias},
                                                    {leaves.grad_output});
      for (size_t i = 0; i < got_grads.size(); ++i) {
        EXPECT_TRUE(tensors_close(got_grads[i], want_grads[i], {1e-9, 1e-9}))
            << act.name << " grad " << i << (channels_last ? " channels_last" : "");
      }
    }
  }
}

TEST(Inplace, RejectsNonInvertibleActivationsAndZeroWeightsBeforeWriting) {
  auto x = torch::randn({4, 3, 5});
  const auto before = x.clone();
  EXPECT_THROW(custom_bn::batch_norm_act_(x, {}, {}, {}, {}, true, 0.1, 1e-5, "relu"),
               c10::ValueError);
  EXPECT_THROW(custom_bn::batch_norm_act_(x, {}, {}, {}, {}, true, 0.1, 1e-5, "leaky_relu", 0.0),
               c10::ValueError);
  auto y = torch::randn({4, 3, 5}).requires_grad_() * 1.0;
  const auto y_before = y.detach().clone();
  const auto w = torch::tensor({1.0f, 0.0f, 2.0f}).requires_grad_();
  EXPECT_THROW(custom_bn::batch_norm_act_(y, w, {}, {}, {}, true), c10::ValueError);
  EXPECT_TRUE(torch::equal(x, before));
  EXPECT_TRUE(torch::equal(y.detach(), y_before));
}

}  // namespace
