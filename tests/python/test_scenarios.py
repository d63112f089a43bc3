"""The classic BatchNorm uses that tutorials teach, each run with torch.nn and with custom_bn from
the same weights and compared. Each scenario records its largest difference from torch.nn in
build/scenario_differences.json (the module's teardown writes it) for the closing notes.
"""

import copy
import json
import os
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import custom_bn

DIFFERENCES: Dict[str, float] = {}
F64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(scope="module", autouse=True)
def _write_differences():
    yield
    path = os.path.join(os.path.dirname(__file__), "..", "..", "build", "scenario_differences.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(DIFFERENCES, f, indent=1, sort_keys=True)


def _record(scenario: str, ours: List[torch.Tensor], theirs: List[torch.Tensor], **tol) -> None:
    """Asserts each pair close and records the largest absolute difference of the scenario."""
    worst = DIFFERENCES.get(scenario, 0.0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **(tol or F64), msg=lambda m: f"{scenario}: {m}")
        worst = max(worst, (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0)
    DIFFERENCES[scenario] = worst


def _twins(build: Callable[[], nn.Module], fuse: bool = False):
    """(torch.nn model, custom_bn model) with the same weights, in float64."""
    torch.manual_seed(0)
    theirs = build().double()
    return theirs, custom_bn.convert_model(copy.deepcopy(theirs), fuse_activation=fuse)


def _outputs_and_grads(model: nn.Module, x: torch.Tensor, grad=None):
    """[output, grad of x, grads of the parameters]; grad_output ``grad``, or (when None) a
    seeded random one of the output's shape (one forward either way)."""
    x = x.clone().requires_grad_()
    out = model(x)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, grad)
    return [out] + list(grads)


def _compare_training(scenario: str, build, x, fuse: bool = False) -> None:
    theirs, ours = _twins(build, fuse)
    _record(scenario, _outputs_and_grads(ours, x), _outputs_and_grads(theirs, x))
    _record(scenario, list(ours.buffers()), list(theirs.buffers()))


def test_mlp_linear_bn1d_relu():
    build = lambda: nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))
    _compare_training("MLP Linear -> BN1d -> ReLU", build, torch.randn(16, 20, dtype=torch.float64))
    _compare_training("MLP Linear -> BN1d -> ReLU (fused)", build, torch.randn(16, 20, dtype=torch.float64), fuse=True)


def test_train_and_eval_outputs_on_the_same_batch():
    theirs, ours = _twins(lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)))
    x = torch.randn(10, 6, dtype=torch.float64) * 3 + 2
    for step in range(3):  # a few training batches move the running statistics
        _record("train vs eval on one batch", [ours(x + step)], [theirs(x + step)])
    ours.eval()
    theirs.eval()
    eval_ours, eval_theirs = ours(x), theirs(x)
    _record("train vs eval on one batch", [eval_ours], [eval_theirs])
    ours.train()
    assert (ours(x) - eval_ours).abs().max() > 0.1  # batch statistics differ from running ones


def test_conv_bn2d_relu():
    build = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    _compare_training("Conv -> BN2d -> ReLU", build, x)
    _compare_training("Conv -> BN2d -> ReLU (channels-last)", build, x.contiguous(memory_format=torch.channels_last))


class _Residual(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fused = fused
        if fused:
            self.bn1 = custom_bn.BatchNormAct2d(6, "relu")
            self.bn2 = custom_bn.BatchNormAct2d(6, "relu")
        else:
            self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)

    def forward(self, x):
        if self.fused:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


def test_residual_block_plain_and_fused():
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    _compare_training("residual block conv-BN-ReLU-conv-BN + identity, ReLU", lambda: _Residual(False), x)
    torch.manual_seed(0)
    theirs = _Residual(False).double()
    fused = _Residual(True).double()
    fused.load_state_dict(theirs.state_dict())
    grad = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    _record("residual block, fused BatchNormAct2d(residual=)", _outputs_and_grads(fused, x, grad),
            _outputs_and_grads(theirs, x, grad))


