"""ONNX export of models with custom_bn layers: translations of the custom_bn operators into
standard ONNX (BatchNormalization, then Add for the residual and the activation's own operator),
so the exported graph runs in onnxruntime or any ONNX backend, with no custom domain.

    torch.onnx.export(model.eval(), (x,), "model.onnx", dynamo=True,
                      custom_translation_table=custom_bn.onnx.translation_table())

or ``custom_bn.onnx.export(model, (x,), "model.onnx")``, which adds the table. Inference graphs:
in evaluation mode a traced custom_bn layer calls ``custom_bn::batch_norm_inference`` (the
operator that reads the running statistics without the training form's write), which is what
is translated; a model exported in training mode has no translation for its BatchNorm and the
export fails. InPlaceBatchNormAct exports like BatchNormAct (tracing computes it out of place).
onnx and onnxscript must be installed (``make setup`` installs them).
"""

from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["translation_table", "export"]


def _translations() -> Dict[Any, Callable]:
    from onnxscript import opset18 as op

    def channels(x):
        return op.Shape(x, start=1, end=2)

    def per_channel(t, x, value: float, like):
        # A missing weight (bias) is ones (zeros) of the statistics' dtype.
        if t is not None:
            return t
        return op.Expand(op.CastLike(op.Constant(value_float=value), like), channels(x))

    def activate(z, activation: str, param: float):
        if activation == "relu":
            return op.Relu(z)
        if activation == "leaky_relu":
            return op.LeakyRelu(z, alpha=param)
        if activation == "elu":
            return op.Elu(z, alpha=param)
        if activation == "silu":
            return op.Mul(z, op.Sigmoid(z))
        return z

    def batch_norm_inference(input, weight, bias, running_mean, running_var, residual,
                             eps: float, activation: str, activation_param: float):
        scale = per_channel(weight, input, 1.0, running_mean)
        shift = per_channel(bias, input, 0.0, running_mean)
        z = op.BatchNormalization(input, scale, shift, running_mean, running_var, epsilon=eps)
        if residual is not None:
            z = op.Add(z, residual)
        return activate(z, activation, activation_param)

    return {torch.ops.custom_bn.batch_norm_inference.default: batch_norm_inference}


def translation_table() -> Dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the custom_bn
    forward operators as standard ONNX operators."""
    return _translations()


def export(model: torch.nn.Module, args: tuple, f: Optional[str] = None, **kwargs: Any):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with custom_bn's translations added
    to any ``custom_translation_table`` given. Returns torch.onnx's ONNXProgram."""
    table = dict(kwargs.pop("custom_translation_table", None) or {})
    table.update(translation_table())
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
