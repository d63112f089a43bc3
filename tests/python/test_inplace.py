"""In-place activated BatchNorm (custom_bn.functional.batch_norm_act_, InPlaceBatchNormAct*).

The overwritten input must equal the torch.nn composition act(BN(x)), and the gradients computed
from that output alone (inverting the activation and the affine map) must equal torch.nn's,
computed from the kept input. Also: gradcheck, autograd's in-place bookkeeping (version
counter, leaves, views), the invertibility and zero-weight errors, the modules' state_dict
interop, and the saved-tensor memory of a conv -> BN -> activation stack.
"""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

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
from test_fused import DTYPE_IDS, DTYPES, EPS, LAYOUTS, torch_composition

# (activation, activation_param as passed, the parameter torch's function gets)
INVERTIBLE = [
    ("leaky_relu", None, 0.01),
    ("leaky_relu", 0.2, 0.2),
    ("elu", None, 1.0),
    ("elu", 0.5, 0.5),
    ("identity", None, None),
]
INV_IDS = [a if p is None else f"{a}{p}" for a, p, _ in INVERTIBLE]

def _overwritable_copy(x: torch.Tensor) -> torch.Tensor:
    """A non-leaf copy of ``x`` with x's strides (also non-dense ones) that autograd tracks back
    to ``x``: what the in-place op receives in a network (a conv's output)."""
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(x)


def _signed_weights(weight: torch.Tensor) -> torch.Tensor:
    """Half of the channels with a negative weight: the inverse map must handle the sign."""
    sign = torch.ones_like(weight)
    sign[::2] = -1
    return weight * sign


def _run_inplace(x, stats, weight, bias, training, activation, param):
    y = _overwritable_copy(x)
    returned = custom_bn.functional.batch_norm_act_(
        y, stats[0], stats[1], weight, bias, training, 0.1, EPS, activation, param
    )
    assert returned is y
    return y


def _inverse_activation(y: torch.Tensor, activation: str, param) -> torch.Tensor:
    """act^-1 with torch ops; elu's saturated outputs clamped as the kernels clamp them."""
    if activation == "leaky_relu":
        return torch.where(y > 0, y, y / param)
    if activation == "elu":
        floor = -1 + torch.finfo(torch.float32).eps
        return torch.where(y <= 0, torch.log1p((y / param).clamp(min=floor)), y)
    return y


