"""Property-based comparison with torch (hypothesis).

Random calls of ``custom_bn.functional.batch_norm`` and of the BatchNorm modules: rank 2..6,
sizes including 1 and 0, random strides, storage offsets, dim orders and channels-last, every
dtype, training/eval, momentum (None, 0, 1, negative, random), eps, affine,
track_running_stats, and now and then a mistake torch rejects. Every output (values and
strides), running statistic and gradient is compared with torch in float64 (the oracle); a call
torch rejects must be rejected with torch's exception class and leave the buffers untouched.

Budget: ``CUSTOM_BN_HYPOTHESIS_PROFILE`` picks a profile. ``ci`` (the default, used by
``make test``) runs a fixed, derandomized set of examples per test, so CI is reproducible;
``explore`` draws fresh random examples, many more of them, for a bug hunt. An example that once
failed lives on as a plain test (see test_regressions.py).
"""

import os
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as torch_F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import Tensor

import custom_bn
import custom_bn.functional as F
from bn_testing import assert_matches_oracle as check

_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("ci", max_examples=1000, derandomize=True, database=None, **_SETTINGS)
settings.register_profile("explore", max_examples=20000, **_SETTINGS)
settings.load_profile(os.environ.get("CUSTOM_BN_HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
MAX_ELEMENTS = 1500
SENTINEL = 7.0


def _numel(sizes: List[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


@st.composite
def shapes(draw: st.DrawFn, ranks: Tuple[int, ...] = (2, 3, 4, 5, 6)) -> Tuple[int, ...]:
    rank = draw(st.sampled_from(ranks))
    sizes = [draw(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 7])) for _ in range(rank)]
    sizes[1] = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 17]))
    while _numel(sizes) > MAX_ELEMENTS:
        largest = max(range(rank), key=lambda d: sizes[d])
        sizes[largest] //= 2
    return tuple(sizes)


