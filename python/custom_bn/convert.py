"""``custom_bn.convert_model``: swap the BatchNorm layers of an existing model for custom_bn's (and
back), optionally folding the activation that follows each into a fused BatchNormAct.

Which layers convert: torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm (exact classes), the
ecosystem's BatchNorm+activation layers that are known here (timm's ``BatchNormAct2d`` and
``SyncBatchNormAct``), and any class registered with :func:`register_conversion`. Any other
subclass of a torch.nn BatchNorm may compute something else in its ``forward``: it is left as
it is, with a warning that names its class.
"""

import inspect
import warnings
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    InPlaceBatchNormAct1d,
    InPlaceBatchNormAct2d,
    InPlaceBatchNormAct3d,
    _BatchNorm,
    _fx_leaf_call,
    _is_fx_proxy,
)
from .sync import SyncBatchNorm

__all__ = ["convert_model", "register_conversion", "rebuild"]

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
# Exact classes: a subclass may override forward.
_ACTIVATION_MODULES: Dict[type, Callable[[nn.Module], Tuple[str, Optional[float]]]] = {
    nn.ReLU: lambda m: ("relu", None),
    nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    nn.ELU: lambda m: ("elu", m.alpha),
    nn.SiLU: lambda m: ("silu", None),
}
_ACTIVATION_FUNCTIONS = {torch.relu: ("relu", None), nn.functional.relu: ("relu", None),
                         nn.functional.silu: ("silu", None)}
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")
# What moves with a layer: its hooks (the dicts are shared, so the caller's handles still remove
# them), the flag that tells full from legacy backward hooks, qconfig, and custom_bn's own marks.
_HOOKS_AND_FLAGS = (*_HOOK_DICTS, "_is_full_backward_hook", "qconfig")
_CARRIED = (*_HOOKS_AND_FLAGS, "_custom_bn_origin", "_custom_bn_folded")


def _activation_of(module: nn.Module) -> Optional[Tuple[str, Optional[float]]]:
    """(activation, activation_param) of an activation module BatchNormAct can fuse, else None."""
    spec = _ACTIVATION_MODULES.get(type(module))
    return None if spec is None else spec(module)


def _activation_module(activation: str, param: Optional[float]) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(0.01 if param is None else param)
    if activation == "elu":
        return nn.ELU(1.0 if param is None else param)
    if activation == "silu":
        return nn.SiLU()
    if activation == "identity":
        return nn.Identity()
    raise ValueError(f"custom_bn.convert_model: unknown activation {activation!r}")


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def rebuild(layer: nn.Module, cls: Type[nn.Module], **kwargs: Any) -> nn.Module:
    """A ``cls`` (a custom_bn or torch.nn BatchNorm class) built with ``layer``'s num_features,
    eps, momentum, affine and track_running_stats plus ``kwargs``, that holds ``layer``'s very
    parameters and buffers (so requires_grad, device, dtype, memory format and an optimizer
    built on them carry over), its training flag and its forward/backward hooks. For the
    ``convert`` function of :func:`register_conversion`."""
    if issubclass(cls, (nn.SyncBatchNorm, SyncBatchNorm)):
        kwargs.setdefault("process_group", getattr(layer, "process_group", None))
    new = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
              track_running_stats=layer.track_running_stats, device="meta", **kwargs)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(layer, name))
    new.train(layer.training)
    for name in _CARRIED:
        if hasattr(layer, name):
            setattr(new, name, getattr(layer, name))
    return new


# ----------------------------------------------------------------------------- foreign layers

class _Origin:
    """What a converted module was (a foreign BatchNorm layer, or a module whose forward a fold
    rewrote into a GraphModule): its class and its attributes other than tensors and hooks, so
    that ``to="torch"`` gives back an instance of that class (its own ``forward``, methods and
    state_dict keys) without knowing its constructor."""

    def __init__(self, module: nn.Module) -> None:
        self.cls = type(module)
        skip = {"_parameters", "_buffers", *_CARRIED}
        self.attributes = {k: v for k, v in vars(module).items() if k not in skip}
        self.attributes["_modules"] = dict(module._modules)


