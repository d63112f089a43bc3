"""ONNX export of models with custom_bn layers, as every tutorial calls it
(``torch.onnx.export(model, args, path)``, no extra argument): a standard ONNX graph
(BatchNormalization, Add, the activations; no custom domain) that onnxruntime runs to the eager
outputs, in evaluation mode, float32; and the translation table for a program exported before."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import custom_bn
import custom_bn.onnx
from bn_testing import Args

STANDARD = {"BatchNormalization", "Add", "Relu", "LeakyRelu", "Elu", "Sigmoid", "Mul", "Conv",
            "ReduceMean", "Slice", "Tile", "Expand", "Shape", "Constant", "CastLike", "Reshape",
            "Identity", "Concat", "Flatten", "Gemm", "MatMul", "Cast", "Squeeze", "Unsqueeze"}


class _Model(nn.Module):
    """Every custom_bn layer kind, with non-default eps and activation parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = custom_bn.BatchNorm2d(4, eps=0.1)
        self.act = custom_bn.BatchNormAct2d(4, "leaky_relu", 0.2, eps=1e-3)
        self.silu = custom_bn.BatchNormAct2d(4, "silu", affine=False)
        self.inplace = custom_bn.InPlaceBatchNormAct2d(4, "elu", 0.5, eps=0.05)
        self.sync = custom_bn.SyncBatchNorm(4, eps=1e-3, activation="relu")
        self.bn3d = custom_bn.BatchNormAct3d(4, "elu", 0.7)
        self.bn1d = custom_bn.BatchNorm1d(4, eps=1e-3)
        self.head = custom_bn.BatchNormAct1d(4, "relu")

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.act(y, residual=y * 0.5)
        z = self.sync(self.inplace(self.silu(z) * 1.0))
        z = self.bn3d(z.unsqueeze(2)).squeeze(2)
        z = self.bn1d(z.flatten(2)).mean(2)
        return self.head(z)


def _torch_forward(model: _Model, x: torch.Tensor) -> torch.Tensor:
    """_Model.forward computed with torch.nn.functional in evaluation mode."""

    def bn(m, x, residual=None):
        y = TF.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        act = Args(activation=getattr(m, "activation", "identity"),
                   activation_param=getattr(m, "activation_param", None))
        return act.activate(y if residual is None else y + residual)

    y = bn(model.bn, model.conv(x))
    z = bn(model.act, y, y * 0.5)
    z = bn(model.sync, bn(model.inplace, bn(model.silu, z) * 1.0))
    z = bn(model.bn3d, z.unsqueeze(2)).squeeze(2)
    z = bn(model.bn1d, z.flatten(2)).mean(2)
    return bn(model.head, z)


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
    return model.eval()


def _run(path: str, x: torch.Tensor):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})
    return got


def _assert_standard(path: str, batch_norms: int) -> None:
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert {n.domain for n in graph.node} <= {""}, "custom domain in the exported graph"
    assert ops <= STANDARD, ops - STANDARD
    # torch.onnx's optimizer may fold the first BatchNorm into the Conv before it
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) >= batch_norms


@pytest.mark.parametrize("extra", [{}, {"dynamo": True}, {"dynamo": False}],
                         ids=["default-call", "dynamo", "torchscript-exporter"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_torch_onnx_export_needs_no_extra_argument(tmp_path, channels_last, extra):
    model = _randomized(_Model())
    x = torch.randn(2, 3, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = {k: (v.clone(), v._version) for k, v in model.state_dict().items()}
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (x,), path, **extra)
    for k, v in model.state_dict().items():  # exporting changed nothing
        assert torch.equal(v, before[k][0]) and v._version == before[k][1], k
    _assert_standard(path, 7)
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(_run(path, x), want.numpy(), rtol=1e-5, atol=1e-5)
    # and what torch computes with the same weights (eps and activation parameters kept)
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, x), _torch_forward(model, x).numpy(), rtol=1e-5, atol=1e-5)


def test_export_helper_and_translation_table_for_an_exported_program(tmp_path):
    """A program exported beforehand carries the custom_bn operators themselves: the translation
    table turns them into standard ONNX."""
    model = _randomized(_Model())
    x = torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (x,))
    assert torch.ops.custom_bn.batch_norm_inference.default in {
        n.target for n in program.graph.nodes}
    path = str(tmp_path / "program.onnx")
    torch.onnx.export(program, (x,), path, custom_translation_table=custom_bn.onnx.translation_table())
    _assert_standard(path, 7)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run(path, x), want, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "helper.onnx")
    custom_bn.onnx.export(model, (x,), path)
    np.testing.assert_allclose(_run(path, x), want, rtol=1e-5, atol=1e-5)
