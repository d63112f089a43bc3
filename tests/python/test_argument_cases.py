"""Every layer with every shared argument case (bn_testing.ARG_CASES: eps, momentum 0 / 1 / None,
activation parameters, affine and running statistics off), against torch.nn in float64: the
modules (plain, fused with a residual, in-place) over training steps and in evaluation mode with
every gradient (the residual's through the evaluation-mode operator too), the functional form
with weight or bias alone, convert_model both ways, torch.export, torch.compile with an empty
batch, and torch.func with each argument batched on its own and at different positions."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import vmap

import custom_bn
from bn_testing import ARG_CASES, Args

C = 3
RANKS = {1: (nn.BatchNorm1d, custom_bn.BatchNormAct1d, (5, C, 4)),
         2: (nn.BatchNorm2d, custom_bn.BatchNormAct2d, (4, C, 3, 2)),
         3: (nn.BatchNorm3d, custom_bn.BatchNormAct3d, (3, C, 2, 2, 2))}
CASES = list(ARG_CASES.items())


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def _pair(args: Args, rank: int):
    """(custom_bn fused layer, torch.nn layer) with the same non-trivial state."""
    torch_cls, ours_cls, _ = RANKS[rank]
    theirs = torch_cls(C, dtype=torch.float64, **args.module_kwargs())
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        if args.affine:
            theirs.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            theirs.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        if args.track_running_stats:
            theirs.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
            theirs.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    ours = ours_cls(C, activation=args.activation, activation_param=args.activation_param,
                    dtype=torch.float64, **args.module_kwargs())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step_and_compare(ours, theirs, args: Args, x, residual, what):
    """One forward/backward of both with a residual: outputs, every gradient, buffers."""
    inputs = [x.clone().requires_grad_(), residual.clone().requires_grad_()]
    theirs_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    dy = torch.randn_like(x)
    y = ours(*inputs)
    z = args.activate(theirs(theirs_inputs[0]) + theirs_inputs[1])
    _close(y, z, f"{what} output")
    params = [p for p in ours.parameters()]
    got = torch.autograd.grad(y, inputs + params, dy)
    want = torch.autograd.grad(z, theirs_inputs + list(theirs.parameters()), dy)
    for name, a, b in zip(["input", "residual", "weight", "bias"], got, want):
        _close(a, b, f"{what} grad_{name}")
    for name, b in theirs.named_buffers():
        _close(getattr(ours, name), b, f"{what} {name}")


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name,args", CASES, ids=[n for n, _ in CASES])
def test_fused_modules_train_and_eval_like_torch(name, args, rank):
    ours, theirs = _pair(args, rank)
    shape = RANKS[rank][2]
    g = torch.Generator().manual_seed(7)
    for step in range(2):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
        if rank == 2:
            x = x.contiguous(memory_format=torch.channels_last)
        residual = torch.randn(shape, generator=g, dtype=torch.float64)
        _step_and_compare(ours, theirs, args, x, residual, f"train step {step}")
    ours.eval(), theirs.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    _step_and_compare(ours, theirs, args, x, torch.randn_like(x), "eval")


@pytest.mark.parametrize("name,args", [c for c in CASES if c[1].activation in ("identity", "leaky_relu", "elu")],
                         ids=[n for n, a in CASES if a.activation in ("identity", "leaky_relu", "elu")])
def test_inplace_module_like_torch(name, args):
    shape = RANKS[2][2]
    fused, theirs = _pair(args, 2)
    ours = custom_bn.InPlaceBatchNormAct2d(C, activation=args.activation,
                                           activation_param=args.activation_param,
                                           dtype=torch.float64, **args.module_kwargs())
    ours.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(3)
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        leaf = x.clone().requires_grad_()
        y = ours(leaf * 1.0)
        z = args.activate(theirs(leaf))
        _close(y, z, "in-place output")
        got = torch.autograd.grad(y, [leaf, *ours.parameters()], dy)
        want = torch.autograd.grad(z, [leaf, *theirs.parameters()], dy)
        for a, b in zip(got, want):
            _close(a, b, "in-place gradient")
        for n, b in theirs.named_buffers():
            _close(getattr(ours, n), b, f"in-place {n}")


@pytest.mark.parametrize("given", ["weight", "bias"])
@pytest.mark.parametrize("name,args", CASES[:3], ids=[n for n, _ in CASES[:3]])
def test_functional_with_weight_or_bias_alone(name, args, given):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, C, 4, generator=g, dtype=torch.float64).requires_grad_()
    t = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    kw = {given: t}
    stats = [torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5]
    theirs_stats = [s.clone() for s in stats]
    for training in (True, False):
        y = custom_bn.functional.batch_norm(x, *stats, training=training, momentum=args.momentum or 0.0,
                                            eps=args.eps, activation=args.activation,
                                            activation_param=args.activation_param, **kw)
        z = args.activate(TF.batch_norm(x, *theirs_stats, training=training,
                                        momentum=args.momentum or 0.0, eps=args.eps, **kw))
        _close(y, z, f"functional {given} alone")
        dy = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, [x, t], dy), torch.autograd.grad(z, [x, t], dy)):
            _close(a, b, f"functional {given} alone gradient")
        for a, b in zip(stats, theirs_stats):
            _close(a, b, "functional running statistics")


def _torch_model(args: Args) -> nn.Module:
    torch.manual_seed(0)
    act = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(args.activation_param or 0.01),
           "elu": nn.ELU(args.activation_param or 1.0), "silu": nn.SiLU(), "identity": nn.Identity()}
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C, **args.module_kwargs()),
                          act[args.activation], nn.Conv2d(C, 2, 1)).double()
    _, theirs = _pair(args, 2)
    model[1].load_state_dict(theirs.state_dict())
    return model


@pytest.mark.parametrize("name,args", CASES, ids=[n for n, _ in CASES])
def test_convert_both_ways_keeps_every_argument(name, args):
    original = _torch_model(args)
    reference = copy.deepcopy(original)
    converted = custom_bn.convert_model(original, fuse_activation=True)
    bn = converted[1]
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (
        args.eps, args.momentum, args.affine, args.track_running_stats)
    if args.activation != "identity":
        assert (bn.activation, bn.activation_param) == (args.activation, args.activation_param)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for training in (True, False):
        converted.train(training), reference.train(training)
        _close(converted(x), reference(x), f"converted, training={training}")
    back = custom_bn.convert_model(converted, to="torch")
    assert [type(m) for m in back] == [type(m) for m in reference]
    assert (back[1].eps, back[1].momentum) == (args.eps, args.momentum)
    for training in (True, False):
        back.train(training), reference.train(training)
        _close(back(x), reference(x), f"back, training={training}")
    reference.load_state_dict(back.state_dict(), strict=True)


@pytest.mark.parametrize("name,args", CASES, ids=[n for n, _ in CASES])
def test_export_and_compile_with_every_argument(name, args):
    ours, theirs = _pair(args, 2)
    x = torch.randn(4, C, 3, 2, dtype=torch.float64)
    residual = torch.randn_like(x)
    ours.eval(), theirs.eval()
    program = torch.export.export(ours, (x, residual))
    _close(program.module()(x, residual), args.activate(theirs(x) + residual), "exported")
    ours.train(), theirs.train()
    torch._dynamo.reset()  # each case compiles anew (the recompile limit counts across cases)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for batch in (x, x[:0], x * 2):  # an empty batch leaves every statistic alone
        z = args.activate(theirs(batch) + residual[: len(batch)])
        _close(compiled(batch, residual[: len(batch)]), z, f"compiled, batch of {len(batch)}")
        for n, b in theirs.named_buffers():
            _close(getattr(ours, n), b, f"compiled {n}")


# (in_dims of input, weight, bias): each argument batched on its own, and at different positions
VMAP_DIMS = [(None, None, 0), (None, 0, None), (None, 1, 0), (0, None, 1), (1, 0, 0)]


@pytest.mark.parametrize("dims", VMAP_DIMS, ids=lambda d: "-".join(map(str, d)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_with_each_argument_batched_alone_or_elsewhere(dims, training):
    args = ARG_CASES["eps0.1-m0-leaky0.2"]
    B = 2
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, C, 3, generator=g, dtype=torch.float64)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    batched = []
    for t, d in zip((x, w, b), dims):
        if d is None:
            batched.append(t)
        else:
            stack = torch.stack([t * (1 + 0.3 * i) + 0.1 * i for i in range(B)])
            batched.append(stack.movedim(0, d))
    # A batched input in training needs batched running statistics (or none), as in torch.
    stats = [torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5]
    if training and dims[0] is not None:
        stats = [None, None]

    def copies():
        return [None if s is None else s.clone() for s in stats]

    ours = vmap(lambda x, w, b: custom_bn.functional.batch_norm(
        x, *copies(), w, b, training, 0.0, args.eps, activation=args.activation,
        activation_param=args.activation_param), in_dims=dims)(*batched)
    theirs = vmap(lambda x, w, b: args.activate(TF.batch_norm(
        x, *copies(), w, b, training, 0.0, args.eps)), in_dims=dims)(*batched)
    _close(ours, theirs, f"vmap in_dims={dims}")


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name,args", CASES, ids=[n for n, _ in CASES])
def test_evaluation_operator_gradients_equal_torch(name, args, with_residual):
    """custom_bn::batch_norm_inference (what traced evaluation calls), called directly and
    through a compiled module, differentiated against torch's composition."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, C, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    residual = torch.randn(4, C, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    mean, var = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    res = residual if with_residual else None
    param = custom_bn.functional.resolve_activation_param(args.activation, args.activation_param)
    y = torch.ops.custom_bn.batch_norm_inference(x, w, b, mean, var, res, args.eps, args.activation, param)
    z = TF.batch_norm(x, mean, var, w, b, False, 0.0, args.eps)
    z = args.activate(z if res is None else z + res)
    _close(y, z, "output")
    leaves = [x, w, b] + ([residual] if with_residual else [])
    dy = torch.randn_like(y)
    for name_, a, c in zip(["input", "weight", "bias", "residual"], torch.autograd.grad(y, leaves, dy),
                           torch.autograd.grad(z, leaves, dy)):
        _close(a, c, f"grad_{name_}")

    ours, theirs = _pair(args, 2)
    ours.eval(), theirs.eval()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    y = compiled(x, res)
    z = theirs(x)
    z = args.activate(z if res is None else z + res)
    params = [p for p in ours.parameters()]
    got = torch.autograd.grad(y, [x] + params + ([residual] if with_residual else []), dy)
    want = torch.autograd.grad(z, [x] + list(theirs.parameters()) + ([residual] if with_residual else []), dy)
    for a, c in zip(got, want):
        _close(a, c, "compiled evaluation gradient")
