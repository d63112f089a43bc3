"""``custom_bn.convert_model``: swap torch.nn BatchNorm layers of an existing model for custom_bn's
(and back), optionally folding the activation that follows each into a fused BatchNormAct."""

import warnings
from typing import Callable, Dict, Optional, Type

import torch
from torch import nn

from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    _BatchNorm,
)
from .sync import SyncBatchNorm

__all__ = ["convert_model"]

_TO_CUSTOM: Dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
# custom_bn class -> the torch.nn class of the same rank (BatchNormAct and in-place subclasses
# are found through their BatchNorm base)
_TO_TORCH: Dict[type, type] = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d,
                               BatchNorm3d: nn.BatchNorm3d, SyncBatchNorm: nn.SyncBatchNorm}
_FUSED: Dict[type, type] = {BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d,
                            BatchNorm3d: BatchNormAct3d}


def _activation_of(module: nn.Module):
    """(activation, activation_param) of an activation module BatchNormAct can fuse, else None."""
    if isinstance(module, nn.ReLU):
        return "relu", None
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", module.negative_slope
    if isinstance(module, nn.ELU):
        return "elu", module.alpha
    if isinstance(module, nn.SiLU):
        return "silu", None
    return None


def _activation_module(activation: str, param: Optional[float]) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(0.01 if param is None else param)
    if activation == "elu":
        return nn.ELU(1.0 if param is None else param)
    if activation == "silu":
        return nn.SiLU()
    return nn.Identity()


