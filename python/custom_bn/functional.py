"""Functional interface: ``custom_bn.functional.batch_norm``, a twin of
``torch.nn.functional.batch_norm`` backed by the ``torch.ops.custom_bn`` operators."""

from typing import Optional

import torch
from torch import Tensor

__all__ = ["batch_norm"]


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "identity",
    activation_param: Optional[float] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    r"""Batch normalization over the channel dimension, a drop-in for
    :func:`torch.nn.functional.batch_norm`.

    Shapes:
        * ``input``: ``(N, C, *)``, any number of spatial dims (``(N, C)``, ``(N, C, L)``,
          ``(N, C, H, W)``, ``(N, C, D, H, W)``, ...); float64,
          float32, float16 or bfloat16; any strides (channels-last is kept).
        * ``weight``, ``bias``, ``running_mean``, ``running_var``: ``(C,)`` or ``None``, with
          input's dtype or (for float16/bfloat16 input) float32.
        * returns: a tensor of input's shape and dtype.

    In training mode the batch statistics (mean and biased variance over every dimension but
    ``C``) normalize ``input`` and, when given, ``running_mean`` / ``running_var`` are updated in
    place: ``r = (1 - momentum) * r + momentum * batch_stat``, the variance unbiased. In
    evaluation mode (``training=False``) the running statistics normalize ``input``.

    ``activation``, ``activation_param`` and ``residual`` are reserved for the fused
    BN + activation variants; only their defaults are accepted here.
    """
    if activation != "identity" or activation_param is not None or residual is not None:
        raise NotImplementedError(
            "custom_bn.functional.batch_norm: fused activation/residual is not supported yet; "
            f"expected activation='identity', activation_param=None, residual=None, got "
            f"activation={activation!r}, activation_param={activation_param!r}, "
            f"residual={'None' if residual is None else 'a tensor'}"
        )
    output, _, _ = torch.ops.custom_bn.batch_norm_forward.default(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )
    return output
