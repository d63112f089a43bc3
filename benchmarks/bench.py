"""``make bench``: custom_bn's CPU BatchNorm against ATen eager, torch.compile and a copy.

For every case (shape, layout, dtype) and mode (train forward, train forward+backward, eval
forward) it times, in one process and interleaved:

* ``custom_bn``: the custom_bn module (``custom_bn.BatchNorm1d/2d/3d``);
* ``aten``: the torch.nn module, i.e. ATen's eager kernels (``F.batch_norm``);
* ``compile``: ``torch.compile`` (inductor) of the same torch.nn module;
* ``copy``: a same-size copy into a fresh tensor, the memory floor of a forward pass.

On a machine with a CUDA GPU the same cases are timed on the GPU as well (rows named ``cuda ...``;
the first child process times them, each call followed by a synchronize).

Train forward runs with gradients enabled and a leaf input that requires them, as in training;
forward+backward adds ``torch.autograd.grad`` for the input, weight and bias (nothing
accumulates into ``.grad``). Each thread count runs in its own child process (torch.compile bakes
the thread count into its kernels). Every timing is the median of interleaved rounds after
warm-up; the machine is noisy, so compare the ratios printed, not absolute times across runs.

glibc's malloc returns large freed blocks to the system and takes them back with fresh,
zero-filled pages on the next call; with two 25 MB tensors alive per step that page-fault cost
varies several-fold between runs and swamps the kernels (ATen's and custom_bn's alike). The
child processes therefore run with GLIBC_TUNABLES set to keep freed memory (the effect a
caching allocator such as jemalloc gives); --system-malloc keeps the defaults.

Prints a table, and writes JSON, a markdown table and a PNG chart to benchmarks/results/
(git-ignored).

    python benchmarks/bench.py [--threads 1 2] [--quick] [--cases NAME ...] [--system-malloc]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Keep freed blocks of up to 32 MiB in the heap and never trim it (see the module docstring).
STEADY_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
CONTENDERS = ("custom_bn", "aten", "compile", "copy")


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    channels_last: bool = False
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


CASES = [
    Case("NCHW 32x64x56x56", (32, 64, 56, 56)),
    Case("NHWC 32x64x56x56", (32, 64, 56, 56), channels_last=True),
    Case("NCHW 32x256x14x14", (32, 256, 14, 14)),
    Case("NCHW 8x3x224x224", (8, 3, 224, 224)),
    Case("NC 256x1024", (256, 1024)),
    Case("NC 8x16", (8, 16)),
    Case("NCDHW 4x32x16x32x32", (4, 32, 16, 32, 32)),
    Case("NCHW bf16 32x64x56x56", (32, 64, 56, 56), dtype="bfloat16"),
    Case("NHWC bf16 32x64x56x56", (32, 64, 56, 56), channels_last=True, dtype="bfloat16"),
    Case("NCHW fp16 32x64x56x56", (32, 64, 56, 56), dtype="float16"),
    Case("NHWC fp16 32x64x56x56", (32, 64, 56, 56), channels_last=True, dtype="float16"),
]
# The fused epilogue (training forward+backward): BN+ReLU and BN+add+ReLU on these cases.
FUSED_CASES = [c for c in CASES if "32x64x56x56" in c.name and c.dtype != "float16"]
EPILOGUES = ("relu", "add_relu")
FUSED_CONTENDERS = ("fused", "plain", "aten", "compile", "copy", "inplace")
# Per-call overhead: a tiny input, forward+backward, through the module and through torch.ops.
OVERHEAD_SHAPE = (8, 16, 4, 4)


def median_times(fns: Dict[str, Callable[[], object]], rounds: int, min_sample_s: float) -> Dict[str, float]:
    """Median seconds per call of each function: warm-up, then `rounds` rounds in which every
    function is timed once in a shuffled order, each sample repeating the call enough times to
    last about min_sample_s."""
    repeats = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        fn()
        once = max((time.perf_counter() - start) / 2, 1e-7)
        repeats[name] = max(1, int(min_sample_s / once))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            fn, n = fns[name], repeats[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def _modules(case: Case, device: str = "cpu"):
    import custom_bn

    dims = len(case.shape) - 2
    nn_cls = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d,
              3: torch.nn.BatchNorm3d}[dims]
    ours_cls = {0: custom_bn.BatchNorm1d, 1: custom_bn.BatchNorm1d, 2: custom_bn.BatchNorm2d,
                3: custom_bn.BatchNorm3d}[dims]
    channels = case.shape[1]
    # Parameters and buffers stay float32 for float16/bfloat16 input, as under autocast.
    reference = nn_cls(channels)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    ours = ours_cls(channels)
    ours.load_state_dict(reference.state_dict())
    return ours.to(device), reference.to(device), copy.deepcopy(reference).to(device)


def _input(case: Case, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(case.shape, device=device) * 2 + 0.5
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.to(case.torch_dtype)


def case_functions(case: Case, mode: str, modules, device: str) -> Dict[str, Callable[[], object]]:
    """The four timed functions of one case and mode; modules = (custom_bn, torch.nn, compiled).
    On CUDA each call waits for the device, so that the time is the kernels'."""
    ours, aten, compiled = modules
    x = _input(case, device)
    training = mode != "eval_fwd"
    for m in (ours, aten, compiled):
        m.train(training)

    def copy_fn():
        return torch.empty_like(x).copy_(x)

    if mode == "eval_fwd":
        def forward(m):
            def run():
                with torch.no_grad():
                    return m(x)
            return run
        fns = {"custom_bn": forward(ours), "aten": forward(aten), "compile": forward(compiled)}
    else:
        leaf = x.detach().requires_grad_()
        dy = torch.randn_like(x)

        def step(m):
            params = (leaf, m.weight, m.bias)

            def run():
                y = m(leaf)
                if mode == "train_fwd_bwd":
                    return torch.autograd.grad(y, params, dy)
                return y
            return run
        fns = {"custom_bn": step(ours), "aten": step(aten), "compile": step(compiled)}
    fns["copy"] = copy_fn
    # The results must agree before their times mean anything (from the same running stats:
    # earlier modes updated each module's own a different number of times).
    ours.load_state_dict(aten.state_dict())
    tol = 1e-4 if case.dtype == "float32" else 5e-2
    results = [r if isinstance(r, tuple) else (r,) for r in (fns["custom_bn"](), fns["aten"]())]
    for got, expected in zip(*results):  # the output, or grad_input, grad_weight, grad_bias
        # atol relative to the largest value: grad_weight sums 10^5 terms, and ATen's own float32
        # error there (channels-last: 6e-3 on values ~3) exceeds a fixed 1e-3.
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * 10 * scale)
    if device == "cuda":
        fns = {name: (lambda fn: lambda: (fn(), torch.cuda.synchronize()))(fn) for name, fn in fns.items()}
    return fns


