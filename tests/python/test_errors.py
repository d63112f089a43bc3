"""Bad input: a clear error naming the argument, and every buffer left exactly as it was."""

import copy
import inspect
from typing import Callable, Optional, Type

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import custom_bn
from bn_testing import single_threaded

F = custom_bn.functional


def _state(module: nn.Module):
    return copy.deepcopy(module.state_dict())


def _assert_rejected(
    fn: Callable[[], object],
    error: Type[Exception],
    pattern: str,
    module: Optional[nn.Module] = None,
    tensors: tuple = (),
) -> None:
    """fn() raises ``error`` matching ``pattern``; module state and ``tensors`` are unchanged."""
    before = _state(module) if module is not None else None
    snapshots = [t.clone() for t in tensors]
    with pytest.raises(error, match=pattern):
        fn()
    if module is not None:
        after = module.state_dict()
        for key, value in before.items():
            assert torch.equal(after[key], value), f"{key} changed by a rejected call"
    for t, snap in zip(tensors, snapshots):
        assert torch.equal(t, snap), "a running statistic changed by a rejected call"


def _trained_bn2d(channels: int = 3, **kwargs) -> custom_bn.BatchNorm2d:
    m = custom_bn.BatchNorm2d(channels, **kwargs)
    m(torch.randn(4, channels, 3, 3))
    return m


# ---------------------------------------------------------------- input rank


@pytest.mark.parametrize("shape", [(), (5,)], ids=["0d", "1d"])
def test_functional_rejects_input_with_fewer_than_two_dims(shape):
    rm, rv = torch.zeros(5), torch.ones(5)
    _assert_rejected(
        lambda: F.batch_norm(torch.randn(shape), rm, rv, training=True),
        RuntimeError,
        r"input must have shape \(N, C, \*\).*got \d-D input",
        tensors=(rm, rv),
    )


@pytest.mark.parametrize(
    "cls,ref_cls,shape",
    [
        (custom_bn.BatchNorm1d, nn.BatchNorm1d, (5,)),
        (custom_bn.BatchNorm1d, nn.BatchNorm1d, (2, 5, 2, 2)),
        (custom_bn.BatchNorm2d, nn.BatchNorm2d, (2, 5, 3)),
        (custom_bn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 3)),
    ],
    ids=["1d-1D", "1d-4D", "2d-3D", "3d-4D"],
)
def test_module_rejects_wrong_rank_like_torch_nn(cls, ref_cls, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError) as ref_error:
        ref_cls(5)(x)
    m = cls(5)
    _assert_rejected(
        lambda: m(x),
        ValueError,
        "^" + str(ref_error.value).replace("(", r"\(").replace(")", r"\)") + "$",
        m,
    )
    assert m.num_batches_tracked.item() == 0


# ---------------------------------------------------------------- channel count


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"affine": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
    ],
    ids=["default", "no_affine", "no_stats", "bare"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_rejects_wrong_channel_count(kwargs, training):
    m = _trained_bn2d(3, **kwargs).train(training)
    _assert_rejected(
        lambda: m(torch.randn(4, 5, 2, 2)), RuntimeError, r"num_features=3.*\[4, 5, 2, 2\]", m
    )


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_functional_rejects_channel_tensor_of_wrong_length(name):
    args = {
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
    }
    args[name] = torch.ones(4)
    stats = (args["running_mean"], args["running_var"])
    _assert_rejected(
        lambda: F.batch_norm(torch.randn(4, 3, 2), training=True, **args),
        RuntimeError,
        rf"{name} must have shape \[C\]=\[3\].*got shape \[4\]",
        tensors=stats,
    )


def test_functional_rejects_two_dimensional_running_stats_and_the_op_any_2d_tensor():
    # torch accepts a weight/bias of any shape with C elements (so does the functional form,
    # see test_accepted_inputs.py) but not such running stats; the operator takes [C] only.
    _assert_rejected(
        lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3, 1), torch.ones(3, 1), training=True),
        RuntimeError,
        r"running_mean must have shape \[C\]=\[3\].*got shape \[3, 1\]",
    )
    _assert_rejected(
        lambda: torch.ops.custom_bn.batch_norm_forward(
            torch.randn(4, 3), torch.ones(3, 1), None, None, None, True, 0.1, 1e-5
        ),
        RuntimeError,
        r"weight must have shape \[C\]=\[3\].*got shape \[3, 1\]",
    )


# ---------------------------------------------------------------- one value per channel


