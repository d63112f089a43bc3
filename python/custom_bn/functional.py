"""Functional interface: ``custom_bn.functional.batch_norm``, a twin of
``torch.nn.functional.batch_norm`` backed by the ``torch.ops.custom_bn`` operators."""

from typing import Optional

import torch
from torch import Tensor

from . import _transforms

__all__ = ["batch_norm"]

_forward_op = torch.ops.custom_bn.batch_norm_forward.default


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch normalization over the channel dimension, a drop-in for
    :func:`torch.nn.functional.batch_norm`.

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
        * returns: a tensor of input's shape and dtype, in the memory format torch gives
          (channels-last input, dense or sliced, gives channels-last output).

    In training mode the batch statistics (mean and biased variance over every dimension but
    ``C``) normalize ``input`` and, when given, ``running_mean`` / ``running_var`` are updated in
    place: ``r = (1 - momentum) * r + momentum * batch_stat``, the variance unbiased. In
    evaluation mode (``training=False``) the running statistics normalize ``input``.
    """
    empty_1d = input.dim() == 1 and input.numel() == 0
    if empty_1d:  # torch's empty (0,) input: zero channels; the operators take it as (0, 0)
        input = input.view(0, 0)
    if input.dim() >= 2:
        weight = _as_channel_vector(weight, input.shape[1])
        bias = _as_channel_vector(bias, input.shape[1])
    if torch.jit.is_scripting():
        output = torch.ops.custom_bn.batch_norm_forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )[0]
    else:
        output = _eager_batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )
    return output.view(0) if empty_1d else output


def _as_channel_vector(t: Optional[Tensor], channels: int) -> Optional[Tensor]:
    """weight/bias of any shape with C elements, as torch accepts them, viewed as ``(C,)``
    (a differentiable reshape, so the gradient comes back in the caller's shape). Any other
    shape is left to the operator's check."""
    if t is not None and t.dim() != 1 and t.numel() == channels:
        return t.reshape(channels)
    return t


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
) -> Tensor:
    """The operator call outside TorchScript (which has its own branch above)."""
    if not training and torch.compiler.is_compiling():
        # Evaluation only reads the running statistics, but the operator's schema marks them
        # written (training writes them), so a traced graph (torch.export, AOTInductor) would
        # carry a write-back of unchanged buffers. Traced evaluation reads copies instead.
        running_mean = None if running_mean is None else running_mean.clone()
        running_var = None if running_var is None else running_var.clone()
    if _transforms.transforms_active():
        return _transforms.BatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )[0]
    return _forward_op(input, weight, bias, running_mean, running_var, training, momentum, eps)[0]

