"""custom_bn.batch_norm_forward / backward against torch's batch norm, case by case.

Every input layout in bn_testing.LAYOUTS (awkward sizes, contiguous, channels-last, sliced and
transposed) is run in every dtype, training and eval, with and without affine parameters and
running statistics; outputs, saved statistics, running statistics, the three gradients and the
output memory format are compared.
"""

from typing import Optional

import pytest
import torch
import torch.nn.functional as TF

import custom_bn
from bn_testing import (
    DEVICES,
    LAYOUTS,
    Layout,
    assert_close,
    assert_close_or_no_worse,
    channel_params,
    clone_optional,
    grads,
    leaf,
    reduce_dims,
    single_threaded,
)

EPS = 1e-5

# (input dtype, parameter/statistics dtype): reduced precision inputs also take float32 params.
DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = [f"{str(a)[6:]}-params_{str(b)[6:]}" for a, b in DTYPES]

# training: running stats absent, or updated with momentum 0.1 / 1.0; eval needs running stats.
MODES = [
    pytest.param(True, None, id="train-nostats"),
    pytest.param(True, 0.1, id="train-momentum0.1"),
    pytest.param(True, 1.0, id="train-momentum1.0"),
    pytest.param(False, 0.1, id="eval"),
]


def _reference_stats(x: torch.Tensor):
    """float64 batch mean and invstd of the (already rounded) input."""
    xd = x.detach().double()
    dims = reduce_dims(x)
    mean = xd.mean(dims)
    var = xd.var(dims, correction=0)
    return mean, (var + EPS).rsqrt()


def _float64_reference(x, weight, bias, stats, training, momentum, grad_out):
    """torch's batch norm in float64 on the same (rounded) values: output, stats, gradients."""
    up = lambda t: None if t is None else t.detach().double()  # noqa: E731
    inputs = {"input": leaf(up(x)), "weight": leaf(up(weight)), "bias": leaf(up(bias))}
    stats64 = [up(s) for s in stats]
    out = TF.batch_norm(
        inputs["input"], *stats64, inputs["weight"], inputs["bias"], training, momentum, EPS
    )
    return out, stats64, grads(out, inputs, grad_out.double())


