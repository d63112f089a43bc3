"""custom_bn.SyncBatchNorm across processes (gloo on 127.0.0.1), against single-process BatchNorm
over the concatenated global batch in float64.

Every multi-process test runs through dist_testing.run_distributed, which has a time bound and
fails (never hangs) when a rank raises.
"""

import os
import subprocess
import sys
import time
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import nn

import custom_bn
from bn_testing import ARG_CASES, Args
from dist_testing import run_distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

C = 3
# (spatial shape, channels_last, activation, with residual, arguments): the arguments from the
# shared cases (eps, momentum 0 / 1 / None, activation parameters), every activation with and
# without a residual.
CASES = [
    ((), False, "identity", False, Args(momentum=0.3)),  # (N, C): BatchNorm1d
    ((5,), False, "identity", False, ARG_CASES["mNone-identity"]),  # (N, C, L)
    ((4, 3), False, "identity", True, Args(momentum=0.0, eps=0.1)),
    ((4, 3), True, "identity", False, Args(momentum=1.0)),  # channels-last
    ((2, 3, 2), False, "identity", False, Args(momentum=0.7, eps=1e-3)),  # BatchNorm3d
    ((4, 3), True, "relu", True, ARG_CASES["eps1e-3-m0.7-relu"]),  # the fused epilogue
    ((4, 3), False, "elu", False, ARG_CASES["m1-elu0.5"]),
    ((4,), False, "elu", True, Args(activation="elu", activation_param=2.0)),
    ((3, 2), True, "leaky_relu", True, ARG_CASES["eps0.1-m0-leaky0.2"]),
    ((3,), False, "leaky_relu", False, ARG_CASES["no-stats-leaky3"]),
    ((2, 2), False, "silu", True, ARG_CASES["no-affine-silu"]),
    ((2, 2), False, "silu", False, Args(activation="silu")),
    ((2, 2), False, "relu", False, Args(activation="relu", momentum=None)),
]
BATCHES = {2: [3, 5], 3: [4, 0, 3]}  # uneven, and one rank with an empty batch


def _case_tensors(index: int, batch: int):
    spatial, channels_last, _, with_residual, _ = CASES[index]
    g = torch.Generator().manual_seed(100 + index)
    shape = (batch, C, *spatial)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    residual = torch.randn(shape, generator=g, dtype=torch.float64) if with_residual else None
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return x, dy, residual, weight, bias


def _sync_worker(rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    sizes = BATCHES[world_size]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out: Dict[str, torch.Tensor] = {}
    for i, (_, channels_last, activation, _, args) in enumerate(CASES):
        x, dy, residual, weight, bias = _case_tensors(i, sum(sizes))
        mine = x[start:stop].clone(memory_format=torch.preserve_format).requires_grad_()
        res = None if residual is None else residual[start:stop].clone().requires_grad_()
        bn = custom_bn.SyncBatchNorm(C, activation=activation, activation_param=args.activation_param,
                                     dtype=torch.float64, **args.module_kwargs())
        if args.affine:
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
        y = bn(mine, res)
        y.backward(dy[start:stop])
        if channels_last and stop > start:
            assert y.is_contiguous(memory_format=torch.channels_last)
        out.update({f"{i}.out": y, f"{i}.grad_input": mine.grad})
        if args.affine:
            out.update({f"{i}.grad_weight": bn.weight.grad, f"{i}.grad_bias": bn.bias.grad})
        if args.track_running_stats:
            out.update({f"{i}.running_mean": bn.running_mean, f"{i}.running_var": bn.running_var,
                        f"{i}.num_batches_tracked": bn.num_batches_tracked})
        if res is not None:
            out[f"{i}.grad_residual"] = res.grad
    return out


def _reference(index: int, batch: int):
    """torch.nn's BatchNorm with the case's arguments on the global batch, then the epilogue."""
    _, _, activation, _, args = CASES[index]
    x, dy, residual, weight, bias = _case_tensors(index, batch)
    x.requires_grad_()
    bn = nn.BatchNorm1d(C, dtype=torch.float64, **args.module_kwargs())
    bn._check_input_dim = lambda input: None  # any rank, as SyncBatchNorm
    if args.affine:
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    y = bn(x)
    if residual is not None:
        residual.requires_grad_()
        y = y + residual
    y = args.activate(y)
    y.backward(dy)
    ref = {"out": y, "grad_input": x.grad}
    if args.affine:
        ref.update(grad_weight=bn.weight.grad, grad_bias=bn.bias.grad)
    if args.track_running_stats:
        ref.update(running_mean=bn.running_mean, running_var=bn.running_var,
                   num_batches_tracked=bn.num_batches_tracked)
    if residual is not None:
        ref["grad_residual"] = residual.grad
    return ref


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_equals_batch_norm_over_the_global_batch(world_size):
    sizes = BATCHES[world_size]
    results = run_distributed(_sync_worker, world_size)
    for i in range(len(CASES)):
        ref = _reference(i, sum(sizes))
        for rank, res in enumerate(results):
            start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
            what = f"case {CASES[i]} rank {rank}"
            for name in ("out", "grad_input", "grad_residual"):
                if name in ref:
                    _close(res[f"{i}.{name}"], ref[name][start:stop], f"{what} {name}")
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if name in ref:
                    _close(res[f"{i}.{name}"], ref[name], f"{what} {name}")
        # Each rank holds its share of the parameters' gradients; DDP sums them.
        for name in ("grad_weight", "grad_bias"):
            if name in ref:
                _close(sum(res[f"{i}.{name}"] for res in results), ref[name], f"case {CASES[i]} {name}")


def _small_net(batch_norm) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), batch_norm(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False), batch_norm(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).double()


