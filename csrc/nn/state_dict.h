#pragma once
// Checkpoint exchange with Python for LibTorch programs (installed as
// <custom_bn/nn/state_dict.h>): a state_dict written in Python with
//     torch.save(dict(model.state_dict()), path)
// (a plain dict: LibTorch's unpickler rejects the OrderedDict with metadata that state_dict()
// returns)
// loads into a C++ module of the same structure (torch::nn modules, custom_bn::nn modules or a
// mix: the names are what count, e.g. "1.running_mean" in a torch::nn::Sequential), and a C++
// module's state is written in the format Python reads back with torch.load(path) and
// model.load_state_dict(...). Between C++ modules, torch::save / torch::load already work:
// custom_bn::nn::BatchNorm* and BatchNormAct* have torch::nn::BatchNorm*'s names.
#include <torch/nn/module.h>

#include <string>

namespace custom_bn::nn {

// Copies the tensors of the dict saved at `path` into the parameters and buffers of `module`
// with the same (dotted) names, without recording autograd history. The shapes must match;
// with `strict`, the names too, both ways (c10::Error naming the missing and unexpected keys).
void load_state_dict(torch::nn::Module& module, const std::string& path, bool strict = true);

// Writes every parameter and buffer of `module` under its dotted name, for torch.load (with
// torch.jit._pickle.restore_type_tag allowed: LibTorch's pickler tags the dict's type).
void save_state_dict(const torch::nn::Module& module, const std::string& path);

}  // namespace custom_bn::nn
