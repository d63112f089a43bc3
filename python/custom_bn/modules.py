"""``custom_bn.BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm1d/2d/3d``.

Same constructor, parameters, buffers and state_dict keys as torch.nn (a torch.nn checkpoint
loads here and back unchanged); the arithmetic runs in the ``torch.ops.custom_bn`` operators.
One deliberate difference: ``num_batches_tracked`` is bumped only after the operator succeeded,
so a rejected input leaves every buffer as it was.
"""


from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _meta
from . import functional as F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "InPlaceBatchNormAct1d",
    "InPlaceBatchNormAct2d",
    "InPlaceBatchNormAct3d",
]


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """The forward shared by BatchNorm1d/2d/3d, each of which also subclasses its torch.nn twin.

    So ``custom_bn.BatchNorm2d`` *is* an ``nn.BatchNorm2d`` and an
    ``nn.modules.batchnorm._BatchNorm``: code that finds BatchNorm layers by type (weight-decay
    filters, BN freezing, weight init, ``fuse_conv_bn_eval``,
    ``torch.func.replace_all_batch_norm_modules_``) treats it as one. The constructor, parameters,
    buffers, ``reset_parameters``, the input-rank check, ``extra_repr`` and checkpoint loading are
    torch.nn's; ``forward`` runs the custom_bn operators.

    Args (as torch.nn): num_features C; eps added to the variance; momentum of the running-stat
    update (None: cumulative average over num_batches_tracked batches); affine (learnable
    weight and bias of shape [C]); track_running_stats (buffers running_mean/running_var of
    shape [C] and num_batches_tracked); device, dtype of parameters and buffers; bias=False
    keeps only the weight.
    """

    def _get_name(self) -> str:
        # repr(model) shows custom_bn.BatchNorm2d(...), so a swap is visible; a user's subclass
        # keeps its own name.
        name = type(self).__name__
        return f"custom_bn.{name}" if type(self).__module__ == __name__ else name

    def _check_num_features(self, input: Tensor) -> None:
        # The operator checks C against weight and the running stats; this also covers a module
        # that has neither (affine=False, track_running_stats=False).
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"custom_bn BatchNorm: expected input with num_features={self.num_features} "
                f"channels (input.size(1)), got input of shape {list(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        """input: ``(N, C, *)`` with C = num_features (rank set by the subclass) → same shape."""
        if not torch.jit.is_scripting() and _is_fx_proxy(input):
            return _fx_leaf_call(self, (input,))
        return self._normalize(input, "identity", None, None)

    def _normalize(
        self,
        input: Tensor,
        activation: str,
        activation_param: Optional[float],
        residual: Optional[Tensor],
    ) -> Tensor:
        """The module's batch norm with the fused epilogue act(BN(input) + residual)."""
        self._check_input_dim(input)
        self._check_num_features(input)

        # Running stats are updated only in training mode when tracked, and normalize only in
        # evaluation mode; without them (track_running_stats=False) batch stats are always used.
        updates_stats = (
            self.training and self.track_running_stats and self.num_batches_tracked is not None
        )
        if (
            updates_stats
            and self.momentum is None
            and not torch.jit.is_scripting()
            and torch.compiler.is_compiling()
        ):
            return self._forward_cumulative_traceable(input, activation, activation_param, residual)
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

        output = self._functional(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            use_batch_stats,
            momentum,
            activation,
            activation_param,
            residual,
        )
        if updates_stats:
            self.num_batches_tracked.add_(1)
        return output

    def _functional(
        self,
        input: Tensor,
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        momentum: float,
        activation: str,
        activation_param: Optional[float],
        residual: Optional[Tensor],
    ) -> Tensor:
        """The functional call with the module's parameters (the in-place modules override it)."""
        return F.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, training, momentum,
            self.eps, activation=activation, activation_param=activation_param, residual=residual,
        )

    def _forward_cumulative_traceable(
        self,
        input: Tensor,
        activation: str,
        activation_param: Optional[float],
        residual: Optional[Tensor],
    ) -> Tensor:
        """Training step with momentum=None under torch.compile.

        The eager path turns 1/(num_batches_tracked+1) into a Python float, a data-dependent
        value that cannot be traced into a graph (torch.nn graph-breaks there). Here the operator
        writes the batch statistics into fresh buffers (momentum 1 keeps only the batch value)
        and the cumulative average is applied with tensor arithmetic.
        """
        batch_mean = torch.zeros_like(self.running_mean)
        batch_var = torch.zeros_like(self.running_var)
        output = self._functional(
            input, batch_mean, batch_var, True, 1.0, activation, activation_param, residual
        )
        count = self.num_batches_tracked + 1
        if input.numel() > 0:  # an empty batch leaves the statistics alone, as in eager mode
            factor = 1.0 / count.to(torch.float64)
            for running, batch in ((self.running_mean, batch_mean), (self.running_var, batch_var)):
                running.mul_(1.0 - factor).add_(batch * factor)
        self.num_batches_tracked.copy_(count)
        return output


@torch.jit.unused
def _is_fx_proxy(input: Tensor) -> bool:
    return isinstance(input, torch.fx.Proxy)


