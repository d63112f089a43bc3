"""ONNX export (torch.onnx.export(..., dynamo=True)) of models with custom_bn layers: a standard
ONNX graph (BatchNormalization, Add, the activations; no custom domain) that onnxruntime runs to
the eager outputs, in evaluation mode, float32."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import custom_bn
import custom_bn.onnx

STANDARD = {"BatchNormalization", "Add", "Relu", "LeakyRelu", "Elu", "Sigmoid", "Mul", "Conv",
            "ReduceMean", "Slice", "Tile", "Expand", "Shape", "Constant", "CastLike", "Reshape",
            "Identity", "Concat", "Flatten", "Gemm", "MatMul", "Cast"}


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = custom_bn.BatchNorm2d(4)
        self.act = custom_bn.BatchNormAct2d(4, "leaky_relu", 0.2)
        self.silu = custom_bn.BatchNormAct2d(4, "silu", affine=False)
        self.inplace = custom_bn.InPlaceBatchNormAct2d(4, "elu", 0.5)
        self.head = custom_bn.BatchNormAct1d(4, "relu")

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.act(y, residual=y * 0.5)
        z = self.inplace(self.silu(z) * 1.0)
        return self.head(z.mean((2, 3)))


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


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, channels_last):
    model = _randomized(_Model())
    x = torch.randn(2, 3, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    path = str(tmp_path / "model.onnx")
    custom_bn.onnx.export(model, (x,), path)
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert {n.domain for n in graph.node} <= {""}, "custom domain in the exported graph"
    assert ops <= STANDARD, ops - STANDARD
    # five BatchNorm layers; torch.onnx's optimizer folds the first into the Conv before it
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) >= 4
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_translation_table_with_torch_onnx_export(tmp_path):
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 1), custom_bn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(1, 3, 4, 4)
    path = str(tmp_path / "plain.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True,
                      custom_translation_table=custom_bn.onnx.translation_table())
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
