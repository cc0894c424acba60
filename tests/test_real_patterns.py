"""Patterns of real CNN libraries, each on a tiny inline model: varargs forwards (ultralytics),
in-place slice assignment (YOLO pose), a forward rebound on the instance (timm FasterNet),
weight-standardised convs (timm BiT, NFNets), stochastic depth (EfficientNet, ConvNeXt), and a
branch that goes another way under tracing (MONAI BasicUNet)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

import fxconet
from fxconet.testing import check_all


def _free(graph: fxconet.ChannelGraph) -> list[int]:
    return [g.id for g in graph.groups if not g.frozen]


def _checks(model: nn.Module, x: torch.Tensor, **kwargs: object) -> None:
    results = check_all(model.eval(), x, **kwargs)
    assert all(r.ok for r in results), [r for r in results if not r.ok]


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)


class Varargs(_Body):
    """``forward(self, x, *args, **kwargs)`` that unpacks and iterates its varargs."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        for key in kwargs:  # iterating kwargs must trace (it is empty)
            raise AssertionError(key)
        return self.predict(x, *args, **kwargs)

    def predict(self, x: torch.Tensor, scale: float = 1.0, *, shift: float = 0.0) -> torch.Tensor:
        return self.b(self.a(x).relu()) * scale + shift


def test_empty_varargs_bind_to_constants():
    model = Varargs()
    x = torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    assert len(_free(graph)) == 1
    gm = fxconet.resize(graph, {_free(graph)[0]: 5})
    assert gm(x).shape == (2, 4, 8, 8)
    _checks(model, x)


class KeywordOnly(_Body):
    def forward(self, x: torch.Tensor, *rest: torch.Tensor, gain: float = 2.0) -> torch.Tensor:
        return self.b(self.a(x)) * gain + sum(rest, torch.zeros(()))


def test_keyword_only_defaults_kept_and_given_varargs_still_bind():
    model = KeywordOnly().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxconet.resize(fxconet.analyze(model, x), {})
    torch.testing.assert_close(gm(x), model(x))
    # an example input for *rest: fx's placeholder binds it, nothing is dropped
    extra = torch.ones(1, 4, 8, 8)
    graph = fxconet.analyze(model, (x, extra))
    torch.testing.assert_close(fxconet.resize(graph, {})(x, extra), model(x, extra))


class PoseHead(nn.Module):
    """``y[:, 2::3] = y[:, 2::3].sigmoid()`` in place, as YOLO pose decodes keypoints."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.kpt = nn.Conv2d(16, 9, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kpt(self.stem(x).relu()).flatten(2)
        y[:, 2::3] = y[:, 2::3].sigmoid()
        return y


def test_inplace_slice_assignment_traces_and_freezes_the_assigned_tensor():
    model = PoseHead().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    stem = next(g for g in graph.groups if "stem" in g.producers)
    assert not stem.frozen  # the assignment's channels stay fixed, the stem's are free
    gm = fxconet.resize(graph, {stem.id: 7})
    assert gm.get_submodule("stem").out_channels == 7
    out = gm(x)
    assert out.shape == (1, 9, 64) and ((out[:, 2::3] > 0) & (out[:, 2::3] < 1)).all()
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))
    _checks(model, x)


class Rebound(nn.Module):
    """``self.forward = self.forward_split`` in ``__init__`` (timm FasterNet's partial conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.forward = self.forward_split  # type: ignore[method-assign]

    def forward_split(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [4, x.shape[1] - 4], dim=1)
        return torch.cat([self.conv(a), b], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # never called
        raise AssertionError("the class's forward was traced")


class WithRebound(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.mix = Rebound()
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.stem(x)))


@pytest.mark.parametrize("root", [False, True], ids=["submodule", "root"])
def test_forward_rebound_on_the_instance_is_the_one_traced(root):
    model = (Rebound() if root else WithRebound()).eval()
    x = torch.randn(1, 4 if root else 3, 8, 8)
    graph = fxconet.analyze(model, x)
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))
    if not root:
        _checks(model, x)