@torch.jit.unused
def _fx_leaf_call(module: nn.Module, args: Tuple[Tensor, ...]) -> Tensor:
    """Under torch.fx symbolic tracing the module appears as one ``call_module`` node, as
    torch.nn's BatchNorm does (torch.fx keeps torch.nn modules as leaves): ``train()``/``eval()``
    on the traced GraphModule keep working and graph passes see the BatchNorm layer itself,
    instead of a trace through forward that would freeze the training flag and the buffer
    updates at trace time."""
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` input; drop-in for ``torch.nn.BatchNorm1d``.

    Shape: input ``(N, C)`` or ``(N, C, L)`` with ``C = num_features``; output the same.
    """


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch norm over ``(N, C, H, W)`` input; drop-in for ``torch.nn.BatchNorm2d``.

    Shape: input ``(N, C, H, W)`` with ``C = num_features``; output the same, channels-last
    input gives channels-last output.
    """


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch norm over ``(N, C, D, H, W)`` input; drop-in for ``torch.nn.BatchNorm3d``.

    Shape: input ``(N, C, D, H, W)`` with ``C = num_features``; output the same,
    channels-last-3d input gives channels-last-3d output.
    """


class _BatchNormAct(_BatchNorm):
    """BatchNorm fused with an optional residual add and an activation:
    ``forward(x, residual=None) = act(BN(x) + residual)`` in one pass over memory, and one
    fused backward that recomputes the pre-activation instead of keeping it.

    Same parameters, buffers and state_dict as the BatchNorm it extends (a torch.nn BatchNorm
    checkpoint loads unchanged); it is an instance of the torch.nn BatchNorm class too.
    activation: ``"relu"`` (default), ``"leaky_relu"`` (activation_param: negative slope,
    default 0.01), ``"elu"`` (activation_param: alpha, default 1.0), ``"silu"`` or
    ``"identity"``. The other arguments are torch.nn's.
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        activation_param: Optional[float] = None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        F.resolve_activation_param(activation, activation_param)  # ValueError when invalid
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """input: ``(N, C, *)`` with C = num_features (rank set by the subclass); residual:
        ``None`` or input's shape and dtype → ``act(BN(input) + residual)``, input's shape."""
        if not torch.jit.is_scripting() and _is_fx_proxy(input):
            return _fx_leaf_call(self, (input,) if residual is None else (input, residual))
        return self._normalize(input, self.activation, self.activation_param, residual)

    def extra_repr(self) -> str:
        act = f"activation={self.activation!r}"
        if self.activation_param is not None:
            act += f", activation_param={self.activation_param}"
        return f"{super().extra_repr()}, {act}"


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """BatchNorm1d + residual + activation, fused; input ``(N, C)`` or ``(N, C, L)``."""


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """BatchNorm2d + residual + activation, fused; input ``(N, C, H, W)`` (channels-last kept)."""


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """BatchNorm3d + residual + activation, fused; input ``(N, C, D, H, W)``."""


class _InPlaceBatchNormAct(_BatchNormAct):
    """In-place activated BatchNorm: ``forward(x)`` overwrites ``x`` with ``act(BN(x))`` and
    returns it, and the backward keeps only that output (custom_bn.functional.batch_norm_act_
    has the details), so a conv -> BN -> activation block keeps one activation-sized tensor for
    backward instead of two.

    activation: ``"leaky_relu"`` (default, negative slope activation_param, default 0.01,
    positive), ``"elu"`` (alpha, default 1.0, positive) or ``"identity"``: the activation must be
    invertible (ValueError otherwise). While training, weight must have no zero entry (checked
    at each call); the parameters mean what torch.nn's mean, so the state_dict is the
    BatchNorm's. No residual input.
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        activation_param: Optional[float] = None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, activation, activation_param, eps, momentum, affine,
            track_running_stats, device, dtype,
        )
        _meta.check_inplace_activation(
            "custom_bn.InPlaceBatchNormAct", activation,
            F.resolve_activation_param(activation, activation_param),
        )

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        """input: ``(N, C, *)`` with C = num_features, overwritten with ``act(BN(input))``
        and returned."""
        if not torch.jit.is_scripting() and _is_fx_proxy(input):
            return _fx_leaf_call(self, (input,))
        return self._normalize(input, self.activation, self.activation_param, None)

    def _functional(
        self,
        input: Tensor,
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        momentum: float,
        activation: str,
        activation_param: Optional[float],
        residual: Optional[Tensor],
    ) -> Tensor:
        return F.batch_norm_act_(
            input, running_mean, running_var, self.weight, self.bias, training, momentum,
            self.eps, activation, activation_param,
        )


class InPlaceBatchNormAct1d(_InPlaceBatchNormAct, BatchNorm1d):
    """In-place BatchNorm1d + activation; input ``(N, C)`` or ``(N, C, L)``, overwritten."""


class InPlaceBatchNormAct2d(_InPlaceBatchNormAct, BatchNorm2d):
    """In-place BatchNorm2d + activation; input ``(N, C, H, W)`` (channels-last kept),
    overwritten."""


class InPlaceBatchNormAct3d(_InPlaceBatchNormAct, BatchNorm3d):
    """In-place BatchNorm3d + activation; input ``(N, C, D, H, W)``, overwritten."""
