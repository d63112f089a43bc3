"""torch.func transforms and forward-mode AD: custom_bn under a transform equals torch.nn's batch
norm under the same transform (float64 values, running statistics and errors)."""

from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves

import custom_bn
from bn_testing import DEVICES, Layout, assert_close, channel_params

OURS = custom_bn.functional.batch_norm
THEIRS = nn.functional.batch_norm
D = torch.float64

LAYOUTS = [
    Layout((6, 3), "contiguous"),
    Layout((4, 3, 5), "contiguous"),
    Layout((3, 3, 4, 2), "channels_last"),
    Layout((2, 3, 2, 3, 2), "channels_last"),
]
LAYOUT_IDS = [layout.id for layout in LAYOUTS]
BATCH = 3  # size of the vmapped dimension


def _stacked(t: Tensor, dim: int = 0) -> Tensor:
    """BATCH different versions of ``t`` stacked along ``dim``."""
    return torch.stack([t * (1 + 0.5 * i) + 0.1 * i for i in range(BATCH)], dim)


# Each transform takes f(x, w, b) -> y and the primal (x, w, b) and returns a pytree of tensors.
# ``batched_input`` says whether the input itself is vmapped (then a training-mode call needs
# batched running statistics, or none, as in torch).
def _scalar(f: Callable, cot: Tensor) -> Callable:
    return lambda x, w, b: (f(x, w, b) ** 3 * cot).sum()


TRANSFORMS: Dict[str, Tuple[Callable, bool]] = {
    "grad": (lambda f, p, c: grad(_scalar(f, c[0]), argnums=(0, 1, 2))(*p), False),
    "vjp": (lambda f, p, c: vjp(f, *p)[1](c[0]), False),
    "jvp": (lambda f, p, c: jvp(f, p, c), False),
    "jacrev": (lambda f, p, c: jacrev(f, argnums=(0, 1, 2))(*p), False),
    "jacfwd": (lambda f, p, c: jacfwd(f, argnums=(0, 1, 2))(*p), False),
    "hessian": (lambda f, p, c: hessian(_scalar(f, c[0]), argnums=(0, 1, 2))(*p), False),
    "vmap_weight_bias": (
        lambda f, p, c: vmap(f, in_dims=(None, 0, 0))(p[0], _stacked(p[1]), _stacked(p[2])),
        False,
    ),
    "vmap_input": (lambda f, p, c: vmap(f, in_dims=(0, None, None))(_stacked(p[0]), *p[1:]), True),
    "vmap_input_dim1_bias": (
        lambda f, p, c: vmap(f, in_dims=(1, None, 0))(_stacked(p[0], 1), p[1], _stacked(p[2])),
        True,
    ),
    "vmap_grad": (
        lambda f, p, c: vmap(grad(_scalar(f, c[0]), argnums=(0, 1, 2)), in_dims=(0, None, None))(
            _stacked(p[0]), *p[1:]
        ),
        True,
    ),
    "hessian_wrt_input": (
        lambda f, p, c: hessian(lambda x: _scalar(f, c[0])(x, *p[1:]))(p[0]),
        False,
    ),
    "jacrev_jacrev": (
        lambda f, p, c: jacrev(jacrev(lambda w: _scalar(f, c[0])(p[0], w, p[2])))(p[1]),
        False,
    ),
    "forward_ad": (lambda f, p, c: _forward_ad(f, p, c), False),
    # Plain autograd with a batch of cotangents: vmap over the backward operator of the eager
    # (C++ autograd) graph, i.e. its batching rule.
    "grad_is_grads_batched": (lambda f, p, c: _batched_cotangents(f, p, c), False),
}


def _batched_cotangents(f: Callable, primals, cotangents):
    leaves = [t.detach().requires_grad_() for t in primals]
    return torch.autograd.grad(f(*leaves), leaves, _stacked(cotangents[0]), is_grads_batched=True)


# torch 2.14.1's functorch batch rule for native_batch_norm_backward treats the saved batch
# statistics as constants when it forms grad_weight, so under torch.func.hessian (and jacrev or
# jacfwd over jacrev) torch.nn's d(dL/dweight)/d(input) block misses the terms through the batch
# mean and variance in training. Those references come from torch's plain autograd
# (double backward), which finite differences confirm.
TORCH_REFERENCE: Dict[str, Callable] = {
    "hessian": lambda f, p, c: torch.autograd.functional.hessian(_scalar(f, c[0]), p),
}