class StdConv(nn.Conv2d):
    """A weight-standardised conv: each output channel's weights normalised over its inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = StdConv(3, 16, 3, padding=1)
        self.b = StdConv(16, 24, 3, padding=1)
        self.c = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).relu()).relu())


def test_weight_standardised_convs_are_free_and_inexact_on_their_inputs():
    model = StdNet().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    by_size = {g.size: g for g in graph.groups}
    assert not by_size[16].frozen and not by_size[24].frozen
    # b standardises over its 16 input channels: growing them changes the statistics
    assert not by_size[16].exact and by_size[24].exact
    gm = fxconet.resize(graph, {by_size[16].id: 10, by_size[24].id: 30})
    assert gm(x).shape == (2, 5, 8, 8)
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))
    _checks(model, x)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 8, 1))
        self.drop = StochasticDepth(0.2, "row")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.drop(self.body(h)))


def test_stochastic_depth_preserves_channels():
    model = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    stream = next(g for g in graph.groups if "stem" in g.producers)
    assert not stream.frozen and "body.2" in stream.producers
    assert fxconet.resize(graph, {stream.id: 11})(x).shape == (2, 4, 8, 8)
    # in training mode too (a per-sample mask over the batch)
    train_graph = fxconet.analyze(Residual().train(), x)
    assert len(_free(train_graph)) == len(_free(graph)) == 2
    _checks(model, x)


class Up(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if isinstance(skip, torch.Tensor) and type(skip) is torch.Tensor:  # False for a Proxy
            x = torch.cat([x, skip], 1)
        return self.conv(x)


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.up = Up()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        return self.up(e, e)


def test_a_branch_taken_otherwise_under_tracing_names_the_module_and_the_fix():
    model = SkipNet().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(fxconet.ShapeError) as info:
        fxconet.analyze(model, x)
    message = str(info.value)
    assert "`up` (Up)" in message and "leaf_modules=[Up]" in message and "branch" in message
    assert "do the example inputs fit" not in message
    graph = fxconet.analyze(model, x, leaf_modules=[Up])  # the fix it names works
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))


def test_a_width_mismatch_at_the_first_layer_blames_the_inputs():
    model = SkipNet().eval()
    with pytest.raises(fxconet.ShapeError, match=r"do the example inputs fit the model\?\)$"):
        fxconet.analyze(model, torch.randn(1, 5, 8, 8))


def test_a_head_wider_than_the_dataset_warns():
    model = fxconet.models.build_model("resnet18", num_classes=1000, in_channels=1)
    with pytest.warns(UserWarning, match=r"outputs 1000 values .* 'digits' has 10 classes"):
        fxconet.optimize_channels(model, data="digits", method="uniform", epochs=0, progress=False)


def test_timm_models_by_name_get_the_classes_and_input_channels():
    pytest.importorskip("timm", reason="timm is in the zoo extra")
    for spec in ("timm:resnet18d", "resnet18d", "timm.models:resnet18d"):
        model = fxconet.models.build_model(spec, num_classes=7, in_channels=1)
        assert model.fc.out_features == 7 and model.conv1[0].in_channels == 1, spec
    # torchvision's name wins where both libraries have one
    assert type(fxconet.models.build_model("resnet18", num_classes=7)).__module__.startswith(
        "torchvision"
    )
    with pytest.raises(fxconet.errors.ModelError, match="did you mean resnet18d"):
        fxconet.models.build_model("timm:resnet18dd", num_classes=7)


def _small() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _three() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1),
    )  # fmt: skip


class _Doubled(nn.Module):
    """A user-written parametrization: fxconet cannot know how its channels map."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


REPARAMETRIZE = {
    "user_parametrization": lambda m: torch.nn.utils.parametrize.register_parametrization(
        m, "weight", _Doubled()
    ),
    "legacy_weight_norm": lambda m: torch.nn.utils.weight_norm(m),
    "legacy_spectral_norm": lambda m: torch.nn.utils.spectral_norm(m),
}


@pytest.mark.parametrize("kind", list(REPARAMETRIZE))
def test_reparametrized_layers_are_kept_as_written_and_frozen(kind):
    torch.manual_seed(0)
    model = _three().eval()
    REPARAMETRIZE[kind](model[2])
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="parametrized tensors|have hooks"):
        graph = fxconet.analyze(model, x)
    assert all("2" not in g.producers + g.consumers for g in graph.free)  # the kept layer
    (free,) = graph.free  # the group between the last two convs, away from the kept layer
    assert free.producers == ("4",)
    with torch.no_grad():
        reference = model(x)
        same = fxconet.resize(graph, {free.id: 8})
        torch.testing.assert_close(same(x), reference)
        shrunk = fxconet.resize(graph, {free.id: 3})
        assert shrunk(x).shape == reference.shape
        assert type(shrunk.get_submodule("2")) is type(model[2])  # the layer as written
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _normed() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16 * 16, 10),
    )  # fmt: skip


