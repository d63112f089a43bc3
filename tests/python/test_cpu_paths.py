"""Every work split of the CPU kernels against torch in float64.

The CPU kernels choose a split from the shape, the thread count and the cache size
(kernels/cpu/batch_norm_kernel.cpp): whole channels per task (tensors larger than the cache,
forced here with CUSTOM_BN_CPU_CACHE_BYTES=0), runs cut into pieces, channels-last tiles of row
ranges x channel blocks (C > 1024 gives several blocks; few rows give one range), and flat
elementwise passes. Each case below runs with 1, 2 and 3 threads, so that every split and its
merge run, and is compared with torch.nn.functional.batch_norm computed in float64 from the
same values.
"""

import pytest
import torch
import torch.nn.functional as F

import custom_bn
from bn_testing import TOLERANCES, assert_close, assert_close_or_no_worse, single_threaded

# (shape, channels_last): each reaches a different split with some thread count (contiguous
# inputs: runs cut into pieces, or, in the whole-channel test, whole channels where balanced).
CASES = [
    ((2, 1, 130, 130), False),  # C = 1: pieces within a plane
    ((4, 3, 70, 70), False),  # C = 3: not balanced over 2 threads: always pieces there
    ((3, 5, 9000), False),  # C = 5: pieces longer than a statistics chunk
    ((4, 64, 12, 12), False),  # many short planes
    ((1, 4, 5000), False),  # N = 1: a plane of a chunk and a tail (cut further with 2-3 threads)
    ((1, 2, 9001), False),  # planes cut into pieces of a length that does not divide them
    ((8, 64, 20, 20), True),  # tiles of row ranges
    ((4, 3, 40, 40), True),  # C narrower than a vector
    ((2, 2500, 3, 3), True),  # several channel blocks
    ((256, 1024), False),  # (N, C): rows
    ((3, 3000), False),  # few rows, wide: channel blocks only
    ((4096, 3), False),  # many rows, narrow
    ((2, 7, 3000, 1), False),  # hw == 1 after the last dim: rows
    ((6, 9, 7, 7), False),  # planes shorter than a vector step: masked tails
    ((8, 33, 5, 5), True),  # C = one AVX-512 float step + 1 (AVX2: two steps + 1)
    ((8, 31, 5, 5), True),  # C = one step - 1: whole rows in the masked tail
    ((2, 3, 2, 3, 2, 4), False),  # rank 6 and 7: torch accepts (N, C, *) of any rank
    ((3, 2, 1, 2, 3, 1, 2), False),
]


def _case_id(case):
    shape, cl = case
    return "x".join(map(str, shape)) + ("-cl" if cl else "")


def _make(shape, channels_last, dtype, mean_scale=1.0):
    x = torch.randn(shape, dtype=torch.float64) * 2 + torch.randn(
        [1, shape[1]] + [1] * (len(shape) - 2), dtype=torch.float64
    ) * mean_scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


def _run(fn, x, dy, train, copy_params=True, **params):
    """Output, running stats and the input/weight/bias gradients of fn. copy_params=False uses
    the given per-channel tensors themselves (strided views stay strided)."""
    x = x.detach().clone().requires_grad_()
    copy = (lambda t: t.detach().clone()) if copy_params else (lambda t: t.detach())
    w = copy(params["weight"]).requires_grad_()
    b = copy(params["bias"]).requires_grad_()
    rm, rv = copy(params["running_mean"]), copy(params["running_var"])
    y = fn(x, rm, rv, w, b, training=train, momentum=0.3, eps=1e-5)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    return {"output": y, "running_mean": rm, "running_var": rv, "grad_input": gx,
            "grad_weight": gw, "grad_bias": gb}


def _params(channels, dtype):
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return {
        "weight": torch.rand(channels, dtype=pdtype) + 0.5,
        "bias": torch.randn(channels, dtype=pdtype),
        "running_mean": torch.randn(channels, dtype=pdtype),
        "running_var": torch.rand(channels, dtype=pdtype) + 0.5,
    }