class _BatchNormDropAct2d(BatchNorm2d):
    """BatchNorm2d, then the foreign layer's own ``drop`` and ``act`` submodules (timm's order),
    for the activations custom_bn does not fuse (hardswish, gelu, prelu, ...) or a drop layer
    between the two. The submodules keep their names, hence the state_dict keys."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and _is_fx_proxy(input):
            return _fx_leaf_call(self, (input,))
        return self.act(self.drop(self._normalize(input, "identity", None, None)))


class _SyncBatchNormDropAct(SyncBatchNorm):
    """SyncBatchNorm, then ``drop`` and ``act``, as _BatchNormDropAct2d (timm's SyncBatchNormAct)."""

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        if _is_fx_proxy(input):
            return _fx_leaf_call(self, (input,))
        return self.act(self.drop(super().forward(input)))


def _from_norm_act(plain: type, fused: type, with_modules: type) -> Callable[[nn.Module], nn.Module]:
    """Converter of a BatchNorm subclass that applies ``self.drop`` then ``self.act`` after the
    normalization (timm's BatchNormAct2d, SyncBatchNormAct): the fused custom_bn layer when the
    activation is one custom_bn fuses and there is no drop layer, else ``with_modules`` holding
    both."""

    def convert(layer: nn.Module) -> nn.Module:
        drop, act = getattr(layer, "drop", nn.Identity()), getattr(layer, "act", nn.Identity())
        spec = _activation_of(act)
        if type(drop) is nn.Identity and type(act) is nn.Identity:
            return rebuild(layer, plain)
        if type(drop) is nn.Identity and spec is not None:
            return rebuild(layer, fused, activation=spec[0], activation_param=spec[1])
        new = rebuild(layer, with_modules)
        new.drop, new.act = drop, act
        return new

    return convert


# Known by import path, so that custom_bn imports none of these libraries.
_KNOWN: Dict[Tuple[str, str], Callable[[nn.Module], nn.Module]] = {
    ("timm.layers.norm_act", "BatchNormAct2d"):
        _from_norm_act(BatchNorm2d, BatchNormAct2d, _BatchNormDropAct2d),
    ("timm.layers.norm_act", "SyncBatchNormAct"):
        _from_norm_act(SyncBatchNorm, SyncBatchNorm, _SyncBatchNormDropAct),
}
_REGISTERED: Dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_conversion(cls: type, convert: Optional[Callable[[nn.Module], nn.Module]] = None) -> None:
    """Teaches :func:`convert_model` a BatchNorm class of your own (or of a library).

    ``convert(layer)`` returns the custom_bn module that replaces an instance ``layer`` of
    exactly ``cls``; build it with :func:`custom_bn.convert.rebuild`, which moves the layer's
    parameters, buffers, training flag and hooks onto it, e.g.
    ``lambda layer: rebuild(layer, custom_bn.BatchNormAct2d, activation="relu")``. Without
    ``convert``, ``cls`` must subclass a torch.nn BatchNorm class and compute what it computes:
    it becomes that class's custom_bn twin. ``convert_model(..., to="torch")`` gives back an
    instance of ``cls`` with the trained values, so its state_dict keeps its keys.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"custom_bn.register_conversion: cls must be an nn.Module class, got {cls!r}")
    if convert is None:
        base = next((c for c in cls.__mro__ if c in _TO_CUSTOM), None)
        if base is None:
            raise TypeError(
                f"custom_bn.register_conversion: {cls.__name__} does not subclass a torch.nn "
                "BatchNorm class (BatchNorm1d/2d/3d, SyncBatchNorm): pass convert=")
        twin = _TO_CUSTOM[base]

        def convert(layer: nn.Module) -> nn.Module:
            return rebuild(layer, twin)

    _REGISTERED[cls] = convert


def _foreign_converter(module: nn.Module) -> Optional[Callable[[nn.Module], nn.Module]]:
    cls = type(module)
    return _REGISTERED.get(cls) or _KNOWN.get((cls.__module__, cls.__qualname__))


def _restore_origin(m: nn.Module) -> nn.Module:
    """The module ``m`` was converted from, holding ``m``'s tensors, submodules (by the original
    names), public attributes (eps, momentum, process_group, ...), flags and hooks."""
    origin: _Origin = m._custom_bn_origin
    module = origin.cls.__new__(origin.cls)
    state = dict(origin.attributes)
    state.update({k: v for k, v in vars(m).items() if not k.startswith("_") and k in state})
    state["_modules"] = {name: m._modules.get(name, child)
                         for name, child in origin.attributes["_modules"].items()}
    state.update(_parameters=dict(m._parameters), _buffers=dict(m._buffers),
                 _non_persistent_buffers_set=set(m._non_persistent_buffers_set))
    state.update({name: getattr(m, name) for name in _HOOKS_AND_FLAGS if hasattr(m, name)})
    vars(module).update(state)
    return module


# ----------------------------------------------------------------------------- folding

class _FoldedActivation(nn.Identity):
    """Stands where an activation was folded into the BatchNormAct before it: passes its input
    through, holds the original activation (module, not registered: no state, no duplicate in
    named_modules) for ``convert_model(..., to="torch")``."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        vars(self)["activation"] = activation
        self.train(activation.training)

    def extra_repr(self) -> str:
        return f"folded into the BatchNorm before it: {self.activation!r}"


