"""The fake (meta) kernels of custom_bn/_meta.py agree with the real kernels on every layout.

opcheck compares fake and real outputs on a handful of samples; this sweeps every input layout
and dtype of the parity suite (cheap: no numerics), and checks that the fakes reject bad calls.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bn_testing import LAYOUTS, Layout

FORWARD = torch.ops.custom_bn.batch_norm_forward.default
BACKWARD = torch.ops.custom_bn.batch_norm_backward.default
DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


def _meta(t: torch.Tensor):
    return (tuple(t.shape), t.stride(), t.dtype)


def _fake_call(op, args):
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return op(*fake_args)


@pytest.mark.parametrize("dtype,param_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.id for layout in LAYOUTS])
def test_fake_matches_real_metadata(layout: Layout, dtype, param_dtype):
    x = layout.make(dtype)
    channels = x.shape[1]
    w = torch.rand(channels, dtype=param_dtype)
    for training, stats in (
        (True, None),
        (
            False,
            (torch.zeros(channels, dtype=param_dtype), torch.ones(channels, dtype=param_dtype)),
        ),
    ):
        rm, rv = stats if stats else (None, None)
        args = (x, w, None, rm, rv, training, 0.1, 1e-5)
        real = FORWARD(*args)
        fake = _fake_call(FORWARD, args)
        assert [_meta(t) for t in fake] == [_meta(t) for t in real], f"forward training={training}"
        grad_out = torch.randn_like(real[0])
        for weight in (w, None):
            for mask in ([True, True, True], [True, False, True], [False, True, False]):
                bargs = (grad_out, x, weight, real[1], real[2], training, 1e-5, mask)
                real_grads = BACKWARD(*bargs)
                fake_grads = _fake_call(BACKWARD, bargs)
                assert [_meta(t) for t in fake_grads] == [
                    _meta(t) for t in real_grads
                ], f"backward training={training} weight={weight is not None} mask={mask}"


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        (
            (torch.randn(4), None, None, None, None, True, 0.1, 1e-5),
            RuntimeError,
            r"input must have shape",
        ),
        (
            (torch.randn(4, 3), torch.ones(4), None, None, None, True, 0.1, 1e-5),
            RuntimeError,
            r"weight must have shape \[C\]=\[3\]",
        ),
        (
            (torch.randn(4, 3), None, None, torch.zeros(3), None, True, 0.1, 1e-5),
            ValueError,
            r"given together",
        ),
        (
            (torch.randn(4, 3), None, None, None, None, False, 0.1, 1e-5),
            RuntimeError,
            r"evaluation mode",
        ),
        (
            (torch.randn(1, 3), None, None, None, None, True, 0.1, 1e-5),
            ValueError,
            r"more than 1 value per channel",
        ),
        (
            (
                torch.randn(4, 3),
                torch.ones(3, dtype=torch.float64),
                None,
                None,
                None,
                True,
                0.1,
                1e-5,
            ),
            RuntimeError,
            r"weight must have dtype",
        ),
        (
            (torch.zeros(4, 3, dtype=torch.long), None, None, None, None, True, 0.1, 1e-5),
            NotImplementedError,
            r"floating-point",
        ),
    ],
    ids=[
        "rank",
        "weight-shape",
        "stats-pair",
        "eval-no-stats",
        "one-value",
        "weight-dtype",
        "integer",
    ],
)
def test_fake_rejects_bad_calls_like_the_real_kernel(args, error, pattern):
    with pytest.raises(error, match=pattern):
        FORWARD(*args)
    with pytest.raises(error, match=pattern):
        _fake_call(FORWARD, args)
