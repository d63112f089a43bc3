"""custom_bn.convert_model on a ResNet-like model built here: the converted model (plain, and with
the activations folded into BatchNormAct) computes what the original computes, before and after
optimizer steps, keeps parameters, buffers and flags, and its state_dict round-trips."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import custom_bn


class BasicBlock(nn.Module):
    """torchvision's shape: one ReLU module shared by both of its uses."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
                                  nn.BatchNorm1d(10), nn.LeakyReLU(0.1), nn.Linear(10, 4))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet().double()
    with torch.no_grad():  # non-trivial affine parameters and running stats
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model


def _data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)


def _assert_same_training(ours: nn.Module, theirs: nn.Module, steps: int = 3) -> None:
    """Equal outputs, gradients, then parameters and buffers after each SGD step (training), and
    equal outputs in eval mode at the end."""
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        x, target = _data(step)
        outs = []
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            out = model(x)
            TF.cross_entropy(out, target).backward()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
        theirs_params = dict(theirs.named_parameters())  # an fx rewrite may reorder them
        for name, a in ours.named_parameters():
            torch.testing.assert_close(a.grad, theirs_params[name].grad, rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"{name}: {m}")
        opt_ours.step()
        opt_theirs.step()
    theirs_state = theirs.state_dict()
    assert ours.state_dict().keys() == theirs_state.keys()
    for name, a in ours.state_dict().items():
        torch.testing.assert_close(a, theirs_state[name], rtol=1e-9, atol=1e-10)
    ours.eval()
    theirs.eval()
    x, _ = _data(99)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def _count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


def test_convert_keeps_everything_and_trains_the_same():
    original = _model()
    reference = copy.deepcopy(original)
    stem_weight = original.stem[1].weight
    converted = custom_bn.convert_model(original)
    assert _count(converted, custom_bn.BatchNorm2d) == 6 and _count(converted, custom_bn.BatchNorm1d) == 1
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    assert converted.stem[1].weight is stem_weight  # the same parameter objects
    assert converted.state_dict().keys() == reference.state_dict().keys()
    _assert_same_training(converted, reference)
    # and back: torch.nn modules with the trained values
    back = custom_bn.convert_model(converted, to="torch")
    assert _count(back, nn.BatchNorm2d) == 6 and _count(back, custom_bn.BatchNorm2d) == 0
    reference.load_state_dict(back.state_dict())


def test_fuse_activation_folds_sequential_and_traced_activations():
    original = _model()
    reference = copy.deepcopy(original)
    fused = custom_bn.convert_model(original, fuse_activation=True)
    # stem (Sequential), bn1 of both blocks (the shared self.relu, found by torch.fx) and the
    # head's BatchNorm1d + LeakyReLU; bn2 feeds the residual add, the downsample BN nothing.
    acts = [m for m in fused.modules() if isinstance(m, custom_bn.modules._BatchNormAct)]
    assert sorted((type(m).__name__, m.activation) for m in acts) == [
        ("BatchNormAct1d", "leaky_relu"), ("BatchNormAct2d", "relu"), ("BatchNormAct2d", "relu"),
        ("BatchNormAct2d", "relu")]
    # the model keeps its class; only the blocks whose forward calls the shared ReLU twice
    # become GraphModules
    assert type(fused) is TinyResNet
    assert isinstance(fused.layer1, torch.fx.GraphModule) and isinstance(fused.layer2, torch.fx.GraphModule)
    assert isinstance(fused.get_submodule("stem.2"), nn.Identity)
    assert fused.get_submodule("head.3").activation_param == 0.1
    # the same state_dict, both ways
    assert set(fused.state_dict()) == set(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    _assert_same_training(fused, reference)
    reference.load_state_dict(fused.state_dict())


def test_fused_sequential_round_trips_to_torch_with_the_same_structure():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ELU(0.5), nn.Linear(6, 2))
    reference = copy.deepcopy(original)
    fused = custom_bn.convert_model(original, fuse_activation=True)
    assert type(fused[1]) is custom_bn.BatchNormAct1d and isinstance(fused[2], nn.Identity)
    back = custom_bn.convert_model(fused, to="torch")
    assert [type(m) for m in back] == [nn.Linear, nn.BatchNorm1d, nn.ELU, nn.Linear]
    assert back[2].alpha == 0.5
    x = torch.randn(8, 5)
    torch.testing.assert_close(back(x), reference(x))


def test_keeps_device_dtype_memory_format_requires_grad_and_training_flag():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, affine=False),
                          nn.SyncBatchNorm(4), nn.BatchNorm3d(2, track_running_stats=False))
    model = model.to(torch.float64)
    model[1].weight.requires_grad_(False)
    model[2].eval()
    model[1].weight.data = model[1].weight.data.clone()
    converted = custom_bn.convert_model(model)
    assert [type(m) for m in converted[1:]] == [custom_bn.BatchNorm2d, custom_bn.BatchNorm2d,
                                                custom_bn.SyncBatchNorm, custom_bn.BatchNorm3d]
    assert converted[1].momentum is None and not converted[1].weight.requires_grad
    assert converted[2].weight is None and not converted[2].training and converted[3].training
    assert converted[4].running_mean is None
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert converted[:4](x).is_contiguous(memory_format=torch.channels_last)


