// conv -> custom_bn::nn::BatchNorm2d -> ReLU -> pool -> linear, trained for a few SGD steps on
// random data next to the same model built with torch::nn::BatchNorm2d from the same weights.
// Exits with 0 when losses, gradients, running statistics and evaluation outputs agree.
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <cstdio>
#include <string>

namespace {

constexpr int64_t kChannels = 8;
constexpr int64_t kClasses = 4;
constexpr double kTolerance = 1e-4;  // relative, float32

template <typename BatchNorm>
torch::nn::Sequential make_model() {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(3, kChannels, 3).padding(1).bias(false)),
                        BatchNorm(kChannels), nn::ReLU(), nn::AdaptiveAvgPool2d(1),
                        nn::Flatten(), nn::Linear(kChannels, kClasses));
}

// Same parameter and buffer names in both models (BatchNorm included), so a name-wise copy
// gives them identical weights.
void copy_weights(const torch::nn::Sequential& from, torch::nn::Sequential& to) {
  torch::NoGradGuard no_grad;
  auto params = to->named_parameters();
  for (const auto& p : from->named_parameters()) params[p.key()].copy_(p.value());
  auto buffers = to->named_buffers();
  for (const auto& b : from->named_buffers()) {
    if (b.value().defined()) buffers[b.key()].copy_(b.value());
  }
}

double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = std::max(1.0, b.abs().max().item<double>());
  return (a - b).abs().max().item<double>() / scale;
}

bool check(const char* what, const torch::Tensor& mine, const torch::Tensor& reference,
           double& worst) {
  const double diff = relative_difference(mine, reference);
  worst = std::max(worst, diff);
  if (diff <= kTolerance && std::isfinite(diff)) return true;
  std::fprintf(stderr, "MISMATCH %s: relative difference %.3g > %.1g\n", what, diff, kTolerance);
  return false;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  auto model = make_model<custom_bn::nn::BatchNorm2d>();
  auto reference = make_model<torch::nn::BatchNorm2d>();
  copy_weights(model, reference);
  std::printf("%s\n", c10::str(*model).c_str());

  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD opt_ref(reference->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  // Sequential::ptr<T>() cannot name BatchNorm impls (their forward is inherited), so cast.
  auto bn = std::dynamic_pointer_cast<custom_bn::nn::BatchNorm2dImpl>(model->ptr(1));
  auto bn_ref = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(reference->ptr(1));
  if (!bn || !bn_ref) {
    std::fprintf(stderr, "layer 1 is not the expected BatchNorm2d\n");
    return 1;
  }

  bool ok = true;
  double worst = 0.0;
  for (int step = 0; step < 5; ++step) {
    const auto x = torch::randn({16, 3, 8, 8}) * 2.0 + 0.5;
    const auto target = torch::randint(0, kClasses, {16});
    opt.zero_grad();
    opt_ref.zero_grad();
    const auto loss = torch::nn::functional::cross_entropy(model->forward(x), target);
    const auto loss_ref = torch::nn::functional::cross_entropy(reference->forward(x), target);
    loss.backward();
    loss_ref.backward();
    std::printf("step %d  loss custom_bn %.6f  torch.nn %.6f\n", step, loss.item<double>(),
                loss_ref.item<double>());
    ok &= check("loss", loss, loss_ref, worst);
    ok &= check("BatchNorm weight grad", bn->weight.grad(), bn_ref->weight.grad(), worst);
    ok &= check("BatchNorm bias grad", bn->bias.grad(), bn_ref->bias.grad(), worst);
    ok &= check("conv weight grad", model->named_parameters()["0.weight"].grad(),
                reference->named_parameters()["0.weight"].grad(), worst);
    opt.step();
    opt_ref.step();
  }
  ok &= check("running_mean", bn->running_mean, bn_ref->running_mean, worst);
  ok &= check("running_var", bn->running_var, bn_ref->running_var, worst);
  if (bn->num_batches_tracked.item<int64_t>() != bn_ref->num_batches_tracked.item<int64_t>()) {
    std::fprintf(stderr, "MISMATCH num_batches_tracked\n");
    ok = false;
  }

  model->eval();
  reference->eval();
  const auto x = torch::randn({4, 3, 8, 8});
  ok &= check("eval output", model->forward(x), reference->forward(x), worst);

  std::printf("largest relative difference %.3g: %s\n", worst, ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