def _fold(bn: nn.Module, spec: Tuple[str, Optional[float]]) -> nn.Module:
    fused = rebuild(bn, _FUSED[type(bn)], activation=spec[0], activation_param=spec[1])
    fused._custom_bn_folded = True  # its activation's place holds a _FoldedActivation
    return fused


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


def _fold_sequentials(module: nn.Module) -> None:
    """In every nn.Sequential, a custom_bn BatchNorm followed directly by a ReLU, LeakyReLU, ELU or
    SiLU becomes the fused BatchNormAct, and the activation a _FoldedActivation (the indices,
    hence the state_dict keys, stay)."""
    for seq in [m for m in module.modules() if type(m) is nn.Sequential]:  # not a subclass's forward
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            bn, act = seq._modules[first], seq._modules[second]
            spec = _activation_of(act)
            if type(bn) in _FUSED and spec is not None and not _has_hooks(bn) and not _has_hooks(act):
                seq._modules[first] = _fold(bn, spec)
                seq._modules[second] = _FoldedActivation(act)


class _LeafTracer(torch.fx.Tracer):
    """Keeps as one call every module that owns buffers (BatchNorm layers above all: tracing
    through one would run its in-place buffer updates on the real buffers) or has hooks
    (tracing through would call them with proxies, and a rewritten graph would skip them)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (super().is_leaf_module(m, module_qualified_name) or _has_hooks(m)
                or isinstance(m, (_TorchBatchNorm, _FoldedActivation)) or bool(m._buffers))


def _foldable_pairs(graph: torch.fx.Graph, owner: nn.Module) -> Dict[tuple, tuple]:
    """The BatchNorm -> activation pairs of a trace of ``owner``: a call of a custom_bn BatchNorm,
    once in the trace, whose only use (through nn.Identity modules, such as timm's disabled
    drop_block between bn and act) is an activation custom_bn fuses. Keyed by what identifies
    the pair in any trace: (bn path, activation module path or function)."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        bn = owner.get_submodule(node.target)
        if type(bn) not in _FUSED or _has_hooks(bn):
            continue
        last = node
        while len(last.users) == 1:
            (user,) = last.users
            if user.op != "call_module":
                break
            identity = owner.get_submodule(user.target)
            if type(identity) is not nn.Identity or _has_hooks(identity):
                break
            last = user
        if len(last.users) != 1:
            continue
        (user,) = last.users
        spec = None
        if user.args == (last,) and user.op == "call_module" and not user.kwargs:
            act = owner.get_submodule(user.target)
            spec = None if _has_hooks(act) else _activation_of(act)
            shared = calls[user.target] > 1
        elif user.args == (last,) and user.op == "call_function" and not user.kwargs.keys() - {"inplace"}:
            spec, shared = _ACTIVATION_FUNCTIONS.get(user.target), True
        if spec is not None:
            pairs[(node.target, user.target)] = (node, user, spec, shared)
    return pairs


