"""torch.library.opcheck on representative samples of every custom_bn operator.

opcheck verifies the schema (mutations annotated, no aliasing), the autograd registration, the
fake kernel against the real one (shapes, dtypes, strides) and tracing through AOTAutograd with
dynamic shapes.
"""

from typing import List, Tuple

import pytest
import torch

from bn_testing import DEVICES, Layout

FORWARD = torch.ops.custom_bn.batch_norm_forward.default
BACKWARD = torch.ops.custom_bn.batch_norm_backward.default

# (layout, input dtype, param dtype, training, affine, running stats)
FORWARD_CASES = [
    (Layout((4, 3, 5, 5), "contiguous"), torch.float32, torch.float32, True, True, True),
    (Layout((4, 3, 5, 5), "channels_last"), torch.float32, torch.float32, True, True, False),
    (Layout((4, 3, 5, 5), "channels_last"), torch.float32, torch.float32, False, True, True),
    (Layout((6, 4), "contiguous"), torch.float64, torch.float64, True, False, True),
    (Layout((3, 4, 7), "sliced"), torch.float64, torch.float64, False, False, True),
    (Layout((2, 3, 2, 3, 4), "channels_last"), torch.float16, torch.float32, True, True, True),
    (Layout((2, 5, 6), "transposed"), torch.bfloat16, torch.bfloat16, True, True, True),
    (Layout((2, 3, 4, 4), "contiguous"), torch.bfloat16, torch.float32, False, True, True),
]
FORWARD_IDS = [
    f"{c[0].id}-{str(c[1])[6:]}-{'train' if c[3] else 'eval'}-{'affine' if c[4] else 'noaffine'}"
    f"-{'stats' if c[5] else 'nostats'}"
    for c in FORWARD_CASES
]


def _forward_args(case, device: str, requires_grad: bool) -> Tuple:
    layout, dtype, param_dtype, training, affine, stats = case
    x = layout.make(dtype, device).requires_grad_(requires_grad)
    channels = x.shape[1]
    opts = {"dtype": param_dtype, "device": device}
    w = (torch.rand(channels, **opts) + 0.5).requires_grad_(requires_grad) if affine else None
    b = torch.randn(channels, **opts).requires_grad_(requires_grad) if affine else None
    rm = torch.randn(channels, **opts) * 0.1 if stats else None
    rv = torch.rand(channels, **opts) + 0.5 if stats else None
    return (x, w, b, rm, rv, training, 0.1, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", FORWARD_CASES, ids=FORWARD_IDS)
def test_opcheck_forward(case, requires_grad, device):
    torch.library.opcheck(FORWARD, _forward_args(case, device, requires_grad))


MASKS: List[List[bool]] = [
    [True, True, True],
    [True, False, False],
    [False, True, True],
    [False, False, False],
]


def _backward_args(case, device: str, mask: List[bool], requires_grad: bool) -> Tuple:
    x, w, b, rm, rv, training, momentum, eps = _forward_args(case, device, False)
    _, save_mean, save_invstd = FORWARD(x, w, b, rm, rv, training, momentum, eps)
    grad_out = torch.randn_like(x)  # keeps a channels-last layout
    x.requires_grad_(requires_grad)
    grad_out.requires_grad_(requires_grad)
    if w is not None:
        w.requires_grad_(requires_grad)
    return (grad_out, x, w, save_mean, save_invstd, training, eps, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize(
    "mask", MASKS, ids=["".join("1" if m else "0" for m in mask) for mask in MASKS]
)
@pytest.mark.parametrize(
    "case",
    [FORWARD_CASES[i] for i in (0, 2, 3, 5, 6)],
    ids=[FORWARD_IDS[i] for i in (0, 2, 3, 5, 6)],
)
def test_opcheck_backward(case, mask, requires_grad, device):
    torch.library.opcheck(BACKWARD, _backward_args(case, device, mask, requires_grad))


ACT_FORWARD = torch.ops.custom_bn.batch_norm_act_forward.default
ACT_BACKWARD = torch.ops.custom_bn.batch_norm_act_backward.default
# (forward case index, activation, activation_param, residual)
ACT_CASES = [
    (0, "relu", 0.0, True),
    (1, "leaky_relu", 0.2, False),
    (2, "elu", 1.0, True),
    (3, "silu", 0.0, True),
    (5, "relu", 0.0, True),
    (6, "identity", 0.0, True),
    (7, "elu", 0.5, False),
]
ACT_IDS = [f"{FORWARD_IDS[i]}-{a}-{'res' if r else 'nores'}" for i, a, _, r in ACT_CASES]


def _act_forward_args(act_case, device: str, requires_grad: bool) -> Tuple:
    index, activation, param, with_residual = act_case
    x, w, b, rm, rv, training, momentum, eps = _forward_args(FORWARD_CASES[index], device, requires_grad)
    residual = torch.randn_like(x).requires_grad_(requires_grad) if with_residual else None
    return (x, w, b, rm, rv, residual, training, momentum, eps, activation, param)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("act_case", ACT_CASES, ids=ACT_IDS)
def test_opcheck_act_forward(act_case, requires_grad, device):
    torch.library.opcheck(ACT_FORWARD, _act_forward_args(act_case, device, requires_grad))


ACT_MASKS = [[True, True, True, True], [True, False, False, False], [False, True, True, False],
             [False, False, False, True]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("mask", ACT_MASKS, ids=["".join("1" if m else "0" for m in mask) for mask in ACT_MASKS])
@pytest.mark.parametrize("act_case", [ACT_CASES[i] for i in (0, 2, 4, 5)], ids=[ACT_IDS[i] for i in (0, 2, 4, 5)])
def test_opcheck_act_backward(act_case, mask, requires_grad, device):
    x, w, b, rm, rv, r, training, momentum, eps, activation, param = _act_forward_args(act_case, device, False)
    _, save_mean, save_invstd = ACT_FORWARD(x, w, b, rm, rv, r, training, momentum, eps, activation, param)
    grad_out = torch.randn_like(x)
    for t in (x, grad_out, w, b, r):
        if t is not None:
            t.requires_grad_(requires_grad)
    torch.library.opcheck(
        ACT_BACKWARD,
        (grad_out, x, w, b, r, save_mean, save_invstd, training, eps, activation, param, mask),
    )


INFERENCE = torch.ops.custom_bn.batch_norm_inference.default


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("act_case", ACT_CASES, ids=ACT_IDS)
def test_opcheck_inference(act_case, requires_grad, device):
    x, w, b, rm, rv, r, _, _, eps, activation, param = _act_forward_args(act_case, device, requires_grad)
    if rm is None:  # the case has no running stats: give some of the per-channel dtype
        stats_dtype = w.dtype if w is not None else (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        rm = torch.randn(x.shape[1], device=device, dtype=stats_dtype) * 0.1
        rv = torch.rand(x.shape[1], device=device, dtype=stats_dtype) + 0.5
    torch.library.opcheck(INFERENCE, (x, w, b, rm, rv, r, eps, activation, param))