@pytest.fixture(params=[1, 2, 3], ids=lambda t: f"threads{t}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _check_against_float64(case, dtype, train):
    shape, channels_last = case
    x = _make(shape, channels_last, dtype)
    dy = _make(shape, channels_last, dtype)
    params = _params(shape[1], dtype)
    ours = _run(custom_bn.functional.batch_norm, x, dy, train, **params)
    with single_threaded():
        ref = _run(F.batch_norm, x.double(), dy.double(), train,
                   **{k: v.double() for k, v in params.items()})
        same_precision = _run(F.batch_norm, x, dy, train, **params)
    assert ours["output"].stride() == x.stride()
    for name, value in ours.items():
        if dtype in (torch.float64, torch.float32):
            assert_close(value, ref[name], dtype, name)
        else:
            assert_close_or_no_worse(value, same_precision[name], ref[name], dtype, name)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_split_matches_float64_torch(case, dtype, train, threads):
    _check_against_float64(case, dtype, train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if not c[1] and len(c[0]) > 2], ids=_case_id)
def test_whole_channel_tasks_match_float64_torch(case, dtype, train, threads, monkeypatch):
    """Contiguous inputs as if larger than the cache: whole channels per task where balanced."""
    monkeypatch.setenv("CUSTOM_BN_CPU_CACHE_BYTES", "0")
    _check_against_float64(case, dtype, train)


@pytest.mark.parametrize("case", [((64, 3, 16, 16), False), ((64, 3, 16, 16), True),
                                  ((4096, 3), False), ((8, 32, 40, 40), True),
                                  ((2, 1, 300, 300), False)], ids=_case_id)
def test_statistics_keep_float32_precision_at_large_means(case, threads):
    """Channel means of 1e6 with std 1 in float32: the statistics must not cancel."""
    shape, channels_last = case
    x = _make(shape, channels_last, torch.float32, mean_scale=0.0) * 0.5 + 1e6
    _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(x, None, None, None, None, True,
                                                              0.1, 1e-5)
    x64 = x.double()
    dims = [0] + list(range(2, x.dim()))
    ref_mean = x64.mean(dims)
    ref_invstd = 1 / torch.sqrt(x64.var(dims, unbiased=False) + 1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(invstd.double(), ref_invstd, rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape", [(1, 2, 8, 8), (3, 2, 100, 100), (64, 2)], ids=str)
def test_nan_reaches_the_statistics(shape, threads):
    """A NaN in a channel makes its variance, save_invstd and running_var NaN, as in torch."""
    x = torch.randn(shape)
    x[0, 1].view(-1)[0] = float("nan")
    rm, rv = torch.zeros(2), torch.ones(2)
    _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(x, None, None, rm, rv, True, 0.1,
                                                              1e-5)
    assert torch.isnan(invstd[1]) and torch.isnan(mean[1]) and torch.isnan(rv[1])
    assert torch.isfinite(invstd[0]) and torch.isfinite(rv[0])


def _strided(values, sentinel=123.0):
    """values as a stride-2 view whose neighbours hold `sentinel` (a wrong stride reads or
    overwrites them)."""
    storage = torch.full((values.numel(), 2), sentinel, dtype=values.dtype)
    storage[:, 0] = values
    return storage[:, 0], storage


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [((4, 5, 6, 7), False), ((4, 5, 6, 7), True), ((64, 5), False)],
                         ids=_case_id)
def test_strided_per_channel_tensors(case, dtype, train):
    """weight, bias, running_mean and running_var as stride-2 views: results equal torch's in
    float64 (computed from dense copies: torch 2.14's own CPU backward mis-reads a strided weight
    for (N, C) input), and the storage between the views' elements is never touched."""
    shape, channels_last = case
    x = _make(shape, channels_last, dtype)
    dy = _make(shape, channels_last, dtype)
    params = _params(shape[1], dtype)
    views, storages = zip(*(_strided(params[k].clone()) for k in
                            ("weight", "bias", "running_mean", "running_var")))
    w, b, rm, rv = views
    assert w.stride() == (2,)
    ours = _run(custom_bn.functional.batch_norm, x, dy, train, copy_params=False, weight=w,
                bias=b, running_mean=rm, running_var=rv)
    for storage in storages:
        assert torch.all(storage[:, 1] == 123.0), "a neighbour of a strided view changed"
    with single_threaded():
        ref = _run(F.batch_norm, x.double(), dy.double(), train,
                   **{k: v.double() for k, v in params.items()})
        same_precision = _run(F.batch_norm, x, dy, train, **params)
    for name, value in ours.items():
        if dtype in (torch.float64, torch.float32):
            assert_close(value, ref[name], dtype, name)
        else:
            assert_close_or_no_worse(value, same_precision[name], ref[name], dtype, name)
