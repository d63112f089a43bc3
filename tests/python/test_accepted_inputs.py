"""Inputs torch accepts, and regressions found by the property suite (test_properties.py), as
plain tests: each compares custom_bn with torch (float64) on one case."""

import pytest
import torch
import torch.nn.functional as torch_F

import custom_bn.functional as F


def _grads(fn, x, weight, bias, dy, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(leaves[0], None, None, leaves[1], leaves[2], **kwargs)
    return (y, *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("training", [True, False])
def test_empty_one_dimensional_input(training):
    """PyTorch's OpInfo sample: input (0,) with empty per-channel tensors (C = 0)."""
    x = torch.empty(0, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    w, b = torch.empty(0, dtype=torch.float64, requires_grad=True), torch.empty(0, dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, w, b, training=training)
    expected = torch_F.batch_norm(x, rm, rv, training=training)
    assert y.shape == expected.shape == (0,) and y.dtype == expected.dtype
    (gx, gw) = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == (0,) and gw.shape == (0,)


@pytest.mark.parametrize("shape", [(3, 1), (1, 3)])
def test_weight_and_bias_of_any_shape_with_c_elements(shape):
    """torch's forward accepts them (its backward fails); gradients keep the caller's shape."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    weight = torch.rand(shape, dtype=torch.float64) + 0.5
    bias = torch.randn(shape, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    y, gx, gw, gb = _grads(F.batch_norm, x, weight, bias, dy, training=True)
    y_t, gx_t, gw_t, gb_t = _grads(torch_F.batch_norm, x, weight.reshape(3), bias.reshape(3), dy,
                                   training=True)
    assert torch.allclose(y, torch_F.batch_norm(x, None, None, weight, bias, training=True), atol=1e-12)
    for ours, theirs in ((y, y_t), (gx, gx_t), (gw, gw_t), (gb, gb_t)):
        torch.testing.assert_close(ours.reshape(theirs.shape), theirs, rtol=1e-10, atol=1e-12)
    assert gw.shape == shape and gb.shape == shape


def test_zero_dimensional_weight_for_one_channel():
    x = torch.randn(6, 1, 4, dtype=torch.float64)
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    y = F.batch_norm(x, None, None, w, None, training=True)
    torch.testing.assert_close(y, torch_F.batch_norm(x, None, None, w.detach(), None, training=True))
    (gw,) = torch.autograd.grad(y.sum() + (y * y).sum(), w)
    assert gw.shape == ()


def _layouts_with_channels_last_strides():
    """Channels-last inputs as torch sees them: dense, sliced, and with arbitrary strides on
    size-1 dims (N = 1 or H = 1, where contiguous and channels-last strides both fit)."""
    dense = torch.randn(4, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    yield "sliced channels", dense[:, :3]
    yield "sliced rows", dense[:, :, 1:4]
    yield "N=1 odd strides", torch.empty_strided((1, 2, 1, 2), (4, 1, 1, 2), dtype=torch.float64).normal_()
    yield "H=1", torch.empty_strided((2, 2, 1, 2), (4, 1, 1, 2), dtype=torch.float64).normal_()
    yield "channels_last_3d sliced", torch.randn(2, 6, 3, 4, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last_3d)[:, ::2]


@pytest.mark.parametrize("name,x", list(_layouts_with_channels_last_strides()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_output_and_gradient_memory_format_as_torch(name, x):
    dy = torch.randn(x.shape, dtype=torch.float64)
    y, gx, _, _ = _grads(F.batch_norm, x, torch.ones(x.shape[1], dtype=torch.float64),
                         torch.zeros(x.shape[1], dtype=torch.float64), dy, training=True)
    y_t = torch_F.batch_norm(x, None, None, training=True)
    assert y.stride() == y_t.stride(), f"{name}: {y.stride()} vs torch's {y_t.stride()}"
    # Values against torch on a contiguous copy: torch 2.14.1's own CPU backward is wrong for
    # the odd-strided channels-last inputs above when dy is contiguous.
    x_dense = x.contiguous().requires_grad_()
    (gx_t,) = torch.autograd.grad(torch_F.batch_norm(x_dense, None, None, training=True), x_dense, dy)
    torch.testing.assert_close(y, y_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_bias_without_weight_gets_a_float32_gradient(dtype):
    """Found by the property suite: grad_bias was rounded to the input's dtype when no weight
    said that the parameters are float32."""
    x = torch.randn(64, 3, dtype=torch.float64).to(dtype)
    dy = torch.randn(64, 3, dtype=torch.float64).to(dtype)
    bias = torch.randn(3, requires_grad=True)
    (gb,) = torch.autograd.grad(F.batch_norm(x, None, None, None, bias, training=True), bias, dy)
    assert gb.dtype == torch.float32
    torch.testing.assert_close(gb.double(), dy.double().sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        # the element count is checked before the pairing of the running stats
        ({"running_mean": None, "running_var": torch.ones(4), "training": True}, RuntimeError),
        # (C, 1) running stats: the right count, so the pairing fails first, as in torch
        ({"running_mean": None, "running_var": torch.ones(3, 1), "training": True}, ValueError),
        ({"running_mean": None, "running_var": torch.ones(3), "training": False}, RuntimeError),
        ({"running_mean": None, "running_var": None, "weight": torch.ones(4), "training": False},
         RuntimeError),
        ({"running_mean": None, "running_var": None, "training": True, "eps": 0.0}, ValueError),
    ],
)
def test_calls_with_several_faults_raise_what_torch_raises(kwargs, error):
    x = torch.randn(4, 3)
    with pytest.raises(error):
        torch_F.batch_norm(x, **kwargs)
    with pytest.raises(error):
        F.batch_norm(x, **kwargs)


def test_channel_count_zero_is_accepted_with_empty_per_channel_tensors():
    """torch fails inside its kernel (IndexError from select) when C = 0 and a weight is given;
    without one it returns an empty output. custom_bn takes both."""
    x = torch.randn(2, 0, 3)
    for weight in (None, torch.empty(0)):
        y = F.batch_norm(x, torch.empty(0), torch.empty(0), weight, None, training=True)
        assert y.shape == x.shape
    assert torch_F.batch_norm(x, torch.empty(0), torch.empty(0), training=True).shape == x.shape


@pytest.mark.parametrize("shape", [(2, 0), (0, 0), (2, 0, 3)])
def test_channel_count_zero_in_evaluation(shape):
    """Found by the property suite: C = 0 in evaluation mode divided by zero in the CPU tiling
    (SIGFPE, the process died)."""
    x = torch.randn(shape, dtype=torch.float64)
    rm, rv = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, training=False)
    assert y.shape == torch_F.batch_norm(x, rm, rv, training=False).shape == x.shape


def test_empty_input_arguments_are_still_checked():
    """The deliberate difference: torch checks nothing when the input is empty."""
    x = torch.randn(0, 3)
    torch_F.batch_norm(x, None, None, torch.ones(4), training=True)  # torch: no error
    with pytest.raises(RuntimeError, match="weight must have shape"):
        F.batch_norm(x, None, None, torch.ones(4), training=True)
