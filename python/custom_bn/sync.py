"""``custom_bn.SyncBatchNorm``: BatchNorm whose training statistics span the processes of a
torch.distributed process group, on the CPU (gloo) as on CUDA (NCCL).

One collective per forward and one per backward, as torch.nn.SyncBatchNorm:

* forward: each process computes its per-channel mean and biased variance
  (``torch.ops.custom_bn.batch_norm_stats``) and all-gathers them with its value count, packed in
  one ``[2C + 1]`` tensor of the accumulation dtype; every process merges them with the counts
  (Chan's parallel formula, in float64: a process with an empty batch has count 0 and adds
  nothing) and normalizes with the merged statistics (``batch_norm_act_forward`` in evaluation
  mode, so the fused activation/residual epilogue is the local operator's);
* backward: each process reduces ``sum(dy')`` and ``sum(dy' (x - mean))``
  (``batch_norm_backward_reduce``), all-reduces that ``[2, C]`` tensor, and computes its part of
  grad_input from the global sums (``batch_norm_backward_elemt``). grad_weight and grad_bias are
  the process's own share, as with torch.nn.SyncBatchNorm: DistributedDataParallel (or any
  all-reduce of the gradients) sums them.
"""

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _meta
from . import functional as F
from .modules import _BatchNormAct, _is_fx_proxy, _fx_leaf_call

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

_stats_op = torch.ops.custom_bn.batch_norm_stats.default
_act_forward_op = torch.ops.custom_bn.batch_norm_act_forward.default
_reduce_op = torch.ops.custom_bn.batch_norm_backward_reduce.default
_elemt_op = torch.ops.custom_bn.batch_norm_backward_elemt.default