def _traces(owner: nn.Module) -> List[torch.fx.Graph]:
    """``owner`` traced in training and in evaluation mode and, when its forward has arguments
    with defaults, with those given and left at their defaults: a fold must hold on whichever
    path a call takes (the training flags are put back afterwards)."""
    parameters = inspect.signature(owner.forward).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    flags = [(m, m.training) for m in owner.modules()]
    graphs = []
    try:
        for mode in (True, False):
            owner.train(mode)
            for concrete in ([None, defaults] if defaults else [None]):
                graphs.append(_LeafTracer().trace(owner, concrete_args=concrete))
    finally:
        for m, flag in flags:
            m.training = flag
    return graphs


def _same_graph(a: torch.fx.Graph, b: torch.fx.Graph) -> bool:
    def nodes(g):
        return [(n.op, n.target, str(n.args), str(n.kwargs)) for n in g.nodes]
    return nodes(a) == nodes(b)


def _owners_bottom_up(root: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Modules whose forward may apply an activation to a still unfused BatchNorm's output,
    innermost first (checked when reached, after the folds inside them)."""
    tracer = _LeafTracer()
    for name, m in reversed(list(root.named_modules())):
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or tracer.is_leaf_module(m, name):
            continue
        if any(type(sub) in _FUSED for sub in m.modules()):
            yield name, m


def _fold_traced(root: nn.Module) -> nn.Module:
    """Folds the activations that forward methods apply to a BatchNorm's output (a shared
    ``self.relu``, ``F.relu(self.bn(x))``), found by tracing each module with torch.fx, innermost
    first; only pairs present on every traced path (training and evaluation, optional arguments
    given or not). An activation module called once is swapped in place for a
    _FoldedActivation; an activation function, or a module called more than once, is replaced
    in the graph of the module that calls it, which becomes a torch.fx.GraphModule (same
    submodules, names and state; see _rewrite) when that graph is the same on every path.
    Returns the root, a GraphModule itself when its own forward was rewritten."""
    untraceable: List[str] = []
    for name, owner in _owners_bottom_up(root):
        try:
            graphs = _traces(owner)
        except Exception:  # noqa: BLE001  (any forward torch.fx cannot trace)
            if any(type(child) in _FUSED for child in owner.children()):
                untraceable.append(name or type(owner).__name__)
            continue
        found = [_foldable_pairs(g, owner) for g in graphs]
        common = set(found[0]).intersection(*found[1:])
        rewritable = (len(graphs) == 2 and _same_graph(*graphs) and not _has_hooks(owner)
                      and all(p.kind == p.POSITIONAL_OR_KEYWORD
                              for p in inspect.signature(owner.forward).parameters.values()))
        rewrites = []
        for key in sorted(common, key=lambda key: key[0]):
            node, user, spec, shared = found[0][key]
            if not any(f[key][3] for f in found):  # an activation module called once everywhere
                _set(owner, node.target, _fold(owner.get_submodule(node.target), spec))
                _set(owner, user.target, _FoldedActivation(owner.get_submodule(user.target)))
            elif rewritable:
                rewrites.append((node, user, spec))
        if rewrites:
            new = _rewrite(owner, graphs[0], rewrites)
            if name:
                _set(root, name, new)
            else:
                root = new
    if untraceable:
        warnings.warn(
            "custom_bn.convert_model: fuse_activation=True folds no activation into the BatchNorm "
            f"layers of {', '.join(untraceable)}: torch.fx cannot trace their forward (they are "
            "converted, unfused)")
    return root


def _rewrite(owner: nn.Module, graph: torch.fx.Graph, rewrites) -> nn.Module:
    """``owner`` as a GraphModule whose graph calls a fused BatchNorm instead of BatchNorm then
    activation. It holds ``owner``'s very submodules (not the containers torch.fx would make for
    the paths the graph uses), parameters, buffers and training flag, plus one placeholder per
    folded activation; it remembers ``owner`` (an _Origin) for ``to="torch"``."""
    gm = torch.fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    vars(gm).update(_modules=dict(owner._modules), _parameters=dict(owner._parameters),
                    _buffers=dict(owner._buffers),
                    _non_persistent_buffers_set=set(owner._non_persistent_buffers_set))
    gm.training = owner.training
    gm._custom_bn_origin = _Origin(owner)
    for node, user, spec in rewrites:
        original = (gm.get_submodule(user.target) if user.op == "call_module"
                    else _activation_module(*spec))
        slot = node.target.replace(".", "_") + "_activation"
        while hasattr(gm, slot):
            slot += "_"
        gm.add_submodule(slot, _FoldedActivation(original))
        _set(gm, node.target, _fold(gm.get_submodule(node.target), spec))
        with gm.graph.inserting_after(user):
            placeholder = gm.graph.call_module(slot, user.args)
        user.replace_all_uses_with(placeholder)
        gm.graph.erase_node(user)
    gm.graph.lint()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------- the conversion

def _replace(module: nn.Module, swap: Callable[[nn.Module], Optional[nn.Module]],
             memo: Optional[Dict[int, nn.Module]] = None) -> nn.Module:
    """``swap(module)`` when not None, else ``module``, with the same done to its children, depth
    first; a module found under several names (shared) is swapped once, so it stays shared."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = swap(module)
    result = module if new is None else new
    memo[id(module)] = result
    for name, child in list(result._modules.items()):
        if child is not None:
            result._modules[name] = _replace(child, swap, memo)
    return result


