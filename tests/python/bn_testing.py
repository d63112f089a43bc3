"""Helpers shared by the pytest suite: input layouts, tolerances, and comparisons."""

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import pytest
import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# (rtol, atol) per dtype. atol is relative to the largest magnitude of the expected tensor (at
# least 1), so one table serves outputs (~1) and reductions such as grad_weight (~sqrt(N*HW)).
# float16/bfloat16 follow torch's own test tolerances for low-precision batch norm.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's reference computations on one thread.

    ATen's CPU batch norm opens a parallel region even for tiny tensors; on a small, busy machine
    each such region can cost tens of milliseconds, which would dominate the suite's runtime. Our
    operators keep the default thread count so that their parallel paths are exercised.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    """assert_close at ``dtype``'s tolerance, atol scaled by max(1, max|expected|)."""
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double(),
        expected.detach().double(),
        rtol=rtol,
        atol=atol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def assert_matches_oracle(
    actual: Tensor,
    oracle: Tensor,
    theirs: Optional[Tensor],
    dtype: torch.dtype,
    what: str,
    conditioning: Optional[Tensor] = None,
) -> None:
    """``actual`` equals the float64 ``oracle`` within ``dtype``'s tolerance (atol relative to
    the largest magnitude, at least 1), or is at most twice as far from it as torch's own result
    at that precision (``theirs``, when given). ``conditioning`` (elementwise, optional) is the
    size of the terms the kernel adds to get each value, e.g. |x * alpha| + |beta| for the
    folded forward y = x * alpha + beta: the accumulation type's rounding of those terms is
    allowed on top (a constant channel's output, ill-conditioned whatever the kernel). NaN and
    Inf sit where the oracle's are."""
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    a, o = actual.detach().double(), oracle.detach().double()
    keep = o.isfinite()
    special_a, special_o = a[~keep], o[~keep]
    assert torch.equal(a.isfinite(), keep) and torch.equal(
        special_a.nan_to_num(nan=0.5), special_o.nan_to_num(nan=0.5)
    ), f"{what}: NaN/Inf differ from torch's: {special_a.tolist()} vs {special_o.tolist()}"
    a, o = a[keep], o[keep]
    if o.numel() == 0:
        return
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, o.abs().max().item())
    err = (a - o).abs()
    bound = atol * scale + rtol * o.abs()
    if conditioning is not None:
        unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24  # float32 accumulation below
        bound = bound + 4 * unit * conditioning.detach().double()[keep]
    if bool((err <= bound).all()):
        return
    ours = err.max().item()
    if theirs is not None:
        if ours <= 2 * (theirs.detach().double()[keep] - o).abs().max().item():
            return
    raise AssertionError(f"{what}: max error {ours:.3g} vs float64 torch ({dtype})")


def assert_close_or_no_worse(
    actual: Tensor, expected: Tensor, reference: Tensor, dtype: torch.dtype, what: str
) -> None:
    """For float16/bfloat16: ``actual`` must match torch's result at the same precision
    (``expected``) within dtype's tolerance, or be at most twice as far as ``expected`` from the
    float64 ``reference``. The second form covers ill-conditioned values (e.g. grad_input of a
    channel with two values, which is rounding noise around zero in any low-precision kernel).
    float32/float64 results must simply match ``expected``.
    """
    if dtype in (torch.float32, torch.float64):
        assert_close(actual, expected, dtype, what)
        return
    try:
        assert_close(actual, expected, dtype, what)
    except AssertionError as mismatch:
        ref = reference.detach().double()
        ours = (actual.detach().double() - ref).abs().max().item()
        theirs = (expected.detach().double() - ref).abs().max().item()
        _, atol = TOLERANCES[dtype]
        assert (
            ours <= 2 * theirs + atol * 1e-2
        ), f"{what}: max error vs float64 {ours:.3g} exceeds twice torch's {theirs:.3g}\n{mismatch}"


@dataclass(frozen=True)
class Layout:
    """An input of ``shape`` laid out as ``kind``: contiguous, channels_last, sliced, transposed."""

    shape: Tuple[int, ...]
    kind: str

    @property
    def id(self) -> str:
        return f"{'x'.join(map(str, self.shape))}-{self.kind}"

    def make(self, dtype: torch.dtype, device: str = "cpu") -> Tensor:
        """A random input of exactly ``shape`` with the requested strides.

        Values have a per-channel offset so that the statistics are not centred at zero.
        """
        shape = self.shape
        offset_shape = [1] * len(shape)
        offset_shape[1] = shape[1]
        if self.kind == "sliced":
            # every other element of the last dim, and skip the first batch entry
            base = torch.randn(shape[0] + 1, *shape[1:-1], 2 * shape[-1], dtype=torch.float64)
            x = base[1:, ..., ::2]
        elif self.kind == "transposed":
            # the last two dims swapped in memory
            x = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64).transpose(
                -1, -2
            )
        else:
            x = torch.randn(shape, dtype=torch.float64)
        x = x * 1.5 + torch.randn(offset_shape, dtype=torch.float64)
        if self.kind == "channels_last":
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        elif self.kind == "contiguous":
            x = x.contiguous()
        # .to() keeps the strides of a dense tensor; sliced views are rebuilt below
        if self.kind == "sliced":
            y = torch.empty(shape[0] + 1, *shape[1:-1], 2 * shape[-1], dtype=dtype, device=device)
            y = y[1:, ..., ::2]
            y.copy_(x)
            out = y
        else:
            out = x.to(dtype=dtype, device=device)
        assert out.shape == torch.Size(shape)
        if self.kind == "contiguous":
            assert out.is_contiguous()
        elif self.kind == "channels_last":
            assert out.is_contiguous(
                memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            )
        else:
            assert not out.is_contiguous() and suggest_memory_format(out) == torch.contiguous_format
        return out


