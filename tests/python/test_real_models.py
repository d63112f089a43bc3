"""convert_model on models nobody on this project wrote: torchvision's and timm's, random init.

Each model is converted (plain, and with fuse_activation=True) and trained two SGD steps (momentum,
weight decay, dropout and stochastic depth seeded alike) in lockstep with a copy of the original
in float64: losses, every gradient, parameters, running statistics and evaluation outputs must
agree, the conversion must leave the original's tensors (values and versions), hooks and flags
alone, and the back conversion must load into the original with strict=True. The models cover
every BatchNorm flavour of the two libraries: torch.nn's BatchNorm2d in Sequentials and behind
shared activation modules, timm's BatchNormAct2d with each activation timm puts in it (fused or
not), with a drop layer, and the frozen layers (left as they are until custom_bn has its own).
Results (largest relative differences, counts, times) go to build/real_models.json."""

import copy
import json
import os
import time
import warnings
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import custom_bn
from custom_bn.modules import _BatchNorm

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d as TimmBatchNormAct2d  # noqa: E402
from timm.layers import ConvNormAct, DropBlock2d, FrozenBatchNormAct2d, freeze_batch_norm_2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d  # noqa: E402

_RESULTS: Dict[str, dict] = {}
# float64, two SGD steps: the largest relative difference allowed. torch against itself (the same
# model in channels-last, another summation order) differs by up to 5e-10 on these models: the
# training dynamics amplify rounding, most where a BatchNorm sees few values per channel.
_BOUND = 1e-9
BATCH = 4


def _timm_activations_model() -> nn.Module:
    """timm's BatchNormAct2d with every activation timm's registry offers (the fused ones and
    the others), without activation, with a drop layer between BN and act, and frozen."""
    acts = ["relu", "leaky_relu", "elu", "silu", "hard_swish", "gelu", "prelu", "mish", "relu6",
            "sigmoid", "tanh", "hard_sigmoid", "celu", "selu", "gelu_tanh"]
    layers: List[nn.Module] = [ConvNormAct(3, 6, 3, act_layer="relu")]
    layers += [ConvNormAct(6, 6, 3, act_layer=act, norm_kwargs={"eps": 1e-3, "momentum": 0.3})
               for act in acts]
    layers.append(ConvNormAct(6, 6, 1, apply_act=False))
    layers.append(ConvNormAct(6, 6, 3, act_layer="silu",
                              drop_layer=lambda: DropBlock2d(0.2, block_size=3)))
    frozen = freeze_batch_norm_2d(ConvNormAct(6, 6, 1, act_layer="relu"))
    assert type(frozen.bn) is FrozenBatchNormAct2d
    layers += [frozen, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10)]
    return nn.Sequential(*layers)


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.2, **kwargs)


# name -> (builder, input size)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], int]] = {
    "torchvision resnet18": (_tv("resnet18"), 64),
    "torchvision mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64),
    "torchvision efficientnet_b0": (_tv("efficientnet_b0"), 64),
    "torchvision shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64),
    "torchvision resnet18, FrozenBatchNorm2d": (_tv("resnet18", norm_layer=TvFrozenBatchNorm2d), 64),
    "timm efficientnet_b0": (_timm("efficientnet_b0", drop_path_rate=0.1), 64),
    "timm mobilenetv3_small_100": (_timm("mobilenetv3_small_100", drop_path_rate=0.1), 64),
    "timm regnety_002": (_timm("regnety_002", drop_path_rate=0.1), 64),
    "timm ghostnet_100": (_timm("ghostnet_100"), 64),
    "timm resnet18d": (_timm("resnet18d", drop_path_rate=0.1), 64),
    "timm BatchNormAct2d, every activation": (_timm_activations_model, 12),
}


def _is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, TvFrozenBatchNorm2d, FrozenBatchNormAct2d))


