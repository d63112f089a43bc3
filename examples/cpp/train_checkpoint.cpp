// A LibTorch program that trains with custom_bn::nn modules and exchanges its checkpoint with
// Python (checkpoint_exchange.py holds the Python half and the same model in torch.nn):
//
//   python checkpoint_exchange.py prepare DIR   writes DIR/initial.pt and DIR/data.pt
//   custom_bn_train_checkpoint DIR              loads them, trains, writes DIR/trained.pt
//   python checkpoint_exchange.py check DIR     loads DIR/trained.pt into the torch.nn model
//
// The module names (conv1, bn1, ...) are those of the Python model, so its state_dict loads
// here by name; the fused BatchNormAct layers hold the same parameters and buffers as the
// torch.nn BatchNorm + ReLU they replace.
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

// Must match checkpoint_exchange.py.
constexpr int kSteps = 12;
constexpr int64_t kBatch = 16;
constexpr double kLearningRate = 0.05, kMomentum = 0.9, kWeightDecay = 1e-4;

namespace nn = torch::nn;
using custom_bn::nn::BatchNormAct1d;
using custom_bn::nn::BatchNormAct2d;

struct NetImpl : nn::Module {
  NetImpl()
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(1, 8, 3).padding(1).bias(false)))),
        bn1(register_module("bn1", BatchNormAct2d(8))),  // activation "relu" by default
        conv2(register_module("conv2", nn::Conv2d(nn::Conv2dOptions(8, 16, 3).padding(1).bias(false)))),
        bn2(register_module("bn2", BatchNormAct2d(16))),
        fc1(register_module("fc1", nn::Linear(16 * 2 * 2, 32))),
        bn3(register_module("bn3", BatchNormAct1d(32))),
        fc2(register_module("fc2", nn::Linear(32, 4))) {}

  torch::Tensor forward(torch::Tensor x) {
    namespace F = torch::nn::functional;
    x = F::max_pool2d(bn1->forward(conv1->forward(x)), F::MaxPool2dFuncOptions(2));
    x = F::max_pool2d(bn2->forward(conv2->forward(x)), F::MaxPool2dFuncOptions(2));
    return fc2->forward(bn3->forward(fc1->forward(x.flatten(1))));
  }

  nn::Conv2d conv1;
  BatchNormAct2d bn1;
  nn::Conv2d conv2;
  BatchNormAct2d bn2;
  nn::Linear fc1;
  BatchNormAct1d bn3;
  nn::Linear fc2;
};
TORCH_MODULE(Net);

// A dict of tensors written in Python by torch.save({"x": ..., "y": ...}, path).
c10::Dict<c10::IValue, c10::IValue> load_tensor_dict(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toGenericDict();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR (with DIR/initial.pt and DIR/data.pt)\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  try {
    Net model;
    custom_bn::nn::load_state_dict(*model, dir + "/initial.pt");  // strict: every name matches
    const auto data = load_tensor_dict(dir + "/data.pt");
    const auto x = data.at("x").toTensor(), y = data.at("y").toTensor();

    torch::optim::SGD optimizer(
        model->parameters(),
        torch::optim::SGDOptions(kLearningRate).momentum(kMomentum).weight_decay(kWeightDecay));
    model->train();
    const int64_t batches = x.size(0) / kBatch;
    for (int step = 0; step < kSteps; ++step) {
      const int64_t first = (step % batches) * kBatch;
      const auto loss = torch::nn::functional::cross_entropy(
          model->forward(x.slice(0, first, first + kBatch)), y.slice(0, first, first + kBatch));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      std::printf("step %2d  loss %.6f\n", step, loss.item<double>());
    }
    custom_bn::nn::save_state_dict(*model, dir + "/trained.pt");
    std::printf("wrote %s/trained.pt (bn1.num_batches_tracked = %lld)\n", dir.c_str(),
                static_cast<long long>(model->bn1->num_batches_tracked.item<int64_t>()));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 1;
  }
  return 0;
}