def _to_custom_bn(m: nn.Module) -> Optional[nn.Module]:
    cls = _TO_CUSTOM.get(type(m))
    if cls is not None:
        return rebuild(m, cls)
    convert = _foreign_converter(m)
    if convert is None:
        return None
    new = convert(m)
    new._custom_bn_origin = _Origin(m)
    return new


# custom_bn's own classes, which to="torch" converts (a user's subclass of one keeps its forward)
_OWN = {BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
        InPlaceBatchNormAct1d, InPlaceBatchNormAct2d, InPlaceBatchNormAct3d, SyncBatchNorm}


def _to_torch(m: nn.Module) -> Optional[nn.Module]:
    if isinstance(m, _FoldedActivation):
        return m.activation
    if hasattr(m, "_custom_bn_origin"):
        return _restore_origin(m)
    if type(m) not in _OWN:
        return None
    plain = rebuild(m, _TO_TORCH[next(c for c in type(m).__mro__ if c in _TO_TORCH)])
    activation = getattr(m, "activation", "identity")
    if activation == "identity" or getattr(m, "_custom_bn_folded", False):
        return plain
    # A fused layer built as such: BatchNorm then the activation module (weights under ".0.").
    return nn.Sequential(plain, _activation_module(activation, m.activation_param))


def _to_sync(layer: nn.Module, process_group: Optional[Any]) -> nn.Module:
    """custom_bn.SyncBatchNorm holding ``layer``'s state, for convert_sync_batchnorm: a foreign
    layer is first converted as convert_model converts it, and a drop or activation module
    custom_bn does not fuse is kept after the synchronized BatchNorm."""
    layer = _to_custom_bn(layer) if _foreign_converter(layer) else layer
    if isinstance(layer, _BatchNormDropAct2d):
        new = rebuild(layer, _SyncBatchNormDropAct, process_group=process_group)
        new.drop, new.act = layer.drop, layer.act
        return new
    return rebuild(layer, SyncBatchNorm, process_group=process_group,
                   activation=getattr(layer, "activation", "identity"),
                   activation_param=getattr(layer, "activation_param", None))