def _build(name: str, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().to(dtype)
    with torch.no_grad():  # non-trivial affine parameters and statistics
        for m in model.modules():
            if _is_batch_norm(m) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
    return model


def _snapshot(model: nn.Module):
    """Every tensor of the model (the object, a copy of its value, its version), every hook and
    every training flag."""
    tensors = [(name, t, t.detach().clone(), t._version)
               for name, t in [*model.named_parameters(), *model.named_buffers()]]
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    flags = {name: m.training for name, m in model.named_modules()}
    return tensors, hooks, flags, list(model.state_dict())


def _assert_untouched(snapshot, model: nn.Module) -> None:
    tensors, hooks, flags, _ = snapshot
    for name, t, value, version in tensors:
        assert t._version == version, f"{name}: version changed by the conversion"
        assert torch.equal(t.detach(), value), f"{name}: value changed by the conversion"
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules() if name in hooks} == {
        name: h for name, h in hooks.items() if name in dict(model.named_modules())}


def _relative(ours: torch.Tensor, theirs: torch.Tensor, largest: float = 0.0) -> float:
    """max |ours - theirs| / max |theirs|; a tensor that is zero in exact arithmetic (below 1e-8
    of ``largest``, the largest of its kind: gradients of the step, or state values) is
    judged against ``largest`` instead (rounding leaves it at ~1e-17, not at zero)."""
    size = theirs.abs().max().item()
    denominator = largest if size < 1e-8 * largest else size
    if denominator == 0:
        return (ours - theirs).abs().max().item()
    return (ours - theirs).abs().max().item() / denominator


def _lockstep(ours: nn.Module, theirs: nn.Module, size: int, steps: int = 2) -> float:
    """Trains both the same way; returns the largest relative difference seen (losses, outputs,
    gradients, parameters, buffers, evaluation outputs)."""
    dtype = next(theirs.parameters()).dtype
    memory_format = torch.channels_last if dtype == torch.float32 else torch.contiguous_format
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
            for m in (ours, theirs)]
    worst = 0.0
    params = [dict(m.named_parameters()) for m in (ours, theirs)]
    assert params[0].keys() == params[1].keys()
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(BATCH, 3, size, size, generator=g, dtype=dtype).to(memory_format=memory_format)
        target = torch.randint(0, 10, (BATCH,), generator=g)
        outputs, losses = [], []
        for model, opt in zip((ours, theirs), opts):
            torch.manual_seed(100 + step)  # dropout, drop path, drop block alike
            opt.zero_grad()
            out = model(x)
            loss = TF.cross_entropy(out, target)
            loss.backward()
            outputs.append(out.detach())
            losses.append(loss.detach())
        worst = max(worst, _relative(*losses), _relative(*outputs))
        largest = max(p.grad.abs().max().item() for p in params[1].values() if p.grad is not None)
        for name, p in params[1].items():
            if p.grad is None:
                assert params[0][name].grad is None, name
                continue
            worst = max(worst, _relative(params[0][name].grad, p.grad, largest))
        for opt in opts:
            opt.step()
    state = theirs.state_dict()
    assert ours.state_dict().keys() == state.keys()
    largest = max(v.abs().max().item() for v in state.values() if v.is_floating_point() and v.numel())
    for name, value in ours.state_dict().items():
        if value.is_floating_point():
            worst = max(worst, _relative(value, state[name], largest))
        else:
            assert torch.equal(value, state[name]), name
    ours.eval(), theirs.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(99), dtype=dtype)
    with torch.no_grad():
        worst = max(worst, _relative(ours(x), theirs(x)))
    return worst


