"""The fused modules and the functional epilogue under torch's tools: torch.compile, torch.export,
torch.fx, TorchScript, torch.func, forward AD and autocast, each compared with the torch.nn
composition (BatchNorm, then add, then the activation) built from the same weights."""

import io

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import custom_bn
from bn_testing import DEVICES, assert_close


class BasicBlock(nn.Module):
    """A ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + x), the BatchNorm + ReLU
    pairs fused into BatchNormAct2d (fused=True) or written as torch.nn modules."""

    def __init__(self, channels: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        norm = custom_bn.BatchNormAct2d if fused else nn.BatchNorm2d
        self.bn1 = norm(channels)
        self.bn2 = norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)
        out = TF.relu(self.bn1(self.conv1(x)))
        return TF.relu(self.bn2(self.conv2(out)) + x)


def _pair(channels=4, device="cpu"):
    fused = BasicBlock(channels, fused=True).to(device)
    for bn in (fused.bn1, fused.bn2):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    twin = BasicBlock(channels, fused=False).to(device)
    twin.load_state_dict(fused.state_dict())
    return fused, twin


def _compare(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"{what}: grad {name}")
    for (name, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        assert_close(p.double(), q.double(), torch.float32, f"{what}: {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_basic_block_matches_eager(device):
    fused, twin = _pair(device=device)
    eager = BasicBlock(4, fused=True).to(device)
    eager.load_state_dict(fused.state_dict())
    compiled = torch.compile(fused, fullgraph=True)
    for step in range(3):
        x = torch.randn(4, 4, 6, 6, device=device).to(memory_format=torch.channels_last)
        outs = [m(x) for m in (compiled, eager, twin)]
        for m, out in zip((compiled, eager, twin), outs):
            m.zero_grad()
            out.square().sum().backward()
        assert_close(outs[0], outs[1], torch.float32, f"step {step}: compiled vs eager")
        assert_close(outs[1], outs[2], torch.float32, f"step {step}: eager vs torch.nn")
        _compare(fused, eager, f"step {step}: compiled vs eager")
        _compare(eager, twin, f"step {step}: eager vs torch.nn")


def test_compiled_graph_calls_the_fused_operator():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    fused, _ = _pair()
    torch.compile(fused, backend=backend, fullgraph=True)(torch.randn(2, 4, 5, 5)).sum().backward()
    code = "\n".join(g.code for g in backend.fw_graphs + backend.bw_graphs)
    assert code.count("custom_bn.batch_norm_act_forward") == 2
    assert code.count("custom_bn.batch_norm_act_backward") == 2


def test_export_eval_block_matches_eager_without_buffer_mutations():
    fused, twin = _pair()
    fused.eval(), twin.eval()
    x = torch.randn(2, 4, 5, 5)
    program = torch.export.export(fused, (x,))
    assert not program.graph_signature.buffers_to_mutate
    assert_close(program.module()(x), twin(x), torch.float32, "exported vs torch.nn")


def test_fx_trace_keeps_fused_modules_as_leaves():
    fused, twin = _pair()
    graph_module = torch.fx.symbolic_trace(fused)
    calls = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target.startswith("bn")]
    assert [n.target for n in calls] == ["bn1", "bn2"]
    assert len(calls[1].args) == 2  # the residual is an argument of the module call
    x = torch.randn(3, 4, 5, 5)
    assert_close(graph_module(x), twin(x), torch.float32, "train")
    graph_module.eval(), twin.eval()
    assert_close(graph_module(x), twin(x), torch.float32, "eval")


def test_torchscript_script_and_trace_survive_save_and_load():
    fused, twin = _pair()
    x = torch.randn(3, 4, 5, 5)
    for make in (lambda m: torch.jit.script(m), lambda m: torch.jit.trace(m.eval(), x)):
        buffer = io.BytesIO()
        torch.jit.save(make(fused), buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        assert_close(loaded.eval()(x), twin.eval()(x), torch.float32, "eval")
        fused.train(), twin.train()
    scripted = torch.jit.script(fused)
    assert_close(scripted(x), twin(x), torch.float32, "scripted train step")
    assert_close(scripted.bn2.running_var, twin.bn2.running_var, torch.float32, "running_var")


ACTS = [("relu", None), ("leaky_relu", 0.2), ("elu", 0.7), ("silu", None)]


def _functional(x, w, b, r, activation, param, training, fused=True):
    if fused:
        return custom_bn.functional.batch_norm(
            x, None if training else torch.zeros(x.shape[1], dtype=x.dtype),
            None if training else torch.ones(x.shape[1], dtype=x.dtype), w, b, training,
            activation=activation, activation_param=param, residual=r,
        )
    stats = (None, None) if training else (torch.zeros(x.shape[1], dtype=x.dtype),
                                           torch.ones(x.shape[1], dtype=x.dtype))
    z = TF.batch_norm(x, *stats, w, b, training) + r
    return {"relu": TF.relu, "silu": TF.silu}.get(activation, lambda t: getattr(TF, activation)(t, param))(z)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS, ids=[a for a, _ in ACTS])
def test_torch_func_transforms_equal_torch_composition(act, training):
    activation, param = act
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    r = torch.randn(5, 3, 4, dtype=torch.float64)
    results = {}
    for fused in (True, False):
        f = lambda x, w, b, r: _functional(x, w, b, r, activation, param, training, fused)  # noqa: E731
        loss = lambda x, w, b, r: (f(x, w, b, r) ** 2).sum()  # noqa: E731
        results[fused] = {
            "vmap": torch.func.vmap(f, in_dims=(0, None, None, 0))(
                torch.stack([x, x * 2]), w, b, torch.stack([r, -r])
            ),
            "grad": torch.func.grad(loss, argnums=(0, 1, 2, 3))(x, w, b, r),
            "jvp": torch.func.jvp(f, (x, w, b, r), (r, w, b, x)),
            "jacrev_w": torch.func.jacrev(f, argnums=1)(x, w, b, r),
            "hessian_b": torch.func.hessian(loss, argnums=2)(x, w, b, r),
        }
    for name in results[True]:
        got, want = results[True][name], results[False][name]
        for i, (a, c) in enumerate(zip(torch.utils._pytree.tree_leaves(got),
                                       torch.utils._pytree.tree_leaves(want))):
            assert_close(a, c, torch.float64, f"{name}[{i}]")


def test_module_under_forward_ad():
    import torch.autograd.forward_ad as fwAD

    fused, twin = _pair()
    x, tangent = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    outs = []
    for m in (fused, twin):
        with fwAD.dual_level():
            out = m(fwAD.make_dual(x, tangent))
            outs.append(fwAD.unpack_dual(out))
    assert_close(outs[0].primal, outs[1].primal, torch.float32, "primal")
    assert_close(outs[0].tangent, outs[1].tangent, torch.float32, "tangent")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_matches_torch(dtype):
    fused, twin = _pair()
    x = torch.randn(4, 4, 6, 6)
    outs = []
    for m in (fused, twin):
        with torch.autocast("cpu", dtype=dtype):
            out = m(x)
        out.float().square().sum().backward()
        outs.append(out)
    assert outs[0].dtype == outs[1].dtype
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **tol)
    for (name, p), (_, q) in zip(fused.named_parameters(), twin.named_parameters()):
        scale = max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2 * scale, msg=name)
