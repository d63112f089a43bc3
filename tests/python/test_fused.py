"""The fused epilogue act(BN(x) + residual) against the torch.nn composition.

Every activation x residual on/off x layout (contiguous, channels-last, (N, C), (N, C, L),
channels-last 3d) x dtype x train/eval: output, its strides, running statistics and the
gradients of input, weight, bias and residual. First and second derivatives are compared with
the torch.nn composition under create_graph=True, and gradcheck/gradgradcheck run in float64.
"""

from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as TF

import custom_bn
from bn_testing import (
    DEVICES,
    Layout,
    assert_close,
    assert_close_or_no_worse,
    channel_params,
    clone_optional,
    leaf,
    single_threaded,
)

EPS = 1e-5

# (activation, activation_param as passed, the parameter torch's function gets)
ACTIVATIONS = [
    ("identity", None, None),
    ("relu", None, None),
    ("leaky_relu", None, 0.01),
    ("leaky_relu", 0.2, 0.2),
    ("leaky_relu", -0.5, -0.5),
    ("elu", None, 1.0),
    ("elu", 0.7, 0.7),
    ("silu", None, None),
]
ACT_IDS = [a if p is None else f"{a}{p}" for a, p, _ in ACTIVATIONS]

LAYOUTS = [
    Layout((4, 17, 5, 3), "contiguous"),
    Layout((4, 17, 5, 3), "channels_last"),
    Layout((64, 17), "contiguous"),
    Layout((3, 17, 7), "contiguous"),
    Layout((2, 3, 2, 3, 4), "channels_last"),
    Layout((4, 3, 6, 5), "sliced"),
]

DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
DTYPE_IDS = [f"{str(a)[6:]}-params_{str(b)[6:]}" for a, b in DTYPES]


def torch_activation(z: torch.Tensor, activation: str, param: Optional[float]) -> torch.Tensor:
    if activation == "relu":
        return TF.relu(z)
    if activation == "leaky_relu":
        return TF.leaky_relu(z, param)
    if activation == "elu":
        return TF.elu(z, param)
    if activation == "silu":
        return TF.silu(z)
    return z


def torch_composition(x, stats, weight, bias, residual, training, activation, param):
    """F.<activation>(F.batch_norm(...) + residual): what the fused op must equal."""
    z = TF.batch_norm(x, stats[0], stats[1], weight, bias, training, 0.1, EPS)
    if residual is not None:
        z = z + residual
    return torch_activation(z, activation, param)


def _grads(out, inputs: Dict[str, Optional[torch.Tensor]], grad_out, **kw):
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    got = torch.autograd.grad(out, [inputs[k] for k in names], grad_out, **kw)
    return dict(zip(names, got))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.id for lay in LAYOUTS])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_fused_equals_torch_composition(act, with_residual, layout, dtypes, training, device):
    activation, given_param, torch_param = act
    dtype, param_dtype = dtypes
    x = leaf(layout.make(dtype, device))
    params = channel_params(x.shape[1], param_dtype, device)
    weight, bias = leaf(params["weight"]), leaf(params["bias"])
    residual = leaf(Layout(layout.shape, "contiguous").make(dtype, device)) if with_residual else None
    ours_stats = [clone_optional(params["running_mean"]), clone_optional(params["running_var"])]
    ref_stats = [clone_optional(params["running_mean"]), clone_optional(params["running_var"])]
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(dtype=dtype, device=device)

    out = custom_bn.functional.batch_norm(
        x, ours_stats[0], ours_stats[1], weight, bias, training, 0.1, EPS,
        activation=activation, activation_param=given_param, residual=residual,
    )
    inputs = {"input": x, "weight": weight, "bias": bias, "residual": residual}
    with single_threaded():
        expected = torch_composition(
            x, ref_stats, weight, bias, residual, training, activation, torch_param
        )
        want = _grads(expected, inputs, grad_out)
        # float64 oracle on the same rounded values, for float16/bfloat16
        up = {k: None if v is None else leaf(v.detach().double()) for k, v in inputs.items()}
        stats64 = [s.detach().double() for s in (params["running_mean"], params["running_var"])]
        ref64 = torch_composition(
            up["input"], stats64, up["weight"], up["bias"], up["residual"], training,
            activation, torch_param,
        )
        ref64_grads = _grads(ref64, up, grad_out.double())

    assert out.dtype == dtype and out.stride() == expected.stride()
    assert_close_or_no_worse(out, expected, ref64, dtype, "output")
    for i, name in enumerate(("running_mean", "running_var")):
        assert_close_or_no_worse(ours_stats[i], ref_stats[i], stats64[i], param_dtype, name)
    got = _grads(out, inputs, grad_out)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == want[name].dtype, f"grad {name} dtype"
        assert got[name].stride() == want[name].stride() or name != "input", f"grad {name} strides"
        assert_close_or_no_worse(got[name], want[name], ref64_grads[name], dtype, f"grad {name}")