@pytest.mark.parametrize(
    "cls,shape",
    [
        (custom_bn.BatchNorm1d, (1, 3)),
        (custom_bn.BatchNorm2d, (1, 3, 1, 1)),
        (custom_bn.BatchNorm3d, (1, 3, 1, 1, 1)),
    ],
    ids=["1d", "2d", "3d"],
)
def test_training_with_one_value_per_channel_is_a_value_error(cls, shape):
    m = cls(3)
    _assert_rejected(
        lambda: m(torch.randn(shape)),
        ValueError,
        "Expected more than 1 value per channel when training",
        m,
    )
    assert m.num_batches_tracked.item() == 0
    # torch.nn raises the same error type (after bumping its counter, which custom_bn must not)
    ref = getattr(nn, cls.__name__)(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ref(torch.randn(shape))
    # in eval mode a single value per channel is fine, as in torch.nn
    m.eval()
    ref.eval()
    x = torch.randn(shape)
    with single_threaded():
        expected = ref(x)
    torch.testing.assert_close(m(x), expected)


def test_momentum_none_one_value_per_channel_keeps_counter():
    m = custom_bn.BatchNorm1d(3, momentum=None)
    m(torch.randn(4, 3))
    _assert_rejected(lambda: m(torch.randn(1, 3)), ValueError, "more than 1 value per channel", m)
    assert m.num_batches_tracked.item() == 1


# ---------------------------------------------------------------- dtypes


_NON_FLOATING = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16,
                 torch.bool, torch.complex64, torch.complex128, torch.float8_e4m3fn]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", _NON_FLOATING, ids=lambda d: str(d)[6:])
def test_rejects_non_floating_input_as_torch_does(dtype, training):
    """Every dtype torch's batch norm rejects, with torch's exception class (NotImplementedError
    today, checked against torch itself), a message naming custom_bn and the dtype, and the
    running statistics and counter untouched."""
    x = torch.zeros(4, 3, 2, 2, dtype=dtype)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.batch_norm(x, rm, rv, training=training)
    expected = type(theirs.value)
    assert expected is NotImplementedError
    m = _trained_bn2d().train(training)
    pattern = r"custom_bn.*input must be a floating-point tensor .*got " + {
        torch.bool: "Bool", torch.int64: "Long", torch.complex64: "ComplexFloat",
    }.get(dtype, "")
    _assert_rejected(lambda: m(x), expected, pattern, m)
    _assert_rejected(
        lambda: F.batch_norm(x, rm, rv, training=training), expected, pattern, tensors=(rm, rv)
    )
    fused = custom_bn.BatchNormAct2d(3, activation="silu").train(training)
    _assert_rejected(lambda: fused(x), expected, pattern, fused)


@pytest.mark.parametrize(
    "input_dtype,name,bad_dtype",
    [
        (torch.float32, "weight", torch.float64),
        (torch.float32, "bias", torch.float16),
        (torch.float32, "running_mean", torch.float64),
        (torch.float64, "running_var", torch.float32),
        (torch.float16, "weight", torch.float64),
        (torch.bfloat16, "running_mean", torch.float16),
    ],
    ids=[
        "f32-weight-f64",
        "f32-bias-f16",
        "f32-mean-f64",
        "f64-var-f32",
        "f16-weight-f64",
        "bf16-mean-f16",
    ],
)
def test_rejects_parameter_of_unsupported_dtype(input_dtype, name, bad_dtype):
    args = {
        "weight": torch.ones(3, dtype=input_dtype),
        "bias": torch.zeros(3, dtype=input_dtype),
        "running_mean": torch.zeros(3, dtype=input_dtype),
        "running_var": torch.ones(3, dtype=input_dtype),
    }
    args[name] = args[name].to(bad_dtype)
    x = torch.randn(4, 3, 5).to(input_dtype)
    stats = (args["running_mean"], args["running_var"])
    _assert_rejected(
        lambda: F.batch_norm(x, training=True, **args),
        RuntimeError,
        rf"{name} must have dtype",
        tensors=stats,
    )


def test_rejects_mixed_parameter_dtypes():
    """float16 input takes float16 or float32 parameters, but one dtype for all of them."""
    x = torch.randn(4, 3, 5).half()
    rm, rv = torch.zeros(3), torch.ones(3)
    _assert_rejected(
        lambda: F.batch_norm(
            x, rm, rv, torch.ones(3, dtype=torch.float16), torch.zeros(3), training=True
        ),
        RuntimeError,
        "bias must have the same dtype as weight",
        tensors=(rm, rv),
    )


def test_module_rejects_input_of_other_dtype():
    m = _trained_bn2d()
    _assert_rejected(
        lambda: m(torch.randn(4, 3, 2, 2, dtype=torch.float64)),
        RuntimeError,
        "weight must have dtype",
        m,
    )


# ---------------------------------------------------------------- devices