class _BNLSTMCell(nn.Module):
    """An LSTM cell with BatchNorm1d on the gate pre-activations, applied at every time step."""

    def __init__(self, bn) -> None:
        super().__init__()
        self.x2h = nn.Linear(5, 4 * 7, bias=False)
        self.h2h = nn.Linear(7, 4 * 7, bias=False)
        self.bn_x, self.bn_h = bn(4 * 7), bn(4 * 7)

    def forward(self, xs):
        h = c = xs.new_zeros(xs.shape[1], 7)
        for x in xs:
            gates = self.bn_x(self.x2h(x)) + self.bn_h(self.h2h(h))
            i, f, g, o = gates.chunk(4, 1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
        return h


def test_bn1d_on_lstm_gate_preactivations_every_step():
    _compare_training("BN1d on LSTM-cell gates, every time step", lambda: _BNLSTMCell(nn.BatchNorm1d),
                      torch.randn(6, 8, 5, dtype=torch.float64))


def test_forward_and_full_backward_hooks_record_statistics():
    theirs, ours = _twins(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    records = {}

    def hooks(model, key):
        stats = records.setdefault(key, [])
        bn = model[1]
        bn.register_forward_hook(lambda m, i, o: stats.extend([i[0].mean(), o.mean(), o.std()]))
        bn.register_full_backward_hook(lambda m, gi, go: stats.extend([gi[0].norm(), go[0].norm()]))

    hooks(theirs, "theirs")
    hooks(ours, "ours")
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    grad = torch.randn(4, 4, 4, 4, dtype=torch.float64)
    _outputs_and_grads(ours, x, grad)
    _outputs_and_grads(theirs, x, grad)
    assert len(records["ours"]) == 5
    _record("forward and full backward hooks on BN", records["ours"], records["theirs"])


def _deep(bn: bool) -> Callable[[], nn.Module]:
    def build():
        layers = []
        for _ in range(12):
            layers += [nn.Linear(16, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(16, 1))
    return build


def test_gradient_norms_of_a_deep_net_with_and_without_bn():
    x = torch.randn(32, 16, dtype=torch.float64)
    norms = {}
    for bn in (False, True):
        theirs, ours = _twins(_deep(bn))
        grad = torch.ones(32, 1, dtype=torch.float64)
        g_ours = _outputs_and_grads(ours, x, grad)[1:]
        g_theirs = _outputs_and_grads(theirs, x, grad)[1:]
        _record("gradient norms, deep net with/without BN", [torch.stack([g.norm() for g in g_ours])],
                [torch.stack([g.norm() for g in g_theirs])])
        norms[bn] = g_ours[1].norm() / g_ours[-2].norm()  # first layer's weight over the last's
    assert norms[True] > norms[False]  # BN keeps the early layers' gradients alive


@pytest.mark.parametrize("lr", [1e-3, 0.1, 1.0, 10.0])
def test_single_sgd_step(lr):
    theirs, ours = _twins(lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)))
    x, target = torch.randn(12, 8, dtype=torch.float64), torch.randint(0, 2, (12,))
    for model in (ours, theirs):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        TF.cross_entropy(model(x), target).backward()
        opt.step()
    _record(f"single SGD step, lr={lr}", list(ours.parameters()) + [ours(x)],
            list(theirs.parameters()) + [theirs(x)])


def test_momentum_one_and_affine_false_buffers():
    for kwargs in ({"momentum": 1.0}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}):
        theirs = nn.BatchNorm2d(5, **kwargs).double()
        ours = custom_bn.BatchNorm2d(5, **kwargs).double()
        for step in range(3):
            x = torch.randn(4, 5, 3, 3, dtype=torch.float64) * (step + 1) + step
            _record("momentum=1 / affine=False / cumulative buffers", [ours(x)], [theirs(x)])
        _record("momentum=1 / affine=False / cumulative buffers", list(ours.buffers()), list(theirs.buffers()))


def test_bias_free_convs_before_bn():
    build = lambda: nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, bias=False), nn.BatchNorm2d(6))
    _compare_training("bias-free convs before BN", build, torch.randn(4, 3, 9, 9, dtype=torch.float64))


def test_bn1d_after_flatten():
    build = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(4 * 6 * 6), nn.ReLU(),
                                  nn.Linear(4 * 6 * 6, 3))
    _compare_training("BN1d after Flatten", build, torch.randn(5, 3, 8, 8, dtype=torch.float64))


def test_large_input_is_normalized_to_zero_mean_unit_std():
    torch.manual_seed(0)
    x = torch.randn(32, 64, 68, 68) * 5 + 3
    ours, theirs = custom_bn.BatchNorm2d(64), nn.BatchNorm2d(64)
    y = ours(x)
    mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3))
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-3
    _record("(32,64,68,68) normalized: mean ~0, std ~1 (float32)", [y, ours.running_var], [theirs(x), theirs.running_var],
            rtol=1e-5, atol=1e-5)


class _ManualBatchNorm(torch.autograd.Function):
    """BatchNorm's backward written out by hand (training mode, per channel of (N, C)). With
    ``naive`` it drops the terms through the batch mean and variance, treating them as constants:
    the mistake that gradcheck must catch."""

    @staticmethod
    def forward(ctx, x, weight, bias, naive: bool):
        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        invstd = (var + 1e-5).rsqrt()
        x_hat = (x - mean) * invstd
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.naive = naive
        return x_hat * weight + bias

    @staticmethod
    def backward(ctx, dy):
        x_hat, invstd, weight = ctx.saved_tensors
        n = dy.shape[0]
        dx_hat = dy * weight
        if ctx.naive:
            dx = dx_hat * invstd
        else:  # through x_hat, the mean and the variance
            dx = invstd / n * (n * dx_hat - dx_hat.sum(0) - x_hat * (dx_hat * x_hat).sum(0))
        return dx, (dy * x_hat).sum(0), dy.sum(0), None


def test_hand_written_backward_agrees_and_a_naive_one_fails_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(8, 3, dtype=torch.float64)
    ours = custom_bn.functional.batch_norm(x, None, None, w, b, training=True)
    manual = _ManualBatchNorm.apply(x, w, b, False)
    _record("hand-written full backward vs custom_bn", [ours] + list(torch.autograd.grad(ours, [x, w, b], grad)),
            [manual] + list(torch.autograd.grad(manual, [x, w, b], grad)))
    fn = lambda x, w, b: custom_bn.functional.batch_norm(x, None, None, w, b, training=True)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: _ManualBatchNorm.apply(x, w, b, False), (x, w, b))
    assert not torch.autograd.gradcheck(lambda x, w, b: _ManualBatchNorm.apply(x, w, b, True), (x, w, b),
                                        raise_exception=False)