def test_subclasses_are_left_alone_and_bad_arguments_rejected():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3))
    assert type(custom_bn.convert_model(model)[0]) is MyBN
    assert type(custom_bn.convert_model(nn.BatchNorm2d(3))) is custom_bn.BatchNorm2d
    with pytest.raises(ValueError, match="to must be"):
        custom_bn.convert_model(model, to="onnx")


# ---------------------------------------------------------------- no surprises (review findings)

def test_folding_in_a_block_keeps_its_submodules_hooks_class_and_flags():
    """A block whose shared ReLU forces a graph rewrite keeps its very submodules (the
    downsample Sequential stays a callable Sequential), its hooks are not called by the
    conversion and fire afterwards, every flag stays, and to="torch" gives back the block's class."""
    original = _model().eval()
    reference = copy.deepcopy(original)
    calls = []
    original.layer2.downsample.register_forward_hook(lambda m, i, o: calls.append(type(o).__name__))
    downsample = original.layer2.downsample
    fused = custom_bn.convert_model(original, fuse_activation=True)
    assert calls == []  # not called with fx proxies while tracing
    assert fused.layer2.downsample is downsample and type(downsample) is nn.Sequential
    assert not any(m.training for m in fused.modules())
    x, _ = _data(0)
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-12, atol=1e-12)
    assert calls == ["Tensor"]
    back = custom_bn.convert_model(fused, to="torch")
    assert type(back.layer1) is BasicBlock and type(back.layer2) is BasicBlock
    assert [n for n, _ in back.named_modules()] == [n for n, _ in reference.named_modules()]
    torch.testing.assert_close(back(x), reference(x), rtol=1e-12, atol=1e-12)


def test_folds_only_what_holds_on_every_path():
    """A training-only op between BN and activation, traced in eval mode, and an optional
    argument used between them: no fold there; the outputs equal torch.nn's on every path."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.act = nn.BatchNorm1d(3), nn.ReLU()

        def forward(self, x):
            y = self.bn(x)
            if self.training:
                y = y - 1.0
            return self.act(y)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x, mask=None):
            y = self.bn(x)
            if mask is not None:
                y = y * mask
            return TF.relu(y)

    x = torch.randn(6, 3, dtype=torch.float64)
    mask = (torch.rand(6, 3) > 0.5).double()
    for model, calls in ((Noisy(), [(x,)]), (Masked(), [(x,), (x, mask)])):
        model = model.double().eval()
        reference = copy.deepcopy(model)
        converted = custom_bn.convert_model(model, fuse_activation=True)
        assert type(converted.bn) is custom_bn.BatchNorm1d  # converted, not folded
        for training in (False, True):
            converted.train(training), reference.train(training)
            for args in calls:
                torch.testing.assert_close(converted(*args), reference(*args), rtol=1e-12, atol=1e-12)


def test_shared_layers_sequential_subclasses_and_custom_bn_subclasses():
    bn = nn.BatchNorm1d(3)

    class Twice(nn.Sequential):
        def forward(self, x):  # not the Sequential order: folding by index would be wrong
            return self[2](self[1](x)) + self[0](x)

    model = nn.Sequential(nn.ModuleList([bn, bn]), Twice(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU()))
    model = model.double()
    converted = custom_bn.convert_model(copy.deepcopy(model), fuse_activation=True)
    shared = converted[0]
    assert type(shared[0]) is custom_bn.BatchNorm1d and shared[0] is shared[1]
    assert type(converted[1][1]) is custom_bn.BatchNorm1d and type(converted[1][2]) is nn.ReLU
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(converted[1](x), model[1](x), rtol=1e-12, atol=1e-12)

    class Scaled(custom_bn.BatchNorm1d):  # a user's custom_bn subclass keeps its forward
        def __init__(self, channels: int) -> None:
            super().__init__(channels)
            self.gain = nn.Parameter(torch.full((channels,), 2.0))

        def forward(self, x):
            return super().forward(x) * self.gain

    mine = nn.Sequential(Scaled(3))
    with pytest.warns(UserWarning, match="left the BatchNorm subclasses Scaled"):
        back = custom_bn.convert_model(mine, to="torch")
    assert type(back[0]) is Scaled


@pytest.mark.parametrize("kind", ["full", "legacy"])
def test_backward_hooks_move_with_the_layer(kind):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    fired = []
    register = model[1].register_full_backward_hook if kind == "full" else model[1].register_backward_hook
    register(lambda m, grad_input, grad_output: fired.append(grad_output[0].detach().clone()))
    x = torch.randn(4, 3, dtype=torch.float64)
    reference = copy.deepcopy(model)
    (reference(x) * x).sum().backward()
    converted = custom_bn.convert_model(model)
    (converted(x) * x).sum().backward()
    assert len(fired) == 2
    torch.testing.assert_close(fired[0], fired[1])


def test_folded_then_synchronized_then_back_to_torch():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, eps=1e-3), nn.SiLU()).double().eval()
    synced = custom_bn.convert_sync_batchnorm(
        custom_bn.convert_model(copy.deepcopy(reference), fuse_activation=True))
    assert type(synced[1]) is custom_bn.SyncBatchNorm and synced[1].activation == "silu"
    back = custom_bn.convert_model(synced, to="torch")
    assert [type(m) for m in back] == [nn.Conv2d, nn.SyncBatchNorm, nn.SiLU]
    reference.load_state_dict(back.state_dict(), strict=True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for model in (synced, back):
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
