"""Calls from many Python threads at once, and memory over many calls.

The operators keep no global mutable state: eight threads calling forward and backward at the
same time, each on its own tensors, must get what the same calls give one after another. And
10 000 forward+backward calls must not grow the process (nothing retained per call).
"""

import gc
import os
import threading
from typing import Dict, List

import pytest
import torch

import custom_bn.functional as F

THREADS = 8

CASES = [
    ((16, 8, 12, 12), torch.float32, torch.contiguous_format),
    ((16, 8, 12, 12), torch.float32, torch.channels_last),
    ((64, 24), torch.float64, torch.contiguous_format),
    ((4, 6, 70, 70), torch.float32, torch.contiguous_format),  # H*W above the CPU chunk
    ((8, 5, 3, 4, 5), torch.bfloat16, torch.channels_last_3d),
    ((32, 3, 50), torch.float16, torch.contiguous_format),
    ((2, 300, 6, 6), torch.float64, torch.channels_last),
    ((1024, 7), torch.float32, torch.contiguous_format),
]


def _inputs(index: int) -> Dict[str, torch.Tensor]:
    shape, dtype, fmt = CASES[index]
    gen = torch.Generator().manual_seed(index)
    C = shape[1]
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return {
        "x": (torch.randn(shape, generator=gen) * 2 + 1).to(dtype).contiguous(memory_format=fmt),
        "dy": torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt),
        "weight": torch.rand(C, generator=gen).to(pdtype) + 0.5,
        "bias": torch.randn(C, generator=gen).to(pdtype),
        "running_mean": torch.zeros(C, dtype=pdtype),
        "running_var": torch.ones(C, dtype=pdtype),
    }


def _train_steps(t: Dict[str, torch.Tensor], steps: int) -> List[torch.Tensor]:
    """``steps`` training steps (forward, backward) on copies of ``t``; returns the last step's
    output and gradients and the running stats after all steps."""
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    for _ in range(steps):
        x = t["x"].detach().requires_grad_()
        w = t["weight"].detach().requires_grad_()
        b = t["bias"].detach().requires_grad_()
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3)
        grads = torch.autograd.grad(y, (x, w, b), t["dy"])
    return [y.detach(), *grads, rm, rv]


def test_eight_threads_at_once_match_serial_calls() -> None:
    steps = 5
    inputs = [_inputs(i) for i in range(THREADS)]
    serial = [_train_steps(t, steps) for t in inputs]
    results: List[List[torch.Tensor]] = [[] for _ in range(THREADS)]
    errors: List[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(i: int) -> None:
        try:
            start.wait(timeout=60)
            results[i] = _train_steps(inputs[i], steps)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for i in range(THREADS):
        for name, got, want in zip(names, results[i], serial[i]):
            # The work split depends only on the shape and the intra-op thread count, which
            # every thread shares: the results are bitwise those of the serial calls.
            assert torch.equal(got, want), f"case {CASES[i]}: {name} differs from the serial call"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_ten_thousand_calls_keep_memory_flat() -> None:
    t = _inputs(0)
    t["x"] = t["x"][:4, :, :6, :6].contiguous()  # ~4.6 KB per tensor: fast, yet a leak shows
    t["dy"] = t["dy"][:4, :, :6, :6].contiguous()

    def calls(n: int) -> None:
        for _ in range(n):
            _train_steps(t, 1)

    calls(1000)  # warm-up: allocator caches, autograd and dispatcher first-call state
    gc.collect()
    before = _rss_bytes()
    calls(10_000)
    gc.collect()
    growth = _rss_bytes() - before
    # One leaked output (4.6 KB) per call would be 46 MB; a leaked saved-statistics pair
    # (2 x 32 B + tensor headers, ~1 KB) 10 MB.
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 10 000 calls"
