// custom_bn::nn::BatchNorm1d/2d/3d against torch::nn::BatchNorm1d/2d/3d: same parameters and
// buffers, same outputs, gradients and running statistics over several training steps and in
// evaluation, momentum=nullopt, checkpoint exchange, and no state change on rejected input.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "test_helpers.h"

namespace {

using custom_bn::testing::channel_varied_input;
using custom_bn::testing::tensors_close;
using custom_bn::testing::throws_c10_error_mentioning;

const custom_bn::testing::Tolerance kTol{1e-4, 1e-5};  // float32 modules

// Gives both modules the same non-trivial affine parameters and running statistics.
template <typename Mine, typename Theirs>
void copy_state(const Mine& mine, const Theirs& theirs) {
  torch::NoGradGuard no_grad;
  const auto params = theirs->named_parameters(/*recurse=*/false);
  for (auto& p : mine->named_parameters(false)) {
    if (!p.value().defined()) continue;
    p.value().uniform_(0.5, 1.5);
    params[p.key()].copy_(p.value());
  }
  const auto buffers = theirs->named_buffers(false);
  for (auto& b : mine->named_buffers(false)) {
    if (!b.value().defined()) continue;
    if (b.key() == "running_mean") b.value().normal_();
    if (b.key() == "running_var") b.value().uniform_(0.5, 2.0);
    buffers[b.key()].copy_(b.value());
  }
}

// Same buffers: running statistics within tolerance, num_batches_tracked exactly; a buffer one
// module lacks (track_running_stats=false) must be lacking in the other too.
template <typename Mine, typename Theirs>
void expect_same_state(const Mine& mine, const Theirs& theirs, const std::string& when) {
  const auto buffers = theirs->named_buffers(false);
  ASSERT_EQ(mine->named_buffers(false).size(), buffers.size()) << when;
  for (const auto& b : mine->named_buffers(false)) {
    ASSERT_TRUE(buffers.contains(b.key())) << b.key() << " " << when;
    const torch::Tensor& expected = buffers[b.key()];
    ASSERT_EQ(b.value().defined(), expected.defined()) << b.key() << " " << when;
    if (!expected.defined()) continue;
    if (b.key() == "num_batches_tracked") {
      EXPECT_TRUE(torch::equal(b.value(), expected))
          << "num_batches_tracked " << when << ": " << b.value().template item<int64_t>()
          << " vs " << expected.item<int64_t>();
    } else {
      EXPECT_TRUE(tensors_close(b.value(), expected, kTol)) << b.key() << " " << when;
    }
  }
}

// One forward and backward of both modules on the same input and grad_output: output, the
// gradients of input, weight and bias (zeroed first, so they are this call's), the memory
// format of output and input gradient, then the state.
template <typename Mine, typename Theirs>
void expect_same_step(Mine& mine, Theirs& theirs, const torch::Tensor& x,
                      const std::string& when) {
  mine->zero_grad();
  theirs->zero_grad();
  auto x_mine = x.clone(torch::MemoryFormat::Preserve).requires_grad_();
  auto x_theirs = x.clone(torch::MemoryFormat::Preserve).requires_grad_();
  const auto y_mine = mine->forward(x_mine);
  const auto y_theirs = theirs->forward(x_theirs);
  ASSERT_TRUE(tensors_close(y_mine, y_theirs, kTol)) << "output " << when;
  EXPECT_EQ(y_mine.strides(), y_theirs.strides()) << "output strides " << when;
  const auto grad_output = torch::randn_like(y_theirs);
  y_mine.backward(grad_output);
  y_theirs.backward(grad_output);
  ASSERT_TRUE(x_theirs.grad().defined());
  EXPECT_TRUE(tensors_close(x_mine.grad(), x_theirs.grad(), kTol)) << "input grad " << when;
  EXPECT_EQ(x_mine.grad().strides(), x_theirs.grad().strides()) << "input grad strides " << when;
  const auto params = theirs->named_parameters(false);
  for (const auto& p : mine->named_parameters(false)) {
    if (!p.value().defined()) continue;
    ASSERT_TRUE(params[p.key()].grad().defined()) << p.key() << " " << when;
    EXPECT_TRUE(tensors_close(p.value().grad(), params[p.key()].grad(), kTol))
        << p.key() << " grad " << when;
  }
  expect_same_state(mine, theirs, when);
}

// Several training steps, then evaluation, comparing outputs, gradients and state each time.
template <typename Mine, typename Theirs>
void expect_module_parity(Mine mine, Theirs theirs, const std::vector<int64_t>& shape,
                          bool channels_last = false) {
  copy_state(mine, theirs);
  auto input = [&](double scale) {
    const auto x = channel_varied_input(shape, torch::kFloat) * scale;
    return channels_last ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x;
  };
  for (int step = 0; step < 3; ++step) {
    expect_same_step(mine, theirs, input(step + 1), "in training step " + std::to_string(step));
  }
  mine->eval();
  theirs->eval();
  expect_same_step(mine, theirs, input(1), "in evaluation");
}

struct ModuleCase {
  std::optional<double> momentum;
  bool affine;
  bool track_running_stats;
};

void PrintTo(const ModuleCase& c, std::ostream* os) {
  *os << "momentum=" << (c.momentum ? std::to_string(*c.momentum) : std::string("None"))
      << " affine=" << c.affine << " track_running_stats=" << c.track_running_stats;
}

std::string module_case_name(const ::testing::TestParamInfo<ModuleCase>& info) {
  const auto& c = info.param;
  std::string momentum = c.momentum ? std::to_string(static_cast<int>(*c.momentum * 100))
                                    : std::string("cumulative");
  return "momentum_" + momentum + (c.affine ? "_affine" : "_noaffine") +
         (c.track_running_stats ? "_tracking" : "_nontracking");
}

class ModuleParity : public ::testing::TestWithParam<ModuleCase> {
 protected:
  void SetUp() override { torch::manual_seed(0); }

