"""The textbook BatchNorm experiment on scikit-learn's digits, with torch.nn and custom_bn.

This is the main job of the repository (``make demo``). One small CNN, as tutorials teach it:

    conv 3x3 -> max-pool 2 -> ReLU -> BatchNorm2d -> dropout     (8x8 -> 4x4, 16 channels)
    conv 3x3 -> max-pool 2 -> ReLU -> BatchNorm2d -> dropout     (4x4 -> 2x2, 32 channels)
    flatten -> linear 128->64 -> ReLU -> linear 64->10

is trained six times, in three pairs; within a pair a torch.nn run and a custom_bn run:

* ``ReLU->BN``: the textbook order, torch.nn.BatchNorm2d against custom_bn.BatchNorm2d (the
  model converted with ``custom_bn.convert_model``);
* ``BN->ReLU``: BatchNorm2d then ReLU against custom_bn's fused BatchNormAct2d(relu)
  (``convert_model(..., fuse_activation=True)``);
* ``BN->LeakyReLU``: BatchNorm2d then LeakyReLU(0.01) against custom_bn.InPlaceBatchNormAct2d,
  which writes its output over its input and keeps only that for backward (ReLU cannot be
  inverted, so the in-place layer uses its default leaky_relu).

Every run starts from the same weights (one state_dict, loaded into all six), sees the same
mini-batches and the same dropout masks, and uses SGD with momentum and weight decay. Training
stops early when the validation loss has not improved for ``--patience`` epochs; the best state
is then restored and evaluated on a held-out test split. The script writes a PNG (loss curves,
time per epoch, histograms of the second BatchNorm's input and output) and prints a summary
table: best validation loss, test accuracy, epochs, time per epoch, and two memory figures of
one training step (the bytes autograd saves for backward, and the peak of the memory allocated
by the step).

It is also a check, exiting with status 1 when a run ends below ``--min-accuracy`` on the test
split or when, within a pair, the two runs' losses differ by more than ``--lockstep-tol`` at a
step of the first epoch. Later steps are not compared: two correct float32 kernels round
differently (reduction order), and training amplifies that (a value within round-off of a ReLU
kink or a max-pool tie takes the other branch, momentum carries the difference on), so the
curves drift apart slowly even when both kernels are right; a wrong statistic or gradient
separates them in the first steps.

Usage (from the repository root, after ``make build-python``)::

    PYTHONPATH=python .venv/bin/python examples/train_digits.py [--max-epochs 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import custom_bn

# A block's normalization and activation, in their order: ("relu", "bn") is the textbook's.
Layers = Callable[[int], "OrderedDict[str, nn.Module]"]


@dataclass
class Data:
    """Digits images (N, 1, 8, 8) float32, standardized with the training split's statistics,
    and labels (N,) int64, for the train / validation / test splits."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]


@dataclass
class Run:
    """One network under training plus everything recorded about it."""

    name: str
    order: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_losses: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stopped: bool = False
    test_accuracy: float = 0.0
    saved_bytes: int = 0
    peak_bytes: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-epochs", type=int, default=60, help="at most this many epochs")
    parser.add_argument("--patience", type=int, default=8,
                        help="stop after this many epochs without a better validation loss")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--dropout", type=float, default=0.25, help="dropout after each block")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights, batches")
    parser.add_argument("--out", default="build/demo", help="folder for the PNG")
    parser.add_argument("--min-accuracy", type=float, default=0.95,
                        help="fail when a run's test accuracy is below this")
    parser.add_argument("--lockstep-tol", type=float, default=1e-3,
                        help="fail when a pair's losses differ by more than this in epoch 1")
    args = parser.parse_args(argv)
    if args.max_epochs < 1 or args.patience < 1 or args.batch_size < 2:
        parser.error("--max-epochs and --patience must be >= 1, --batch-size >= 2 "
                     "(BatchNorm needs 2+ samples)")
    return args


