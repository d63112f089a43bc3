"""custom_bn.BatchNorm1d/2d/3d against their torch.nn twins: training steps, eval, state_dict."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import custom_bn
from bn_testing import DEVICES, assert_close, single_threaded

PAIRS = {
    "1d-2D": (custom_bn.BatchNorm1d, nn.BatchNorm1d, (8, 5)),
    "1d-3D": (custom_bn.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7)),
    "2d": (custom_bn.BatchNorm2d, nn.BatchNorm2d, (4, 5, 3, 3)),
    "3d": (custom_bn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 2, 3)),
}
CONFIGS = {
    "default": {},
    "momentum1": {"momentum": 1.0},
    "momentum_none": {"momentum": None},
    "no_affine": {"affine": False},
    "no_bias": {"bias": False},
    "no_running_stats": {"track_running_stats": False},
    "bare": {"affine": False, "track_running_stats": False, "eps": 1e-3},
}


def _twins(pair: str, config: str, device: str = "cpu", dtype=torch.float64):
    ours_cls, ref_cls, shape = PAIRS[pair]
    kwargs = dict(CONFIGS[config], device=device, dtype=dtype)
    ref = ref_cls(5, **kwargs)
    ours = ours_cls(5, **kwargs)
    # non-trivial parameters and statistics, identical in both
    with torch.no_grad():
        for t in ref.parameters():
            t.uniform_(0.5, 1.5)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-0.2, 0.2)
            ref.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, shape


def _compare_state(ours: nn.Module, ref: nn.Module, dtype: torch.dtype, what: str) -> None:
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd), what
    for key in ref_sd:
        assert ours_sd[key].dtype == ref_sd[key].dtype, f"{what}: {key} dtype"
        if key.endswith("num_batches_tracked"):
            assert torch.equal(ours_sd[key], ref_sd[key]), f"{what}: {key}"
        else:
            assert_close(ours_sd[key], ref_sd[key], dtype, f"{what}: {key}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("pair", list(PAIRS))
def test_training_and_eval_steps_match_torch_nn(pair, config, dtype, device):
    ours, ref, shape = _twins(pair, config, device, dtype)
    # train 3 steps, eval, train again, eval: outputs, gradients and buffers must follow torch.nn
    for step, training in enumerate([True, True, True, False, True, False]):
        ours.train(training)
        ref.train(training)
        x = (torch.randn(shape, dtype=dtype, device=device) * 2 + step).requires_grad_()
        y = ours(x)
        with single_threaded():
            y_ref = ref(x)
        what = f"{pair}/{config} step {step} ({'train' if training else 'eval'})"
        assert_close(y, y_ref, dtype, f"{what}: output")
        g = torch.randn_like(y)
        params = [x] + list(ours.parameters())
        got = torch.autograd.grad(y, params, g)
        with single_threaded():
            want = torch.autograd.grad(y_ref, [x] + list(ref.parameters()), g)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, dtype, f"{what}: grad {i}")
        _compare_state(ours, ref, dtype, what)


def test_momentum_none_is_cumulative_average():
    m = custom_bn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    batches = [torch.randn(4, 3, 2, 2, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for x in batches:
        m(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in batches])
    variances = torch.stack([x.var((0, 2, 3), correction=1) for x in batches])
    # the initial running stats (0 and 1) get weight 0 from the first batch on
    torch.testing.assert_close(m.running_mean, means.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, variances.mean(0), rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 4


def test_track_running_stats_switched_off_after_construction():
    """torch.nn: buffers exist but are neither updated in training nor ignored in eval."""
    ours, ref, shape = _twins("2d", "default")
    ours.track_running_stats = ref.track_running_stats = False
    x = torch.randn(shape, dtype=torch.float64)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        with single_threaded():
            expected = ref(x)
        assert_close(ours(x), expected, torch.float64, f"training={training}")
        _compare_state(ours, ref, torch.float64, f"training={training}")
    assert ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("pair", ["1d-2D", "2d", "3d"])
def test_structure_matches_torch_nn(pair, config):
    ours_cls, ref_cls, _ = PAIRS[pair]
    ours, ref = ours_cls(7, **CONFIGS[config]), ref_cls(7, **CONFIGS[config])
    # The repr names custom_bn, so a swap is visible; the arguments read as torch.nn's.
    assert repr(ours) == "custom_bn." + repr(ref)
    assert ours.extra_repr() == ref.extra_repr()
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for key in ref_sd:
        assert (
            torch.equal(ours_sd[key], ref_sd[key]) and ours_sd[key].dtype == ref_sd[key].dtype
        ), key
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr), attr


def test_factory_kwargs_and_resets():
    m = custom_bn.BatchNorm3d(4, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long and m.num_batches_tracked.item() == 0
    m(torch.randn(2, 4, 2, 2, 2, dtype=torch.float64))
    with torch.no_grad():
        m.weight.fill_(3.0)
        m.bias.fill_(2.0)
    assert m.num_batches_tracked.item() == 1 and not torch.equal(
        m.running_var, torch.ones(4, dtype=torch.float64)
    )
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(m.running_var, torch.ones(4, dtype=torch.float64))
    assert m.num_batches_tracked.item() == 0 and m.weight[0].item() == 3.0
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4, dtype=torch.float64))
    assert torch.equal(m.bias, torch.zeros(4, dtype=torch.float64))


def test_torch_nn_checkpoint_round_trip_is_exact():
    ref = nn.BatchNorm2d(6)
    with single_threaded():
        for _ in range(3):
            ref(torch.randn(5, 6, 4, 4) * 3 + 1)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    saved = copy.deepcopy(ref.state_dict())
    ours = custom_bn.BatchNorm2d(6)
    result = ours.load_state_dict(saved, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict(), strict=True)
    for sd in (ours.state_dict(), back.state_dict()):
        assert list(sd) == list(saved)
        for key in saved:
            assert torch.equal(sd[key], saved[key]) and sd[key].dtype == saved[key].dtype, key
    assert ours.num_batches_tracked.item() == 3
    # the loaded module computes what the original does, in both modes
    x = torch.randn(5, 6, 4, 4)
    for training in (False, True):
        ours.train(training)
        ref.train(training)
        with single_threaded():
            expected = ref(x)
        assert_close(ours(x), expected, torch.float32, f"training={training}")


def test_swap_inside_a_model_via_state_dict():
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), custom_bn.BatchNorm2d(4), nn.ReLU())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())


def _old_checkpoint(module: nn.Module) -> OrderedDict:
    """A state_dict as saved before num_batches_tracked existed (version 1 metadata)."""
    sd = module.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = OrderedDict({"": {"version": 1}})
    return sd


@pytest.mark.parametrize("device", DEVICES)
def test_old_checkpoint_without_num_batches_tracked(device):
    source = nn.BatchNorm2d(3, device=device)
    with single_threaded():
        source(torch.randn(4, 3, 2, 2, device=device))
    for cls in (custom_bn.BatchNorm2d, nn.BatchNorm2d):
        m = cls(3, device=device)
        m.num_batches_tracked.fill_(5)
        result = m.load_state_dict(_old_checkpoint(source), strict=True)
        assert not result.missing_keys, cls
        assert m.num_batches_tracked.item() == 5, cls  # kept, as torch.nn does
        assert torch.equal(m.running_mean, source.running_mean), cls
    # a version-2 checkpoint that lacks the key is a real missing key, for both
    sd = source.state_dict()
    del sd["num_batches_tracked"]
    for cls in (custom_bn.BatchNorm2d, nn.BatchNorm2d):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(3, device=device).load_state_dict(sd, strict=True)


def test_old_checkpoint_into_meta_module_gets_zero_count():
    source = nn.BatchNorm2d(3)
    ours = custom_bn.BatchNorm2d(3, device="meta")
    ours.load_state_dict(_old_checkpoint(source), strict=True, assign=True)
    assert ours.num_batches_tracked.device.type == "cpu" and ours.num_batches_tracked.item() == 0


def test_train_eval_with_lower_precision_module():
    """A float16 module (params, stats and input all float16) follows torch.nn."""
    ours, ref = custom_bn.BatchNorm2d(3, dtype=torch.float16), nn.BatchNorm2d(
        3, dtype=torch.float16
    )
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x = torch.randn(4, 3, 5, 5).half()
        with single_threaded():
            expected = ref(x)
        assert_close(ours(x), expected, torch.float16, f"training={training}")
        _compare_state(ours, ref, torch.float16, f"training={training}")