def _float64_case(activation, with_residual, training, affine, shape=(3, 4, 3)):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).requires_grad_()
    params = channel_params(shape[1], torch.float64, affine=affine)
    weight, bias = leaf(params["weight"]), leaf(params["bias"])
    residual = leaf(torch.randn(shape, dtype=torch.float64)) if with_residual else None
    return x, weight, bias, residual, params


GRAD_ACTS = [a for a in ACTIVATIONS if a[0] != "relu"] + [("relu", None, None)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "residual"])
@pytest.mark.parametrize("act", GRAD_ACTS, ids=[a if p is None else f"{a}{p}" for a, p, _ in GRAD_ACTS])
def test_gradcheck_and_gradgradcheck(act, with_residual, training, affine):
    activation, param, _ = act
    x, weight, bias, residual, params = _float64_case(activation, with_residual, training, affine)
    rm, rv = params["running_mean"], params["running_var"]
    leaves = [t for t in (x, weight, bias, residual) if t is not None]

    def f(*tensors):
        named = dict(zip([n for n, t in zip("xwbr", (x, weight, bias, residual)) if t is not None], tensors))
        return custom_bn.functional.batch_norm(
            named["x"], rm.clone(), rv.clone(), named.get("w"), named.get("b"), training,
            0.1, EPS, activation=activation, activation_param=param, residual=named.get("r"),
        )

    # relu/leaky_relu kinks: the random values sit far from them at gradcheck's step size.
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_first_and_second_order_equal_torch(act, with_residual, training, affine, device):
    """Values, not only consistency: the gradients with create_graph=True and the gradient of
    <grads, v> equal those of the torch.nn composition, for every input."""
    activation, given_param, torch_param = act
    x, weight, bias, residual, params = _float64_case(
        activation, with_residual, training, affine, shape=(4, 3, 5, 2)
    )
    inputs = {"input": x, "weight": weight, "bias": bias, "residual": residual}
    inputs = {k: None if v is None else leaf(v.to(device)) for k, v in inputs.items()}
    stats = [params["running_mean"].to(device), params["running_var"].to(device)]
    grad_out = torch.randn(x.shape, dtype=torch.float64, device=device).requires_grad_()

    def second_order(fn):
        out = fn()
        first = _grads(out, inputs, grad_out, create_graph=True)
        vs = {k: torch.randn_like(g, generator=torch.Generator(device).manual_seed(i))
              for i, (k, g) in enumerate(first.items())}
        total = sum((first[k] * vs[k]).sum() for k in first)
        targets = dict(inputs, grad_output=grad_out)
        second = _grads(total, targets, None, allow_unused=True)
        return first, second

    ours = second_order(lambda: custom_bn.functional.batch_norm(
        inputs["input"], stats[0].clone(), stats[1].clone(), inputs["weight"], inputs["bias"],
        training, 0.1, EPS, activation=activation, activation_param=given_param,
        residual=inputs["residual"],
    ))
    theirs = second_order(lambda: torch_composition(
        inputs["input"], [s.clone() for s in stats], inputs["weight"], inputs["bias"],
        inputs["residual"], training, activation, torch_param,
    ))
    for order, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a.keys() == b.keys()
        for name in a:
            # unused (None) and zero are the same derivative
            mine, want = a[name], b[name]
            if mine is None or want is None:
                other = want if mine is None else mine
                assert other is None or other.abs().max() == 0, f"order {order} d/d{name}"
                continue
            assert_close(mine, want, torch.float64, f"order {order} d/d{name}")


def test_backward_operator_masks_layout_and_identity_residual():
    """batch_norm_act_backward: masked-out gradients are empty, gradients keep input's memory
    format, and with the identity grad_residual is grad_output."""
    op = torch.ops.custom_bn.batch_norm_act_backward
    x = torch.randn(3, 4, 5, 5).to(memory_format=torch.channels_last)
    r = torch.randn(3, 4, 5, 5)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    _, mean, invstd = torch.ops.custom_bn.batch_norm_act_forward(
        x, w, b, None, None, r, True, 0.1, EPS, "relu", 0.0
    )
    dy = torch.randn_like(x)
    full = op(dy, x, w, b, r, mean, invstd, True, EPS, "relu", 0.0, [True] * 4)
    for i in range(4):
        mask = [j == i for j in range(4)]
        part = op(dy, x, w, b, r, mean, invstd, True, EPS, "relu", 0.0, mask)
        for j in range(4):
            if j == i:
                torch.testing.assert_close(part[j], full[j], rtol=0, atol=0)
            else:
                assert part[j].shape == (0,)
    assert full[0].is_contiguous(memory_format=torch.channels_last)
    assert full[3].is_contiguous(memory_format=torch.channels_last)
    ident = op(dy, x, w, b, r, mean, invstd, True, EPS, "identity", 0.0, [False] * 3 + [True])
    torch.testing.assert_close(ident[3], dy, rtol=0, atol=0)


