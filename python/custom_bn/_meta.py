"""Fake (meta) kernels of the custom_bn operators, for torch.compile, torch.export and FakeTensor.

A fake kernel computes only output metadata (shape, dtype, strides, device). It must agree
exactly with what the real CPU/CUDA kernels return, so every rule here mirrors csrc/checks.h:

* outputs and gradients of ``input``'s shape have the memory format torch's batch norm gives
  them (``batch_norm_memory_format``: channels-last for a channels-last input, dense or sliced);
* ``save_mean`` / ``save_invstd`` have shape ``[C]`` and the accumulation dtype (float32 for
  float16/bfloat16 input, else input's dtype);
* ``grad_weight`` / ``grad_bias`` have weight's dtype, or the accumulation dtype without a weight
  (csrc/checks.h: channel_gradient_dtype);
* a gradient masked out by ``output_mask`` is an empty tensor of shape ``[0]`` and input's dtype.

The cheap argument checks (rank, dtype, ``[C]`` shapes) are repeated so that a bad call fails
while tracing with the same kind of error as in eager mode.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

_FORWARD = "custom_bn::batch_norm_forward"
_BACKWARD = "custom_bn::batch_norm_backward"
_ACT_FORWARD = "custom_bn::batch_norm_act_forward"
_ACT_BACKWARD = "custom_bn::batch_norm_act_backward"
_INPLACE_FORWARD = "custom_bn::batch_norm_act_inplace_forward"
_INPLACE_BACKWARD = "custom_bn::batch_norm_act_inplace_backward"
_INFERENCE = "custom_bn::batch_norm_inference"
_STATS = "custom_bn::batch_norm_stats"
_BACKWARD_REDUCE = "custom_bn::batch_norm_backward_reduce"
_BACKWARD_ELEMT = "custom_bn::batch_norm_backward_elemt"
ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def batch_norm_memory_format(input: Tensor) -> torch.memory_format:
    """Memory format of an output shaped like ``input``: torch's choice for batch norm, the rule
    of csrc/checks.h (contiguous stays contiguous, dense channels-last stays channels-last, any
    other input takes ``suggest_memory_format``)."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return suggest_memory_format(input)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved statistics: float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in _REDUCED_DTYPES else dtype


