"""custom_bn modules where torch's tools look for BatchNorm: type checks, eager-mode fusers,
torch.fx, TorchScript and convert_sync_batchnorm, each compared with a torch.nn twin model."""

import io
import os
import socket
import time
import warnings

import pytest
import torch
from torch import nn

import custom_bn

D = torch.float64
TWINS = {1: (custom_bn.BatchNorm1d, nn.BatchNorm1d), 2: (custom_bn.BatchNorm2d, nn.BatchNorm2d),
         3: (custom_bn.BatchNorm3d, nn.BatchNorm3d)}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics (a fresh layer is the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def _net(dims: int, ours: bool, momentum=0.1) -> nn.Module:
    """conv -> BN -> ReLU -> conv -> BN (momentum as given) -> flatten -> linear -> BN1d."""
    bn = TWINS[dims][0 if ours else 1]
    torch.manual_seed(3)
    model = nn.Sequential(
        CONVS[dims](2, 4, 3), bn(4), nn.ReLU(), CONVS[dims](4, 4, 1), bn(4, momentum=momentum),
        nn.Flatten(), nn.Linear(4 * 2 ** dims, 5), custom_bn.BatchNorm1d(5) if ours else nn.BatchNorm1d(5),
    ).to(D)
    return _randomize(model)


def _input(dims: int) -> torch.Tensor:
    return torch.randn(6, 2, *([4] * dims), dtype=D)


def _assert_same_state(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_type_identity_and_repr(dims):
    ours_cls, torch_cls = TWINS[dims]
    m = ours_cls(8, eps=1e-3)
    assert isinstance(m, torch_cls) and isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert repr(m) == f"custom_bn.{repr(torch_cls(8, eps=1e-3))}"

    class MyNorm(ours_cls):
        pass

    assert repr(MyNorm(8)).startswith("MyNorm(8, ")


def test_code_that_finds_batchnorm_by_type_treats_both_alike():
    """Weight-decay exclusion, BN freezing and torchvision-style init, written against torch.nn
    types, do the same to the custom_bn model as to its torch.nn twin."""
    results = []
    for ours in (True, False):
        model = _net(2, ours)
        no_decay = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    for p in m.parameters()]
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # freeze: running statistics stay, batch statistics unused
                m.weight.requires_grad_(False)
                nn.init.constant_(m.bias, 0.25)
        model[-1].train()
        x = _input(2)
        results.append((len(no_decay), model(x), [m.training for m in model.modules()],
                        [p.requires_grad for p in model.parameters()]))
    (n_ours, y_ours, *flags_ours), (n_theirs, y_theirs, *flags_theirs) = results
    assert n_ours == n_theirs == 6 and flags_ours == flags_theirs
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fuse_conv_bn_eval(dims):
    ours, theirs = _net(dims, True).eval(), _net(dims, False).eval()
    fused = [nn.utils.fuse_conv_bn_eval(m[0], m[1]) for m in (ours, theirs)]
    x = _input(dims)
    torch.testing.assert_close(fused[0](x), ours[1](ours[0](x)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused[0](x), fused[1](x), rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ao_fuse_modules_in_eval_mode(dims):
    """torch.ao.quantization.fuse_modules with its default fusers: Conv+BN+ReLU, Conv+BN and
    Linear+BN1d fold into the conv/linear exactly as for the torch.nn twin."""
    groups = [["0", "1", "2"], ["3", "4"], ["6", "7"]]
    x = _input(dims)
    outputs = []
    for ours in (True, False):
        model = _net(dims, ours).eval()
        expected = model(x)
        fused = torch.ao.quantization.fuse_modules(model, groups)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        torch.testing.assert_close(fused(x), expected, rtol=1e-10, atol=1e-10)
        outputs.append(fused(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_fx_symbolic_trace_keeps_batchnorm_as_a_module(momentum):
    """torch.fx.symbolic_trace with the default tracer: each custom_bn layer is one call_module
    node (as torch.nn's are), so train()/eval() on the GraphModule still switch it, and training
    steps update the running statistics as in the torch.nn twin."""
    graphs = [torch.fx.symbolic_trace(_net(2, ours, momentum)) for ours in (True, False)]
    targets = {n.target: n.op for n in graphs[0].graph.nodes}
    assert all(targets[name] == "call_module" for name in ("1", "4", "7"))
    for training in (True, True, False, True, False):
        x = _input(2)
        y = [g.train(training)(x) for g in graphs]
        torch.testing.assert_close(y[0], y[1], rtol=1e-10, atol=1e-10)
    _assert_same_state(graphs[0], graphs[1], "after steps")


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_script_and_trace_survive_save_and_load(kind):
    """Scripted (train and eval) and traced (eval) custom_bn models match the torch.nn twin, before
    and after torch.jit.save/torch.jit.load."""
    models = [_net(2, ours, momentum=None) for ours in (True, False)]
    if kind == "script":
        compiled = [torch.jit.script(m) for m in models]
        modes = (True, False, True)
    else:
        x0 = _input(2)
        compiled = [torch.jit.trace(m.eval(), x0) for m in models]
        modes = (False,)
    inputs = [_input(2) for _ in modes]
    for m in compiled:
        buffer = io.BytesIO()
        torch.jit.save(m, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        for training, x in zip(modes, inputs):
            m.train(training)
            loaded.train(training)
            y = m(x)
            torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    for training in modes:
        x = _input(2)
        y = [m.train(training)(x) for m in compiled]
        torch.testing.assert_close(y[0], y[1], rtol=1e-10, atol=1e-10)
    _assert_same_state(compiled[0], compiled[1], f"{kind} after steps")


def test_convert_sync_batchnorm_says_it_replaces_custom_bn_layers():
    model = _net(2, True)
    with pytest.warns(UserWarning, match="replaces the custom_bn layer custom_bn.BatchNorm2d"):
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert converted[1].weight is model[1].weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.SyncBatchNorm.convert_sync_batchnorm(_net(2, False))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_matches_torch(dtype, device):
    """Under torch.autocast the conv hands BatchNorm a reduced-precision input while parameters
    and running statistics stay float32, as for torch.nn: output dtype, output, running
    statistics and float32 parameter gradients agree at that precision."""
    results = []
    for ours in (True, False):
        model = _net(2, ours).float().to(device)
        x = _input(2).float().to(device)
        with torch.autocast(device, dtype=dtype):
            y = model(x)
        y.float().square().mean().backward()
        results.append((y, [m for m in model.state_dict().values() if m.is_floating_point()],
                        [p.grad for p in model.parameters()]))
    (y_ours, state_ours, grads_ours), (y_theirs, state_theirs, grads_theirs) = results
    assert y_ours.dtype == y_theirs.dtype
    rtol, atol = {torch.bfloat16: (1.6e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=rtol, atol=atol)
    for a, b in zip(state_ours + grads_ours, state_theirs + grads_theirs):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: three SGD steps of DDP on its half of a fixed batch, first with custom_bn
    layers, then with torch.nn's; rank 0 saves both final states."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        g = torch.Generator().manual_seed(1)
        data = torch.randn(4 * world, 2, 4, 4, generator=g, dtype=D)
        target = torch.randn(4 * world, 5, generator=g, dtype=D)
        shard = slice(4 * rank, 4 * rank + 4)
        for ours in (True, False):
            model = _net(2, ours)
            ddp = DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            for _ in range(3):
                opt.zero_grad()
                (ddp(data[shard]) - target[shard]).square().mean().backward()
                opt.step()
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(out_dir, f"ours{ours}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_training_matches_torch(tmp_path):
    """Two processes, DistributedDataParallel over gloo (gradients all-reduced, buffers
    broadcast from rank 0): custom_bn ends with torch.nn's parameters and running statistics.
    Bounded in time: a rank that fails or hangs fails the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 300 s")
    ours, theirs = (torch.load(tmp_path / f"ours{flag}.pt") for flag in (True, False))
    assert list(ours) == list(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{key}: {m}")