def _inplace_backward_reference(out, dy, x, stats, weight, bias, training, activation, param):
    """The gradients that the (rounded) output determines, in float64: x_hat recovered as
    (act^-1(y) - b) / w, dz = dy * act'(z), then BatchNorm's backward with the forward's
    statistics. In float16/bfloat16 the stored output carries half an ulp of rounding that no
    backward can undo (and elu's saturated outputs none of their input), so this, not torch's
    gradient at the exact input, is what the kernels must reproduce."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    x64 = x.detach().double()
    if training:
        var, mean = torch.var_mean(x64, dims, unbiased=False)
    else:
        mean, var = stats[0].double(), stats[1].double()
    invstd = (var + EPS).rsqrt().view(shape)
    w, b = weight.detach().double().view(shape), bias.detach().double().view(shape)
    y = out.detach().double()
    z = _inverse_activation(y, activation, param)
    dz = dy.double() * {"leaky_relu": lambda: torch.where(y > 0, 1.0, param),
                        "elu": lambda: torch.where(y <= 0, y + param, 1.0),
                        "identity": lambda: torch.ones_like(y)}[activation]()
    x_hat = (z - b) / w
    grad_weight, grad_bias = (dz * x_hat).sum(dims), dz.sum(dims)
    if training:
        dz = dz - dz.mean(dims, keepdim=True) - x_hat * (dz * x_hat).mean(dims, keepdim=True)
    return dz * w * invstd, grad_weight, grad_bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.id for lay in LAYOUTS])
@pytest.mark.parametrize("act", INVERTIBLE, ids=INV_IDS)
def test_inplace_equals_torch_composition(act, layout, dtypes, training, device):
    activation, given_param, torch_param = act
    dtype, param_dtype = dtypes
    x = leaf(layout.make(dtype, device))
    params = channel_params(x.shape[1], param_dtype, device)
    weight, bias = leaf(_signed_weights(params["weight"])), leaf(params["bias"])
    ours_stats = [clone_optional(params["running_mean"]), clone_optional(params["running_var"])]
    ref_stats = [clone_optional(params["running_mean"]), clone_optional(params["running_var"])]
    grad_out = torch.randn(x.shape, dtype=torch.float64).to(dtype=dtype, device=device)
    inputs = [x, weight, bias]

    out = _run_inplace(x, ours_stats, weight, bias, training, activation, given_param)
    got = torch.autograd.grad(out, inputs, grad_out)
    with single_threaded():
        expected = torch_composition(x, ref_stats, weight, bias, None, training, activation, torch_param)
        want = torch.autograd.grad(expected, inputs, grad_out)
        up = [leaf(t.detach().double()) for t in inputs]
        stats64 = [s.detach().double() for s in (params["running_mean"], params["running_var"])]
        ref64 = torch_composition(up[0], stats64, up[1], up[2], None, training, activation, torch_param)
        if dtype in (torch.float16, torch.bfloat16):
            want = _inplace_backward_reference(out, grad_out, x, stats64, weight, bias, training,
                                               activation, torch_param)

    assert out.dtype == dtype and out.stride() == x.stride()
    assert_close_or_no_worse(out, expected, ref64, dtype, "output")
    for i, name in enumerate(("running_mean", "running_var")):
        assert_close(ours_stats[i], ref_stats[i], param_dtype, name)
    for name, g, w in zip(("input", "weight", "bias"), got, want):
        assert g.dtype == inputs[["input", "weight", "bias"].index(name)].dtype, f"grad {name} dtype"
        assert_close(g, w, dtype, f"grad {name}")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", INVERTIBLE, ids=INV_IDS)
def test_gradcheck(act, layout, training, affine):
    activation, param, _ = act
    x = leaf(Layout((3, 4, 3, 2), layout).make(torch.float64))
    params = channel_params(4, torch.float64, affine=affine)
    w = None if params["weight"] is None else leaf(_signed_weights(params["weight"]))
    b = leaf(params["bias"])
    leaves = [t for t in (x, w, b) if t is not None]

    def f(*tensors):
        named = dict(zip([n for n, t in zip("xwb", (x, w, b)) if t is not None], tensors))
        stats = [params["running_mean"].clone(), params["running_var"].clone()]
        return _run_inplace(named["x"], stats, named.get("w"), named.get("b"), training, activation, param)

    assert torch.autograd.gradcheck(f, leaves)


def test_elu_saturation_keeps_gradients_finite():
    """Where elu saturates (output -alpha in float32) the pre-activation cannot be recovered;
    the gradients stay finite and equal torch's where the output still carries the input."""
    x = leaf(torch.randn(8, 3, 4, 4))
    w = leaf(torch.tensor([40.0, 1.0, 1.0]))  # channel 0: outputs down to about -40 * 2
    b = leaf(torch.zeros(3))
    out = _run_inplace(x, [None, None], w, b, True, "elu", None)
    grads = torch.autograd.grad(out.sum(), [x, w, b])
    assert all(bool(g.isfinite().all()) for g in grads)
    ref = torch_composition(x, [None, None], w, b, None, True, "elu", 1.0)
    want = torch.autograd.grad(ref.sum(), [x, w, b])
    torch.testing.assert_close(grads[0][:, 1:], want[0][:, 1:])


