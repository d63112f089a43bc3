"""Convert an existing torch.nn model to custom_bn with one call, and back.

The model below stands for one you already have (a torchvision ResNet converts the same way):
``custom_bn.convert_model`` swaps every torch.nn BatchNorm for the custom_bn twin in place, keeping
the parameter objects (so an optimizer built before the conversion keeps working), buffers,
device, dtype and train/eval mode; ``fuse_activation=True`` also folds the ReLU after each
BatchNorm into one fused BatchNormAct layer. The script checks that the converted model computes
what the original does, in training (outputs, gradients, running statistics) and in evaluation,
and that ``to="torch"`` gives back a model whose state_dict loads into the original.

Usage: PYTHONPATH=python .venv/bin/python examples/convert_model.py
"""

import copy
import sys

import torch
from torch import nn

import custom_bn


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU: a ResNet basic block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def main() -> int:
    torch.manual_seed(0)
    original = SmallResNet()
    model = copy.deepcopy(original)  # your model; the copy stays as the reference here
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                  for m in (original, model)]  # built before the conversion
    # In a Sequential the ReLU after a BatchNorm is folded in place; elsewhere (the blocks'
    # shared self.relu) torch.fx rewrites the forward, and the result is a GraphModule.
    model = custom_bn.convert_model(model, fuse_activation=True)
    fused = sum(isinstance(m, custom_bn.BatchNormAct2d) for m in model.modules())
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            print(f"{name:<16} {m}")
    print(f"{type(model).__name__}: {fused} BatchNorm + ReLU pairs fused")

    x, target = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    diffs = {"train loss": 0.0}
    for _ in range(3):  # training mode: batch statistics, running stats updated
        losses = []
        for m, optimizer in zip((original, model), optimizers):
            optimizer.zero_grad()
            losses.append(nn.functional.cross_entropy(m(x), target))
            losses[-1].backward()
            optimizer.step()
        diffs["train loss"] = max(diffs["train loss"], abs(losses[0].item() - losses[1].item()))
    diffs["parameters, buffers"] = largest_difference(original.state_dict(), model.state_dict())
    original.eval()
    model.eval()
    diffs["eval output"] = (model(x) - original(x)).abs().max().item()

    # The converted model's checkpoints load into the torch.nn original (same keys) ...
    original.load_state_dict(model.state_dict())
    diffs["state_dict into torch.nn"] = (model(x) - original(x)).abs().max().item()
    # ... and to="torch" turns a converted model back into torch.nn layers.
    back = custom_bn.convert_model(custom_bn.convert_model(copy.deepcopy(original)), to="torch")
    if any(isinstance(m, custom_bn.BatchNorm2d) for m in back.modules()):
        print("MISMATCH: custom_bn layers left after to='torch'")
        return 1
    diffs["to='torch' output"] = (back(x) - original(x)).abs().max().item()

    for what, diff in diffs.items():
        print(f"{what:<25} largest |custom_bn - torch.nn| = {diff:.2e}")
    ok = all(diff <= 1e-5 for diff in diffs.values())
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
