"""Writes what the C++ deployment test (tests/cpp/deploy_models.cpp, ctest deploy_*) loads: a
model with custom_bn BatchNorm layers saved as TorchScript (script and trace) and as an
AOTInductor package, the torch.nn twin's state_dict saved with torch.save (which the C++ program
loads into a model built from custom_bn::nn modules), plus the input and the outputs of the
torch.nn model (same weights and statistics) in a TorchScript data file. With --check-cpp it
instead reads back the state_dict that the C++ program wrote after its training step.

Usage: python make_artifacts.py OUTPUT_DIR               (custom_bn importable: PYTHONPATH=python)
       python make_artifacts.py --check-cpp OUTPUT_DIR
"""

import os
import sys

import torch
import torch.jit._pickle  # restore_type_tag, for reading LibTorch's pickles (check_cpp)
from torch import nn

import custom_bn


def build(ours: bool) -> nn.Module:
    bn2d = custom_bn.BatchNorm2d if ours else nn.BatchNorm2d
    bn1d = custom_bn.BatchNorm1d if ours else nn.BatchNorm1d
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), bn2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), bn2d(8, momentum=None),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10), bn1d(10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


class Data(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    ours, theirs = build(True).eval(), build(False).eval()
    x = torch.randn(4, 3, 8, 8)

    # A plain dict: LibTorch's unpickler does not take the OrderedDict (with its _metadata) that
    # state_dict() returns.
    torch.save(dict(theirs.state_dict()), os.path.join(out_dir, "torch_state_dict.pt"))
    torch.jit.save(torch.jit.script(ours), os.path.join(out_dir, "scripted.pt"))
    torch.jit.save(torch.jit.trace(ours, x), os.path.join(out_dir, "traced.pt"))
    exported = torch.export.export(ours, (x,))
    torch._inductor.aoti_compile_and_package(
        exported, package_path=os.path.join(out_dir, "model.pt2")
    )

    with torch.no_grad():
        expected_eval = theirs(x)
        theirs.train()
        expected_train = theirs(x)  # one training step: batch statistics, buffers updated
    data = Data({
        "input": x,
        "expected_eval": expected_eval,
        "expected_train": expected_train,
        "expected_running_mean": theirs[1].running_mean.clone(),
        "expected_running_var": theirs[4].running_var.clone(),
    })
    torch.jit.save(torch.jit.script(data), os.path.join(out_dir, "data.pt"))
    print(f"deployment artifacts written to {out_dir}")


def check_cpp(out_dir: str) -> None:
    """The C++ program's state after one training step (custom_bn::nn::save_state_dict) loads into
    the torch.nn model and equals that model's own state after the same step."""
    theirs = build(False)
    x = torch.jit.load(os.path.join(out_dir, "data.pt")).input
    with torch.no_grad():
        theirs(x)
    # LibTorch's pickler tags the dict's type with a function that weights-only loading must be
    # told about (README, "C++ (LibTorch)").
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        saved = torch.load(os.path.join(out_dir, "cpp_state_dict.pt"))
    reloaded = build(False)
    reloaded.load_state_dict(saved)  # strict: the same names
    for name, want in theirs.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], want, rtol=1e-5, atol=1e-5)
    print("the C++ program's state_dict loads into torch.nn and matches its training step")


if __name__ == "__main__":
    if sys.argv[1] == "--check-cpp":
        check_cpp(sys.argv[2])
    else:
        main(sys.argv[1])