def _forward_ad(f: Callable, primals, tangents):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        primal, tangent = fwAD.unpack_dual(f(*duals))
    return primal, tangent


def _run(batch_norm, transform, layout, training, device, with_stats):
    torch.manual_seed(1)
    x = layout.make(D, device)
    params = channel_params(x.shape[1], D, device, stats=with_stats)
    primals = (x, params["weight"], params["bias"])
    cotangents = tuple(torch.randn_like(p) for p in primals)
    stats = (params["running_mean"], params["running_var"])

    def f(x, w, b):
        return batch_norm(x, stats[0], stats[1], w, b, training, 0.1, 1e-5)

    return transform(f, primals, cotangents), stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_equals_torch(name, layout, training, device):
    transform, batched_input = TRANSFORMS[name]
    # torch refuses to update unbatched running statistics from a batched input (tested below).
    with_stats = not (training and batched_input)
    ours, our_stats = _run(OURS, transform, layout, training, device, with_stats)
    reference = TORCH_REFERENCE.get(name, transform)
    theirs, their_stats = _run(THEIRS, reference, layout, training, device, with_stats)
    ours, theirs = tree_leaves(ours), tree_leaves(theirs)
    assert len(ours) == len(theirs)
    for i, (got, want) in enumerate(zip(ours, theirs)):
        assert_close(got, want, D, f"{name} result {i}")
    for stat, (got, want) in zip(("running_mean", "running_var"), zip(our_stats, their_stats)):
        if want is not None:
            assert_close(got, want, D, f"{name} {stat}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vmap_and_grad_in_reduced_precision(dtype, device):
    """Per-sample gradients with batched running statistics, input in float32 / float16 /
    bfloat16 and parameters in float32. torch 2.14.1 itself fails this for half-precision input
    ("expected scalar type BFloat16 but found Float" in its batch rule), so the reference is
    torch on the same values in float32, at the tolerance of ``dtype``."""
    x = _stacked(torch.randn(4, 3, 5, 2, device=device)).to(dtype)
    params = channel_params(3, torch.float32, device)
    cot = torch.randn(x.shape[1:], device=device)

    def run(batch_norm, x):
        stats = [_stacked(params[k]) for k in ("running_mean", "running_var")]

        def loss(x, w, b, rm, rv):
            return (batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5).float() * cot).sum()

        g = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None, 0, 0))(
            x, params["weight"], params["bias"], *stats
        )
        return list(g) + stats

    for i, (got, want) in enumerate(zip(run(OURS, x), run(THEIRS, x.float()))):
        assert got.dtype == (dtype if i == 0 else torch.float32)
        assert_close(got.float(), want, dtype, f"result {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_over_running_statistics(training, device):
    """Batched running statistics: each batch member normalizes with (eval) or updates (train)
    its own. Compared with torch.nn under vmap, and with a loop over the members for statistics
    batched along a dimension other than 0 (torch 2.14 folds those into a copy and loses the
    update; custom_bn writes it back)."""
    x = _stacked(torch.randn(4, 3, 5, dtype=D, device=device))
    w, b = (channel_params(3, D, device)[k] for k in ("weight", "bias"))
    mean = torch.randn(BATCH, 3, dtype=D, device=device)
    var = torch.rand(BATCH, 3, dtype=D, device=device) + 0.5

    def f(batch_norm):
        return lambda x, rm, rv: batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)

    for stat_dim in (0, 1):
        stats = {
            impl: [s.clone() if stat_dim == 0 else s.t().contiguous() for s in (mean, var)]
            for impl in ("ours", "torch", "loop")
        }
        ours = vmap(f(OURS), in_dims=(0, stat_dim, stat_dim))(x, *stats["ours"])
        loop = torch.stack(
            [
                f(THEIRS)(x[i], *(s.select(stat_dim, i) for s in stats["loop"]))
                for i in range(BATCH)
            ]
        )
        assert_close(ours, loop, D, f"output, statistics batched along dim {stat_dim}")
        for got, want in zip(stats["ours"], stats["loop"]):
            assert_close(got, want, D, f"running stat batched along dim {stat_dim}")
        if stat_dim == 0:
            theirs = vmap(f(THEIRS), in_dims=(0, 0, 0))(x, *stats["torch"])
            assert_close(ours, theirs, D, "output vs torch")
            for got, want in zip(stats["ours"], stats["torch"]):
                assert_close(got, want, D, "running stat vs torch")


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_rejects_unbatched_running_stats_in_training_like_torch(device):
    x = _stacked(torch.randn(4, 3, 5, dtype=D, device=device))
    params = channel_params(3, D, device)
    before = [params[k].clone() for k in ("running_mean", "running_var")]
    for batch_norm in (THEIRS, OURS):
        with pytest.raises(RuntimeError, match="were not batched"):
            vmap(
                lambda x: batch_norm(
                    x, params["running_mean"], params["running_var"], None, None, True, 0.1, 1e-5
                )
            )(x)
    for got, want in zip((params["running_mean"], params["running_var"]), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _twin_models(device: str) -> Tuple[nn.Module, nn.Module]:
    """A small conv net with torch.nn BatchNorm2d and its copy with custom_bn's, same weights."""

    def build(norm):
        torch.manual_seed(2)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 4, 2)
        ).to(device=device, dtype=D)

    return build(custom_bn.BatchNorm2d), build(nn.BatchNorm2d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "train_no_running_stats"])
