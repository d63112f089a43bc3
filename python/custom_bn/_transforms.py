"""The torch.func and forward-mode AD path of ``custom_bn.functional.batch_norm``.

Plain eager calls go straight to ``torch.ops.custom_bn.batch_norm_forward``, whose derivative is a
C++ ``torch::autograd::Function`` (the one LibTorch programs use). functorch refuses any C++
autograd Function, and such a Function has no forward-mode derivative, so while a torch.func
transform (vmap, grad, jvp, jacrev, jacfwd, hessian, ...) or a forward-AD dual level is active,
the Python face routes the call through :class:`BatchNormFunction` below instead. It runs the same
fused operators and adds what functorch needs:

* ``setup_context``/``backward`` (reverse mode). The backward calls the backward operator, whose
  Autograd kernel switches to a differentiable composite when its result is itself
  differentiated (hessian, jacrev of jacrev, jacfwd of jacrev).
* ``jvp`` (forward mode), written with differentiable torch operations so it can be
  differentiated and batched in turn.
* batching rules for both operators (``torch.library.register_vmap``), the counterparts of
  ATen's rules for ``native_batch_norm``: the vmapped dimension is folded into the channel
  dimension, so one fused kernel call normalizes every batch member with its own statistics.
  The autograd Function uses them through ``generate_vmap_rule=True``.

The choice between the two paths costs one check per call (see :func:`transforms_active`).
"""

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

_forward_op = torch.ops.custom_bn.batch_norm_forward.default
_backward_op = torch.ops.custom_bn.batch_norm_backward.default


def transforms_active() -> bool:
    """True while a torch.func transform or a forward-AD dual level is active: the calls that
    the C++ autograd Function cannot serve. Under torch.compile the operators are traced as they
    are (their derivatives come from the registered autograd kernels)."""
    return (
        forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
    ) and not torch.compiler.is_compiling()