P = torch.nn.utils.parametrizations
NORMS = {
    "weight_norm": P.weight_norm,
    "weight_norm_dim1": lambda m: P.weight_norm(m, dim=1),
    "spectral_norm": P.spectral_norm,
}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kind", list(NORMS))
def test_weight_and_spectral_norm_layers_resize_through_their_parametrization(kind, training):
    torch.manual_seed(0)
    model = _normed().train(training)
    for i in (0, 3, 5, 8):  # conv, conv, transposed conv, linear
        NORMS[kind](model[i])
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = fxconet.analyze(model, x)
    assert [g.producers for g in graph.free] == [("0",), ("3",), ("5",)]
    assert all(r.ok for r in fxconet.testing.check_all(model, x)), kind  # identity, zero removal
    shrunk = fxconet.resize(graph, {g.id: 5 for g in graph.free})
    grown = fxconet.resize(graph, {g.id: 12 for g in graph.free})
    with torch.no_grad():  # new channels do not change the output (eval: no power iteration)
        torch.testing.assert_close(
            copy.deepcopy(grown).eval()(x), copy.deepcopy(model).eval()(x), rtol=1e-4, atol=1e-5
        )
    for gm, width in ((shrunk, 5), (grown, 12)):
        layer = gm.get_submodule("3")
        assert type(layer) is type(model[3])  # still parametrized the same way
        assert layer.weight.shape == (width, width, 3, 3)
        if kind == "spectral_norm":
            sn = layer.parametrizations.weight[0]
            assert sn._u.shape == (width,) and sn._v.shape == (width * 9,)
        else:
            g = layer.parametrizations.weight.original0
            assert g.shape == ((width, 1, 1, 1) if kind == "weight_norm" else (1, width, 1, 1))
        out = gm(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    reset = fxconet.resize(graph, {g.id: 5 for g in graph.free}, init="reset")
    layer = reset.get_submodule("3")
    assert not torch.allclose(layer.weight, shrunk.get_submodule("3").weight)
    loss = reset(x).square().mean()
    loss.backward()  # trains through the parametrization
    assert all(p.grad is not None for p in reset.parameters() if p.requires_grad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hooks_resize_still_refuses_the_legacy_norm_hooks():
    model = _small()
    torch.nn.utils.weight_norm(model[0])
    with pytest.raises(fxconet.TraceError, match=r"remove_weight_norm\(module\)") as info:
        fxconet.analyze(model, torch.randn(1, 3, 8, 8), hooks="resize")
    assert "module `0` (" in str(info.value) and "hooks='freeze'" in str(info.value)


def test_a_parametrized_root_is_refused_naming_the_fix():
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
    with pytest.raises(fxconet.TraceError, match="remove_parametrizations"):
        fxconet.analyze(conv, torch.randn(1, 3, 8, 8))


def test_the_fast_parametrization_check_agrees_with_torch():
    from torch.nn.utils import parametrize

    from fxconet.passes import parametrized

    plain = nn.Conv2d(3, 8, 3)
    normed = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
    user = nn.Linear(4, 4)
    parametrize.register_parametrization(user, "bias", _Doubled())
    holder = nn.Module()
    holder.parametrizations = nn.Linear(2, 2)  # a child of that name that is no parametrization
    for mod in (plain, normed, user, holder, nn.Sequential(normed)):
        for name in (None, "weight", "bias"):
            assert parametrized.is_parametrized(mod, name) == parametrize.is_parametrized(
                mod, name
            ), (type(mod).__name__, name)


def test_hooks_on_the_root_are_refused_and_the_named_fix_keeps_them():
    model = _small().eval()
    model.register_forward_hook(lambda mod, args, out: out * 2)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(fxconet.TraceError, match="forward hooks.*would drop"):
        fxconet.analyze(model, x)

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    wrapped = Wrapper(model)
    graph = fxconet.analyze(wrapped, x)
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))


