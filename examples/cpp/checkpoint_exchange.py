"""The Python half of the checkpoint exchange with the LibTorch program train_checkpoint.cpp.

    python checkpoint_exchange.py prepare DIR   # DIR/initial.pt (torch.nn Net's state_dict) and
                                                # DIR/data.pt (training data), for the C++ program
    custom_bn_train_checkpoint DIR              # loads both, trains with custom_bn::nn modules,
                                                # writes DIR/trained.pt
    python checkpoint_exchange.py check DIR     # loads DIR/trained.pt into the torch.nn Net and
                                                # compares it with the same training done here

Only torch is needed here: the C++ program's checkpoint is an ordinary state_dict of the torch.nn
model below (custom_bn's modules have torch.nn's parameter and buffer names).
"""

import os
import sys

import torch
import torch.jit._pickle  # restore_type_tag: LibTorch's pickler tags the dict's type
import torch.nn.functional as F
from torch import nn

# Must match train_checkpoint.cpp.
STEPS, BATCH, LR, MOMENTUM, WEIGHT_DECAY = 12, 16, 0.05, 0.9, 1e-4
TOLERANCE = 1e-4  # largest difference relative to max(1, |value|), float32


class Net(nn.Module):
    """(N, 1, 8, 8) -> (N, 4): two conv-BN-ReLU-pool blocks, then linear-BN-ReLU-linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.bn3 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.bn3(self.fc1(x.flatten(1)))))


def train(model: nn.Module, data: dict) -> list:
    """What the C++ program does: STEPS SGD steps over the batches in order, returns the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    model.train()
    losses = []
    batches = data["x"].shape[0] // BATCH
    for step in range(STEPS):
        rows = slice((step % batches) * BATCH, (step % batches + 1) * BATCH)
        loss = F.cross_entropy(model(data["x"][rows]), data["y"][rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def prepare(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # non-trivial statistics, so a wrong mapping of names shows
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
    # A plain dict: LibTorch's unpickler rejects the OrderedDict that state_dict() returns.
    torch.save(dict(model.state_dict()), os.path.join(folder, "initial.pt"))
    x = torch.randn(4 * BATCH, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()
    torch.save({"x": x, "y": y}, os.path.join(folder, "data.pt"))
    print(f"wrote {folder}/initial.pt and {folder}/data.pt")


def check(folder: str) -> int:
    data = torch.load(os.path.join(folder, "data.pt"))
    reference = Net()
    reference.load_state_dict(torch.load(os.path.join(folder, "initial.pt")))
    losses = train(reference, data)

    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        trained = torch.load(os.path.join(folder, "trained.pt"))
    from_cpp = Net()
    from_cpp.load_state_dict(trained)  # strict: every name of the torch.nn model is there
    worst, worst_name = 0.0, ""
    for name, value in reference.state_dict().items():
        diff = ((from_cpp.state_dict()[name].double() - value.double()).abs().max()
                / max(1.0, value.double().abs().max())).item()
        if diff >= worst:
            worst, worst_name = diff, name
    reference.eval()
    from_cpp.eval()
    with torch.no_grad():
        eval_diff = (from_cpp(data["x"]) - reference(data["x"])).abs().max().item()
    print(f"torch.nn in Python, {STEPS} SGD steps from initial.pt: loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}")
    print(f"checkpoint of the C++ program vs that training: largest relative difference "
          f"{worst:.2e} ({worst_name}); eval outputs differ by {eval_diff:.2e}")
    ok = worst <= TOLERANCE and eval_diff <= TOLERANCE
    print("OK" if ok else f"MISMATCH (tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "check"):
        sys.exit(__doc__)
    sys.exit(prepare(sys.argv[2]) if sys.argv[1] == "prepare" else check(sys.argv[2]))