def merge_stats(gathered: Tensor, channels: int):
    """Merges the rows ``[mean (C), biased var (C), count]`` of ``gathered`` (one per process):
    the mean and biased variance of the union, in float64, and the union's count."""
    g = gathered.double()
    counts = g[:, 2 * channels :]
    total = counts.sum()
    means, variances = g[:, :channels], g[:, channels : 2 * channels]
    mean = (counts * means).sum(0) / total
    m2 = (counts * (variances + (means - mean).square())).sum(0)
    return mean, m2 / total, int(total.item())


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        residual: Optional[Tensor],
        momentum: float,
        eps: float,
        group: Any,
        activation: str,
        activation_param: float,
    ) -> Tensor:
        channels = input.shape[1]
        mean, var = _stats_op(input)
        count = input.numel() // channels
        packed = torch.cat([mean, var, mean.new_full((1,), count)])
        gathered = packed.new_empty(dist.get_world_size(group) * packed.numel())
        dist.all_gather_single(gathered, packed, group=group)
        global_mean, global_var, total = merge_stats(gathered.view(-1, packed.numel()), channels)
        if total <= 1:
            raise ValueError(
                "custom_bn.SyncBatchNorm: Expected more than 1 value per channel when training, "
                f"got {total} over the process group (this process's input size {list(input.shape)})"
            )
        if running_mean is not None and running_var is not None:
            unbiased = global_var * (total / (total - 1))
            for running, batch in ((running_mean, global_mean), (running_var, unbiased)):
                running.copy_(running.double() * (1 - momentum) + batch * momentum)
        output, save_mean, save_invstd = _act_forward_op(
            input, weight, bias, global_mean.to(mean.dtype), global_var.to(mean.dtype), residual,
            False, 0.0, eps, activation, activation_param,
        )
        keep_residual = residual if activation != "identity" else None
        ctx.save_for_backward(input, weight, bias, keep_residual, save_mean, save_invstd)
        ctx.count, ctx.group, ctx.has_residual = total, group, residual is not None
        ctx.activation, ctx.activation_param = activation, activation_param
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor):
        input, weight, bias, residual, mean, invstd = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=_meta.batch_norm_memory_format(input))
        sums = _reduce_op(
            grad_output, input, weight, bias, residual, mean, invstd, ctx.activation,
            ctx.activation_param,
        )
        # This process's share of the parameters' gradients (DDP sums them), before the sums
        # become global.
        grad_weight = (sums[1] * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sums[0].to(bias.dtype, copy=True) if ctx.needs_input_grad[2] else None
        dist.all_reduce(sums, group=ctx.group)
        identity = ctx.activation == "identity"
        want_residual = ctx.has_residual and ctx.needs_input_grad[5]
        grad_input, grad_residual = _elemt_op(
            grad_output, input, weight, bias, residual, mean, invstd, sums, ctx.count,
            ctx.activation, ctx.activation_param,
            [ctx.needs_input_grad[0], want_residual and not identity],
        )
        if want_residual and identity:
            grad_residual = grad_output
        return (
            grad_input if ctx.needs_input_grad[0] else None, grad_weight, grad_bias, None, None,
            grad_residual if want_residual else None, None, None, None, None, None,
        )


class SyncBatchNorm(_BatchNormAct):
    """BatchNorm over ``(N, C, *)`` whose training statistics span the processes of
    ``process_group`` (default: the whole world), with the fused epilogue of BatchNormAct:
    ``forward(x, residual=None) = act(BN(x) + residual)`` (activation ``"identity"`` by default).

    Works on the CPU (gloo) and on CUDA (NCCL). In evaluation mode, when torch.distributed is
    not initialized, or with a group of one process it is the local custom_bn BatchNorm. Every
    process of the group must call it, with the same number of channels; their batch sizes may
    differ, and a process may have an empty batch. It has torch.nn.SyncBatchNorm's parameters,
    buffers and state_dict and no double backward (as torch.nn.SyncBatchNorm). It is a
    ``torch.nn.modules.batchnorm._BatchNorm`` but not a
    ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses the latter on the CPU.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        activation: str = "identity",
        activation_param: Optional[float] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, activation, activation_param, eps, momentum, affine,
            track_running_stats, device, dtype,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:  # as torch.nn.SyncBatchNorm
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self) -> Optional[Any]:
        """The process group to synchronize over, or None when the local op is the answer."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """input: ``(N, C, *)`` with C = num_features; residual: ``None`` or input's shape
        → ``act(BN(input) + residual)`` with statistics over the whole process group."""
        if _is_fx_proxy(input):
            return _fx_leaf_call(self, (input,) if residual is None else (input, residual))
        group = self._sync_group()
        if group is None:
            return self._normalize(input, self.activation, self.activation_param, residual)
        self._check_input_dim(input)
        self._check_num_features(input)
        updates_stats = self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is not None:
            momentum = self.momentum
        else:
            momentum = 1.0 / float(self.num_batches_tracked + 1) if updates_stats else 0.0
        if residual is not None and residual.dtype != input.dtype:
            common = torch.promote_types(input.dtype, residual.dtype)
            input, residual = input.to(common), residual.to(common)
        output = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if updates_stats else None,
            self.running_var if updates_stats else None, residual, momentum, self.eps, group,
            self.activation, F.resolve_activation_param(self.activation, self.activation_param),
        )
        if updates_stats:
            self.num_batches_tracked.add_(1)
        return output


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Returns ``module`` with every BatchNorm layer replaced by a custom_bn.SyncBatchNorm over
    ``process_group``: torch.nn BatchNorm1d/2d/3d and SyncBatchNorm, and custom_bn's BatchNorm,
    BatchNormAct (its activation kept) and InPlaceBatchNormAct (computed out of place), and the
    layers convert_model knows (timm's BatchNormAct2d: its activation fused or kept). The same
    parameter objects (so an optimizer built before keeps working), buffers and training flag
    are kept; a module that is itself a BatchNorm is returned converted. custom_bn.SyncBatchNorm
    layers are left as they are."""
    from .convert import _to_sync  # convert imports this module

    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        return _to_sync(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
