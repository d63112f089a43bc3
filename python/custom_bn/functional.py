"""Functional interface: ``custom_bn.functional.batch_norm``, a twin of
``torch.nn.functional.batch_norm`` backed by the ``torch.ops.custom_bn`` operators."""

from typing import Optional

import torch
from torch import Tensor

from . import _meta, _transforms

__all__ = ["batch_norm", "batch_norm_act_"]

_forward_op = torch.ops.custom_bn.batch_norm_forward.default
_act_forward_op = torch.ops.custom_bn.batch_norm_act_forward.default
_inplace_forward_op = torch.ops.custom_bn.batch_norm_act_inplace_forward.default
_inference_op = torch.ops.custom_bn.batch_norm_inference.default


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "identity",
    activation_param: Optional[float] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    r"""Batch normalization over the channel dimension, a drop-in for
    :func:`torch.nn.functional.batch_norm`, optionally fused with a residual add and an
    activation: ``act(batch_norm(input, ...) + residual)`` in one pass over memory (and one
    fused backward).

    Shapes:
        * ``input``: ``(N, C, *)``, any number of spatial dims (``(N, C)``, ``(N, C, L)``,
          ``(N, C, H, W)``, ``(N, C, D, H, W)``, ...); float64,
          float32, float16 or bfloat16; any strides (channels-last is kept).
        * ``weight``, ``bias``, ``running_mean``, ``running_var``: ``(C,)`` or ``None``, with
          input's dtype or (for float16/bfloat16 input) float32. As in torch, ``weight`` and
          ``bias`` may have any shape of ``C`` elements (``(C, 1)``, ...); their gradients keep
          that shape.
        * the empty 1-D input ``(0,)`` (``C = 0``, per-channel tensors empty or ``None``) is
          accepted, as torch accepts it, and gives an empty output.
        * ``residual``: ``None`` or a tensor of input's shape (any strides; read in input's
          memory format), added after the normalization, before the activation. Of another
          floating dtype, both are computed in the promoted dtype (torch's ``BN(x) + residual``
          under autocast gives that dtype too).
        * returns: a tensor of input's shape and dtype, in the memory format torch gives
          (channels-last input, dense or sliced, gives channels-last output).

    ``activation`` is one of ``"identity"`` (the default: plain batch norm), ``"relu"``,
    ``"leaky_relu"`` (``activation_param``: the negative slope, default 0.01), ``"elu"``
    (``activation_param``: alpha, default 1.0) or ``"silu"``; an ``activation_param`` for an
    activation that takes none is a ValueError. The result equals the torch.nn composition
    ``F.<activation>(F.batch_norm(...) + residual)``, gradients included (the residual's too,
    and second derivatives); float16/bfloat16 are rounded once, at the end. (The three
    epilogue arguments are meant to be passed by keyword; they are not keyword-only because
    TorchScript cannot compile keyword-only arguments with defaults.)

    In training mode the batch statistics (mean and biased variance over every dimension but
    ``C``) normalize ``input`` and, when given, ``running_mean`` / ``running_var`` are updated in
    place: ``r = (1 - momentum) * r + momentum * batch_stat``, the variance unbiased. In
    evaluation mode (``training=False``) the running statistics normalize ``input``.
    """
    param = resolve_activation_param(activation, activation_param)
    empty_1d = input.dim() == 1 and input.numel() == 0
    if empty_1d:  # torch's empty (0,) input: zero channels; the operators take it as (0, 0)
        input = input.view(0, 0)
        if residual is not None:
            residual = residual.view(0, 0)
    if residual is not None and residual.dtype != input.dtype:
        # As torch's BN(x) + residual: the sum takes the promoted dtype (autocast hands a
        # float16 conv output and a float32 skip connection). The operators take one dtype.
        common = torch.promote_types(input.dtype, residual.dtype)
        input, residual = input.to(common), residual.to(common)
    if input.dim() >= 2:
        weight = _as_channel_vector(weight, input.shape[1])
        bias = _as_channel_vector(bias, input.shape[1])
    fused = activation != "identity" or residual is not None
    if torch.jit.is_scripting():
        if fused:
            output = torch.ops.custom_bn.batch_norm_act_forward(
                input, weight, bias, running_mean, running_var, residual, training, momentum,
                eps, activation, param,
            )[0]
        else:
            output = torch.ops.custom_bn.batch_norm_forward(
                input, weight, bias, running_mean, running_var, training, momentum, eps
            )[0]
    else:
        output = _eager_batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps,
            activation, param, residual,
        )
    return output.view(0) if empty_1d else output