def test_module_state_dict_and_forward_match_torch_modules():
    torch_bn = torch.nn.BatchNorm2d(6)
    torch_bn.weight.data.uniform_(0.5, 1.5)
    torch_bn.bias.data.normal_()
    fused = custom_bn.BatchNormAct2d(6, activation="elu", activation_param=0.5)
    fused.load_state_dict(torch_bn.state_dict())
    assert isinstance(fused, torch.nn.BatchNorm2d)
    assert fused.state_dict().keys() == torch_bn.state_dict().keys()
    assert "activation='elu', activation_param=0.5" in repr(fused)
    assert repr(fused).startswith("custom_bn.BatchNormAct2d(6")
    x, r = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    for _ in range(2):
        assert_close(fused(x, r), TF.elu(torch_bn(x) + r, 0.5), torch.float32, "train output")
    for name, buf in torch_bn.named_buffers():
        assert torch.equal(getattr(fused, name), buf) or name != "num_batches_tracked"
        assert_close(getattr(fused, name).double(), buf.double(), torch.float32, name)
    fused.eval(), torch_bn.eval()
    assert_close(fused(x), TF.elu(torch_bn(x), 0.5), torch.float32, "eval output")
    torch_bn.load_state_dict(fused.state_dict())  # and back


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (custom_bn.BatchNormAct1d, torch.nn.BatchNorm1d, (8, 5)),
    (custom_bn.BatchNormAct1d, torch.nn.BatchNorm1d, (8, 5, 3)),
    (custom_bn.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 5, 2, 3, 2)),
])
def test_module_ranks(cls, torch_cls, shape):
    m = cls(5, activation="silu", momentum=None)
    ref = torch_cls(5, momentum=None)
    x, r = torch.randn(shape), torch.randn(shape)
    for _ in range(3):
        assert_close(m(x, r), TF.silu(ref(x) + r), torch.float32, "output")
    assert_close(m.running_var, ref.running_var, torch.float32, "running_var")
    assert m.num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match="expected 2D or 3D|expected 5D"):
        m(torch.randn(2, 5, 2, 2, 2, 2))


def test_arguments_rejected_with_clear_errors_and_stats_untouched():
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    call = custom_bn.functional.batch_norm
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh'"):
        call(x, rm, rv, training=True, activation="tanh")
    with pytest.raises(ValueError, match="activation 'relu' takes none, got 0.2"):
        call(x, rm, rv, training=True, activation="relu", activation_param=0.2)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.custom_bn.batch_norm_act_forward(x, None, None, rm, rv, None, True, 0.1, EPS, "gelu", 0.0)
    with pytest.raises(RuntimeError, match=r"residual must have input's shape \[4, 3, 5\], got \[4, 3, 1\]"):
        call(x, rm, rv, training=True, activation="relu", residual=torch.randn(4, 3, 1))
    with pytest.raises(RuntimeError, match="residual must have input's dtype"):
        torch.ops.custom_bn.batch_norm_act_forward(
            x, None, None, rm, rv, x.double(), True, 0.1, EPS, "relu", 0.0)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(ValueError, match="activation must be one of"):
        custom_bn.BatchNormAct2d(3, activation="gelu")
    with pytest.raises(ValueError, match="takes none"):
        custom_bn.BatchNormAct2d(3, activation="silu", activation_param=1.0)


def test_residual_of_another_dtype_promotes_as_torch():
    x = torch.randn(4, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 3, 5, requires_grad=True)
    out = custom_bn.functional.batch_norm(x, None, None, training=True, activation="relu", residual=r)
    ref = TF.relu(TF.batch_norm(x, None, None, training=True) + r)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)
    grads = torch.autograd.grad(out.sum(), [x, r])
    want = torch.autograd.grad(ref.sum(), [x, r])
    for g, w in zip(grads, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=1.6e-2, atol=2e-2)


def test_residual_in_another_memory_format_and_empty_input():
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 3, 4, 4, requires_grad=True)  # contiguous
    out = custom_bn.functional.batch_norm(x, None, None, training=True, activation="relu", residual=r)
    ref = TF.relu(TF.batch_norm(x, None, None, training=True) + r)
    assert_close(out, ref, torch.float32, "output")
    assert out.is_contiguous(memory_format=torch.channels_last)
    gr, = torch.autograd.grad(out.sum(), [r])
    gr_ref, = torch.autograd.grad(ref.sum(), [r])
    assert_close(gr, gr_ref, torch.float32, "grad residual")
    empty = torch.randn(0, 3, 4, requires_grad=True)
    out = custom_bn.functional.batch_norm(
        empty, torch.zeros(3), torch.ones(3), training=False, activation="relu", residual=torch.randn(0, 3, 4)
    )
    assert out.shape == (0, 3, 4)
    out.sum().backward()
    assert empty.grad.shape == (0, 3, 4)