@st.composite
def laid_out(draw: st.DrawFn, values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` copied into a tensor of ``dtype`` with random strides: the dims in a random
    memory order (channels-last among them), every other element along some dims, and a storage
    offset."""
    rank = values.dim()
    if rank in (4, 5) and draw(st.booleans()):
        order = [0] + list(range(2, rank)) + [1]  # channels-last: memory order, outermost first
    else:
        order = list(draw(st.permutations(range(rank))))
    steps = [draw(st.sampled_from([1, 1, 2])) for _ in range(rank)]
    offset = draw(st.integers(0, 3))
    storage = torch.empty(offset + _numel([values.shape[d] * steps[d] for d in order]), dtype=dtype)
    base = storage[offset:].view([values.shape[d] * steps[d] for d in order])
    x = base.permute([order.index(d) for d in range(rank)])
    x = x[tuple(slice(None, None, s) for s in steps)]
    x.copy_(values)
    return x


def strided_copy(t: Tensor) -> Tuple[Tensor, Tensor]:
    """(view, storage): ``t`` as every other element of a buffer whose other elements are
    SENTINEL, so a kernel that ignores the stride reads wrong values or overwrites them."""
    storage = torch.full((2 * t.numel() + 1,), SENTINEL, dtype=t.dtype)
    view = storage[1::2]
    view.copy_(t)
    return view, storage


def _generator(draw: st.DrawFn) -> torch.Generator:
    """torch's random values seeded from hypothesis, so an example (and its shrinking) replays."""
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


@st.composite
def batch_norm_calls(draw: st.DrawFn) -> Dict:
    shape = draw(shapes())
    C = shape[1]
    dtype = draw(st.sampled_from(DTYPES))
    pdtype = dtype
    if dtype in (torch.float16, torch.bfloat16):
        pdtype = draw(st.sampled_from([dtype, torch.float32]))
    gen = _generator(draw)
    values = torch.randn(shape, dtype=torch.float64, generator=gen) * draw(st.sampled_from([1.0, 3.0, 0.01]))
    shift = torch.randn(C, dtype=torch.float64, generator=gen) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    values += shift.view([1, C] + [1] * (len(shape) - 2))
    if C > 0 and draw(st.integers(0, 9)) == 0:
        values[:, draw(st.integers(0, C - 1))] = 0.25  # a constant channel: variance 0
    params = {
        "weight": torch.rand(C, dtype=torch.float64, generator=gen) + 0.5,
        "bias": torch.randn(C, dtype=torch.float64, generator=gen),
        "running_mean": torch.randn(C, dtype=torch.float64, generator=gen),
        "running_var": torch.rand(C, dtype=torch.float64, generator=gen) + 0.5,
    }
    params = {k: v.to(pdtype) if draw(st.booleans()) else None for k, v in params.items()}
    training = draw(st.booleans())
    if (params["running_mean"] is None) != (params["running_var"] is None) and (
        not training or draw(st.booleans())
    ):
        params["running_mean"] = params["running_var"] = None
    mistake = draw(st.sampled_from(["none"] * 12 + ["size", "dtype", "eps", "shape"]))
    name = None
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]))
    given_params = [k for k, v in params.items() if v is not None]
    if mistake == "eps":
        eps = draw(st.sampled_from([0.0, -1e-5]))
    elif given_params and mistake in ("size", "dtype", "shape"):
        name = draw(st.sampled_from(given_params))
        t = params[name]
        if mistake == "size":
            params[name] = torch.cat([t, t[:1] if C else torch.ones(1, dtype=t.dtype)])
        elif mistake == "dtype":
            params[name] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
        else:
            params[name] = t.view(C, 1)  # torch takes it for weight/bias, not for running stats
    return {
        "input": draw(laid_out(values, dtype)),
        "params": params,
        "strided": {k: draw(st.booleans()) for k in params},
        "dy": torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype),
        "training": training,
        "momentum": draw(st.sampled_from([0.1, 0.0, 1.0, 0.5, -0.3])),
        "eps": eps,
        "mistake": mistake if mistake == "eps" or given_params else "none",
        "mistake_on": name if mistake in ("size", "dtype", "shape") and given_params else None,
    }


Result = Union[Exception, Tuple[Tensor, Dict[str, Tensor], Dict[str, Tensor]]]


def run(fn, call: Dict, mode: str) -> Result:
    """Forward and backward of ``fn`` on fresh copies of ``call``'s tensors, in one of three
    modes: "ours" keeps every stride (running stats get fresh strided buffers whose neighbours
    are checked); "torch" makes the per-channel tensors dense (torch's CPU backward mishandles a
    strided weight with (N, C) input) and keeps every dtype; "oracle" casts everything to
    float64. Returns the exception of the forward, or (output, running stats, gradients)."""
    x = call["input"].detach()
    params: Dict[str, Optional[Tensor]] = {}
    neighbours: List[Tensor] = []
    for name, t in call["params"].items():
        if t is None:
            params[name] = None
        elif mode == "ours" and call["strided"][name] and t.dim() == 1:
            params[name], storage = strided_copy(t)
            neighbours.append(storage[::2])
        else:
            if mode != "ours" and name in ("weight", "bias"):
                t = t.reshape(-1)  # (C, 1) as (C,): torch's backward fails on the former
            params[name] = t.to(torch.float64 if mode == "oracle" else t.dtype).contiguous().clone()
    if mode == "oracle":
        x = x.double().contiguous()  # the math does not depend on the layout; torch's may
    leaves = {"input": x.requires_grad_()}
    for name in ("weight", "bias"):
        if params[name] is not None:
            params[name] = leaves[name] = params[name].requires_grad_()
    try:
        y = fn(leaves["input"], params["running_mean"], params["running_var"], params["weight"],
               params["bias"], call["training"], call["momentum"], call["eps"])
    except Exception as error:  # noqa: BLE001 - its class is what the test compares
        return error
    for n in neighbours:
        assert bool((n == SENTINEL).all()), "a strided per-channel tensor's neighbours changed"
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[k] for k in names], call["dy"].to(y.dtype))
    stats = {k: params[k] for k in ("running_mean", "running_var") if params[k] is not None}
    return y, stats, dict(zip(names, grads))


def _same_error(ours: Result, theirs: Exception) -> None:
    assert isinstance(ours, Exception), f"torch raises {type(theirs).__name__}: {theirs}; ours accepts"
    assert type(ours) is type(theirs), (
        f"torch raises {type(theirs).__name__} ({theirs}), ours {type(ours).__name__} ({ours})"
    )


def _buffers_untouched(call: Dict) -> None:
    """A rejected call must leave running stats as they were: run ours on fresh copies and
    compare them with the originals."""
    stats = {k: call["params"][k] for k in ("running_mean", "running_var")}
    copies = {k: None if t is None else t.clone() for k, t in stats.items()}
    try:
        F.batch_norm(call["input"], copies["running_mean"], copies["running_var"],
                     call["params"]["weight"], call["params"]["bias"], call["training"],
                     call["momentum"], call["eps"])
    except Exception:  # noqa: BLE001 - the class was checked already
        pass
    for k, t in stats.items():
        if t is not None:
            assert torch.equal(copies[k], t), f"{k} changed by a rejected call"


@given(batch_norm_calls())
def test_functional_matches_torch(call: Dict) -> None:
    x = call["input"]
    note(f"input {x.dtype} shape {tuple(x.shape)} strides {x.stride()} offset {x.storage_offset()}")
    dtype = call["input"].dtype
    theirs = run(torch_F.batch_norm, call, "torch")
    ours = run(F.batch_norm, call, "ours")
    if call["input"].numel() == 0 and _checked_though_empty(call, ours, theirs):
        return
    if isinstance(theirs, Exception):
        _same_error(ours, theirs)
        _buffers_untouched(call)
        return
    assert not isinstance(ours, Exception), f"torch accepts, ours raises {type(ours).__name__}: {ours}"
    if call["input"].numel() == 0:
        # Nothing to compare but shapes: torch's empty output may even take the parameters'
        # dtype (float32 for a float16 input with float32 bias); custom_bn keeps input's.
        assert ours[0].shape == call["input"].shape and ours[0].dtype == call["input"].dtype
        return
    oracle = run(torch_F.batch_norm, call, "oracle")
    y, stats, grads = ours
    y_t, stats_t, grads_t = theirs
    y_o, stats_o, grads_o = oracle
    assert y.dtype == y_t.dtype and same_layout(y, y_t), (
        f"output {y.dtype} strides {y.stride()}, torch's {y_t.dtype} {y_t.stride()}"
    )
    check(y, y_o, y_t, dtype, "output", _forward_conditioning(call))
    for k in stats_o:
        assert stats[k].dtype == stats_t[k].dtype
        check(stats[k], stats_o[k], stats_t[k], stats[k].dtype, k)
    for k in grads_o:
        given_param = call["input"] if k == "input" else call["params"][k]
        assert grads[k].shape == given_param.shape and grads[k].dtype == given_param.dtype
        if k == "input":
            assert same_layout(grads[k], grads_t[k]), f"grad_input strides {grads[k].stride()}"
        check(grads[k].reshape(grads_o[k].shape), grads_o[k], grads_t[k], grads[k].dtype, f"grad {k}")


def _forward_conditioning(call: Dict) -> Tensor:
    """|x * alpha| + |beta| of the folded forward y = x * alpha + beta, in float64."""
    x = call["input"].double()
    C = x.shape[1]
    view = [1, C] + [1] * (x.dim() - 2)
    params = {k: None if t is None else t.double().reshape(-1) for k, t in call["params"].items()}
    if call["training"]:
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = params["running_mean"], params["running_var"]
    alpha = (var + call["eps"]).rsqrt()
    if params["weight"] is not None:
        alpha = alpha * params["weight"]
    beta = -mean * alpha
    if params["bias"] is not None:
        beta = beta + params["bias"]
    return (x * alpha.view(view)).abs() + beta.abs().view(view)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Equal strides on every dim longer than 1 (the stride of a size-1 dim addresses nothing;
    an empty tensor has no layout)."""
    return a.numel() == 0 or all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1
    )


def _checked_though_empty(call: Dict, ours: Result, theirs: Result) -> bool:
    """The deliberate difference on empty inputs: torch checks no argument then (or fails in its
    kernel with an IndexError when C = 0 and weight or bias is given), custom_bn checks them as
    for any input. True when the call was settled here."""
    params = call["params"]
    one_sided = (params["running_mean"] is None) != (params["running_var"] is None)
    eval_without_stats = not call["training"] and params["running_mean"] is None
    torch_kernel_failure = isinstance(theirs, IndexError) and call["input"].shape[1] == 0
    wrong_stat_shape = call["mistake"] == "shape" and call["mistake_on"].startswith("running")
    if call["mistake"] in ("size", "dtype") or wrong_stat_shape or one_sided or eval_without_stats:
        if isinstance(theirs, Exception) and not torch_kernel_failure:
            return False  # torch rejects it too: compared as usual
        # torch's order for a non-empty input: counts (RuntimeError), then the pairing of the
        # running stats in training (ValueError), then everything else (RuntimeError)
        one_sided_first = one_sided and call["training"] and call["mistake"] != "size"
        expected = ValueError if one_sided_first else RuntimeError
        assert isinstance(ours, expected), f"expected {expected.__name__}, got {ours!r}"
        _buffers_untouched(call)
        return True
    if torch_kernel_failure:
        assert not isinstance(ours, Exception), f"ours raises {type(ours).__name__}: {ours}"
        assert ours[0].shape == call["input"].shape
        return True
    return False


MODULES = {1: (custom_bn.BatchNorm1d, torch.nn.BatchNorm1d, (2, 3)),
           2: (custom_bn.BatchNorm2d, torch.nn.BatchNorm2d, (4,)),
           3: (custom_bn.BatchNorm3d, torch.nn.BatchNorm3d, (5,))}


@st.composite
def module_runs(draw: st.DrawFn) -> Dict:
    kind = draw(st.sampled_from(sorted(MODULES)))
    C = draw(st.integers(1, 6))
    options = {
        "momentum": draw(st.sampled_from([0.1, None, 0.0, 1.0, 0.7])),
        "eps": draw(st.sampled_from([1e-5, 0.1])),
        "affine": draw(st.booleans()),
        "track_running_stats": draw(st.booleans()),
    }
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        shape = list(draw(shapes(MODULES[kind][2])))
        shape[1] = C
        values = torch.randn(shape, dtype=torch.float64, generator=_generator(draw)) * 2 + 1
        steps.append((draw(st.booleans()), draw(laid_out(values, torch.float64))))
    return {"kind": kind, "C": C, "options": options, "steps": steps, "gen": _generator(draw),
            "dtype": draw(st.sampled_from([torch.float64, torch.float32]))}


@given(module_runs())
def test_modules_match_torch_nn(spec: Dict) -> None:
    ours_cls, torch_cls, _ = MODULES[spec["kind"]]
    dtype = spec["dtype"]
    note(f"strides {[values.stride() for _, values in spec['steps']]}")
    ours = ours_cls(spec["C"], dtype=dtype, **spec["options"])
    oracle = torch_cls(spec["C"], dtype=torch.float64, **spec["options"])
    if spec["options"]["affine"]:
        with torch.no_grad():
            oracle.weight.uniform_(0.5, 1.5, generator=spec["gen"])
            oracle.bias.normal_(generator=spec["gen"])
            for p in oracle.parameters():  # the values ours can hold
                p.copy_(p.to(dtype))
    ours.load_state_dict(oracle.state_dict())
    theirs = torch_cls(spec["C"], dtype=dtype, **spec["options"])  # torch.nn at ours' precision
    theirs.load_state_dict(oracle.state_dict())
    for training, values in spec["steps"]:
        for m in (ours, oracle, theirs):
            m.train(training)
        x, xt = values.to(dtype).detach().requires_grad_(), values.to(dtype).detach().requires_grad_()
        x64 = values.to(dtype).double().contiguous().requires_grad_()
        try:
            expected = oracle(x64)
        except Exception as error:  # noqa: BLE001
            before = {k: v.clone() for k, v in ours.state_dict().items()}
            try:
                ours(x)
            except Exception as ours_error:  # noqa: BLE001
                _same_error(ours_error, error)
            else:
                raise AssertionError(f"torch.nn raises {type(error).__name__}; ours accepts")
            after = ours.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "buffers changed"
            if oracle.num_batches_tracked is not None:
                # torch.nn counts the batch before the call fails; custom_bn does not count a
                # rejected batch (documented in modules.py): keep the oracle in step.
                oracle.num_batches_tracked.copy_(ours.num_batches_tracked)
            continue
        got, their_y = ours(x), theirs(xt)
        check(got, expected, their_y, dtype, "output")
        dy = torch.randn(values.shape, dtype=torch.float64, generator=spec["gen"]).to(dtype)
        grads, their_grads, grads64 = (
            torch.autograd.grad(y, [leaf] + [p for p in (m.weight, m.bias) if p is not None], g)
            for y, leaf, m, g in ((got, x, ours, dy), (their_y, xt, theirs, dy),
                                  (expected, x64, oracle, dy.double()))
        )
        for name, g, gt, g64 in zip(["input", "weight", "bias"], grads, their_grads, grads64):
            check(g, g64, gt, dtype, f"grad {name}")
        for name, buf in oracle.named_buffers():
            mine = getattr(ours, name)
            if name == "num_batches_tracked":
                assert torch.equal(mine, buf), f"num_batches_tracked {mine} != {buf}"
            else:
                check(mine, buf, getattr(theirs, name), dtype, name)
