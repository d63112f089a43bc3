"""Writes what the C++ deployment test (tests/cpp/deploy_models.cpp, ctest deploy_*) loads: a
model with custom_bn BatchNorm layers saved as TorchScript (script and trace) and as an
AOTInductor package, plus its input and the outputs of the same model built with torch.nn
BatchNorm layers (same weights and statistics), in a TorchScript data file.

Usage: python make_artifacts.py OUTPUT_DIR   (custom_bn importable: PYTHONPATH=python)
"""

import os
import sys

import torch
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


if __name__ == "__main__":
    main(sys.argv[1])