def test_version_counter_catches_reuse_of_the_overwritten_input():
    x = leaf(torch.randn(4, 3, 5, 5))
    a = x.exp()  # exp saves its output a for its backward
    custom_bn.functional.batch_norm_act_(a, None, None, torch.ones(3), torch.zeros(3), True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        a.sum().backward()


def test_version_bumped_without_autograd():
    x = torch.randn(4, 3, 5, 5)
    before = x._version
    with torch.no_grad():
        custom_bn.functional.batch_norm_act_(x, None, None, training=True)
    assert x._version > before


def test_leaf_that_requires_grad_is_rejected():
    x = leaf(torch.randn(4, 3, 5, 5))
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        custom_bn.functional.batch_norm_act_(x, None, None, training=True)


def test_view_of_a_larger_tensor():
    """In place on a view (channels 2..5 of a wider tensor): autograd rebases the base's history
    and the gradient reaches the untouched channels unchanged."""
    x = leaf(torch.randn(4, 8, 3, 3, dtype=torch.float64))
    base = x * 1.0
    custom_bn.functional.batch_norm_act_(base[:, 2:6], None, None, training=True, activation="elu")
    g = torch.randn_like(base)
    (got,) = torch.autograd.grad(base, x, g)
    ref = x.clone()
    ref[:, 2:6] = TF.elu(TF.batch_norm(x[:, 2:6], None, None, training=True))
    (want,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(base, ref)
    torch.testing.assert_close(got, want)


def test_no_double_backward():
    x = leaf(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    out = _run_inplace(x, [None, None], None, None, True, "leaky_relu", None)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize(
    "activation,param",
    [("relu", None), ("silu", None), ("leaky_relu", 0.0), ("leaky_relu", -0.1), ("elu", 0.0)],
)
def test_non_invertible_activation_is_a_value_error(activation, param):
    x = torch.randn(4, 3, 5, 5)
    before = x.clone()
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="invertible"):
        custom_bn.functional.batch_norm_act_(x, rm, rv, None, None, True, 0.1, EPS, activation, param)
    with pytest.raises(ValueError, match="invertible"):
        custom_bn.InPlaceBatchNormAct2d(3, activation, param)
    assert torch.equal(x, before) and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_zero_weight_is_a_value_error_before_anything_is_written():
    x = torch.randn(4, 3, 5, 5)
    y = _overwritable_copy(leaf(x))
    rm, rv = torch.zeros(3), torch.ones(3)
    w = leaf(torch.tensor([1.0, 0.0, -2.0]))
    with pytest.raises(ValueError, match="weight must have no zero entries, got 1 of 3"):
        custom_bn.functional.batch_norm_act_(y, rm, rv, w, None, True)
    assert torch.equal(y, x) and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with torch.no_grad():  # inference never inverts: a zero weight is fine
        custom_bn.functional.batch_norm_act_(y, rm, rv, w, None, False)
    torch.testing.assert_close(y, TF.leaky_relu(TF.batch_norm(x, torch.zeros(3), torch.ones(3), w.detach())))


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (custom_bn.InPlaceBatchNormAct1d, nn.BatchNorm1d, (6, 5, 4)),
    (custom_bn.InPlaceBatchNormAct2d, nn.BatchNorm2d, (6, 5, 4, 3)),
    (custom_bn.InPlaceBatchNormAct3d, nn.BatchNorm3d, (3, 5, 2, 3, 2)),
])
def test_module_matches_torch_and_shares_its_state_dict(cls, torch_cls, shape):
    theirs = torch_cls(5)
    with torch.no_grad():
        theirs.weight.uniform_(-2, 2).add_(torch.sign(theirs.weight) * 0.1)
        theirs.bias.normal_()
    ours = cls(5, "elu", 0.5)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch_cls) and "activation='elu', activation_param=0.5" in repr(ours)
    for training in (True, False, True):
        ours.train(training)
        theirs.train(training)
        x = leaf(torch.randn(shape))
        y = x * 1.0
        out = ours(y)
        assert out is y
        ref = TF.elu(theirs(x), 0.5)
        torch.testing.assert_close(out, ref)
        g = torch.randn(shape)
        got = torch.autograd.grad(out, [x, ours.weight, ours.bias], g)
        want = torch.autograd.grad(ref, [x, theirs.weight, theirs.bias], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


def _saved_storage_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during a forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return sum(storages.values())


def conv_bn_act_stack(blocks: int, channels: int, norm) -> nn.Sequential:
    """Blocks Sequential(conv, BN[, activation]): the same state_dict keys whatever ``norm``."""
    return nn.Sequential(*[
        nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), *norm(channels))
        for _ in range(blocks)
    ])


