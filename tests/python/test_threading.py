"""The CPU kernels run on torch's intra-op thread pool, and only on it.

Threads are observed from outside the kernels: the CPU time of each thread of this process
(/proc/self/task/<tid>/stat) is read before and after a stretch of kernel calls. A kernel that
runs serially leaves the pool's other threads idle, so the second-busiest thread's share tells
whether the work was split. Each split of kernels/cpu/batch_norm_kernel.cpp gets its own case.
"""

import os
import time

import pytest
import torch

import custom_bn

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")


def _thread_cpu_ticks():
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def _busy_thread_shares(fn, seconds=0.4):
    """CPU time of each thread while fn runs repeatedly, as shares of the busiest thread's."""
    fn()  # warm-up: the pool's threads start at the first parallel region
    before = _thread_cpu_ticks()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        fn()
    after = _thread_cpu_ticks()
    used = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
    assert used[0] > 0, "no CPU time measured"
    return [u / used[0] for u in used]


def _forward(shape, channels_last=False, training=True):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    return lambda: torch.ops.custom_bn.batch_norm_forward(x, None, None, rm, rv, training, 0.1, 1e-5)


def _backward(shape, channels_last=False):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(x, None, None, None, None, True, 0.1,
                                                              1e-5)
    w = torch.ones(shape[1])
    return lambda: torch.ops.custom_bn.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5,
                                                           [True, True, True])


CASES = {
    "forward-whole-channels": _forward((16, 64, 32, 32)),
    "forward-C1-pieces": _forward((4, 1, 256, 256)),
    "forward-C3-pieces": _forward((4, 3, 160, 160)),
    "forward-channels-last": _forward((16, 64, 32, 32), channels_last=True),
    "forward-BatchNorm1d": _forward((1024, 1024)),
    "forward-huge-C-two-rows": _forward((2, 200000)),
    "forward-eval": _forward((16, 64, 32, 32), training=False),
    "backward-whole-channels": _backward((16, 64, 32, 32)),
    "backward-C3-pieces": _backward((4, 3, 160, 160)),
    "backward-channels-last": _backward((16, 64, 32, 32), channels_last=True),
    "backward-BatchNorm1d": _backward((1024, 1024)),
}


@pytest.fixture
def threads():
    def use(n):
        torch.set_num_threads(n)

    before = torch.get_num_threads()
    yield use
    torch.set_num_threads(before)


def test_built_with_openmp_and_one_runtime():
    info = custom_bn.build_info()
    assert info["openmp"], info
    # Only libtorch's own OpenMP runtime: a second copy would run a second thread pool that
    # torch.set_num_threads does not control.
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    assert len(info["openmp_runtimes"]) == 1, info["openmp_runtimes"]
    assert os.path.dirname(info["openmp_runtimes"][0]) == torch_lib, info["openmp_runtimes"]


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_uses_two_threads(name, threads, monkeypatch):
    threads(2)
    if "whole-channels" in name:  # these tensors fit in the cache: force the whole-channel mode
        monkeypatch.setenv("CUSTOM_BN_CPU_CACHE_BYTES", "0")
    shares = _busy_thread_shares(CASES[name])
    assert shares[1] > 0.4, f"{name}: CPU time per thread relative to the busiest: {shares[:4]}"


def test_one_thread_when_torch_has_one(threads):
    """The measurement can fail: with torch.set_num_threads(1) the other threads stay idle."""
    threads(1)
    shares = _busy_thread_shares(CASES["forward-whole-channels"])
    assert shares[1] < 0.2, shares[:4]