  torch::nn::BatchNormOptions options(int64_t C) const {
    const auto& c = GetParam();
    return torch::nn::BatchNormOptions(C)
        .momentum(c.momentum)
        .affine(c.affine)
        .track_running_stats(c.track_running_stats)
        .eps(1e-3);
  }
};

TEST_P(ModuleParity, BatchNorm2dMatchesTorchNN) {
  expect_module_parity(custom_bn::nn::BatchNorm2d(options(5)),
                       torch::nn::BatchNorm2d(options(5)), {4, 5, 3, 6});
}

TEST_P(ModuleParity, BatchNorm2dChannelsLastMatchesTorchNN) {
  expect_module_parity(custom_bn::nn::BatchNorm2d(options(4)),
                       torch::nn::BatchNorm2d(options(4)), {3, 4, 5, 5}, /*channels_last=*/true);
}

TEST_P(ModuleParity, BatchNorm1dMatchesTorchNNOn2dInput) {
  expect_module_parity(custom_bn::nn::BatchNorm1d(options(6)),
                       torch::nn::BatchNorm1d(options(6)), {10, 6});
}

TEST_P(ModuleParity, BatchNorm1dMatchesTorchNNOn3dInput) {
  expect_module_parity(custom_bn::nn::BatchNorm1d(options(3)),
                       torch::nn::BatchNorm1d(options(3)), {4, 3, 7});
}

TEST_P(ModuleParity, BatchNorm3dMatchesTorchNN) {
  expect_module_parity(custom_bn::nn::BatchNorm3d(options(2)),
                       torch::nn::BatchNorm3d(options(2)), {2, 2, 3, 4, 3});
}

INSTANTIATE_TEST_SUITE_P(Modules, ModuleParity,
                         ::testing::Values(ModuleCase{0.1, true, true},
                                           ModuleCase{std::nullopt, true, true},
                                           ModuleCase{1.0, true, true},
                                           ModuleCase{0.1, false, true},
                                           ModuleCase{0.1, true, false},
                                           ModuleCase{std::nullopt, false, false}),
                         module_case_name);

TEST(Modules, ParametersAndBuffersHaveTorchNNNames) {
  custom_bn::nn::BatchNorm2d mine(7);
  torch::nn::BatchNorm2d theirs(7);
  auto keys = [](const auto& dict) {
    std::vector<std::string> out;
    for (const auto& item : dict) out.push_back(item.key());
    return out;
  };
  EXPECT_EQ(keys(mine->named_parameters()), keys(theirs->named_parameters()));
  EXPECT_EQ(keys(mine->named_buffers()), keys(theirs->named_buffers()));
  EXPECT_EQ(keys(mine->named_parameters()), (std::vector<std::string>{"weight", "bias"}));
  EXPECT_EQ(mine->num_batches_tracked.scalar_type(), torch::kLong);
  EXPECT_EQ(mine->num_batches_tracked.dim(), 0);
  EXPECT_TRUE(torch::equal(mine->weight, torch::ones({7})));
  EXPECT_TRUE(torch::equal(mine->running_var, torch::ones({7})));
}

TEST(Modules, CheckpointsExchangeWithTorchNN) {
  torch::manual_seed(3);
  torch::nn::BatchNorm2d theirs(4);
  theirs->forward(channel_varied_input({5, 4, 3, 3}, torch::kFloat));  // non-default buffers
  {
    torch::NoGradGuard no_grad;
    theirs->weight.uniform_(0.5, 1.5);
    theirs->bias.normal_();
  }
  torch::serialize::OutputArchive out;
  theirs->save(out);
  std::stringstream stream;
  out.save_to(stream);

  custom_bn::nn::BatchNorm2d mine(4);
  torch::serialize::InputArchive in;
  in.load_from(stream);
  mine->load(in);
  EXPECT_TRUE(torch::equal(mine->weight, theirs->weight));
  EXPECT_TRUE(torch::equal(mine->bias, theirs->bias));
  EXPECT_TRUE(torch::equal(mine->running_mean, theirs->running_mean));
  EXPECT_TRUE(torch::equal(mine->running_var, theirs->running_var));
  EXPECT_EQ(mine->num_batches_tracked.item<int64_t>(), 1);

  mine->eval();
  theirs->eval();
  const auto x = channel_varied_input({2, 4, 3, 3}, torch::kFloat);
  EXPECT_TRUE(tensors_close(mine->forward(x), theirs->forward(x), kTol));
}

TEST(Modules, CloneIsDeep) {
  custom_bn::nn::BatchNorm2d mine(torch::nn::BatchNormOptions(3).momentum(std::nullopt));
  mine->forward(channel_varied_input({4, 3, 2, 2}, torch::kFloat));
  auto copy = std::dynamic_pointer_cast<custom_bn::nn::BatchNorm2dImpl>(mine->clone());
  ASSERT_TRUE(copy);
  EXPECT_FALSE(copy->options.momentum().has_value());
  EXPECT_TRUE(torch::equal(copy->running_mean, mine->running_mean));
  EXPECT_NE(copy->running_mean.data_ptr(), mine->running_mean.data_ptr());
  EXPECT_EQ(copy->num_batches_tracked.item<int64_t>(), 1);
  copy->forward(channel_varied_input({4, 3, 2, 2}, torch::kFloat));
  EXPECT_EQ(mine->num_batches_tracked.item<int64_t>(), 1) << "the clone shares state";
}

TEST(Modules, ResetRunningStats) {
  custom_bn::nn::BatchNorm1d mine(3);
  mine->forward(channel_varied_input({8, 3}, torch::kFloat));
  mine->reset_running_stats();
  EXPECT_TRUE(torch::equal(mine->running_mean, torch::zeros({3})));
  EXPECT_TRUE(torch::equal(mine->running_var, torch::ones({3})));
  EXPECT_EQ(mine->num_batches_tracked.item<int64_t>(), 0);
}

TEST(Modules, PrettyPrint) {
  std::ostringstream os;
  os << custom_bn::nn::BatchNorm2d(torch::nn::BatchNormOptions(64).momentum(std::nullopt));
  EXPECT_EQ(os.str(),
            "custom_bn::nn::BatchNorm2d(64, eps=1e-05, momentum=None, affine=true, "
            "track_running_stats=true)");
}

// Clones of a module's parameters and buffers, to compare its state with after a call.
using StateSnapshot = std::map<std::string, torch::Tensor>;

StateSnapshot snapshot(const torch::nn::Module& m) {
  StateSnapshot state;
  for (const auto& p : m.named_parameters()) {
    if (p.value().defined()) state[p.key()] = p.value().detach().clone();
  }
  for (const auto& b : m.named_buffers()) {
    if (b.value().defined()) state[b.key()] = b.value().clone();
  }
  return state;
}

// Every parameter and buffer (running statistics, num_batches_tracked) bit for bit as before.
::testing::AssertionResult state_unchanged(const torch::nn::Module& m,
                                           const StateSnapshot& before) {
  const StateSnapshot now = snapshot(m);
  if (now.size() != before.size()) {
    return ::testing::AssertionFailure() << "the module has " << now.size() << " tensors, had "
                                         << before.size();
  }
  for (const auto& [name, value] : now) {
    if (!before.count(name) || !torch::equal(value, before.at(name))) {
      return ::testing::AssertionFailure() << name << " changed";
    }
  }
  return ::testing::AssertionSuccess();
}

// A rejected forward leaves every piece of module state as it was. torch::nn increments
// num_batches_tracked before the call that fails; custom_bn must not.
class ModuleRejects : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(4);
    bn = custom_bn::nn::BatchNorm2d(torch::nn::BatchNormOptions(3).momentum(std::nullopt));
    bn->forward(channel_varied_input({4, 3, 2, 2}, torch::kFloat));
    ASSERT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
    before = snapshot(*bn);
  }

  void expect_unchanged() { EXPECT_TRUE(state_unchanged(*bn, before)); }

  custom_bn::nn::BatchNorm2d bn{nullptr};
  StateSnapshot before;
};

