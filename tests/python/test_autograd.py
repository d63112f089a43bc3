"""gradcheck and gradgradcheck of custom_bn's batch norm in float64 (input, weight, bias)."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import custom_bn
from bn_testing import DEVICES, Layout, leaf

LAYOUTS = [
    Layout((4, 3), "contiguous"),
    Layout((3, 2, 4), "contiguous"),
    Layout((2, 3, 3, 2), "contiguous"),
    Layout((2, 3, 3, 2), "channels_last"),
    Layout((2, 3, 2, 2, 2), "channels_last"),
    Layout((3, 2, 2, 3), "sliced"),
]
LAYOUT_IDS = [layout.id for layout in LAYOUTS]


def _inputs(layout: Layout, device: str, affine: bool):
    x = leaf(layout.make(torch.float64, device))
    channels = x.shape[1]
    opts = {"dtype": torch.float64, "device": device}
    w = leaf(torch.rand(channels, **opts) + 0.5) if affine else None
    b = leaf(torch.randn(channels, **opts)) if affine else None
    stats = (torch.randn(channels, **opts) * 0.1, torch.rand(channels, **opts) + 0.5)
    return x, w, b, stats


def _fn(training: bool, stats, affine: bool):
    # eval mode normalizes with (constant) running stats; training uses and updates copies
    def bn(x, w=None, b=None):
        rm, rv = stats[0].clone(), stats[1].clone()
        return custom_bn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)

    return bn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_gradcheck(layout, training, affine, device):
    x, w, b, stats = _inputs(layout, device, affine)
    args = (x, w, b) if affine else (x,)
    assert gradcheck(_fn(training, stats, affine), args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "layout",
    [LAYOUTS[1], LAYOUTS[3], LAYOUTS[4]],
    ids=[LAYOUT_IDS[1], LAYOUT_IDS[3], LAYOUT_IDS[4]],
)
def test_gradgradcheck(layout, training, device):
    x, w, b, stats = _inputs(layout, device, True)
    assert gradgradcheck(_fn(training, stats, True), (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_only_some_inputs_require_grad(device):
    """The output mask follows requires_grad: each subset of (input, weight, bias)."""
    x, w, b, stats = _inputs(Layout((3, 2, 4), "contiguous"), device, True)
    for needs in [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (False, True, True),
    ]:
        xs, ws, bs = (t.detach().requires_grad_(n) for t, n in zip((x, w, b), needs))
        assert gradcheck(_fn(True, stats, True), (xs, ws, bs), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_only_and_bias_only_gradients(device):
    x, w, b, stats = _inputs(Layout((3, 2, 4), "contiguous"), device, True)
    for training in (True, False):
        bn = _fn(training, stats, True)
        assert gradcheck(lambda x, w: bn(x, w, None), (x, w), eps=1e-6, atol=1e-6, rtol=1e-5)
        assert gradcheck(lambda x, b: bn(x, None, b), (x, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_op_masks_and_layout():
    """batch_norm_backward returns [0]-shaped tensors for masked gradients and keeps layout."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(
        x, w, None, None, None, True, 0.1, 1e-5
    )
    dy = torch.randn_like(x)
    full = torch.ops.custom_bn.batch_norm_backward(
        dy, x, w, mean, invstd, True, 1e-5, [True, True, True]
    )
    assert full[0].is_contiguous(memory_format=torch.channels_last)
    assert [tuple(g.shape) for g in full] == [tuple(x.shape), (3,), (3,)]
    for mask in (
        [False, True, True],
        [True, False, False],
        [False, False, True],
        [False, False, False],
    ):
        part = torch.ops.custom_bn.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5, mask)
        for wanted, got, ref in zip(mask, part, full):
            if wanted:
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
            else:
                assert got.shape == (0,)


def _first_and_second_order(bn, x, w, b, dy, v):
    """First-order gradients of bn's output (cotangent dy) with create_graph=True, then the
    gradients of sum(first * v) with respect to input, weight, bias and dy: second order."""
    leaves = [t for t in (x, w, b) if t is not None]
    first = torch.autograd.grad(bn(x, w, b), leaves, dy, create_graph=True)
    total = sum((g * vi).sum() for g, vi in zip(first, v))
    second = torch.autograd.grad(total, leaves + [dy], allow_unused=True)
    return first, second


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_first_and_second_order_gradients_equal_torch(layout, training, affine, device):
    """The values, not only their consistency: the differentiable backward used under
    create_graph=True against torch.nn.functional.batch_norm, both in float64."""
    x, w, b, stats = _inputs(layout, device, affine)
    dy = leaf(torch.randn_like(x))
    v = [torch.randn_like(t) for t in (x, w, b) if t is not None]

    def torch_bn(x, w=None, b=None):
        rm, rv = stats[0].clone(), stats[1].clone()
        return torch.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)

    ours = _first_and_second_order(_fn(training, stats, affine), x, w, b, dy, v)
    ref = _first_and_second_order(torch_bn, x, w, b, dy, v)
    names = ["input", "weight", "bias"][: len(v)]
    for order, (got_all, want_all, labels) in enumerate(
        [(ours[0], ref[0], names), (ours[1], ref[1], names + ["grad_output"])], start=1
    ):
        for got, want, name in zip(got_all, want_all, labels):
            what = f"order {order}, d/d{name}"
            if want is None:  # torch's graph does not depend on it: ours must be zero or absent
                assert got is None or torch.count_nonzero(got) == 0, what
                continue
            assert got is not None, what
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")