def test_inplace_stack_saves_half_the_activations():
    """The memory acceptance in miniature (the full-size numbers are in make bench): a stack of
    conv -> BN -> activation blocks keeps one activation per block instead of two."""
    torch.manual_seed(0)
    theirs = conv_bn_act_stack(4, 8, lambda c: [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)])
    ours = conv_bn_act_stack(4, 8, lambda c: [custom_bn.InPlaceBatchNormAct2d(c)])
    theirs.double()
    ours.double().load_state_dict(theirs.state_dict())
    x = torch.randn(4, 8, 16, 16, dtype=torch.float64)
    theirs_bytes = _saved_storage_bytes(theirs, x)
    ours_bytes = _saved_storage_bytes(ours, x)
    assert ours_bytes <= 0.55 * theirs_bytes, (ours_bytes, theirs_bytes)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    fwd = torch.ops.custom_bn.batch_norm_act_inplace_forward.default
    bwd = torch.ops.custom_bn.batch_norm_act_inplace_backward.default
    for layout, activation, param, training in [
        (Layout((4, 3, 5, 5), "contiguous"), "leaky_relu", 0.01, True),
        (Layout((4, 3, 5, 5), "channels_last"), "elu", 1.0, False),
        (Layout((4, 3, 6, 5), "sliced"), "identity", 0.0, True),
    ]:
        x = layout.make(torch.float32, device)
        w = torch.rand(3, device=device) + 0.5
        b = torch.randn(3, device=device)
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        args = (x, w, b, rm, rv, training, 0.1, EPS, activation, param)
        torch.library.opcheck(fwd, args)
        save_mean, save_invstd = fwd(*args)
        grad_out = torch.randn_like(x)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(
                bwd, (grad_out, x, w, b, save_mean, save_invstd, training, EPS, activation, param, mask)
            )


class _ConvInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = custom_bn.InPlaceBatchNormAct2d(4, "elu", 0.5)

    def forward(self, x):
        return self.bn(self.conv(x))


def _torch_twin(model: _ConvInplace) -> nn.Module:
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(model.bn.state_dict())
    return nn.Sequential(model.conv, bn, nn.ELU(0.5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_torch(training):
    torch.manual_seed(0)
    model = _ConvInplace().train(training)
    twin = _torch_twin(model).train(training)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 6, 6)
    out = compiled(x)
    ref = twin(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.bn.running_var, twin[1].running_var)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [model.conv.weight, model.bn.weight], g)
    want = torch.autograd.grad(ref, [twin[0].weight, twin[1].weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_torchscript_fx_and_export():
    torch.manual_seed(0)
    model = _ConvInplace()
    twin = _torch_twin(model)
    x = torch.randn(4, 3, 6, 6)
    scripted = torch.jit.script(model.bn)
    torch.testing.assert_close(scripted(model.conv(x)), twin(x))
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["conv", "bn"]
    torch.testing.assert_close(traced(x), twin(x))
    model.eval()
    twin.eval()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), twin(x))


def test_torch_func_grad_and_vmap():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)

    def ours(w, b, x):
        return custom_bn.functional.batch_norm_act_(x.clone(), None, None, w, b, True).square().sum()

    def theirs(w, b, x):
        return TF.leaky_relu(TF.batch_norm(x, None, None, w, b, True), 0.01).square().sum()

    for a, c in zip(torch.func.grad(ours, argnums=(0, 1))(w, b, x),
                    torch.func.grad(theirs, argnums=(0, 1))(w, b, x)):
        torch.testing.assert_close(a, c)
    xs = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(ours, (None, None, 0))(w, b, xs),
                               torch.func.vmap(theirs, (None, None, 0))(w, b, xs))