LAYOUTS = [
    Layout((2, 1), "contiguous"),
    Layout((64, 17), "contiguous"),
    Layout((5, 3), "transposed"),
    Layout((3, 17, 7), "contiguous"),
    Layout((4, 3, 9), "sliced"),
    Layout((2, 5, 6), "transposed"),
    Layout((2, 3, 1, 1), "contiguous"),
    Layout((64, 17, 1, 1), "contiguous"),
    Layout((4, 17, 5, 3), "contiguous"),
    Layout((4, 17, 5, 3), "channels_last"),
    Layout((3, 3, 5, 7), "channels_last"),
    Layout((3, 1, 4, 4), "channels_last"),  # C=1: both formats at once, computed as contiguous
    Layout((2, 3, 1, 1), "channels_last"),
    Layout((4, 3, 6, 5), "sliced"),
    Layout((4, 5, 3, 6), "transposed"),
    Layout((2, 3, 2, 3, 4), "contiguous"),
    Layout((2, 3, 2, 3, 4), "channels_last"),
    Layout((3, 17, 2, 1, 3), "channels_last"),
    Layout((2, 4, 3, 2, 2), "sliced"),
    Layout((2, 1, 1, 1, 1), "contiguous"),
]


def channel_params(
    channels: int, dtype: torch.dtype, device: str = "cpu", affine: bool = True, stats: bool = True
) -> Dict[str, Optional[Tensor]]:
    """Random weight/bias (when affine) and running stats (when stats) of shape [C]."""
    opts = {"dtype": dtype, "device": device}
    return {
        "weight": (torch.rand(channels, **opts) + 0.5) if affine else None,
        "bias": torch.randn(channels, **opts) if affine else None,
        "running_mean": torch.randn(channels, **opts) * 0.1 if stats else None,
        "running_var": (torch.rand(channels, **opts) + 0.5) if stats else None,
    }


def clone_optional(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().clone()


def reduce_dims(x: Tensor) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def leaf(t: Optional[Tensor], requires_grad: bool = True) -> Optional[Tensor]:
    """A detached leaf sharing ``t``'s storage and strides."""
    return None if t is None else t.detach().requires_grad_(requires_grad)


def grads(out: Tensor, inputs: Dict[str, Optional[Tensor]], grad_out: Tensor) -> Dict[str, Tensor]:
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    got = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)
    return dict(zip(names, got))


@dataclass(frozen=True)
class Args:
    """One set of non-default arguments of a BatchNorm layer (torch.nn's plus custom_bn's
    activation), shared by the tests of every layer: each is checked against torch.nn in float64
    with the same values, so an argument lost or misread anywhere shows."""

    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    affine: bool = True
    track_running_stats: bool = True
    activation: str = "identity"
    activation_param: Optional[float] = None

    def module_kwargs(self) -> Dict[str, object]:
        return {"eps": self.eps, "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats}

    def activate(self, z: Tensor) -> Tensor:
        """torch.nn.functional's activation with this case's parameter."""
        F = torch.nn.functional
        if self.activation == "relu":
            return F.relu(z)
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, 0.01 if self.activation_param is None else self.activation_param)
        if self.activation == "elu":
            return F.elu(z, 1.0 if self.activation_param is None else self.activation_param)
        if self.activation == "silu":
            return F.silu(z)
        return z


# Each case reaches other code: eps far from the default, momentum 0 / 1 / None (cumulative) /
# 0.7, activation parameters off their defaults, no affine parameters, no running statistics.
ARG_CASES: Dict[str, Args] = {
    "eps1e-3-m0.7-relu": Args(eps=1e-3, momentum=0.7, activation="relu"),
    "eps0.1-m0-leaky0.2": Args(eps=0.1, momentum=0.0, activation="leaky_relu", activation_param=0.2),
    "m1-elu0.5": Args(momentum=1.0, activation="elu", activation_param=0.5),
    "mNone-identity": Args(momentum=None, eps=1e-3),
    "no-affine-silu": Args(affine=False, eps=0.1, momentum=0.7, activation="silu"),
    "no-stats-leaky3": Args(track_running_stats=False, activation="leaky_relu", activation_param=3.0),
}
