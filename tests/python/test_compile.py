"""torch.compile(fullgraph=True) and torch.export of models built from custom_bn modules,
compared with the same model built from torch.nn modules (same weights) in eager mode.

Compilation is slow on a small CPU machine, so each test compiles one model once per mode and
checks several steps with it.
"""

import pytest
import torch
from torch import nn

import custom_bn
from bn_testing import DEVICES, assert_close


def _model(momentum, norms=custom_bn) -> nn.Module:
    """A small conv net; ``norms`` is the module namespace of its BatchNorms (custom_bn or nn)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        norms.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        norms.BatchNorm2d(6, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 10),
        norms.BatchNorm1d(10, momentum=momentum),
    )


def _torch_twin(model: nn.Module, momentum) -> nn.Module:
    """The same network with torch.nn BatchNorms and ``model``'s parameters and buffers."""
    twin = _model(momentum, nn).to(next(model.parameters()).device)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def _compare_models(compiled: nn.Module, eager: nn.Module, what: str) -> None:
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        assert (a.grad is None) == (b.grad is None), f"{what}: grad of {name}"
        if a.grad is not None:
            # A conv bias followed by BatchNorm has a gradient of exactly 0 in exact arithmetic:
            # what both sides hold is float32 rounding noise of the other gradients' size.
            noise = 1e-5 * max(1.0, max(p.grad.abs().max().item() for p in eager.parameters()))
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=noise,
                                       msg=lambda m: f"{what}: grad of {name}: {m}")
    for (name, a), (_, b) in zip(compiled.named_buffers(), eager.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), f"{what}: {name}"
        else:
            assert_close(a, b, torch.float32, f"{what}: {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "momentum,channels_last",
    [(0.1, False), (None, True)],
    ids=["momentum0.1", "momentum_none-channels_last"],
)
def test_compiled_model_matches_eager(momentum, channels_last, device):
    model = _model(momentum).to(device)
    eager = _torch_twin(model, momentum)
    compiled = torch.compile(model, fullgraph=True)
    for step, training in enumerate([True, True, False]):
        eager.train(training)
        model.train(training)
        x = torch.randn(6, 3, 5, 5, device=device) + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_eager = x.clone().requires_grad_()
        x_compiled = x.clone().requires_grad_()
        y_eager, y_compiled = eager(x_eager), compiled(x_compiled)
        what = f"step {step} ({'train' if training else 'eval'})"
        assert_close(y_compiled, y_eager, torch.float32, f"{what}: output")
        g = torch.randn_like(y_eager)
        y_eager.backward(g)
        y_compiled.backward(g)
        assert_close(x_compiled.grad, x_eager.grad, torch.float32, f"{what}: grad input")
        _compare_models(model, eager, what)
        eager.zero_grad()
        model.zero_grad()
    assert model[1].num_batches_tracked.item() == 2


def test_compiled_graph_calls_the_custom_operator():
    """The operator is captured in the graph (no graph break, no decomposition into aten)."""
    seen = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    bn = custom_bn.BatchNorm2d(4)
    fn = torch.compile(bn, backend=backend, fullgraph=True)
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(fn(x), nn.BatchNorm2d(4)(x))
    op = torch.ops.custom_bn.batch_norm_forward
    assert op in seen or op.default in seen, seen
    assert bn.num_batches_tracked.item() == 1


def test_export_eval_model_matches_eager():
    model = _model(0.1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(6, 3, 5, 5))
    model.eval()
    x = torch.randn(4, 3, 5, 5)
    exported = torch.export.export(model, (x,))
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    # the operator that only reads the running statistics
    assert torch.ops.custom_bn.batch_norm_inference.default in targets
    assert_close(exported.module()(x), _torch_twin(model, 0.1)(x), torch.float32, "exported output")
    # Evaluation reads the running statistics only: no buffer mutation in the exported program,
    # before or after decomposition to the inference IR that AOTInductor compiles (as torch.nn).
    for program in (exported, exported.run_decompositions()):
        assert program.graph_signature.buffers_to_mutate == {}
    assert_close(
        exported.run_decompositions().module()(x), _torch_twin(model, 0.1)(x), torch.float32,
        "decomposed exported output",
    )


def test_export_training_model_mutates_the_same_buffers_as_torch():
    programs = [
        torch.export.export(m.train(), (torch.randn(4, 3, 5, 5),)).run_decompositions()
        for m in (_model(0.1), _torch_twin(_model(0.1), 0.1))
    ]
    ours, theirs = (sorted(p.graph_signature.buffers_to_mutate.values()) for p in programs)
    assert ours == theirs and any("running_mean" in name for name in ours)