def load_data(seed: int, device: torch.device) -> Data:
    """Stratified 60 / 20 / 20 split of the 1,797 digits (shipped with scikit-learn)."""
    digits = load_digits()
    x_train, x_rest, y_train, y_rest = train_test_split(
        digits.images, digits.target, test_size=0.4, random_state=seed, stratify=digits.target)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    mean, std = float(x_train.mean()), float(x_train.std())
    xs = {"train": x_train, "val": x_val, "test": x_test}
    ys = {"train": y_train, "val": y_val, "test": y_test}
    return Data(
        {k: ((torch.as_tensor(v, dtype=torch.float32) - mean) / std).unsqueeze(1).to(device)
         for k, v in xs.items()},
        {k: torch.as_tensor(v, dtype=torch.int64).to(device) for k, v in ys.items()},
    )


def relu_bn(c: int) -> OrderedDict[str, nn.Module]:
    return OrderedDict(act=nn.ReLU(), bn=nn.BatchNorm2d(c))


def bn_relu(c: int) -> OrderedDict[str, nn.Module]:
    return OrderedDict(bn=nn.BatchNorm2d(c), act=nn.ReLU())


def bn_leaky(c: int) -> OrderedDict[str, nn.Module]:
    return OrderedDict(bn=nn.BatchNorm2d(c), act=nn.LeakyReLU(0.01))


def inplace_bn_leaky(c: int) -> OrderedDict[str, nn.Module]:
    # Identity keeps the slot, so the state_dict keys are the torch.nn model's.
    return OrderedDict(bn=custom_bn.InPlaceBatchNormAct2d(c, "leaky_relu", 0.01),
                       act=nn.Identity())


def build_model(layers: Layers, dropout: float) -> nn.Sequential:
    """(N, 1, 8, 8) images -> (N, 10) logits; the same parameter names whatever ``layers``."""
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, padding=1), pool=nn.MaxPool2d(2),
            **layers(c_out), drop=nn.Dropout(dropout)))

    return nn.Sequential(OrderedDict(
        block1=block(1, 16), block2=block(16, 32), flatten=nn.Flatten(),
        fc1=nn.Linear(32 * 2 * 2, 64), relu=nn.ReLU(), fc2=nn.Linear(64, 10)))