def _count(model: nn.Module) -> Tuple[int, int]:
    converted = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    fused = [m for m in converted if getattr(m, "activation", "identity") != "identity"]
    return len(converted), len(fused)


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", list(MODELS))
def test_converts_without_side_effects_and_trains_in_lockstep(name, fuse):
    start = time.perf_counter()
    original = _build(name)
    reference = copy.deepcopy(original)
    before = _snapshot(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BatchNorm of these models is known: no warning
        converted = custom_bn.convert_model(original, fuse_activation=fuse)
    _assert_untouched(before, original)
    assert list(converted.state_dict()) == before[3]
    layers = sum(_is_batch_norm(m) for m in reference.modules())
    frozen = sum(isinstance(m, (TvFrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in reference.modules())
    n_converted, n_fused = _count(converted)
    assert n_converted == layers - frozen, "a BatchNorm layer was not converted"
    assert not any(type(m) in (nn.BatchNorm2d, TimmBatchNormAct2d) for m in converted.modules())
    worst = _lockstep(converted, reference, MODELS[name][1])
    assert worst <= _BOUND, f"{name}: largest relative difference {worst:.2e}"

    back = custom_bn.convert_model(converted, to="torch")
    assert not any(isinstance(m, (_BatchNorm, custom_bn.convert._FoldedActivation))
                   for m in back.modules())
    assert [type(m) for m in back.modules() if _is_batch_norm(m)] == [
        type(m) for m in reference.modules() if _is_batch_norm(m)]
    fresh = _build(name)
    fresh.load_state_dict(back.state_dict(), strict=True)
    x = torch.randn(2, 3, MODELS[name][1], MODELS[name][1], dtype=torch.float64)
    with torch.no_grad():
        assert _relative(fresh.eval()(x), reference(x)) <= _BOUND
        assert _relative(back.eval()(x), reference(x)) <= _BOUND
    _RESULTS[f"{name} ({'fused' if fuse else 'plain'})"] = {
        "batch_norm_layers": layers, "converted": n_converted, "fused": n_fused,
        "max_relative_difference": worst, "seconds": round(time.perf_counter() - start, 2)}


def test_timm_layers_convert_to_fused_layers_with_their_parameters():
    model = _timm_activations_model().double()
    converted = custom_bn.convert_model(copy.deepcopy(model))
    kinds = [(type(m).__name__, getattr(m, "activation", None), getattr(m, "eps", None))
             for m in converted.modules() if isinstance(m, _BatchNorm)]
    assert kinds[:5] == [("BatchNormAct2d", "relu", 1e-5), ("BatchNormAct2d", "relu", 1e-3),
                         ("BatchNormAct2d", "leaky_relu", 1e-3), ("BatchNormAct2d", "elu", 1e-3),
                         ("BatchNormAct2d", "silu", 1e-3)]
    assert all(m.momentum == 0.3 for m in list(converted.modules()) if isinstance(m, _BatchNorm)
               and m.eps == 1e-3)
    # activations custom_bn does not fuse stay timm's modules, after a custom_bn BatchNorm
    hard_swish = converted[5].bn
    assert isinstance(hard_swish, custom_bn.BatchNorm2d) and type(hard_swish.act) is nn.Hardswish
    assert type(converted[7].bn.act) is timm.layers.activations.PReLU  # its weight: bn.act.weight
    # a drop layer between BN and act: no fusion, the drop layer kept
    assert type(converted[-5].bn.drop) is DropBlock2d
    # frozen layers are left as they are
    assert type(converted[-4].bn) is FrozenBatchNormAct2d


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_convert_sync_batchnorm_keeps_timm_activations(act):
    torch.manual_seed(0)
    timm_layer = TimmBatchNormAct2d(3, act_layer=act).double().eval()
    with torch.no_grad():
        timm_layer.running_mean.normal_()
    synced = custom_bn.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(timm_layer)))[0]
    assert isinstance(synced, custom_bn.SyncBatchNorm)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(synced(x), timm_layer(x), rtol=1e-12, atol=1e-12)


def test_channels_last_float32_resnet18_trains_in_lockstep():
    original = _build("torchvision resnet18", torch.float32).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(original)
    converted = custom_bn.convert_model(original, fuse_activation=True)
    # One step: float32 rounding (1e-7) grows to O(1) differences by the second step, for torch
    # against itself too once its first step is perturbed at that level.
    worst = _lockstep(converted, reference, 64, steps=1)
    assert worst <= 1e-4, worst
    _RESULTS["torchvision resnet18 float32 channels-last (fused)"] = {
        "max_relative_difference": worst}


def test_compiled_converted_model_matches_torch():
    original = _build("timm mobilenetv3_small_100")
    reference = copy.deepcopy(original)
    converted = custom_bn.convert_model(original, fuse_activation=True)
    # In place (the same parameter names). aot_eager: the whole graph through AOTAutograd with
    # the fake kernels, run by the eager kernels, so dropout draws what eager torch draws
    # (inductor has its own random streams, and compiles this model for two minutes here).
    converted.compile(fullgraph=True, backend="aot_eager")
    worst = _lockstep(converted, reference, 64)
    assert worst <= _BOUND, worst
    _RESULTS["timm mobilenetv3_small_100 torch.compile(fullgraph=True) (fused)"] = {
        "max_relative_difference": worst}


def test_user_subclass_is_converted_once_registered_and_restored():
    class MyBatchNorm(nn.BatchNorm2d):
        """A user's subclass with an extra constructor argument and attribute."""

        def __init__(self, channels: int, tag: str) -> None:
            super().__init__(channels, eps=1e-3, momentum=0.7)
            self.tag = tag

    class MyBatchNormReLU(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), MyBatchNorm(4, "a"), nn.Conv2d(4, 4, 1),
                             MyBatchNormReLU(4), nn.Flatten(), nn.LazyLinear(10)).double()

    original = model()
    original(torch.randn(2, 3, 6, 6, dtype=torch.float64))  # materialize the lazy layer
    reference = copy.deepcopy(original)
    with pytest.warns(UserWarning, match="MyBatchNorm, .*MyBatchNormReLU.*register_conversion"):
        left = custom_bn.convert_model(copy.deepcopy(original))
    assert type(left[1]) is MyBatchNorm and type(left[3]) is MyBatchNormReLU

    custom_bn.register_conversion(MyBatchNorm)
    custom_bn.register_conversion(
        MyBatchNormReLU,
        lambda layer: custom_bn.convert.rebuild(layer, custom_bn.BatchNormAct2d, activation="relu"))
    try:
        converted = custom_bn.convert_model(original)
        assert type(converted[1]) is custom_bn.BatchNorm2d and converted[1].eps == 1e-3
        assert converted[1].momentum == 0.7
        assert type(converted[3]) is custom_bn.BatchNormAct2d
        assert _lockstep(converted, reference, 6) <= _BOUND
        back = custom_bn.convert_model(converted, to="torch")
        assert type(back[1]) is MyBatchNorm and back[1].tag == "a" and back[1].eps == 1e-3
        assert type(back[3]) is MyBatchNormReLU
        reference.load_state_dict(back.state_dict(), strict=True)
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(back(x), reference(x), rtol=1e-12, atol=1e-12)
    finally:
        custom_bn.convert._REGISTERED.clear()
    with pytest.raises(TypeError, match="does not subclass a torch.nn BatchNorm"):
        custom_bn.register_conversion(nn.Linear)


def test_hooks_move_with_the_layer_and_block_fusion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4), nn.ReLU()).double()
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    reference = copy.deepcopy(model)
    converted = custom_bn.convert_model(model, fuse_activation=True)
    assert type(converted[1]) is custom_bn.BatchNorm2d  # hooked: not fused (it would see act(BN))
    assert type(converted[4]) is custom_bn.BatchNormAct2d
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-12, atol=1e-12)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-12, atol=1e-12)
    handle.remove()  # the caller's handle still removes it
    converted(x)
    assert len(seen) == 2


def teardown_module(module) -> None:
    if _RESULTS:
        os.makedirs("build", exist_ok=True)
        with open(os.path.join("build", "real_models.json"), "w") as f:
            json.dump(_RESULTS, f, indent=1)