def compulsory_bytes(case: Case, mode: str) -> int:
    """Bytes an op must move at least: forward reads x and writes y; backward reads x and dy
    and writes dx."""
    size = torch.Size(case.shape).numel() * torch.empty((), dtype=case.torch_dtype).element_size()
    return {"train_fwd": 2 * size, "eval_fwd": 2 * size, "train_fwd_bwd": 5 * size}[mode]


def overhead_functions() -> Dict[str, Callable[[], object]]:
    """(8,16,4,4) forward+backward: custom_bn vs torch.nn through the module, and the custom_bn
    operator vs ATen's through torch.ops."""
    case = Case("overhead", OVERHEAD_SHAPE)
    ours, aten, _ = _modules(case)
    x = _input(case).requires_grad_()
    dy = torch.randn_like(x)

    def module(m):
        params = (x, m.weight, m.bias)
        return lambda: torch.autograd.grad(m(x), params, dy)

    w, b = aten.weight, aten.bias
    rm, rv = aten.running_mean.clone(), aten.running_var.clone()

    def ops_custom_bn():
        y = torch.ops.custom_bn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)[0]
        return torch.autograd.grad(y, (x, w, b), dy)

    def ops_aten():
        y = torch.ops.aten.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, False)
        return torch.autograd.grad(y, (x, w, b), dy)

    return {"module custom_bn": module(ours), "module torch.nn": module(aten),
            "torch.ops custom_bn": ops_custom_bn, "torch.ops aten": ops_aten}