def _warn_unconverted(module: nn.Module, to: str) -> None:
    """Names the BatchNorm subclasses the conversion left: a foreign class (to custom_bn) or a
    user's subclass of a custom_bn class (to torch), whose forward may differ."""
    if to == "custom_bn":
        left = {m for m in module.modules() if isinstance(m, _TorchBatchNorm)
                and not isinstance(m, _BatchNorm)}
        how = "custom_bn.register_conversion teaches convert_model a class"
    else:
        left = {m for m in module.modules() if isinstance(m, _BatchNorm)}
        how = "convert them yourself"
    if left:
        names = ", ".join(sorted({type(m).__name__ for m in left}))
        warnings.warn(f"custom_bn.convert_model: left the BatchNorm subclasses {names} as they "
                      f"are (their forward may differ from their base class's); {how}")


def convert_model(module: nn.Module, fuse_activation: bool = False, to: str = "custom_bn") -> nn.Module:
    """Returns ``module`` with its BatchNorm layers swapped.

    ``to="custom_bn"`` (default): every torch.nn BatchNorm1d/2d/3d becomes the custom_bn twin,
    every torch.nn.SyncBatchNorm a custom_bn.SyncBatchNorm (same process group), timm's
    BatchNormAct2d (SyncBatchNormAct) the fused custom_bn BatchNormAct2d (SyncBatchNorm) with
    its activation when custom_bn fuses it (relu, leaky_relu, elu, silu) and no drop layer
    sits between the two, else a custom_bn BatchNorm followed by timm's own drop and act
    modules; classes registered with :func:`register_conversion` follow their converter.
    The converted layers hold the original parameter and buffer objects (requires_grad,
    device, dtype, memory format and an existing optimizer's references carry over), training
    flag and forward/backward hooks; the state_dict keys do not change. Other subclasses of
    the torch.nn classes are left alone, with a warning (their forward may differ).

    ``fuse_activation=True`` also folds a ReLU, LeakyReLU, ELU or SiLU applied directly to a
    converted BatchNorm's output into a BatchNormAct, where torch.fx finds that on every path
    (training and evaluation, optional forward arguments given or not): in an nn.Sequential, or
    an activation module that a forward calls once, the activation's slot then holds an
    identity placeholder (same names and state_dict keys); an activation function
    (``F.relu(self.bn(x))``) or a module called more than once (torchvision's shared
    ``self.relu``) is rewritten in the torch.fx graph of the innermost module that calls it,
    which becomes a GraphModule with that module's very submodules and state. Layers or
    activations with hooks are not folded (a hook would see another tensor). Tracing keeps
    every module that owns buffers or hooks as one call, so no buffer update and no hook runs
    during conversion.

    ``to="torch"``: back to torch.nn (custom_bn BatchNorm, BatchNormAct, InPlaceBatchNormAct and
    SyncBatchNorm) or to the foreign class a layer was converted from; folded activations
    return to their slots and rewritten modules to their class, so the round trip restores the
    structure and state_dict keys. User subclasses of custom_bn classes are left, with a
    warning. A
    fused layer built as such becomes ``nn.Sequential(BatchNorm, activation)``, whose weights
    sit one level deeper (``.0.``).

    The conversion never changes the values or versions of ``module``'s parameters and buffers,
    nor their hooks and training flags; it replaces ``module``'s children in place where it
    can. Always use the returned module, which differs when ``module`` itself is a BatchNorm
    or an fx rewrite of its own forward ran.
    """
    if to == "custom_bn":
        module = _replace(module, _to_custom_bn)
        _warn_unconverted(module, to)
        if fuse_activation:
            _fold_sequentials(module)
            module = _fold_traced(module)
        return module
    if to == "torch":
        if fuse_activation:
            raise ValueError("custom_bn.convert_model: fuse_activation applies to to='custom_bn'")
        module = _replace(module, _to_torch)
        _warn_unconverted(module, to)
        return module
    raise ValueError(f"custom_bn.convert_model: to must be 'custom_bn' or 'torch', got {to!r}")