class BatchNormFunction(torch.autograd.Function):
    """``batch_norm_forward`` with reverse-mode, forward-mode and vmap support in Python."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return _forward_op(input, weight, bias, running_mean, running_var, training, momentum, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
        input, weight, bias, _, _, training, _, eps = inputs
        _, save_mean, save_invstd = output
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.save_for_forward(input, weight, save_mean, save_invstd)
        ctx.training = training
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(save_mean, save_invstd)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> Tuple[Optional[Tensor], ...]:
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        mask = [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        ]
        grads = _backward_op(
            grad_output, input, weight, save_mean, save_invstd, ctx.training, ctx.eps, mask
        )
        grad_input, grad_weight, grad_bias = (g if wanted else None for g, wanted in zip(grads, mask))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None

    @staticmethod
    def jvp(
        ctx: Any,
        input_t: Optional[Tensor],
        weight_t: Optional[Tensor],
        bias_t: Optional[Tensor],
        *_: Any,
    ) -> Tuple[Optional[Tensor], None, None]:
        # y = xhat * w + b with xhat = (x - mean) * invstd. In training mean and invstd are the
        # batch statistics, so d(xhat) = invstd * (dx - mean(dx) - xhat * mean(dx * xhat)); in
        # evaluation they are the (constant) running statistics and d(xhat) = invstd * dx.
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        compute = save_mean.dtype
        channels = [1] * input.dim()
        channels[1] = input.shape[1]
        reduce = [0] + list(range(2, input.dim()))
        x = input.to(compute)
        xhat = (x - save_mean.view(channels)) * save_invstd.view(channels)
        tangent: Optional[Tensor] = None
        if input_t is not None:
            dx = input_t.to(compute)
            if ctx.training:
                dx = dx - dx.mean(reduce, keepdim=True) - xhat * (dx * xhat).mean(reduce, keepdim=True)
            tangent = dx * save_invstd.view(channels)
            if weight is not None:
                tangent = tangent * weight.to(compute).view(channels)
        for term in (
            xhat * weight_t.to(compute).view(channels) if weight_t is not None else None,
            bias_t.to(compute).view(channels) if bias_t is not None else None,
        ):
            if term is not None:
                tangent = term if tangent is None else tangent + term
        if tangent is None:
            return None, None, None
        return tangent.expand_as(input).to(input.dtype), None, None


# --- batching rules -------------------------------------------------------------------------


def _batched_first(t: Tensor, bdim: Optional[int], size: int) -> Tensor:
    """``t`` with its vmapped dimension in front (``size`` copies of it when unbatched)."""
    if bdim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _fold_channels(t: Tensor, bdim: Optional[int], size: int) -> Tensor:
    """(B, N, C, *) -> (N, B*C, *): each batch member becomes its own block of channels."""
    t = _batched_first(t, bdim, size).movedim(0, 1)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def _fold_vector(t: Optional[Tensor], bdim: Optional[int], size: int) -> Optional[Tensor]:
    """(B, C) -> (B*C,) for per-channel tensors."""
    return None if t is None else _batched_first(t, bdim, size).reshape(-1)


def _unfold_channels(t: Tensor, size: int) -> Tensor:
    """(N, B*C, *) -> (N, B, C, *), vmapped dimension 1."""
    return t.view(t.shape[0], size, -1, *t.shape[2:])


def _running_stats_rejected(op: str) -> RuntimeError:
    # torch.nn.BatchNorm's message and class under the same misuse (ATen's batch rule).
    return RuntimeError(
        f"{op}: Batch norm got a batched tensor as input while the running_mean or running_var, "
        "which will be updated in place, were not batched. If you are using a module and do not "
        "need eval mode, set `track_running_stats` to False; torch.func's "
        "replace_all_batch_norm_modules_ does that for a whole model."
    )


@torch.library.register_vmap("custom_bn::batch_norm_forward")
def _forward_vmap(
    info: Any,
    in_dims: Sequence[Optional[int]],
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tuple[Tuple[Tensor, Tensor, Tensor], Tuple[Optional[int], ...]]:
    input_bdim, weight_bdim, bias_bdim, mean_bdim, var_bdim = in_dims[:5]
    size = info.batch_size
    stats_unbatched = [
        stat is not None and bdim is None
        for stat, bdim in ((running_mean, mean_bdim), (running_var, var_bdim))
    ]
    if training and input_bdim is not None and any(stats_unbatched):
        raise _running_stats_rejected("custom_bn.batch_norm")

    if input_bdim is None and mean_bdim is None and var_bdim is None:
        # Only weight and/or bias vary: one normalization serves every batch member (and updates
        # the running statistics once, as torch does); the affine map is applied per member.
        xhat, save_mean, save_invstd = _forward_op(
            input, None, None, running_mean, running_var, training, momentum, eps
        )
        channels = [1] * (input.dim() + 1)
        channels[2] = input.shape[1]
        output = xhat.unsqueeze(0)
        if weight is not None:
            output = output * _batched_first(weight, weight_bdim, size).reshape(size, *channels[1:])
        if bias is not None:
            output = output + _batched_first(bias, bias_bdim, size).reshape(size, *channels[1:])
        output = output.expand(size, *input.shape).to(input.dtype)
        return (output, save_mean, save_invstd), (0, None, None)

    folded_stats: List[Optional[Tensor]] = []
    for stat, bdim in ((running_mean, mean_bdim), (running_var, var_bdim)):
        folded_stats.append(_fold_vector(stat, bdim, size))
    output, save_mean, save_invstd = _forward_op(
        _fold_channels(input, input_bdim, size),
        _fold_vector(weight, weight_bdim, size),
        _fold_vector(bias, bias_bdim, size),
        folded_stats[0],
        folded_stats[1],
        training,
        momentum,
        eps,
    )
    if training:
        # A batched running statistic that could not be folded as a view was updated in a
        # copy: write it back.
        for stat, bdim, folded in zip(
            (running_mean, running_var), (mean_bdim, var_bdim), folded_stats
        ):
            if stat is not None and bdim is not None:
                target = stat.movedim(bdim, 0)
                if folded.data_ptr() != target.data_ptr() or not target.is_contiguous():
                    target.copy_(folded.view(target.shape))
    return (
        (_unfold_channels(output, size), save_mean.view(size, -1), save_invstd.view(size, -1)),
        (1, 0, 0),
    )


@torch.library.register_vmap("custom_bn::batch_norm_backward")
def _backward_vmap(
    info: Any,
    in_dims: Sequence[Optional[int]],
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    eps: float,
    output_mask: Sequence[bool],
) -> Tuple[Tuple[Tensor, Tensor, Tensor], Tuple[Optional[int], ...]]:
    grad_bdim, input_bdim, weight_bdim, mean_bdim, invstd_bdim = in_dims[:5]
    size = info.batch_size
    grads = _backward_op(
        _fold_channels(grad_output, grad_bdim, size),
        _fold_channels(input, input_bdim, size),
        _fold_vector(weight, weight_bdim, size),
        _fold_vector(save_mean, mean_bdim, size),
        _fold_vector(save_invstd, invstd_bdim, size),
        training,
        eps,
        output_mask,
    )
    grad_input = _unfold_channels(grads[0], size) if output_mask[0] else grads[0]
    grad_weight, grad_bias = (
        g.view(size, -1) if wanted else g for g, wanted in zip(grads[1:], output_mask[1:])
    )
    out_dims = tuple(d if wanted else None for d, wanted in zip((1, 0, 0), output_mask))
    return (grad_input, grad_weight, grad_bias), out_dims


def epilogue(
    output: Tensor, residual: Optional[Tensor], activation: str, activation_param: float
) -> Tensor:
    """``act(output + residual)`` with torch ops: the fused epilogue where torch.func transforms
    need derivative and batching rules (which torch has for these ops)."""
    if residual is not None:
        output = output + residual
    if activation == "relu":
        return torch.nn.functional.relu(output)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(output, activation_param)
    if activation == "elu":
        return torch.nn.functional.elu(output, activation_param)
    if activation == "silu":
        return torch.nn.functional.silu(output)
    return output