def test_per_sample_gradients_through_functional_call(mode, device):
    """The classic per-sample-gradient recipe: vmap(grad(loss)) over functional_call."""
    x = torch.randn(6, 2, 3, 5, 6, dtype=D, device=device)  # 6 samples, each a batch of 2
    y = torch.randint(0, 2, (6, 2), device=device)
    results = []
    for model in _twin_models(device):
        if mode == "eval":
            model.eval()
        else:
            torch.func.replace_all_batch_norm_modules_(model)
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(params, xi, yi):
            return nn.functional.cross_entropy(functional_call(model, (params, buffers), (xi,)), yi)

        results.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y))
    ours, theirs = results
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert_close(ours[k], theirs[k], D, f"per-sample grad of {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_under_forward_ad_and_jvp(training, device):
    """Dual numbers through the modules: output tangent, and the running statistics a training
    step updates, equal torch.nn's."""
    x = torch.randn(4, 3, 5, 6, dtype=D, device=device)
    tangent = torch.randn_like(x)
    results = []
    for model in _twin_models(device):
        model.train(training)
        with fwAD.dual_level():
            out = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent)))
        results.append([out.primal, out.tangent, *model[1].buffers()])
        if not training:  # a training step mutates the buffers, which torch.func.jvp refuses
            results.append(list(jvp(model, (x,), (tangent,))))
    half = len(results) // 2
    for i, (got, want) in enumerate(zip(tree_leaves(results[:half]), tree_leaves(results[half:]))):
        assert_close(got.to(D), want.to(D), D, f"result {i}")


def test_plain_eager_calls_use_the_cpp_autograd_function():
    """Outside transforms nothing changes: the graph node is the C++ autograd Function (the
    Python one is only for transforms and forward AD)."""
    x = torch.randn(4, 3, requires_grad=True)
    eager = custom_bn.functional.batch_norm(x, None, None, training=True)
    assert type(eager.grad_fn).__name__ == "CppFunction", type(eager.grad_fn)
    with fwAD.dual_level():
        dual = custom_bn.functional.batch_norm(
            fwAD.make_dual(x.detach(), torch.ones_like(x)), None, None, training=True
        )
        assert fwAD.unpack_dual(dual).tangent is not None


def test_operator_called_with_dual_tensors_says_where_forward_ad_lives():
    """torch.ops.custom_bn.batch_norm_forward itself has only the C++ reverse-mode derivative:
    a dual input is refused with a clear error rather than silently losing its tangent."""
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(4, 3), torch.randn(4, 3))
        with pytest.raises(RuntimeError, match="forward-mode"):
            torch.ops.custom_bn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