STEPS = 3
GLOBAL_BATCH = 8


def _step_data(step: int):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (GLOBAL_BATCH,), generator=g))


def _train(model: nn.Module, rank: int, world_size: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world_size
    for step in range(STEPS):
        x, target = _step_data(step)
        x, target = x[rank * share:(rank + 1) * share], target[rank * share:(rank + 1) * share]
        opt.zero_grad()
        TF.cross_entropy(model(x), target).backward()
        opt.step()


def _ddp_worker(rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    model = custom_bn.convert_sync_batchnorm(_small_net(nn.BatchNorm2d))
    assert sum(isinstance(m, custom_bn.SyncBatchNorm) for m in model.modules()) == 2
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(ddp, rank, world_size)
    return dict(model.state_dict())


def test_ddp_training_equals_one_process_on_the_full_batch():
    results = run_distributed(_ddp_worker, 2)
    reference = _small_net(nn.BatchNorm2d)
    _train(reference, 0, 1)
    for name, want in reference.state_dict().items():
        for rank, res in enumerate(results):
            torch.testing.assert_close(res[name], want, rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def _subgroup_worker(rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    group_index, local = divmod(rank, 2)
    x, dy, _, weight, bias = _case_tensors(2 + group_index, 6)
    mine = x[3 * local:3 * local + 3].clone().requires_grad_()
    bn = custom_bn.SyncBatchNorm(C, process_group=groups[group_index], dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    y = bn(mine)
    y.backward(dy[3 * local:3 * local + 3])
    return {"out": y, "grad_input": mine.grad, "running_var": bn.running_var}


def test_subgroups_equal_per_group_batch_norm():
    results = run_distributed(_subgroup_worker, 4)
    for rank, res in enumerate(results):
        group_index, local = divmod(rank, 2)
        x, dy, _, weight, bias = _case_tensors(2 + group_index, 6)
        x.requires_grad_()
        rv = torch.ones(C, dtype=torch.float64)
        y = TF.batch_norm(x, torch.zeros(C, dtype=torch.float64), rv, weight, bias, True, 0.1, 1e-5)
        y.backward(dy)
        rows = slice(3 * local, 3 * local + 3)
        _close(res["out"], y[rows], f"rank {rank} out")
        _close(res["grad_input"], x.grad[rows], f"rank {rank} grad_input")
        _close(res["running_var"], rv, f"rank {rank} running_var")


def _collective_counting_worker(rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    calls: List[tuple] = []
    for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather", "broadcast",
                 "reduce_scatter"):
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            tensor = args[1] if _name.startswith("all_gather_") else args[0]
            calls.append((_name, tensor.numel() * tensor.element_size()))
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    bn = custom_bn.SyncBatchNorm(64)
    x = torch.randn(4, 64, 5, 5, requires_grad=True)
    bn(x).sum().backward()
    names = ("all_gather_single", "all_reduce")
    return {name: torch.tensor([b for n, b in calls if n == name]) for name in names} | {
        "total": torch.tensor(len(calls))}


def test_one_collective_per_forward_and_one_per_backward():
    """torch.nn.SyncBatchNorm all-gathers [mean, invstd, count] (2C + 1 values) in forward and
    all-reduces [sum_dy, sum_dy_xmu] (2C values) in backward, in float32 for float32 input: the
    same counts and bytes here."""
    for res in run_distributed(_collective_counting_worker, 2):
        assert int(res["total"]) == 2
        assert res["all_gather_single"].tolist() == [(2 * 64 + 1) * 4]
        assert res["all_reduce"].tolist() == [2 * 64 * 4]


def _failing_worker(rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.all_reduce(torch.ones(1))  # blocks: rank 1 never joins
    return {}


def test_a_failing_rank_fails_the_run_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 failed"):
        run_distributed(_failing_worker, 2, timeout=120)
    assert time.monotonic() - start < 60


def test_local_fallback_and_conversion_in_one_process():
    """Without an initialized process group (and in eval mode) SyncBatchNorm is the local
    BatchNorm; convert_sync_batchnorm keeps parameters (the same objects), buffers, the training
    flag and BatchNormAct's activation."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), custom_bn.BatchNormAct2d(4, "elu"),
                          nn.SyncBatchNorm(4))
    model[1].eval()
    params = [model[1].weight, model[2].bias]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    converted = custom_bn.convert_sync_batchnorm(model)
    assert [type(m) for m in converted[1:]] == [custom_bn.SyncBatchNorm] * 3
    assert converted[1].weight is params[0] and converted[2].bias is params[1]
    assert not converted[1].training and converted[2].training
    assert converted[2].activation == "elu"
    bn = custom_bn.SyncBatchNorm(4, activation="relu")
    ref = nn.BatchNorm2d(4)
    y = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(bn(y), torch.relu(ref(y)))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and not isinstance(bn, nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bn(torch.randn(4))


def test_torchrun_launch():
    """The README's launch: torchrun on this node, 2 processes, the example checks itself."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "sync_batch_norm.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("matches one process on the global batch") == 2, proc.stdout


STATS = torch.ops.custom_bn.batch_norm_stats.default
REDUCE = torch.ops.custom_bn.batch_norm_backward_reduce.default
ELEMT = torch.ops.custom_bn.batch_norm_backward_elemt.default


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_building_blocks_in_one_process(dtype, channels_last):
    """stats -> normalize, reduce -> elemt with this batch's own sums and count: torch's batch
    norm and its gradient (the distributed tests check the merge across processes)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(4, 5, 3, 6, dtype=torch.float64) * 3 + 2).to(dtype).contiguous(memory_format=fmt)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = STATS(x)
    want_var, want_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert mean.dtype == acc and var.dtype == acc
    torch.testing.assert_close(mean.double(), want_mean, **tol)
    torch.testing.assert_close(var.double(), want_var, **tol)

    w = torch.rand(5, dtype=acc) + 0.5
    b = torch.randn(5, dtype=acc)
    invstd = (var + 1e-5).rsqrt()
    dy = torch.randn_like(x)
    sums = REDUCE(dy, x, w, b, None, mean, invstd, "elu", 1.0)
    grad_input, _ = ELEMT(dy, x, w, b, None, mean, invstd, sums, x.numel() // 5, "elu", 1.0, [True, False])
    x64 = x.double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    y = TF.elu(TF.batch_norm(x64, None, None, w64, b64, True))
    want = torch.autograd.grad(y, [x64, w64, b64], dy.double())
    loose = tol if dtype != torch.bfloat16 else {"rtol": 2e-2, "atol": 2e-2}
    assert grad_input.dtype == dtype and grad_input.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(grad_input.double(), want[0], **loose)
    torch.testing.assert_close((sums[1] * invstd).double(), want[1], **loose)
    torch.testing.assert_close(sums[0].double(), want[2], **loose)


def test_opcheck_building_blocks():
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(STATS, (x,))
    torch.library.opcheck(STATS, (torch.randn(0, 3, 2),))
    mean, var = STATS(x)
    invstd = (var + 1e-5).rsqrt()
    w, b, r = torch.rand(3) + 0.5, torch.randn(3), torch.randn_like(x)
    dy = torch.randn_like(x)
    torch.library.opcheck(REDUCE, (dy, x, w, b, r, mean, invstd, "relu", 0.0))
    sums = REDUCE(dy, x, w, b, r, mean, invstd, "relu", 0.0)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(ELEMT, (dy, x, w, b, r, mean, invstd, sums, 200, "relu", 0.0, mask))
    with pytest.raises(ValueError, match="count"):
        ELEMT(dy, x, w, b, r, mean, invstd, sums, 10, "relu", 0.0, [True, True])
