"""Extreme inputs against torch: large channel means, constant channels, NaN and Inf, float16
near its largest value, denormals; in every layout (contiguous, channels-last, (N, C), 3-D,
5-D channels-last) and with channels long enough to be split into several chunks and pieces.

The float64 oracle is torch's F.batch_norm on the same (already rounded) input in float64, so
each bound below is the error of custom_bn's arithmetic alone.
"""

from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as torch_F

import custom_bn.functional as F
from bn_testing import assert_matches_oracle

LAYOUTS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda x: x.contiguous(),
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "NC": lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]),
    "NCL": lambda x: x.flatten(2),
    "channels_last_3d": lambda x: x.unsqueeze(2).contiguous(memory_format=torch.channels_last_3d),
}


def _forward(x: torch.Tensor, pdtype: torch.dtype):
    """custom_bn's and torch's training forward on copies of the same running stats; returns
    (ours, torch's) as (output, save_mean, save_invstd, running_mean, running_var); torch's
    saved statistics come from its float64 counterpart."""
    C = x.shape[1]
    results = []
    for fn in (F.batch_norm, torch_F.batch_norm):
        rm, rv = torch.zeros(C, dtype=pdtype), torch.ones(C, dtype=pdtype)
        y = fn(x, rm, rv, None, None, True, 0.5, 1e-5)
        results.append([y, rm, rv])
    _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    return results[0] + [mean, invstd], results[1]


def _oracle(x: torch.Tensor):
    C = x.shape[1]
    x64 = x.double()
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y = torch_F.batch_norm(x64, rm, rv, None, None, True, 0.5, 1e-5)
    flat = x64.transpose(0, 1).reshape(C, -1)
    mean = flat.mean(1)
    invstd = (flat.var(1, unbiased=False) + 1e-5).rsqrt()
    return y, rm, rv, mean, invstd


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected) / expected.abs()).abs().max().item()


# Bounds on float32 statistics at channel means 1e6 and 1e8 (unit spread): measured errors are
# ~3e-8 (mean) and ~5e-8 / 1.5e-7 (invstd at 1e6 / 1e8), the same in every layout. torch's own
# channels-last and (N, C) float32 paths miss the running variance by a factor of 200 at 1e6.
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mean", [1e6, 1e8])
def test_large_channel_means(layout: str, mean: float) -> None:
    base = torch.randn(64, 3, 16, 16, dtype=torch.float64) + mean * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1)
    x = LAYOUTS[layout](base).float()
    (y, rm, rv, save_mean, save_invstd), (y_torch, _, _) = _forward(x, torch.float32)
    y64, rm64, rv64, mean64, invstd64 = _oracle(x)
    assert _relative(save_mean, mean64) < 1e-7
    assert _relative(save_invstd, invstd64) < 5e-7
    assert _relative(rm, rm64) < 1e-7
    assert _relative(rv, rv64) < 5e-7
    # The output y = x*alpha + beta (one fused multiply-add) inherits the rounding of
    # beta ~ -mean*invstd: ulp(mean) per unit of invstd. torch's contiguous path folds the same
    # way; custom_bn's error is at most twice that in any layout.
    _, (y_contiguous, _, _) = _forward(base.float(), torch.float32)
    torch_error = (y_contiguous.double() - torch_F.batch_norm(base.float().double(), None, None, training=True)).abs().max().item()
    ours = (y.double() - y64).abs().max().item()
    assert ours <= 2 * torch_error, f"output error {ours:.3g}, torch's contiguous {torch_error:.3g}"