def test_check_all_leaves_a_train_mode_model_as_it_was():
    model = fxconet.models.cifar_resnet20(in_channels=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for x in (torch.randn(4, 1, 8, 8), torch.randn(1, 1, 8, 8)):
        assert all(r.ok for r in check_all(model, x))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class NoGradBlock(nn.Module):
    """A block that computes its features without gradients (a frozen feature extractor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        with torch.no_grad():
            return self.conv(x)


class WithNoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = NoGradBlock()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.frozen(x))


def test_no_grad_inside_a_traced_forward_warns_naming_the_module_and_the_fix():
    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"`frozen` \(NoGradBlock.forward\) uses `torch.no_grad`"):
        graph = fxconet.analyze(WithNoGrad(), x)
    assert any("leaf_modules=[NoGradBlock]" in n for n in graph.notes)
    # the named fix: kept as a leaf it runs as written, and nothing is said
    graph = fxconet.analyze(WithNoGrad(), x, leaf_modules=[NoGradBlock])
    assert not any("no_grad" in n for n in graph.notes)
    gm = fxconet.resize(graph, {})
    out = gm(x.requires_grad_())
    assert out.grad_fn is not None and gm.frozen.conv.weight.grad is None
    out.sum().backward()
    assert gm.frozen.conv.weight.grad is None  # still no gradient inside the block


def test_hooks_on_layers_are_resized_when_asked_and_said():
    model, x = (
        nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)),
        torch.randn(1, 3, 4, 4),
    )
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with pytest.warns(UserWarning, match=r"hooks \(`2`\), resized as hooks='resize' asks"):
        graph = fxconet.analyze(model, x, hooks="resize")
    (g,) = graph.free
    gm = fxconet.resize(graph, {g.id: 5})
    gm(x)
    assert seen[-1] == 5  # the copied hook ran on the resized model, seeing the new width
    model(x)
    assert seen[-1] == 8  # and the user's own still runs on the user's model


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


def _hooked_net() -> tuple[nn.Module, list[tuple[str, int]]]:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), _Block(), _Block(), nn.Conv2d(8, 4, 1))
    seen: list[tuple[str, int]] = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(("block", o.shape[1])))
    net[2].c1.register_forward_pre_hook(lambda m, i: seen.append(("c1", i[0].shape[1])))
    return net, seen


def test_hooked_modules_are_kept_whole_and_frozen_by_default():
    net, seen = _hooked_net()
    x = torch.randn(1, 3, 12, 12)
    with pytest.warns(UserWarning, match=r"2 module\(s\) have hooks \(`1`, `2.c1`\)"):
        graph = fxconet.analyze(net, x)
    frozen = {layer: g.reason for g in graph.groups if not g.free for layer in g.producers}
    assert "has hooks" in frozen["2.c1"]
    assert {p for g in graph.free for p in g.producers} == {"2.c2"}  # inside the block: free
    gm = fxconet.resize(graph, {g.id: 4 for g in graph.free})
    seen.clear()
    out = gm(x)
    # the block's hook runs in the resized model (fx alone would trace through it and drop it),
    # and both hooks see the widths they were written for
    assert seen == [("block", 8), ("c1", 8)]
    assert out.shape == net(x).shape
    with torch.no_grad():  # same widths: the same function, hooks and all
        same = fxconet.resize(graph, {g.id: g.size for g in graph.free})
        torch.testing.assert_close(same(x), net(x))


def test_hooks_resize_says_which_hooks_the_resized_model_drops():
    net, seen = _hooked_net()
    x = torch.randn(1, 3, 12, 12)
    with pytest.warns(UserWarning, match=r"the hooks of `1` do NOT run in the resized model"):
        graph = fxconet.analyze(net, x, hooks="resize")
    gm = fxconet.resize(graph, {g.id: 4 for g in graph.free})
    seen.clear()
    gm(x)
    assert seen == [("c1", 4)]  # the traced-through block's hook is gone, as the note says
    with pytest.raises(ValueError, match="hooks must be one of"):
        fxconet.analyze(net, x, hooks="keep")


class PooledBranch(nn.Module):
    """An ASPP-style image-pooling branch: a BatchNorm on a 1x1 map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool_conv = nn.Conv2d(8, 8, 1)
        self.pool_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        p = F.relu(self.pool_bn(self.pool_conv(F.adaptive_avg_pool2d(y, 1))))
        return self.head(torch.cat([y, p.expand_as(y)], 1))


def test_check_all_runs_on_batch_one_through_a_pooled_batch_norm():
    model, x = PooledBranch().eval(), torch.randn(1, 3, 8, 8)
    results = check_all(model, x)
    assert [r.name for r in results] == ["identity", "random", "zero-removal"]
    assert all(r.ok for r in results), results


class _CachedBias(nn.Module):
    """timm's attention-bias cache: the forward stores a computed tensor in a dict attribute
    (in eval mode), and reads it back on the next call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias[:, None, None] * 2
        return self.head(torch.relu(self.conv(x) + self.cache[key]))


def test_a_forward_that_fills_a_dict_cache_leaves_the_users_dict_alone():
    model = _CachedBias().eval()
    x = torch.randn(1, 3, 8, 8)
    fxconet.analyze(model, x)
    assert model.cache == {}  # no Proxy stored on the user's model
    graph = fxconet.analyze(model, x)  # a second analysis does not read a stale one
    with torch.no_grad():
        torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))
    assert all(r.ok for r in check_all(model, x))  # also once the model's own call filled it