def batch_norm_act_(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: Optional[float] = None,
) -> Tensor:
    r"""In-place activated batch norm: writes ``act(batch_norm(input, ...))`` into ``input`` and
    returns ``input``; the memory-saving form of :func:`batch_norm` with an activation.

    The backward keeps only this output: it recovers the normalized input by inverting the
    activation and the affine map, ``x_hat = (act^-1(y) - bias) / weight``. Hence:

    * ``activation`` must be invertible: ``"leaky_relu"`` (the default; ``activation_param``
      the negative slope, default 0.01, must be positive), ``"elu"`` (alpha, default 1.0, must
      be positive) or ``"identity"``; others are a ValueError.
    * when autograd records the call, ``weight`` must have no zero entry (ValueError, raised
      before ``input`` is touched). Negative entries are fine. The parameters mean what they
      mean in torch.nn (no reparametrisation), so checkpoints move between the two unchanged.
      Where elu saturates (output within rounding of ``-alpha``) the input cannot be
      recovered; those elements get the gradient of the clamped pre-activation.
    * autograd sees the overwrite: using the old value of ``input`` in another backward raises
      autograd's "modified by an inplace operation" error, and a leaf that requires grad is
      rejected, as for any in-place op. There is no double backward (``create_graph=True``
      raises); use :func:`batch_norm` with ``activation=`` for that.

    Arguments and running-stat update as :func:`batch_norm` (no residual). A non-dense ``input``
    is computed in a dense copy that is then copied back. Under torch.compile, torch.export and
    torch.func transforms the result is computed out of place and copied into ``input`` (same
    values and gradients; the compiler plans the memory), so the saving is an eager-mode one.
    """
    param = resolve_activation_param(activation, activation_param)
    target = input.view(0, 0) if input.dim() == 1 and input.numel() == 0 else input
    if target.dim() >= 2:
        weight = _as_channel_vector(weight, target.shape[1])
        bias = _as_channel_vector(bias, target.shape[1])
    if torch.jit.is_scripting():
        torch.ops.custom_bn.batch_norm_act_inplace_forward(
            target, weight, bias, running_mean, running_var, training, momentum, eps,
            activation, param,
        )
    else:
        _eager_batch_norm_act_(
            target, weight, bias, running_mean, running_var, training, momentum, eps,
            activation, param,
        )
    return input


def resolve_activation_param(activation: str, activation_param: Optional[float]) -> float:
    """``activation_param`` as given or the activation's default (leaky_relu: 0.01, elu: 1.0);
    ValueError for an unknown activation or a parameter the activation does not take."""
    if activation not in ["identity", "relu", "leaky_relu", "elu", "silu"]:
        raise ValueError(
            "custom_bn.batch_norm: activation must be one of 'identity', 'relu', 'leaky_relu', "
            "'elu', 'silu', got '" + activation + "'"
        )
    if activation_param is None:
        if activation == "leaky_relu":
            return 0.01
        return 1.0 if activation == "elu" else 0.0
    if activation not in ("leaky_relu", "elu"):
        raise ValueError(
            "custom_bn.batch_norm: activation_param is the negative slope of leaky_relu or the "
            "alpha of elu; activation '" + activation + "' takes none, got "
            + str(activation_param)
        )
    return float(activation_param)


def _as_channel_vector(t: Optional[Tensor], channels: int) -> Optional[Tensor]:
    """weight/bias of any shape with C elements, as torch accepts them, viewed as ``(C,)``
    (a differentiable reshape, so the gradient comes back in the caller's shape). Any other
    shape is left to the operator's check."""
    if t is not None and t.dim() != 1 and t.numel() == channels:
        return t.reshape(channels)
    return t


@torch.jit.unused
def _onnx_exporting() -> bool:
    """torch.onnx.export is tracing the model (dynamo or TorchScript exporter)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export()


@torch.jit.unused
def _eager_batch_norm(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    activation: str = "identity",
    activation_param: float = 0.0,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The operator call outside TorchScript (which has its own branch above)."""
    if _onnx_exporting():
        # ONNX export (torch.onnx.export, with or without dynamo): torch's own batch norm and
        # epilogue, which every ONNX exporter translates into standard operators
        # (BatchNormalization, Add, the activation), so no translation table is needed.
        output = torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
        return _transforms.epilogue(output, residual, activation, activation_param)
    if (not training and running_mean is not None and running_var is not None
            and torch.compiler.is_compiling() and not _transforms.transforms_active()):
        # Evaluation only reads the running statistics, but the training operators' schemas mark
        # them written, so a traced graph (torch.export, AOTInductor, ONNX) would carry a
        # write-back of unchanged buffers. Traced evaluation calls the operator that only reads.
        return _inference_op(
            input, weight, bias, running_mean, running_var, residual, eps, activation,
            activation_param,
        )
    fused = activation != "identity" or residual is not None
    if _transforms.transforms_active():
        # torch.func / forward AD: batch norm with its derivative rules, then the epilogue as
        # torch ops, whose rules torch.func already has.
        output = _transforms.BatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )[0]
        return _transforms.epilogue(output, residual, activation, activation_param)
    if fused:
        return _act_forward_op(
            input, weight, bias, running_mean, running_var, residual, training, momentum, eps,
            activation, activation_param,
        )[0]
    return _forward_op(input, weight, bias, running_mean, running_var, training, momentum, eps)[0]


@torch.jit.unused
def _eager_batch_norm_act_(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
) -> None:
    """The in-place operator call outside TorchScript."""
    if torch.compiler.is_compiling() or _transforms.transforms_active() or _onnx_exporting():
        # Traced graphs (ONNX's TorchScript exporter too, which would drop an in-place op
        # whose result nothing reads) and torch.func get the fused op's values and
        # derivatives, written into input with copy_, which functionalization and the
        # transforms handle. The fused op keeps its input for backward: it gets a copy, since
        # input is then overwritten.
        _meta.check_inplace_activation("custom_bn.batch_norm", activation, activation_param)
        output = _eager_batch_norm(
            input.clone(), weight, bias, running_mean, running_var, training, momentum, eps,
            activation, activation_param,
        )
        input.copy_(output)
        return
    _inplace_forward_op(
        input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
        activation_param,
    )
