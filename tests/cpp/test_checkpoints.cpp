// Checkpoints between torch::nn and custom_bn::nn modules in C++ (torch::save / torch::load, both
// ways, BatchNorm and BatchNormAct), and custom_bn::nn::save_state_dict / load_state_dict, the
// Python-format exchange (the Python side of it is the deploy_* ctest entries).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <cstdio>
#include <sstream>

namespace {

template <typename Module>
void randomize(const Module& m) {
  torch::NoGradGuard no_grad;
  m->weight.uniform_(0.5, 1.5);
  m->bias.normal_();
  m->running_mean.normal_();
  m->running_var.uniform_(0.5, 2.0);
  m->num_batches_tracked.fill_(7);
}

template <typename A, typename B>
void expect_same_state(const A& a, const B& b) {
  const auto pa = a->named_parameters(), pb = b->named_parameters();
  const auto ba = a->named_buffers(), bb = b->named_buffers();
  ASSERT_EQ(pa.keys(), pb.keys());
  ASSERT_EQ(ba.keys(), bb.keys());
  for (const auto& k : pa.keys()) EXPECT_TRUE(torch::equal(pa[k], pb[k])) << k;
  for (const auto& k : ba.keys()) EXPECT_TRUE(torch::equal(ba[k], bb[k])) << k;
}

TEST(Checkpoints, TorchBatchNormAndCustomBnBatchNormLoadEachOther) {
  torch::manual_seed(0);
  torch::nn::BatchNorm2d theirs(torch::nn::BatchNormOptions(5).momentum(0.3));
  randomize(theirs);
  std::stringstream to_ours;
  torch::save(theirs, to_ours);
  custom_bn::nn::BatchNorm2d ours(custom_bn::nn::BatchNorm2dOptions(5).momentum(0.3));
  torch::load(ours, to_ours);
  expect_same_state(ours, theirs);

  // back: train ours a step, save, load into a fresh torch::nn module
  ours(torch::randn({4, 5, 3, 3}));
  std::stringstream to_theirs;
  torch::save(ours, to_theirs);
  torch::nn::BatchNorm2d back(torch::nn::BatchNormOptions(5).momentum(0.3));
  torch::load(back, to_theirs);
  expect_same_state(back, ours);
  ours->eval();
  back->eval();
  const auto x = torch::randn({2, 5, 3, 3});
  EXPECT_TRUE(torch::allclose(ours(x), back(x), 1e-6, 1e-6));
}

TEST(Checkpoints, BatchNormActLoadsTorchBatchNormAndBack) {
  torch::manual_seed(1);
  torch::nn::BatchNorm1d theirs(torch::nn::BatchNormOptions(6));
  randomize(theirs);
  std::stringstream stream;
  torch::save(theirs, stream);
  custom_bn::nn::BatchNormAct1d ours(custom_bn::nn::BatchNormActOptions(6).activation("elu"));
  torch::load(ours, stream);
  expect_same_state(ours, theirs);
  std::stringstream back_stream;
  torch::save(ours, back_stream);
  torch::nn::BatchNorm1d back(torch::nn::BatchNormOptions(6));
  torch::load(back, back_stream);
  expect_same_state(back, theirs);
  ours->eval();
  theirs->eval();
  const auto x = torch::randn({3, 6});
  EXPECT_TRUE(torch::allclose(ours(x), torch::elu(theirs(x)), 1e-6, 1e-6));
}

TEST(Checkpoints, StateDictFilesRoundTripAndReportNameMismatches) {
  torch::manual_seed(2);
  torch::nn::Sequential theirs(torch::nn::Conv2d(3, 4, 3), torch::nn::BatchNorm2d(4));
  randomize(theirs[1]->as<torch::nn::BatchNorm2dImpl>());
  const std::string path = ::testing::TempDir() + "custom_bn_state_dict.pt";
  custom_bn::nn::save_state_dict(*theirs, path);
  torch::nn::Sequential ours(torch::nn::Conv2d(3, 4, 3), custom_bn::nn::BatchNorm2d(4));
  custom_bn::nn::load_state_dict(*ours, path);
  expect_same_state(ours, theirs);

  torch::nn::Sequential other(torch::nn::Conv2d(3, 4, 3), torch::nn::ReLU(), custom_bn::nn::BatchNorm2d(4));
  try {
    custom_bn::nn::load_state_dict(*other, path);
    FAIL() << "expected a name mismatch";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing \"2.bias\""), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("unexpected \"1.bias\""), std::string::npos) << e.what();
  }
  custom_bn::nn::load_state_dict(*other, path, /*strict=*/false);  // the conv matches
  EXPECT_TRUE(torch::equal(other[0]->as<torch::nn::Conv2d>()->weight,
                           theirs[0]->as<torch::nn::Conv2d>()->weight));
  std::remove(path.c_str());
}

}  // namespace