def _special_cases() -> List[Tuple[str, torch.Tensor]]:
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    x[:, 1] = 3.0  # a constant channel: variance 0
    cases = [("constant", x)]
    for name, marks in [("nan", [float("nan")]), ("inf", [float("inf")]), ("-inf", [float("-inf")]),
                        ("inf and -inf", [float("inf"), float("-inf")])]:
        y = x.clone()
        for i, v in enumerate(marks):
            y[1 + i, 0, 2, i] = v  # channel 0 only
        cases.append((name, y))
    # a channel of several chunks (H*W > 4096) and threads' pieces, Inf in a late chunk
    long = torch.randn(2, 2, 96, 96, dtype=torch.float64)
    long[1, 1, 90, 3] = float("inf")
    cases.append(("inf in a late chunk", long))
    return cases


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,values", _special_cases(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_inf_and_constant_channels_propagate_as_in_torch(layout, name, values, dtype) -> None:
    """Statistics of the channel holding NaN/Inf become NaN (the mean Inf for a lone Inf), as in
    torch; every other channel, its output, running stats and gradients stay exact."""
    x = LAYOUTS[layout](values).to(dtype)
    x_leaf = x.detach().requires_grad_()
    x64 = x.double().requires_grad_()
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    rm64, rv64 = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    w = torch.rand(C, dtype=dtype) + 0.5
    b = torch.randn(C, dtype=dtype)
    y = F.batch_norm(x_leaf, rm, rv, w, b, True, 0.5, 1e-5)
    y_torch = torch_F.batch_norm(x, None, None, w, b, True, 0.5, 1e-5)
    y64 = torch_F.batch_norm(x64, rm64, rv64, w.double(), b.double(), True, 0.5, 1e-5)
    _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    _, mean64, invstd64, _ = torch.ops.aten._batch_norm_with_update(
        x.double(), w.double(), b.double(), torch.zeros(C, dtype=torch.float64),
        torch.ones(C, dtype=torch.float64), 0.1, 1e-5)
    dy = torch.randn(x.shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x_leaf, dy.to(dtype))
    (dx64,) = torch.autograd.grad(y64, x64, dy)
    assert_matches_oracle(y, y64, y_torch, dtype, "output")
    for what, ours, oracle in [("save_mean", mean, mean64), ("save_invstd", invstd, invstd64),
                               ("running_mean", rm, rm64), ("running_var", rv, rv64),
                               ("grad_input", dx, dx64)]:
        assert_matches_oracle(ours, oracle, None, dtype, what)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_near_the_largest_float16(layout: str, dtype: torch.dtype) -> None:
    """float16 values up to 65504 (a sum in float16 would overflow; the statistics accumulate
    in float32), and a spread of +-60000: outputs, statistics and gradients as torch."""
    base = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    for values in (60000 + 2000 * base, 20000 * base):
        x = LAYOUTS[layout](values.clamp(-65504, 65504)).to(dtype)
        (y, rm, rv, save_mean, save_invstd), (y_torch, rm_torch, rv_torch) = _forward(x, torch.float32)
        y64, rm64, rv64, mean64, invstd64 = _oracle(x)
        assert y.isfinite().all() and save_invstd.isfinite().all()
        assert_matches_oracle(y, y64, y_torch, dtype, "output")
        for what, ours, oracle in [("save_mean", save_mean, mean64), ("save_invstd", save_invstd, invstd64),
                                   ("running_mean", rm, rm64), ("running_var", rv, rv64)]:
            assert_matches_oracle(ours, oracle, None, torch.float32, what)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-40), (torch.float64, 1e-310)])
def test_denormal_inputs(layout: str, dtype: torch.dtype, scale: float) -> None:
    """Subnormal values: the variance underflows to 0 and eps dominates, as in torch."""
    x = LAYOUTS[layout](torch.randn(4, 3, 5, 5, dtype=torch.float64) * scale).to(dtype)
    assert (x != 0).any() and (x.abs() < torch.finfo(dtype).tiny).all()
    (y, rm, rv, save_mean, save_invstd), _ = _forward(x, dtype)
    y64, rm64, rv64, mean64, invstd64 = _oracle(x)
    for what, ours, oracle in [("output", y, y64), ("save_mean", save_mean, mean64),
                               ("save_invstd", save_invstd, invstd64), ("running_mean", rm, rm64),
                               ("running_var", rv, rv64)]:
        assert_matches_oracle(ours, oracle, None, dtype, what)
