"""Train the same small conv net twice, with torch.nn.BatchNorm2d and custom_bn.BatchNorm2d.

This is the main job of the repository (``make demo``). It shows that custom_bn.BatchNorm2d is a
drop-in replacement for torch.nn.BatchNorm2d in real training:

* one network (three conv -> BatchNorm2d -> ReLU blocks, global average pooling, a linear head) is
  built once; a deep copy has every torch.nn.BatchNorm2d swapped for a custom_bn.BatchNorm2d that
  loads the original's state_dict, so both runs start from identical weights and buffers;
* both are trained on scikit-learn's bundled digits data set (1,797 8x8 grey images of the digits
  0-9, shipped with scikit-learn, nothing is downloaded) with the same optimizer (SGD with momentum,
  cosine learning-rate decay) and the same mini-batch order, in float32 on CUDA when available,
  else on the CPU;
* per epoch it prints the mean training loss and the test accuracy (eval mode, so the running
  statistics are used) of both runs side by side, then the largest absolute difference between
  the two runs' losses over all training steps, and each run's final test accuracy and training
  time.

The script is also a check; it exits with status 1 when

* either network ends below ``--min-accuracy`` on the test split, or
* the losses differ by more than ``--lockstep-tol`` during the first epoch, or
* the losses differ by more than ``--loss-tol`` at any step of the whole run.

Why two loss tolerances: two correct float32 BatchNorm kernels round differently (reduction
order), so the runs start out equal to ~1e-7. Training amplifies that: each time a value lands
within round-off of a ReLU kink or a max-pool tie, the two runs take slightly different gradients,
momentum carries the difference on and the network's sensitivity multiplies it. Over hundreds of
steps the curves therefore drift apart by up to ~1e-2 even when both kernels are right (measured
here with several independent, correct re-implementations of the same math). A wrong kernel shows
up at once: a wrong statistic or gradient separates the losses in the first steps, long before
that drift, so the first epoch is held to the tight tolerance and the whole run to a loose one.

Usage (from the repository root, after ``make build``)::

    PYTHONPATH=python .venv/bin/python examples/train_digits.py [--epochs 15] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import custom_bn


@dataclass
class Split:
    """Digits images as float32 tensors: x has shape (N, 1, 8, 8), y has shape (N,) (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Run:
    """One network under training plus everything recorded about it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    test_accuracies: list[float] = field(default_factory=list)
    train_seconds: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="initial SGD learning rate (momentum 0.9, cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, weights and batch order")
    parser.add_argument("--min-accuracy", type=float, default=0.90,
                        help="fail when a run's final test accuracy is below this")
    parser.add_argument("--lockstep-tol", type=float, default=1e-3,
                        help="fail when the losses differ by more than this in the first epoch")
    parser.add_argument("--loss-tol", type=float, default=5e-2,
                        help="fail when the losses differ by more than this at any step")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be >= 1 and --batch-size >= 2 (BatchNorm needs 2+ samples)")
    return args


def load_split(seed: int, device: torch.device) -> Split:
    """Stratified 75/25 split of the digits data, standardized with the training split's statistics."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    mean, std = float(x_train.mean()), float(x_train.std())

    def images(a) -> torch.Tensor:
        return ((torch.as_tensor(a, dtype=torch.float32) - mean) / std).unsqueeze(1).to(device)

    def labels(a) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64).to(device)

    return Split(images(x_train), labels(y_train), images(x_test), labels(y_test))


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # The conv has no bias: the BatchNorm that follows would subtract it again.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def build_model() -> nn.Sequential:
    """(N, 1, 8, 8) images -> (N, 10) logits."""
    return nn.Sequential(
        conv_bn_relu(1, 32),          # 8x8
        conv_bn_relu(32, 64),         # 8x8
        nn.MaxPool2d(2),              # 4x4
        conv_bn_relu(64, 64),         # 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def swap_batch_norm(module: nn.Module) -> int:
    """Replace every torch.nn.BatchNorm2d under ``module`` with custom_bn.BatchNorm2d in place.

    The replacement gets the same hyper-parameters, the old module's state_dict (weight, bias,
    running stats, num_batches_tracked) and its train/eval mode. Returns the number swapped.
    """
    swapped = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            twin = custom_bn.BatchNorm2d(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            twin.load_state_dict(child.state_dict())
            twin.train(child.training)
            setattr(module, name, twin)
            swapped += 1
        else:
            swapped += swap_batch_norm(child)
    return swapped


def batch_orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """One shuffled index order per epoch, drawn once so both runs see identical mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator) for _ in range(epochs)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(run: Run, data: Split, order: torch.Tensor, batch_size: int,
                    device: torch.device) -> None:
    """One pass over the training split in ``order``; appends per-step losses, adds the time."""
    run.model.train()
    order = order.to(device)
    total, count = 0.0, 0
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, order.numel(), batch_size):
        index = order[first:first + batch_size]
        x, y = data.x_train[index], data.y_train[index]
        loss = F.cross_entropy(run.model(x), y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        value = loss.item()
        run.step_losses.append(value)
        total += value * index.numel()
        count += index.numel()
    synchronize(device)
    run.train_seconds += time.perf_counter() - start
    run.epoch_losses.append(total / count)


@torch.no_grad()
def test_accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    predictions = model(data.x_test).argmax(dim=1)
    return (predictions == data.y_test).float().mean().item()


def warm_up(model: nn.Module, data: Split, batch_size: int) -> None:
    """Forward/backward on a throw-away copy so one-time setup costs stay out of the timings."""
    scratch = copy.deepcopy(model).train()
    F.cross_entropy(scratch(data.x_train[:batch_size]), data.y_train[:batch_size]).backward()


def max_state_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference over all parameters and buffers (same state_dict keys)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise RuntimeError(f"state_dict keys differ: {sorted(sa.keys() ^ sb.keys())}")
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Keep cuDNN's algorithm choice from being a second source of difference between the runs.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(args.seed)

    data = load_split(args.seed, device)
    reference = build_model()
    custom = copy.deepcopy(reference)
    swapped = swap_batch_norm(custom)
    leftover = [m for m in custom.modules() if type(m) is nn.BatchNorm2d]
    if swapped == 0 or leftover:
        raise RuntimeError(f"conversion failed: {swapped} swapped, {len(leftover)} torch.nn left")

    runs: list[Run] = []
    for name, model in (("torch.nn", reference), ("custom_bn", custom)):
        model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
        runs.append(Run(name, model, optimizer, scheduler))
    torch_run, custom_run = runs

    n_train, n_test = data.y_train.numel(), data.y_test.numel()
    print(f"digits: {n_train} train / {n_test} test images (8x8), device {device}, "
          f"{torch.get_num_threads()} CPU threads, float32")
    print(f"model: 3 x (conv3x3 -> BatchNorm2d -> ReLU), {swapped} BatchNorm2d swapped for "
          f"custom_bn.BatchNorm2d; SGD lr={args.lr} momentum=0.9 cosine, batch {args.batch_size}, "
          f"{args.epochs} epochs, seed {args.seed}")
    for run in runs:
        warm_up(run.model, data, args.batch_size)

    header = (f"{'epoch':>5} | {'loss torch.nn':>13} {'loss custom_bn':>14} | "
              f"{'acc torch.nn':>12} {'acc custom_bn':>13} | {'max |dloss|':>11}")
    print(header)
    print("-" * len(header))
    orders = batch_orders(n_train, args.epochs, args.seed)
    progress = tqdm(orders, desc="training", unit="epoch", dynamic_ncols=True)
    for epoch, order in enumerate(progress, start=1):
        steps_before = len(torch_run.step_losses)
        # Interleaved epoch by epoch so both runs see the same machine conditions while timed.
        for run in runs:
            train_one_epoch(run, data, order, args.batch_size, device)
            run.scheduler.step()
            run.test_accuracies.append(test_accuracy(run.model, data))
        epoch_diff = max(abs(a - b) for a, b in zip(torch_run.step_losses[steps_before:],
                                                     custom_run.step_losses[steps_before:]))
        progress.set_postfix(loss=f"{custom_run.epoch_losses[-1]:.4f}",
                             acc=f"{custom_run.test_accuracies[-1]:.3f}")
        tqdm.write(f"{epoch:>5} | {torch_run.epoch_losses[-1]:>13.6f} "
                   f"{custom_run.epoch_losses[-1]:>14.6f} | {torch_run.test_accuracies[-1]:>12.4f} "
                   f"{custom_run.test_accuracies[-1]:>13.4f} | {epoch_diff:>11.2e}")
    progress.close()

    diffs = [abs(a - b) for a, b in zip(torch_run.step_losses, custom_run.step_losses)]
    worst_step = max(range(len(diffs)), key=diffs.__getitem__)
    first_epoch_steps = len(diffs) // args.epochs
    worst_lockstep = max(diffs[:first_epoch_steps])
    state_diff = max_state_difference(torch_run.model, custom_run.model)
    print()
    print(f"largest |loss difference| in epoch 1 ({first_epoch_steps} steps): "
          f"{worst_lockstep:.3e} (tolerance {args.lockstep_tol:g})")
    print(f"largest |loss difference| over all {len(diffs)} steps: {diffs[worst_step]:.3e} "
          f"(step {worst_step + 1}; tolerance {args.loss_tol:g})")
    print(f"largest |difference| of final parameters and buffers: {state_diff:.3e}")
    for run in runs:
        print(f"{run.name:>10}: test accuracy {run.test_accuracies[-1]:.4f}, "
              f"training time {run.train_seconds:.2f} s")
    ratio = custom_run.train_seconds / torch_run.train_seconds
    print(f"time ratio custom_bn / torch.nn: {ratio:.2f}")

    failures = [f"{run.name} test accuracy {run.test_accuracies[-1]:.4f} < {args.min_accuracy}"
                for run in runs if run.test_accuracies[-1] < args.min_accuracy]
    if worst_lockstep > args.lockstep_tol:
        failures.append(f"losses differ in epoch 1: max |dloss| {worst_lockstep:.3e} "
                        f"> {args.lockstep_tol:g}")
    if diffs[worst_step] > args.loss_tol:
        failures.append(f"losses diverge: max |dloss| {diffs[worst_step]:.3e} > {args.loss_tol:g}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if not failures:
        print("OK: both networks reach the target accuracy with matching losses")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