def build_runs(args: argparse.Namespace, device: torch.device) -> list[Run]:
    """The six runs, every one loaded with the same initial state_dict."""
    torch.manual_seed(args.seed)
    initial = build_model(relu_bn, args.dropout).state_dict()

    def fresh(layers: Layers) -> nn.Sequential:
        model = build_model(layers, args.dropout)
        model.load_state_dict(initial)
        return model

    models = [
        ("torch.nn", "ReLU->BN", fresh(relu_bn)),
        ("custom_bn", "ReLU->BN", custom_bn.convert_model(fresh(relu_bn))),
        ("torch.nn", "BN->ReLU", fresh(bn_relu)),
        ("custom_bn fused", "BN->ReLU",
         custom_bn.convert_model(fresh(bn_relu), fuse_activation=True)),
        ("torch.nn", "BN->LeakyReLU", fresh(bn_leaky)),
        ("custom_bn in-place", "BN->LeakyReLU", fresh(inplace_bn_leaky)),
    ]
    runs = []
    for name, order, model in models:
        model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        runs.append(Run(name, order, model, optimizer))
    expected = (nn.BatchNorm2d, custom_bn.BatchNorm2d, nn.BatchNorm2d, custom_bn.BatchNormAct2d,
                nn.BatchNorm2d, custom_bn.InPlaceBatchNormAct2d)
    for run, cls in zip(runs, expected):
        if type(run.model.block2.bn) is not cls:
            raise RuntimeError(f"{run.name} {run.order}: block2.bn is "
                               f"{type(run.model.block2.bn).__name__}, not {cls.__name__}")
    return runs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(run: Run, data: Data, order: torch.Tensor, batch_size: int, dropout_seed: int,
                device: torch.device) -> None:
    """One pass over the training split in ``order``; the dropout masks come from
    ``dropout_seed``, so every run of the epoch draws the same ones."""
    run.model.train()
    torch.manual_seed(dropout_seed)
    total = 0.0
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, order.numel(), batch_size):
        index = order[first:first + batch_size]
        loss = F.cross_entropy(run.model(data.x["train"][index]), data.y["train"][index])
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.step_losses.append(loss.item())
        total += run.step_losses[-1] * index.numel()
    synchronize(device)
    run.epoch_seconds.append(time.perf_counter() - start)
    run.train_losses.append(total / order.numel())


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, split: str) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode, i.e. with the running statistics."""
    model.eval()
    logits = model(data.x[split])
    loss = F.cross_entropy(logits, data.y[split]).item()
    return loss, (logits.argmax(dim=1) == data.y[split]).float().mean().item()


def end_epoch(run: Run, data: Data, epoch: int, patience: int) -> None:
    """Validation loss, best state so far, and the early-stopping decision."""
    val_loss, _ = evaluate(run.model, data, "val")
    run.val_losses.append(val_loss)
    if val_loss < run.best_val_loss:
        run.best_val_loss, run.best_epoch = val_loss, epoch
        run.best_state = copy.deepcopy(run.model.state_dict())
    elif epoch - run.best_epoch >= patience:
        run.stopped = True


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2 (C++ libraries write there directly, not through sys.stderr)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def step_memory(run: Run, data: Data, batch_size: int, device: torch.device) -> None:
    """Memory of one training step on a copy of the model: the bytes of the distinct activation
    tensors (parameters aside) that autograd saves for backward, and the peak of the memory allocated during forward + backward above what was
    allocated before (CUDA: the caching allocator's counters; CPU: the profiler's allocation
    and free events, summed in time order)."""
    model = copy.deepcopy(run.model).train()
    model.zero_grad(set_to_none=True)  # the step allocates its gradients, as in training
    # A batch of its own (a slice would share the whole training set's storage).
    x, y = data.x["train"][:batch_size].clone(), data.y["train"][:batch_size].clone()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        run.peak_bytes = torch.cuda.max_memory_allocated(device) - base
    else:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                      profile_memory=True)
        with quiet_stderr():  # the profiler's start/stop log lines
            prof.start()
        try:
            step()
        finally:
            with quiet_stderr():
                prof.stop()
        # Every allocation (+bytes) and free (-bytes) of the step, in time order.
        changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
        level = peak = 0
        for _, change in changes:
            level += change
            peak = max(peak, level)
        run.peak_bytes = peak
    run.saved_bytes = sum(storages.values())


@torch.no_grad()
def bn_histogram_data(model: nn.Module, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of block2's BatchNorm on the validation split (eval mode)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        seen["in"], seen["out"] = inputs[0].detach().clone(), output.detach().clone()

    handle = model.block2.bn.register_forward_hook(hook)
    try:
        evaluate(model, data, "val")
    finally:
        handle.remove()
    return seen["in"].flatten().cpu(), seen["out"].flatten().cpu()


def plot(runs: list[Run], histograms: dict[str, tuple[torch.Tensor, torch.Tensor]],
         path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{run.name} ({run.order})" for run in runs]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ((curves, times), (before, after)) = plt.subplots(2, 2, figsize=(14, 10))
    for i, (run, label) in enumerate(zip(runs, labels)):
        epochs = range(1, len(run.train_losses) + 1)
        curves.plot(epochs, run.train_losses, color=colors[i], label=f"{label} train")
        curves.plot(epochs, run.val_losses, color=colors[i], linestyle="--",
                    label=f"{label} validation")
        curves.axvline(run.best_epoch, color=colors[i], linestyle=":", linewidth=0.8)
    curves.set(xlabel="epoch", ylabel="cross-entropy", yscale="log",
               title="loss (solid: train, dashed: validation, dotted: best epoch)")
    curves.legend(fontsize=7)

    medians = [1e3 * statistics.median(run.epoch_seconds) for run in runs]
    bars = times.barh(range(len(runs)), medians, color=colors[:len(runs)])
    times.bar_label(bars, fmt="%.0f ms")
    times.set_yticks(range(len(runs)), labels, fontsize=8)
    times.invert_yaxis()
    times.set(xlabel="median training time per epoch (ms)", title="time per epoch")

    for axis, index, what in ((before, 0, "input"), (after, 1, "output")):
        for (name, tensors), style in zip(histograms.items(), ("-", ":")):
            axis.hist(tensors[index].numpy(), bins=80, histtype="step", density=True,
                      linestyle=style, linewidth=1.5, label=name)
        axis.set(xlabel="activation", ylabel="density",
                 title=f"{what} of block2's BatchNorm (ReLU->BN, trained, eval mode, validation)")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(runs: list[Run]) -> str:
    header = (f"{'run':<19} {'order':<14} {'best val loss':>13} {'test acc':>8} "
              f"{'epochs (best)':>13} {'ms/epoch':>8} {'vs torch.nn':>11} {'saved KiB':>9} "
              f"{'peak KiB':>8}")
    lines = [header, "-" * len(header)]
    for i, run in enumerate(runs):
        ms = 1e3 * statistics.median(run.epoch_seconds)
        reference = 1e3 * statistics.median(runs[i - i % 2].epoch_seconds)
        lines.append(
            f"{run.name:<19} {run.order:<14} {run.best_val_loss:>13.4f} {run.test_accuracy:>8.4f} "
            f"{f'{len(run.val_losses)} ({run.best_epoch})':>13} {ms:>8.1f} "
            f"{ms / reference:>10.2f}x {run.saved_bytes / 1024:>9.1f} {run.peak_bytes / 1024:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    data = load_data(args.seed, device)
    runs = build_runs(args, device)
    n = {k: v.numel() for k, v in data.y.items()}
    print(f"digits: {n['train']} train / {n['val']} validation / {n['test']} test images (8x8), "
          f"device {device}, {torch.get_num_threads()} CPU threads, float32")
    print(f"SGD lr={args.lr} momentum={args.momentum} weight_decay={args.weight_decay}, "
          f"batch {args.batch_size}, dropout {args.dropout}, at most {args.max_epochs} epochs, "
          f"patience {args.patience}, seed {args.seed}")

    for run in runs:  # one-time setup costs (thread pool, allocator) out of the timings
        step_memory(run, data, args.batch_size, device)

    generator = torch.Generator().manual_seed(args.seed)
    progress = tqdm(range(1, args.max_epochs + 1), desc="epochs", unit="epoch",
                    dynamic_ncols=True)
    for epoch in progress:
        order = torch.randperm(n["train"], generator=generator).to(device)
        active = [run for run in runs if not run.stopped]
        # Interleaved within the epoch, so every run meets the same machine conditions.
        for run in active:
            train_epoch(run, data, order, args.batch_size, args.seed * 1000 + epoch, device)
            end_epoch(run, data, epoch, args.patience)
        progress.set_postfix(active=len(active),
                             best_val=f"{min(run.best_val_loss for run in runs):.4f}")
        if all(run.stopped for run in runs):
            break
    progress.close()

    failures = []
    for i, run in enumerate(runs):
        run.model.load_state_dict(run.best_state)
        _, run.test_accuracy = evaluate(run.model, data, "test")
        if run.test_accuracy < args.min_accuracy:
            failures.append(f"{run.name} ({run.order}) test accuracy {run.test_accuracy:.4f} "
                            f"< {args.min_accuracy}")
        if i % 2:
            reference = runs[i - 1]
            steps = len(run.step_losses) // len(run.train_losses)
            lockstep = max(abs(a - b) for a, b in zip(reference.step_losses[:steps],
                                                      run.step_losses[:steps]))
            print(f"{run.order:<14} largest |loss difference| torch.nn vs {run.name} in epoch 1: "
                  f"{lockstep:.2e}")
            if lockstep > args.lockstep_tol:
                failures.append(f"{run.order}: losses differ by {lockstep:.2e} in epoch 1 "
                                f"(> {args.lockstep_tol:g})")

    for run in runs:  # after training, for the state the summary describes
        step_memory(run, data, args.batch_size, device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.abspath(os.path.join(args.out, "train_digits.png"))
    # The custom_bn run's trained weights, and torch.nn's layers holding the very same weights.
    twin = build_model(relu_bn, args.dropout).to(device)
    twin.load_state_dict(runs[1].model.state_dict())
    plot(runs, {"custom_bn": bn_histogram_data(runs[1].model, data),
                "torch.nn, same weights": bn_histogram_data(twin, data)}, path)
    print(f"plot: {path}")
    print()
    print(summary(runs))
    print(f"one training step, batch {args.batch_size}: saved KiB = activations autograd keeps "
          "for backward; peak KiB = peak of the memory allocated during the step")

    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if not failures:
        print("OK: every run reaches the target accuracy, each pair in lockstep in epoch 1")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
