// State-dict exchange with Python through torch's pickle format (torch::pickle_load reads what
// torch.save writes, and torch.load reads what torch::pickle_save writes).
#include "nn/state_dict.h"

#include <torch/serialize.h>

#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <vector>

namespace custom_bn::nn {
namespace {

// Parameters and buffers of module by dotted name (what Python's state_dict() lists).
std::vector<std::pair<std::string, at::Tensor>> named_state(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> state;
  for (const auto& p : module.named_parameters()) state.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers()) state.emplace_back(b.key(), b.value());
  return state;
}

std::string join(const std::set<std::string>& names) {
  std::ostringstream os;
  for (const auto& n : names) os << (os.tellp() > 0 ? ", " : "") << '"' << n << '"';
  return os.str();
}

}  // namespace

void load_state_dict(torch::nn::Module& module, const std::string& path, bool strict) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "custom_bn::nn::load_state_dict: cannot open '", path, "'");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  const auto loaded = torch::pickle_load(bytes);
  TORCH_CHECK(loaded.isGenericDict(), "custom_bn::nn::load_state_dict: '", path,
              "' must hold a dict of tensors (torch.save(dict(model.state_dict()), path)), got ",
              loaded.tagKind());
  std::map<std::string, at::Tensor> saved;
  for (const auto& item : loaded.toGenericDict()) {
    saved[item.key().toStringRef()] = item.value().toTensor();
  }
  std::set<std::string> missing, unexpected;
  for (const auto& item : saved) unexpected.insert(item.first);
  torch::NoGradGuard no_grad;
  for (auto& [name, tensor] : named_state(module)) {
    const auto it = saved.find(name);
    if (it == saved.end()) {
      missing.insert(name);
      continue;
    }
    unexpected.erase(name);
    TORCH_CHECK(it->second.sizes() == tensor.sizes(), "custom_bn::nn::load_state_dict: '", name,
                "' has shape ", tensor.sizes(), " in the module, got ", it->second.sizes(),
                " in '", path, "'");
    tensor.copy_(it->second);
  }
  TORCH_CHECK(!strict || (missing.empty() && unexpected.empty()),
              "custom_bn::nn::load_state_dict: the names of '", path,
              "' differ from the module's: missing ", missing.empty() ? "none" : join(missing),
              "; unexpected ", unexpected.empty() ? "none" : join(unexpected));
}

void save_state_dict(const torch::nn::Module& module, const std::string& path) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [name, tensor] : named_state(module)) dict.insert(name, tensor.detach());
  const std::vector<char> bytes = torch::pickle_save(dict);
  std::ofstream file(path, std::ios::binary);
  TORCH_CHECK(file, "custom_bn::nn::save_state_dict: cannot write '", path, "'");
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace custom_bn::nn