def _rebuild(old: nn.modules.batchnorm._BatchNorm, cls: Type[nn.Module], **extra) -> nn.Module:
    """A ``cls`` holding ``old``'s very parameters and buffers (so requires_grad, device, dtype,
    memory format and an optimizer built on them carry over) and training flag."""
    if issubclass(cls, (nn.SyncBatchNorm, SyncBatchNorm)):
        extra.setdefault("process_group", getattr(old, "process_group", None))
    new = cls(old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
              track_running_stats=old.track_running_stats, device="meta", **extra)
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _replace(module: nn.Module, swap: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """module with every submodule m for which swap(m) is not None replaced, depth first."""
    new = swap(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        setattr(module, name, _replace(child, swap))
    return module


def _to_custom_bn(m: nn.Module) -> Optional[nn.Module]:
    cls = _TO_CUSTOM.get(type(m))  # exact types: a user's subclass keeps its own forward
    return None if cls is None else _rebuild(m, cls)


def _to_torch(m: nn.Module) -> Optional[nn.Module]:
    if not isinstance(m, _BatchNorm):
        return None
    plain = _rebuild(m, _torch_class(m))
    activation = getattr(m, "activation", "identity")
    if activation == "identity":
        return plain
    # Fused: BatchNorm then the activation module (the weights move under ".0.").
    return nn.Sequential(plain, _activation_module(activation, m.activation_param))


def _torch_class(m: nn.Module) -> type:
    return _TO_TORCH[next(c for c in type(m).__mro__ if c in _TO_TORCH)]


def _unfuse_sequentials(module: nn.Module) -> None:
    """The inverse of _fuse_sequentials: a fused custom_bn layer followed by an nn.Identity in an
    nn.Sequential becomes the torch.nn BatchNorm, and the Identity the activation module."""
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            bn, slot = seq._modules[first], seq._modules[second]
            activation = getattr(bn, "activation", "identity")
            if isinstance(bn, _BatchNorm) and activation != "identity" and type(slot) is nn.Identity:
                seq._modules[first] = _rebuild(bn, _torch_class(bn))
                seq._modules[second] = _activation_module(activation, bn.activation_param)


def _fuse_sequentials(module: nn.Module) -> int:
    """In every nn.Sequential, a custom_bn BatchNorm followed directly by a ReLU, LeakyReLU, ELU or
    SiLU becomes the fused BatchNormAct and the activation an nn.Identity (the indices, hence
    the state_dict keys, stay). Returns how many were fused."""
    fused = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            bn, act = seq._modules[first], seq._modules[second]
            spec = _activation_of(act)
            if type(bn) in _FUSED and spec is not None:
                seq._modules[first] = _rebuild(bn, _FUSED[type(bn)], activation=spec[0],
                                               activation_param=spec[1])
                seq._modules[second] = nn.Identity()
                fused += 1
    return fused


def _fuse_graph(module: nn.Module) -> nn.Module:
    """The same fusion through torch.fx, for models whose forward applies an activation module
    or function to a BatchNorm's output (a shared ``self.relu``, ``F.relu(self.bn(x))``). Returns
    a GraphModule when something was fused, else ``module``."""
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as error:  # noqa: BLE001  (any untraceable forward)
        warnings.warn(f"custom_bn.convert_model: fuse_activation folds only activations in "
                      f"nn.Sequential here: torch.fx cannot trace the model ({error})")
        return module
    functions = {torch.relu: ("relu", None), nn.functional.relu: ("relu", None),
                 nn.functional.silu: ("silu", None)}
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in _FUSED or len(node.users) != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        (user,) = node.users
        spec = None
        if user.op == "call_module":
            spec = _activation_of(modules[user.target])
        elif user.op == "call_function" and not user.kwargs.keys() - {"inplace"}:
            spec = functions.get(user.target)
        if spec is None or user.args[0] is not node or len(user.args) != 1:
            continue
        bn = modules[node.target]
        parent_name, _, attr = node.target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        setattr(parent, attr, _rebuild(bn, _FUSED[type(bn)], activation=spec[0], activation_param=spec[1]))
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        fused += 1
    if not fused:
        return module
    gm.graph.lint()
    gm.recompile()
    return gm


def convert_model(module: nn.Module, fuse_activation: bool = False, to: str = "custom_bn") -> nn.Module:
    """Returns ``module`` with its BatchNorm layers swapped.

    ``to="custom_bn"`` (default): every torch.nn BatchNorm1d/2d/3d becomes the custom_bn twin and
    every torch.nn.SyncBatchNorm a custom_bn.SyncBatchNorm (same process group). The converted
    layers hold the original parameter and buffer objects (requires_grad, device, dtype, memory
    format and an existing optimizer's references carry over) and training flag; subclasses of
    the torch.nn classes are left alone (their forward may differ). With
    ``fuse_activation=True`` a ReLU, LeakyReLU, ELU or SiLU that directly follows a BatchNorm is
    folded into a BatchNormAct: inside an nn.Sequential the activation becomes an nn.Identity
    (same indices and state_dict keys); elsewhere, when torch.fx can trace the model, the fused
    model is returned as a torch.fx.GraphModule with the same submodule names.

    ``to="torch"``: back to torch.nn (custom_bn BatchNorm, BatchNormAct, InPlaceBatchNormAct and
    SyncBatchNorm). A fused layer followed by an nn.Identity in an nn.Sequential (what
    ``fuse_activation`` leaves) gets its activation module back in that slot, so the round trip
    restores the original structure and state_dict keys; any other fused layer becomes
    ``nn.Sequential(BatchNorm, activation)``, whose weights sit one level deeper (``.0.``).

    The module is changed in place where it can be (its children replaced); always use the
    returned module, which differs when ``module`` itself is a BatchNorm or an fx rewrite ran.
    """
    if to == "custom_bn":
        module = _replace(module, _to_custom_bn)
        if fuse_activation:
            _fuse_sequentials(module)
            if not isinstance(module, nn.Sequential):
                module = _fuse_graph(module)
        return module
    if to == "torch":
        if fuse_activation:
            raise ValueError("custom_bn.convert_model: fuse_activation applies to to='custom_bn'")
        _unfuse_sequentials(module)
        return _replace(module, _to_torch)
    raise ValueError(f"custom_bn.convert_model: to must be 'custom_bn' or 'torch', got {to!r}")