def _check_input(op: str, input: Tensor) -> None:
    torch._check(
        input.dim() >= 2,
        lambda: f"{op}: input must have shape (N, C, *) with at least 2 dims, "
        f"got {input.dim()}-D input of shape {list(input.shape)}",
    )
    torch._check_not_implemented(
        input.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: input must be a floating-point tensor (float64, float32, float16 or "
        f"bfloat16), got {input.dtype}",
    )


def _check_channel_counts(op: str, input: Tensor, named: Sequence[Tuple[str, Optional[Tensor]]]) -> None:
    channels = input.shape[1]
    for name, t in named:
        if t is not None:
            torch._check(
                t.numel() == channels,
                lambda: f"{op}: {name} must have shape [C]=[{channels}] where C = input.size(1), "
                f"got shape {list(t.shape)}",
            )


def _check_channel_tensors(
    op: str, input: Tensor, named: Sequence[Tuple[str, Optional[Tensor]]]
) -> None:
    shared: Optional[Tensor] = None
    shared_name = ""
    for name, t in named:
        if t is None:
            continue
        torch._check(
            t.dim() == 1,
            lambda: f"{op}: {name} must have shape [C]=[{input.shape[1]}] where C = input.size(1), "
            f"got shape {list(t.shape)}",
        )
        torch._check(
            t.device == input.device,
            lambda: f"{op}: {name} must be on the same device as input ({input.device}), "
            f"got {t.device}",
        )
        allowed = t.dtype == input.dtype or (
            t.dtype == torch.float32 and input.dtype in _REDUCED_DTYPES
        )
        torch._check(
            allowed,
            lambda: f"{op}: {name} must have dtype {input.dtype} to match input, got {t.dtype}",
        )
        if shared is None:
            shared, shared_name = t, name
        else:
            torch._check(
                t.dtype == shared.dtype,
                lambda: f"{op}: {name} must have the same dtype as {shared_name} "
                f"({shared.dtype}), got {t.dtype}",
            )


def check_activation(op: str, activation: str) -> None:
    torch._check_value(
        activation in ACTIVATIONS,
        lambda: f"{op}: activation must be one of 'identity', 'relu', 'leaky_relu', 'elu', "
        f"'silu', got '{activation}'",
    )


def check_inplace_activation(op: str, activation: str, activation_param: float) -> None:
    """The in-place mode inverts the activation: identity, leaky_relu with a positive slope or
    elu with a positive alpha (ValueError otherwise), as csrc/checks.h."""
    check_activation(op, activation)
    torch._check_value(
        activation == "identity" or (activation in ("leaky_relu", "elu") and activation_param > 0),
        lambda: f"{op}: the in-place mode recovers its input from the output, so the activation "
        "must be invertible: 'identity', 'leaky_relu' with a positive slope or 'elu' with a "
        f"positive alpha, got '{activation}' with activation_param {activation_param} "
        "(use BatchNormAct for the others)",
    )


def _check_residual(op: str, input: Tensor, residual: Optional[Tensor]) -> None:
    if residual is None:
        return
    torch._check(
        residual.shape == input.shape,
        lambda: f"{op}: residual must have input's shape {list(input.shape)}, "
        f"got {list(residual.shape)}",
    )
    torch._check(
        residual.dtype == input.dtype,
        lambda: f"{op}: residual must have input's dtype {input.dtype}, got {residual.dtype}",
    )
    torch._check(
        residual.device == input.device,
        lambda: f"{op}: residual must be on input's device ({input.device}), got {residual.device}",
    )


@torch.library.register_fake(_ACT_FORWARD)
def _batch_norm_act_forward_fake(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    residual: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    outputs = _batch_norm_forward_fake(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )
    _check_residual("custom_bn.batch_norm", input, residual)
    check_activation("custom_bn.batch_norm", activation)
    return outputs


@torch.library.register_fake(_ACT_BACKWARD)
def _batch_norm_act_backward_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    eps: float,
    activation: str,
    activation_param: float,
    output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "custom_bn.batch_norm_backward"
    grads = _batch_norm_backward_fake(
        grad_output, input, weight, save_mean, save_invstd, training, eps, output_mask[:3]
    )
    _check_channel_counts(op, input, [("bias", bias)])
    _check_channel_tensors(op, input, [("weight", weight), ("bias", bias)])
    _check_residual(op, input, residual)
    check_activation(op, activation)
    if output_mask[3]:
        grad_residual = torch.empty_like(input, memory_format=batch_norm_memory_format(input))
    else:
        grad_residual = input.new_empty((0,))
    return grads[0], grads[1], grads[2], grad_residual


@torch.library.register_fake(_INFERENCE)
def _batch_norm_inference_fake(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    residual: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tensor:
    return _batch_norm_act_forward_fake(
        input, weight, bias, running_mean, running_var, residual, False, 0.0, eps, activation,
        activation_param,
    )[0]


@torch.library.register_fake(_INPLACE_FORWARD)
def _batch_norm_act_inplace_forward_fake(
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
) -> Tuple[Tensor, Tensor]:
    _, save_mean, save_invstd = _batch_norm_forward_fake(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )
    check_inplace_activation("custom_bn.batch_norm", activation, activation_param)
    return save_mean, save_invstd


@torch.library.register_fake(_INPLACE_BACKWARD)
def _batch_norm_act_inplace_backward_fake(
    grad_output: Tensor,
    output: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    eps: float,
    activation: str,
    activation_param: float,
    output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    op = "custom_bn.batch_norm_backward"
    grads = _batch_norm_backward_fake(
        grad_output, output, weight, save_mean, save_invstd, training, eps, output_mask
    )
    _check_channel_counts(op, output, [("bias", bias)])
    _check_channel_tensors(op, output, [("weight", weight), ("bias", bias)])
    check_inplace_activation(op, activation, activation_param)
    return grads


@torch.library.register_fake(_FORWARD)
def _batch_norm_forward_fake(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    op = "custom_bn.batch_norm"
    _check_input(op, input)
    # In torch's order, as csrc/checks.h: batch size and eps (ValueError), per-channel element
    # counts, a missing running stat in evaluation mode (RuntimeError), one running stat without
    # the other (ValueError), then shapes, devices and dtypes.
    torch._check_value(
        not training or math.prod(input.shape[:1] + input.shape[2:]) != 1,
        lambda: f"{op}: Expected more than 1 value per channel when training, got input size "
        f"{list(input.shape)}",
    )
    torch._check_value(
        eps > 0 if training else eps >= 0,
        lambda: f"{op}: eps must be "
        f"{'positive in training' if training else 'non-negative'}, got {eps}",
    )
    named = [
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ]
    _check_channel_counts(op, input, named)
    torch._check(
        training or (running_mean is not None and running_var is not None),
        lambda: f"{op}: running_mean and running_var must be defined in evaluation mode "
        "(training=False)",
    )
    torch._check_value(
        (running_mean is None) == (running_var is None),
        lambda: f"{op}: running_mean and running_var must be given together",
    )
    _check_channel_tensors(op, input, named)
    channels = input.shape[1]
    output = torch.empty_like(input, memory_format=batch_norm_memory_format(input))
    stats_dtype = accumulate_dtype(input.dtype)
    save_mean = input.new_empty((channels,), dtype=stats_dtype)
    save_invstd = input.new_empty((channels,), dtype=stats_dtype)
    return output, save_mean, save_invstd


@torch.library.register_fake(_BACKWARD)
def _batch_norm_backward_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    eps: float,
    output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    op = "custom_bn.batch_norm_backward"
    _check_input(op, input)
    torch._check(
        grad_output.shape == input.shape,
        lambda: f"{op}: grad_output must have input's shape {list(input.shape)}, "
        f"got {list(grad_output.shape)}",
    )
    torch._check(
        grad_output.dtype == input.dtype,
        lambda: f"{op}: grad_output must have input's dtype {input.dtype}, got {grad_output.dtype}",
    )
    for name, stat in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        torch._check(
            stat.dim() == 1 and stat.shape[0] == input.shape[1],
            lambda: f"{op}: {name} must have shape [C]=[{input.shape[1]}], got {list(stat.shape)}",
        )
        torch._check(
            stat.dtype == accumulate_dtype(input.dtype),
            lambda: f"{op}: {name} must be a {accumulate_dtype(input.dtype)} tensor, "
            f"got {stat.dtype}",
        )
    _check_channel_counts(op, input, [("weight", weight)])
    _check_channel_tensors(op, input, [("weight", weight)])
    channels = input.shape[1]
    param_dtype = weight.dtype if weight is not None else accumulate_dtype(input.dtype)
    if output_mask[0]:
        grad_input = torch.empty_like(input, memory_format=batch_norm_memory_format(input))
    else:
        grad_input = input.new_empty((0,))
    grads = [grad_input]
    for wanted in (output_mask[1], output_mask[2]):
        grads.append(
            input.new_empty((channels,), dtype=param_dtype) if wanted else input.new_empty((0,))
        )
    return grads[0], grads[1], grads[2]


# SyncBatchNorm's building blocks (csrc/ops/sync_batch_norm.h).


@torch.library.register_fake(_STATS)
def _batch_norm_stats_fake(input: Tensor) -> Tuple[Tensor, Tensor]:
    _check_input("custom_bn.batch_norm_stats", input)
    stats_dtype = accumulate_dtype(input.dtype)
    channels = input.shape[1]
    return input.new_empty((channels,), dtype=stats_dtype), input.new_empty((channels,), dtype=stats_dtype)


def _check_split_backward(op, grad_output, input, weight, bias, residual, mean, invstd, activation):
    _batch_norm_backward_fake(grad_output, input, weight, mean, invstd, True, 0.0, [False] * 3)
    _check_channel_counts(op, input, [("bias", bias)])
    _check_channel_tensors(op, input, [("weight", weight), ("bias", bias)])
    _check_residual(op, input, residual)
    check_activation(op, activation)


@torch.library.register_fake(_BACKWARD_REDUCE)
def _batch_norm_backward_reduce_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    activation: str,
    activation_param: float,
) -> Tensor:
    _check_split_backward("custom_bn.batch_norm_backward_reduce", grad_output, input, weight, bias,
                          residual, mean, invstd, activation)
    return input.new_empty((2, input.shape[1]), dtype=accumulate_dtype(input.dtype))


@torch.library.register_fake(_BACKWARD_ELEMT)
def _batch_norm_backward_elemt_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    sums: Tensor,
    count: int,
    activation: str,
    activation_param: float,
    output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor]:
    op = "custom_bn.batch_norm_backward_elemt"
    _check_split_backward(op, grad_output, input, weight, bias, residual, mean, invstd, activation)
    torch._check(
        sums.dim() == 2 and sums.shape[0] == 2 and sums.shape[1] == input.shape[1],
        lambda: f"{op}: sums must have shape [2, C]=[2, {input.shape[1]}], got {list(sums.shape)}",
    )
    fmt = batch_norm_memory_format(input)
    return tuple(  # type: ignore[return-value]
        torch.empty_like(input, memory_format=fmt) if wanted else input.new_empty((0,))
        for wanted in output_mask
    )
