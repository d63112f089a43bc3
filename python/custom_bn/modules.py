"""``custom_bn.BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm1d/2d/3d``.

Same constructor, parameters, buffers and state_dict keys as torch.nn (a torch.nn checkpoint
loads here and back unchanged); the arithmetic runs in the ``torch.ops.custom_bn`` operators.
One deliberate difference: ``num_batches_tracked`` is bumped only after the operator succeeded,
so a rejected input leaves every buffer as it was.
"""

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(nn.Module):
    """Shared implementation of BatchNorm1d/2d/3d; subclasses only fix the accepted ranks.

    Args (as torch.nn): num_features C; eps added to the variance; momentum of the running-stat
    update (None: cumulative average over num_batches_tracked batches); affine (learnable
    weight and bias of shape [C]); track_running_stats (buffers running_mean/running_var of
    shape [C] and num_batches_tracked); device, dtype of parameters and buffers; bias=False
    keeps only the weight.
    """

    # Version 2 added num_batches_tracked (as in torch.nn); older checkpoints lack it.
    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    _expected_dims: tuple = ()
    _expected_dims_text: str = ""

    num_features: int
    eps: float
    momentum: Optional[float]
    affine: bool
    track_running_stats: bool
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine map to the identity (weight 1, bias 0)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            raise ValueError(
                f"expected {self._expected_dims_text} input (got {input.dim()}D input)"
            )

    def _check_num_features(self, input: Tensor) -> None:
        # The operator checks C against weight and the running stats; this also covers a module
        # that has neither (affine=False, track_running_stats=False).
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"{type(self).__name__}: expected input with num_features={self.num_features} "
                f"channels (input.size(1)), got input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        """input: ``(N, C, *)`` with C = num_features (rank set by the subclass) → same shape."""
        self._check_input_dim(input)
        self._check_num_features(input)

        # Running stats are updated only in training mode when tracked, and normalize only in
        # evaluation mode; without them (track_running_stats=False) batch stats are always used.
        updates_stats = (
            self.training and self.track_running_stats and self.num_batches_tracked is not None
        )
        if updates_stats and self.momentum is None and torch.compiler.is_compiling():
            return self._forward_cumulative_traceable(input)
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = self.running_mean is None and self.running_var is None
        pass_buffers = not self.training or self.track_running_stats
        if self.momentum is not None:
            momentum = self.momentum
        elif updates_stats:
            # Cumulative moving average: this batch becomes number num_batches_tracked + 1; the
            # counter itself moves only once the operator has accepted the input.
            momentum = 1.0 / float(self.num_batches_tracked + 1)
        else:
            momentum = 0.0

        output = F.batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        if updates_stats:
            self.num_batches_tracked.add_(1)
        return output

    def _forward_cumulative_traceable(self, input: Tensor) -> Tensor:
        """Training step with momentum=None under torch.compile.

        The eager path turns 1/(num_batches_tracked+1) into a Python float, a data-dependent
        value that cannot be traced into a graph (torch.nn graph-breaks there). Here the operator
        writes the batch statistics into fresh buffers (momentum 1 keeps only the batch value)
        and the cumulative average is applied with tensor arithmetic.
        """
        batch_mean = torch.zeros_like(self.running_mean)
        batch_var = torch.zeros_like(self.running_var)
        output = F.batch_norm(
            input, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps
        )
        count = self.num_batches_tracked + 1
        if input.numel() > 0:  # an empty batch leaves the statistics alone, as in eager mode
            factor = 1.0 / count.to(torch.float64)
            for running, batch in ((self.running_mean, batch_mean), (self.running_var, batch_var)):
                running.mul_(1.0 - factor).add_(batch * factor)
        self.num_batches_tracked.copy_(count)
        return output

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        counter_key = prefix + "num_batches_tracked"
        saved_version = local_metadata.get("version")
        written_before_counter = saved_version is None or saved_version < 2
        if written_before_counter and self.track_running_stats and counter_key not in state_dict:
            # Such a checkpoint has no counter to restore: the module keeps its own (a meta
            # tensor has no value, so that case starts from zero) instead of a missing-key error.
            counter = self.num_batches_tracked
            if counter.device.type == "meta":
                counter = torch.zeros((), dtype=torch.long)
            state_dict[counter_key] = counter
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` input; drop-in for ``torch.nn.BatchNorm1d``.

    Shape: input ``(N, C)`` or ``(N, C, L)`` with ``C = num_features``; output the same.
    """

    _expected_dims = (2, 3)
    _expected_dims_text = "2D or 3D"


class BatchNorm2d(_BatchNorm):
    """Batch norm over ``(N, C, H, W)`` input; drop-in for ``torch.nn.BatchNorm2d``.

    Shape: input ``(N, C, H, W)`` with ``C = num_features``; output the same, channels-last
    input gives channels-last output.
    """

    _expected_dims = (4,)
    _expected_dims_text = "4D"


class BatchNorm3d(_BatchNorm):
    """Batch norm over ``(N, C, D, H, W)`` input; drop-in for ``torch.nn.BatchNorm3d``.

    Shape: input ``(N, C, D, H, W)`` with ``C = num_features``; output the same,
    channels-last-3d input gives channels-last-3d output.
    """

    _expected_dims = (5,)
    _expected_dims_text = "5D"