def test_rejects_parameter_on_another_device():
    """Without a GPU the 'meta' device stands in for another device."""
    x = torch.randn(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.ones(3, device="meta")
    _assert_rejected(
        lambda: F.batch_norm(x, rm, rv, w, None, training=True),
        RuntimeError,
        "weight must be on the same device",
        tensors=(rm, rv),
    )


@pytest.mark.cuda
def test_rejects_cpu_parameter_for_cuda_input():
    x = torch.randn(4, 3, 2, 2, device="cuda")
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    _assert_rejected(
        lambda: F.batch_norm(x, rm, rv, torch.ones(3), None, training=True),
        RuntimeError,
        "weight must be on the same device",
        tensors=(rm, rv),
    )


# ---------------------------------------------------------------- running statistics


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stat_without_its_partner_has_torchs_error_class(given, training):
    """torch raises ValueError in training and RuntimeError in evaluation mode: so do we."""
    stat = torch.zeros(3) if given == "running_mean" else torch.ones(3)
    rm, rv = (stat, None) if given == "running_mean" else (None, stat)
    x = torch.randn(4, 3)
    with pytest.raises(Exception) as torch_error:
        TF.batch_norm(x, rm, rv, training=training)
    expected = ValueError if training else RuntimeError
    assert type(torch_error.value) is expected
    _assert_rejected(
        lambda: F.batch_norm(x, rm, rv, training=training),
        expected,
        "must be given together" if training else "must be defined in evaluation mode",
        tensors=(stat,),
    )


def test_eval_without_running_stats():
    w = torch.ones(3)
    _assert_rejected(
        lambda: F.batch_norm(torch.randn(4, 3), None, None, w, training=False),
        RuntimeError,
        "running_mean and running_var must be defined in evaluation mode",
    )


@pytest.mark.parametrize(
    "training,eps",
    [(True, -1.0), (True, 0.0), (False, -1e-5)],
    ids=["train-negative", "train-zero", "eval-negative"],
)
def test_eps_out_of_range_is_a_value_error_like_torch(training, eps):
    """torch.nn.functional.batch_norm: eps > 0 in training, eps >= 0 in eval, else ValueError."""
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="eps"):
        TF.batch_norm(x, rm.clone(), rv.clone(), training=training, eps=eps)
    _assert_rejected(
        lambda: F.batch_norm(x, rm, rv, training=training, eps=eps),
        ValueError,
        "eps",
        tensors=(rm, rv),
    )


def test_module_usable_after_rejected_calls():
    m = _trained_bn2d()
    ref = copy.deepcopy(m)
    for bad in (
        torch.randn(4, 5, 2, 2),
        torch.randn(1, 3, 1, 1),
        torch.zeros(4, 3, 2, 2, dtype=torch.long),
    ):
        with pytest.raises((RuntimeError, ValueError)):
            m(bad)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=0, atol=0)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2


# ---------------------------------------------------------------- empty batch


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentum_none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_empty_batch_behaves_like_torch_nn(momentum, channels_last):
    ours, ref = custom_bn.BatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
    with single_threaded():
        warm = torch.randn(4, 3, 2, 2)
        ref(warm)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(0, 3, 4, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(xo)
        with single_threaded():
            y_ref = ref(xr)
        assert y.shape == y_ref.shape == x.shape
        y.sum().backward()
        y_ref.sum().backward()
        assert xo.grad.shape == x.shape
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
        for key, value in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), f"{key} (training={training})"
    assert ours.num_batches_tracked.item() == 2  # the warm-up batch and the empty one


def test_empty_batch_functional_keeps_running_stats():
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = (rm.clone(), rv.clone())
    out = F.batch_norm(torch.randn(0, 3, 5), rm, rv, training=True, momentum=0.5)
    assert out.shape == (0, 3, 5)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


# ---------------------------------------------------------------- backward operator


def test_backward_op_rejects_mismatched_arguments():
    x = torch.randn(4, 3, 5)
    _, mean, invstd = torch.ops.custom_bn.batch_norm_forward(
        x, None, None, None, None, True, 0.1, 1e-5
    )
    bwd = torch.ops.custom_bn.batch_norm_backward
    mask = [True, True, True]
    with pytest.raises(RuntimeError, match=r"grad_output must have input's shape"):
        bwd(torch.randn(4, 3, 4), x, None, mean, invstd, True, 1e-5, mask)
    with pytest.raises(RuntimeError, match=r"grad_output must have input's dtype"):
        bwd(torch.randn(4, 3, 5, dtype=torch.float64), x, None, mean, invstd, True, 1e-5, mask)
    with pytest.raises(RuntimeError, match=r"save_mean must have shape \[C\]=\[3\]"):
        bwd(torch.randn(4, 3, 5), x, None, mean[:2], invstd, True, 1e-5, mask)
    with pytest.raises(RuntimeError, match=r"save_invstd must be a Float tensor"):
        bwd(torch.randn(4, 3, 5), x, None, mean, invstd.double(), True, 1e-5, mask)


# ---------------------------------------------------------------- signature


def test_functional_signature_is_torchs_plus_the_epilogue():
    """torch.nn.functional.batch_norm's parameters, in order and with its defaults, then the
    fused epilogue's three; an unknown keyword is a TypeError, as in torch."""
    ours = inspect.signature(F.batch_norm).parameters
    theirs = inspect.signature(TF.batch_norm).parameters
    assert list(ours) == list(theirs) + ["activation", "activation_param", "residual"]
    defaults = [p.default for p in ours.values()]
    assert defaults[: len(theirs)] == [p.default for p in theirs.values()]
    assert defaults[len(theirs):] == ["identity", None, None]
    with pytest.raises(TypeError):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, act="relu")