class _Composition(torch.nn.Module):
    """torch.nn's BN(x) [+ residual], then ReLU: what BatchNormAct2d fuses."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.bn(x)
        return torch.relu(y if residual is None else y + residual)


def fused_functions(case: Case, epilogue: str, device: str = "cpu") -> Dict[str, Callable[[], object]]:
    """Training forward+backward of BN+ReLU (epilogue "relu") or BN+add+ReLU ("add_relu"):
    ``fused`` custom_bn.BatchNormAct2d, ``plain`` custom_bn.BatchNorm2d alone (the fused op's
    target: the epilogue should cost nothing on top), ``aten`` the torch.nn composition,
    ``compile`` torch.compile of that composition, ``copy`` the memory floor of a forward.
    ``inplace``: custom_bn.InPlaceBatchNormAct2d (leaky_relu, relu not being invertible; no
    residual) on a fresh copy of x, since it overwrites its input: the copy's time (``copy``) is
    subtracted when the table reports it."""
    import custom_bn

    ours, reference, to_compile = _modules(case, device)
    fused = custom_bn.BatchNormAct2d(case.shape[1]).to(device)
    fused.load_state_dict(reference.state_dict())
    inplace = custom_bn.InPlaceBatchNormAct2d(case.shape[1]).to(device)
    inplace.load_state_dict(reference.state_dict())
    aten = _Composition(reference)
    compiled = torch.compile(_Composition(to_compile), dynamic=False)
    x = _input(case, device).requires_grad_()
    residual = torch.randn_like(x).requires_grad_() if epilogue == "add_relu" else None
    dy = torch.randn_like(x)

    def step(forward, bn, uses_residual=True):
        inputs = (x, bn.weight, bn.bias) + ((residual,) if uses_residual and residual is not None else ())
        return lambda: torch.autograd.grad(forward(), inputs, dy)

    fns = {
        "fused": step(lambda: fused(x, residual), fused),
        "plain": step(lambda: ours(x), ours, uses_residual=False),
        "aten": step(lambda: aten(x, residual), reference),
        "compile": step(lambda: compiled(x, residual), to_compile),
        "copy": lambda: torch.empty_like(x).copy_(x),
    }
    if residual is None:
        fns["inplace"] = step(lambda: inplace(x.clone()), inplace, uses_residual=False)
    tol = 1e-4 if case.dtype == "float32" else 5e-2
    for got, expected in zip(fns["fused"](), fns["aten"]()):
        scale = max(1.0, expected.abs().max().item())
        close = torch.isclose(got.float(), expected.float(), rtol=tol, atol=tol * 10 * scale)
        # Where BN(x) [+ residual] rounds to the other side of 0 than torch's, the ReLU passes
        # dy on one side only: a handful of elements in millions, not a wrong kernel.
        assert (~close).sum().item() <= max(1, got.numel() // 100_000), (
            f"fused {case.name} {epilogue}: {(~close).sum().item()} of {got.numel()} values differ")
    return fns


# The memory of a training step: 8 blocks conv(64 -> 64, 3x3) -> BN -> activation on a
# (16, 64, 56, 56) float32 input, each variant in its own process.
MEMORY_VARIANTS = ("torch.nn BatchNorm2d+ReLU", "custom_bn BatchNormAct2d", "custom_bn InPlaceBatchNormAct2d")
MEMORY_SHAPE = (16, 64, 56, 56)
MEMORY_BLOCKS = 8


def memory_child(variant: str) -> dict:
    """Bytes of the distinct storages saved for backward (saved_tensors_hooks, each storage
    counted once) and the process's peak resident memory during one training step, above what it
    held before the step."""
    import resource

    import custom_bn

    torch.manual_seed(0)
    channels = MEMORY_SHAPE[1]
    layers = []
    for _ in range(MEMORY_BLOCKS):
        layers.append(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if variant == MEMORY_VARIANTS[0]:
            layers += [torch.nn.BatchNorm2d(channels), torch.nn.ReLU()]
        elif variant == MEMORY_VARIANTS[1]:
            layers.append(custom_bn.BatchNormAct2d(channels))
        else:
            layers.append(custom_bn.InPlaceBatchNormAct2d(channels))
    model = torch.nn.Sequential(*layers)
    x = torch.randn(MEMORY_SHAPE)
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * page
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "saved_bytes": sum(storages.values()), "peak_step_bytes": peak - before}


def memory_table(rows: List[dict]) -> str:
    base = rows[0]
    lines = [f"memory of a training step, {MEMORY_BLOCKS} x (conv -> BN -> activation) on "
             f"{'x'.join(map(str, MEMORY_SHAPE))} float32 (saved: distinct storages kept for "
             "backward; peak: resident memory above the step's start):"]
    for r in rows:
        lines.append(
            f"  {r['variant']:<34} saved {r['saved_bytes'] / 2**20:8.1f} MiB "
            f"({r['saved_bytes'] / base['saved_bytes'] - 1:+.1%})   peak {r['peak_step_bytes'] / 2**20:8.1f} MiB "
            f"({r['peak_step_bytes'] / base['peak_step_bytes'] - 1:+.1%})")
    return "\n".join(lines)


# SyncBatchNorm: 2 processes (gloo on 127.0.0.1, one thread each), this per-process batch.
SYNC_SHAPE = (8, 64, 56, 56)
SYNC_WORLD = 2


def sync_child(rank: int, port: int, rounds: int) -> dict:
    """Training forward+backward of custom_bn.SyncBatchNorm against the local custom_bn
    BatchNorm2d on the same per-process batch, in lockstep in both processes (a fixed number of
    calls in the same order: every sync call is a collective both must join)."""
    import torch.distributed as dist

    import custom_bn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=SYNC_WORLD)
    torch.manual_seed(rank)
    x = torch.randn(SYNC_SHAPE, requires_grad=True)
    dy = torch.randn_like(x)
    modules = {"sync": custom_bn.SyncBatchNorm(SYNC_SHAPE[1]), "local": custom_bn.BatchNorm2d(SYNC_SHAPE[1])}
    fns = {k: (lambda m=m: torch.autograd.grad(m(x), (x, m.weight, m.bias), dy)) for k, m in modules.items()}
    order = random.Random(0)  # the same order in both processes
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(rounds + 2):  # two warm-up rounds
        names = list(fns)
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            for _ in range(5):
                fns[name]()
            if r >= 2:
                samples[name].append((time.perf_counter() - start) / 5)
    dist.destroy_process_group()
    channels = SYNC_SHAPE[1]
    return {"rank": rank, "seconds": {k: statistics.median(v) for k, v in samples.items()},
            # per process and step: all-gather of [mean, var, count], all-reduce of 2 sums
            "bytes_sent": (2 * channels + 1) * 4 + 2 * channels * 4}


def sync_table(rows: List[dict]) -> str:
    lines = [f"SyncBatchNorm, {SYNC_WORLD} processes (gloo, 1 thread each), per-process batch "
             f"{'x'.join(map(str, SYNC_SHAPE))} float32, training forward+backward:"]
    for r in rows:
        t = r["seconds"]
        lines.append(f"  rank {r['rank']}: sync {t['sync'] * 1e3:.3f} ms, local {t['local'] * 1e3:.3f} ms, "
                     f"overhead {t['sync'] / t['local']:.2f}x; 2 collectives, {r['bytes_sent']} bytes sent "
                     "per step (torch.nn.SyncBatchNorm: the same 2 collectives and bytes)")
    return "\n".join(lines)


def run_child(threads: int, cases: List[Case], rounds: int, min_sample_s: float, cuda: bool) -> dict:
    """Measures every case with `threads` threads (and, when `cuda`, on the GPU too); returns a
    JSON-able dict."""
    import custom_bn

    torch.set_num_threads(threads)
    # One compiled module per case (train and eval graphs): more than dynamo's default number
    # of recompilations of nn.BatchNorm's forward, after which it would silently run eagerly.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 1024
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    rows = []
    for device in ["cpu"] + (["cuda"] if cuda else []):
        for case in cases:
            ours, aten, to_compile = _modules(case, device)
            modules = (ours, aten, torch.compile(to_compile, dynamic=False))
            name = case.name if device == "cpu" else f"cuda {case.name}"
            for mode in MODES:
                times = median_times(case_functions(case, mode, modules, device), rounds, min_sample_s)
                rows.append({"case": asdict(case), "name": name, "mode": mode, "device": device,
                             "threads": threads, "seconds": times, "bytes": compulsory_bytes(case, mode)})
                print(f"  [{threads} thread(s)] {name:<24} {mode:<14} done", file=sys.stderr, flush=True)
    fused_rows = []
    for case in cases:
        if case not in FUSED_CASES:
            continue
        for epilogue in EPILOGUES:
            times = median_times(fused_functions(case, epilogue), rounds, min_sample_s)
            fused_rows.append({"name": case.name, "epilogue": epilogue, "threads": threads,
                               "seconds": times})
            print(f"  [{threads} thread(s)] {case.name:<24} {epilogue:<14} done", file=sys.stderr, flush=True)
    overhead = median_times(overhead_functions(), rounds, min_sample_s)
    return {"threads": threads, "rows": rows, "fused_rows": fused_rows, "overhead": overhead,
            "build_info": custom_bn.build_info()}


COLUMNS = ["case", "mode", "thr", "custom_bn ms", "ATen ms", "compile ms", "copy ms", "vs ATen",
           "vs compile", "x copy", "GB/s"]


def table_rows(results: List[dict]) -> List[List[str]]:
    """One list of formatted cells per measured row, in COLUMNS order."""
    rows = []
    for res in results:
        for row in res["rows"]:
            t = row["seconds"]
            ours = t["custom_bn"]
            rows.append([row["name"], row["mode"], str(row["threads"])]
                        + [f"{t[c] * 1e3:.3f}" for c in CONTENDERS]
                        + [f"{t['aten'] / ours:.2f}x", f"{t['compile'] / ours:.2f}x",
                           f"{ours / t['copy']:.2f}", f"{row['bytes'] / ours / 1e9:.1f}"])
    return rows


FUSED_COLUMNS = ["case", "epilogue", "thr", "fused ms", "plain ms", "ATen ms", "compile ms",
                 "copy ms", "inplace ms", "fused/plain", "vs ATen", "vs compile", "inplace/fused"]


def fused_table_rows(results: List[dict]) -> List[List[str]]:
    rows = []
    for res in results:
        for row in res.get("fused_rows", []):
            t = dict(row["seconds"])
            if "inplace" in t:
                t["inplace"] -= t["copy"]  # its step copies x first (see fused_functions)
            fused = t["fused"]
            ms = lambda c: f"{t[c] * 1e3:.3f}" if c in t else "-"
            rows.append([row["name"], row["epilogue"], str(row["threads"])]
                        + [ms(c) for c in FUSED_CONTENDERS]
                        + [f"{fused / t['plain']:.2f}", f"{t['aten'] / fused:.2f}x",
                           f"{t['compile'] / fused:.2f}x",
                           f"{t['inplace'] / fused:.2f}" if "inplace" in t else "-"])
    return rows


def format_table(results: List[dict]) -> str:
    widths = [24, 14] + [max(len(c), 8) for c in COLUMNS[2:]]
    line = lambda cells: " ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    head = line(COLUMNS)
    lines = [head, "-" * len(head)] + [line(r) for r in table_rows(results)]
    fused_rows = fused_table_rows(results)
    if fused_rows:
        lines += ["", "fused epilogue, training forward+backward (fused/plain: time over plain custom_bn "
                  "BatchNorm alone; vs: speed-up of fused over the torch.nn composition):"]
        head = line(FUSED_COLUMNS)
        lines += [head, "-" * len(head)] + [line(r) for r in fused_rows]
    lines.append("")
    lines.append("per-call overhead, (8,16,4,4) forward+backward (microseconds; ratio custom_bn / torch):")
    for res in results:
        o = res["overhead"]
        lines.append(
            f"  {res['threads']} thread(s): module {o['module custom_bn'] * 1e6:.1f} vs "
            f"{o['module torch.nn'] * 1e6:.1f} ({o['module custom_bn'] / o['module torch.nn']:.2f}x); "
            f"torch.ops {o['torch.ops custom_bn'] * 1e6:.1f} vs {o['torch.ops aten'] * 1e6:.1f} "
            f"({o['torch.ops custom_bn'] / o['torch.ops aten']:.2f}x)"
        )
    return "\n".join(lines)


def markdown_table(results: List[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "--:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    fused_rows = fused_table_rows(results)
    if fused_rows:
        lines += ["", "| " + " | ".join(FUSED_COLUMNS) + " |",
                  "|---|---|" + "--:|" * (len(FUSED_COLUMNS) - 2)]
        lines += ["| " + " | ".join(r) + " |" for r in fused_rows]
    return "\n".join(lines) + "\n"


def plot(results: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(results), 1, figsize=(14, 5 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows = res["rows"]
        labels = [f"{r['name']}\n{r['mode']}" for r in rows]
        xs = range(len(rows))
        width = 0.28
        for k, (other, color) in enumerate((("aten", "tab:blue"), ("compile", "tab:orange"))):
            ax.bar([x + (k - 0.5) * width for x in xs],
                   [r["seconds"][other] / r["seconds"]["custom_bn"] for r in rows], width,
                   label=f"speed-up vs {other}", color=color)
        ax.plot(list(xs), [r["seconds"]["custom_bn"] / r["seconds"]["copy"] for r in rows], "k.",
                label="custom_bn time / copy time")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")  # copy multiples of tiny inputs reach 30
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_title(f"custom_bn on the CPU, {res['threads']} thread(s): higher bars are better")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", help="substrings of case names to run")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc settings in the timed processes")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--sync-child", type=int, nargs=2, help=argparse.SUPPRESS)  # rank, port
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    if args.sync_child:
        print(json.dumps(sync_child(*args.sync_child, 3 if args.quick else 9)))
        return
    cases = [c for c in CASES if not args.cases or any(s in c.name for s in args.cases)]
    rounds, min_sample_s = (3, 0.002) if args.quick else (9, 0.01)

    if args.child is not None:
        # The GPU rows do not depend on the CPU thread count: the first child times them.
        cuda = torch.cuda.is_available() and args.child == args.threads[0]
        print(json.dumps(run_child(args.child, cases, rounds, min_sample_s, cuda)))
        return

    env = dict(os.environ)
    if not args.system_malloc:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), STEADY_MALLOC]))
    results = []
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--child", str(threads), "--threads", *map(str, args.threads)]
        if args.cases:
            cmd += ["--cases", *args.cases]
        if args.quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    memory = []
    for variant in MEMORY_VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant],
                             stdout=subprocess.PIPE, text=True, check=True, env=env)
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, __file__, "--sync-child", str(r), str(port)]
                              + (["--quick"] if args.quick else []), stdout=subprocess.PIPE, text=True, env=env)
             for r in range(SYNC_WORLD)]
    sync_rows = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in ranks]

    table = format_table(results) + "\n\n" + memory_table(memory) + "\n\n" + sync_table(sync_rows)
    info = results[0]["build_info"]
    malloc = "default malloc" if args.system_malloc else "steady malloc"
    header = (f"custom_bn {info['version']}, torch {info['torch']}, CPU path {info['cpu_capability']}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {malloc}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(header)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(RESULTS, f"bench-{stamp}.json")
    with open(json_path, "w") as f:
        json.dump({"header": header, "results": results, "memory": memory, "sync": sync_rows}, f,
                  indent=1)
    png_path = plot(results, os.path.join(RESULTS, f"bench-{stamp}.png"))
    md_path = os.path.join(RESULTS, f"bench-{stamp}.md")
    with open(md_path, "w") as f:
        f.write(f"{header}\n\n{markdown_table(results)}\n```\n{memory_table(memory)}\n\n"
                f"{sync_table(sync_rows)}\n```\n")
    print(f"\nJSON: {json_path}")
    print(f"Markdown: {md_path}")
    if png_path:
        print(f"PNG:  {png_path}")


if __name__ == "__main__":
    main()