def _check_case(
    layout: Layout,
    dtype: torch.dtype,
    param_dtype: torch.dtype,
    training: bool,
    momentum: Optional[float],
    affine: bool,
    device: str,
) -> None:
    x = leaf(layout.make(dtype, device))
    channels = x.shape[1]
    with_stats = momentum is not None
    params = channel_params(channels, param_dtype, device, affine=affine, stats=with_stats)
    weight, bias = leaf(params["weight"]), leaf(params["bias"])
    ours_stats = [clone_optional(params["running_mean"]), clone_optional(params["running_var"])]
    ref_stats = [clone_optional(params["running_mean"]), clone_optional(params["running_var"])]
    mom = 0.1 if momentum is None else momentum
    reduced = dtype in (torch.float16, torch.bfloat16)
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(dtype=dtype, device=device)
    if reduced:
        with single_threaded():
            ref64_out, ref64_stats, ref64_grads = _float64_reference(
                x,
                weight,
                bias,
                [params["running_mean"], params["running_var"]],
                training,
                mom,
                grad_out,
            )
    else:  # torch's own result is the reference
        ref64_out = ref64_stats = ref64_grads = None

    out, save_mean, save_invstd = torch.ops.custom_bn.batch_norm_forward(
        x, weight, bias, ours_stats[0], ours_stats[1], training, mom, EPS
    )
    with single_threaded():
        expected = TF.batch_norm(x, ref_stats[0], ref_stats[1], weight, bias, training, mom, EPS)

    # output: values, dtype, layout
    assert out.dtype == dtype and out.device == x.device
    assert_close_or_no_worse(out, expected, ref64_out, dtype, "output")
    assert out.stride() == expected.stride(), (
        f"output strides {out.stride()} for input {x.stride()}, torch's {expected.stride()}"
    )
    if layout.kind == "channels_last" and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert out.is_contiguous(memory_format=fmt)

    # saved statistics (float32 for reduced precision inputs)
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert save_mean.dtype == acc and save_invstd.dtype == acc
    assert save_mean.shape == (channels,) and save_invstd.shape == (channels,)
    if training:
        ref_mean, ref_invstd = _reference_stats(x)
        assert_close(save_mean, ref_mean, acc, "save_mean vs float64")
        assert_close(save_invstd, ref_invstd, acc, "save_invstd vs float64")
        with single_threaded():
            _, nat_mean, nat_invstd = torch.native_batch_norm(
                x.detach(), None, None, None, None, True, mom, EPS
            )
        assert_close(save_mean, nat_mean, nat_mean.dtype, "save_mean vs native_batch_norm")
        assert_close(save_invstd, nat_invstd, nat_invstd.dtype, "save_invstd vs native_batch_norm")
    else:
        assert_close(save_mean, params["running_mean"].double(), acc, "save_mean (eval)")
        ref_invstd = (params["running_var"].double() + EPS).rsqrt()
        assert_close(save_invstd, ref_invstd, acc, "save_invstd (eval)")

    # running statistics: updated in place in training, untouched in eval
    if with_stats:
        for i, name in enumerate(("running_mean", "running_var")):
            ours, ref = ours_stats[i], ref_stats[i]
            assert ours.dtype == param_dtype
            ref64 = ref64_stats[i] if reduced else None
            assert_close_or_no_worse(ours, ref, ref64, param_dtype, name)
            if not training:
                assert torch.equal(ours, params[name]), f"{name} changed in eval mode"

    # gradients of input, weight, bias
    inputs = {"input": x, "weight": weight, "bias": bias}
    got = grads(out, inputs, grad_out)
    with single_threaded():
        want = grads(expected, inputs, grad_out)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == want[name].dtype, f"grad {name} dtype"
        ref64 = ref64_grads[name] if reduced else None
        assert_close_or_no_worse(got[name], want[name], ref64, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training,momentum", MODES)
@pytest.mark.parametrize("dtype,param_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.id for layout in LAYOUTS])
def test_matches_torch(layout, dtype, param_dtype, training, momentum, affine, device):
    _check_case(layout, dtype, param_dtype, training, momentum, affine, device)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_without_bias_and_bias_without_weight(device):
    x = torch.randn(6, 4, 5, device=device, requires_grad=True)
    w = torch.rand(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    for weight, bias in ((w, None), (None, b)):
        out = custom_bn.functional.batch_norm(x, None, None, weight, bias, training=True)
        g = torch.randn_like(out)
        inputs = {"input": x, "weight": weight, "bias": bias}
        with single_threaded():
            ref = TF.batch_norm(x, None, None, weight, bias, training=True)
            want = grads(ref, inputs, g)
        assert_close(out, ref, torch.float32, "output")
        got = grads(out, inputs, g)
        for name in want:
            assert_close(got[name], want[name], torch.float32, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_functional_is_drop_in(device):
    """Positional and keyword use exactly as torch.nn.functional.batch_norm."""
    x = torch.randn(8, 3, 4, 4, device=device)
    stats = [torch.zeros(3, device=device), torch.ones(3, device=device)]
    ref_stats = [s.clone() for s in stats]
    w, b = torch.rand(3, device=device), torch.randn(3, device=device)
    out = custom_bn.functional.batch_norm(x, *stats, w, b, True, 0.3, 1e-3)
    with single_threaded():
        ref = TF.batch_norm(x, *ref_stats, w, b, True, 0.3, 1e-3)
    assert_close(out, ref, torch.float32, "output")
    for s, r in zip(stats, ref_stats):
        assert_close(s, r, torch.float32, "running stat")
    out = custom_bn.functional.batch_norm(x, *stats, weight=w, bias=b, eps=1e-3)  # eval default
    with single_threaded():
        ref = TF.batch_norm(x, *ref_stats, weight=w, bias=b, eps=1e-3)
    assert_close(out, ref, torch.float32, "eval output")


def test_large_mean_does_not_cancel():
    """Statistics of data far from zero stay accurate (no E[x^2] - E[x]^2)."""
    x = torch.randn(16, 4, 32, dtype=torch.float64) + 1e4
    for dtype in (torch.float32, torch.float64):
        xs = x.to(dtype)
        _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(
            xs, None, None, None, None, True, 0.1, EPS
        )
        ref_mean, ref_invstd = _reference_stats(xs)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            invstd.double(), ref_invstd, rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=0
        )


# Sizes large enough for the kernels to split channels/rows across threads and vector lanes.
BIG_LAYOUTS = [
    Layout((256, 33), "contiguous"),
    Layout((16, 20, 300), "contiguous"),
    Layout((16, 40, 9, 11), "contiguous"),
    Layout((16, 40, 9, 11), "channels_last"),
    Layout((4, 24, 5, 6, 7), "contiguous"),
    Layout((4, 24, 5, 6, 7), "channels_last"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "dtype,param_dtype", [DTYPES[1], DTYPES[5]], ids=[DTYPE_IDS[1], DTYPE_IDS[5]]
)
@pytest.mark.parametrize("layout", BIG_LAYOUTS, ids=[layout.id for layout in BIG_LAYOUTS])
def test_matches_torch_large(layout, dtype, param_dtype, training, device):
    _check_case(layout, dtype, param_dtype, training, 0.1, True, device)