TEST_F(ModuleRejects, WrongChannelCount) {
  EXPECT_TRUE(throws_c10_error_mentioning(
      [&] { bn->forward(torch::randn({4, 5, 2, 2})); }, {"weight", "[3]", "[5]"}));
  expect_unchanged();
}

TEST_F(ModuleRejects, SingleValuePerChannel) {
  EXPECT_TRUE(throws_c10_error_mentioning([&] { bn->forward(torch::randn({1, 3, 1, 1})); },
                                          {"more than 1 value per channel"}));
  expect_unchanged();
}

TEST_F(ModuleRejects, IntegerInput) {
  EXPECT_TRUE(throws_c10_error_mentioning(
      [&] { bn->forward(torch::randint(0, 5, {4, 3, 2, 2})); }, {"input", "floating-point"}));
  expect_unchanged();
}

TEST_F(ModuleRejects, WrongDimensionality) {
  EXPECT_TRUE(throws_c10_error_mentioning([&] { bn->forward(torch::randn({4, 3, 2})); },
                                          {"BatchNorm2d", "4-D", "3-D"}));
  expect_unchanged();
}

TEST(Modules, DimensionChecksPerModule) {
  custom_bn::nn::BatchNorm1d bn1(3);
  custom_bn::nn::BatchNorm3d bn3(3);
  const StateSnapshot bn1_before = snapshot(*bn1), bn3_before = snapshot(*bn3);
  EXPECT_TRUE(throws_c10_error_mentioning([&] { bn1->forward(torch::randn({2, 3, 4, 4})); },
                                          {"BatchNorm1d", "2-D", "3-D", "4-D"}));
  EXPECT_TRUE(throws_c10_error_mentioning([&] { bn1->forward(torch::randn({3})); },
                                          {"BatchNorm1d", "1-D"}));
  EXPECT_TRUE(throws_c10_error_mentioning([&] { bn3->forward(torch::randn({2, 3, 4, 4})); },
                                          {"BatchNorm3d", "5-D", "4-D"}));
  EXPECT_TRUE(state_unchanged(*bn1, bn1_before));
  EXPECT_TRUE(state_unchanged(*bn3, bn3_before));
}

}  // namespace
