// A LibTorch program without Python runs models that use custom_bn layers, saved from Python
// (tests/deploy/make_artifacts.py): TorchScript files (script and trace) through
// torch::jit::load, and an AOTInductor package through AOTIModelPackageLoader. Linking
// libcustom_bn is what registers the custom_bn operators these programs call. Outputs are
// compared with the same model built from torch.nn BatchNorm layers in Python. It also loads
// that torch.nn model's state_dict (torch.save) into a C++ model made of custom_bn::nn modules,
// and writes the state after a training step for Python to read back (deploy_state_dict_to_python).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <custom_bn/custom_bn.h>

#include <iostream>
#include <string>

namespace {

int failures = 0;

void check(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  const bool ok = got.sizes() == want.sizes() && at::allclose(got, want, 1e-5, 1e-5);
  std::cout << (ok ? "ok   " : "FAIL ") << what;
  if (got.sizes() == want.sizes()) std::cout << " (max |diff| " << (got - want).abs().max().item<double>() << ")";
  std::cout << "\n";
  failures += ok ? 0 : 1;
}

at::Tensor buffer(const torch::jit::Module& m, const std::string& name) {
  for (const auto& b : m.named_buffers()) {
    if (b.name == name) return b.value;
  }
  throw std::runtime_error("no buffer " + name);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: custom_bn_deploy_models ARTIFACT_DIR\n";
    return 2;
  }
  const std::string dir = argv[1];
  const auto data = torch::jit::load(dir + "/data.pt");
  const auto input = buffer(data, "input");
  {
    torch::NoGradGuard no_grad;
    for (const char* file : {"scripted.pt", "traced.pt"}) {
      auto model = torch::jit::load(dir + "/" + file);
      model.eval();
      check(std::string(file) + " eval", model.forward({input}).toTensor(),
            buffer(data, "expected_eval"));
    }
    // The scripted model also trains: batch statistics, running statistics updated (momentum
    // 0.1 in layer 1, the cumulative average in layer 4).
    auto scripted = torch::jit::load(dir + "/scripted.pt");
    scripted.train();
    check("scripted.pt train", scripted.forward({input}).toTensor(),
          buffer(data, "expected_train"));
    check("scripted.pt running_mean", buffer(scripted, "1.running_mean"),
          buffer(data, "expected_running_mean"));
    check("scripted.pt running_var (cumulative)", buffer(scripted, "4.running_var"),
          buffer(data, "expected_running_var"));

    // The torch.nn model's state_dict (torch.save in Python) in a C++ model built from
    // custom_bn::nn modules with the same structure, and its state back to Python.
    torch::nn::Sequential model(
        torch::nn::Conv2d(3, 8, 3), custom_bn::nn::BatchNorm2d(8), torch::nn::ReLU(),
        torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 8, 1)),
        custom_bn::nn::BatchNorm2d(custom_bn::nn::BatchNorm2dOptions(8).momentum(std::nullopt)),
        torch::nn::Flatten(), torch::nn::Linear(8 * 6 * 6, 10), custom_bn::nn::BatchNorm1d(10));
    custom_bn::nn::load_state_dict(*model, dir + "/torch_state_dict.pt");
    model->eval();
    check("torch.save state_dict -> custom_bn::nn model, eval", model->forward(input),
          buffer(data, "expected_eval"));
    model->train();
    check("torch.save state_dict -> custom_bn::nn model, train", model->forward(input),
          buffer(data, "expected_train"));
    custom_bn::nn::save_state_dict(*model, dir + "/cpp_state_dict.pt");

    torch::inductor::AOTIModelPackageLoader package(dir + "/model.pt2");
    const auto outputs = package.run({input});
    check("model.pt2 (AOTInductor) eval", outputs.at(0), buffer(data, "expected_eval"));
  }
  std::cout << (failures == 0 ? "all deployed models match torch.nn\n" : "MISMATCH\n");
  return failures == 0 ? 0 : 1;
}
