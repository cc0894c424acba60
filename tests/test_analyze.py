"""Unit tests of the analysis passes on tiny inline models, one per channel pattern.

Each test asserts the exact groups (producers, sizes, frozen or free) and, where the pattern
involves a rewrite, that a resize runs and removes zeroed channels without changing the output.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxconet
from fxconet import testing
from fxconet.errors import ChannelError, TraceError


def by_producers(graph: fxconet.ChannelGraph) -> dict[tuple[str, ...], fxconet.ChannelGroup]:
    return {tuple(sorted(g.producers)): g for g in graph.groups}


def assert_exact_removal(model: nn.Module, x: torch.Tensor, **kw) -> None:
    result = testing.check_zero_removal(model.eval(), x, **kw)
    assert result.ok, result
    assert "groups shrunk" in result.note


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------------
# patterns


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.c2(F.relu(self.bn1(self.c1(x)))))
        x = F.relu(x + y)
        return self.head(x.mean((2, 3)))


def test_residual_add_ties_both_branches():
    graph = fxconet.analyze(Residual(), torch.randn(2, 3, 8, 8))
    groups = by_producers(graph)
    assert set(groups) == {("c2", "stem"), ("c1",), ("head",)}
    stream = groups[("c2", "stem")]
    assert (stream.size, stream.frozen, stream.divisor) == (8, False, 1)
    assert set(stream.consumers) == {"c1", "head"}
    assert "bn2" in stream.layers
    assert groups[("c1",)].size == 16 and groups[("c1",)].free
    head = groups[("head",)]
    assert head.frozen and head.reason == "model output"


def test_residual_resize_and_exact_removal():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    stream = by_producers(graph)[("c2", "stem")].id
    gm = fxconet.resize(graph, {stream: 5})
    assert (gm.stem.out_channels, gm.c2.out_channels, gm.c1.in_channels) == (5, 5, 5)
    assert gm.bn2.num_features == 5 and gm.bn2.running_mean.shape == (5,)
    assert gm.head.in_features == 5
    assert run(gm, x).shape == (2, 4)
    assert_exact_removal(model, x)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.c(F.relu(self.bn(y))).sum((2, 3))


def test_concat_keeps_inputs_independent():
    model, x = Concat().eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    ga, gb = groups[("a",)], groups[("b",)]
    assert (ga.size, gb.size) == (4, 6) and ga.free and gb.free
    assert graph.layer("c").in_groups == (ga.id, gb.id)
    assert graph.layer("bn").in_groups == (ga.id, gb.id)
    gm = fxconet.resize(graph, {ga.id: 7, gb.id: 2})
    assert (gm.c.in_channels, gm.bn.num_features) == (9, 9)
    assert run(gm, x).shape == (2, 5)
    assert_exact_removal(model, x)


def test_growing_preserves_the_function():
    model, x = Concat().eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    gm = fxconet.resize(graph, {groups[("a",)].id: 9, groups[("b",)].id: 11})
    assert gm.c.in_channels == 20
    torch.testing.assert_close(run(gm, x), run(model, x))
    # new consumer inputs start at zero, new producer outputs get the default init (nonzero)
    new_in = gm.c.weight[:, 4:9]
    assert torch.count_nonzero(new_in) == 0
    assert torch.count_nonzero(gm.a.weight[4:]) > 0
    kept = fxconet.kept_channels(gm)
    assert kept[groups[("a",)].id].tolist() == [0, 1, 2, 3, -1, -1, -1, -1, -1]


class SumNormalised(nn.Module):
    """A group normalised by its sum over channels, whole-tensor or per position."""

    def __init__(self, per_position: bool) -> None:
        super().__init__()
        self.per_position = per_position
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        x = self.a(x).exp()
        x = x / (x.sum(1, keepdim=True) if self.per_position else x.sum())
        return self.b(x).mean((2, 3))


@pytest.mark.parametrize("per_position", [True, False])
def test_a_sum_over_channels_is_inexact_because_growing_changes_it(per_position):
    model, x = SumNormalised(per_position).eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    g = by_producers(graph)[("a",)]
    assert not g.exact
    grown = fxconet.resize(graph, {g.id: 8})
    assert not torch.allclose(run(grown, x), run(model, x), atol=1e-4)  # why exact=False
    assert by_producers(fxconet.analyze(Concat().eval(), torch.randn(2, 3, 6, 6)))[("a",)].exact


class Separable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        x = F.relu6(self.bn1(self.expand(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.pw(x).mean((2, 3))


def test_depthwise_is_a_non_conv_edge():
    model, x = Separable().eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    assert set(groups) == {("expand",), ("pw",)}
    g = groups[("expand",)]
    assert {"dw", "bn1", "bn2"} <= set(g.layers)
    assert graph.layer("dw").kind == "depthwise"
    kinds = {e.dst: e.kind for e in graph.edges}
    assert kinds["dw"] == "non-conv" and kinds["expand"] == "conv" and kinds["pw"] == "conv"
    gm = fxconet.resize(graph, {g.id: 7})
    assert (gm.dw.groups, gm.dw.in_channels, gm.dw.out_channels) == (7, 7, 7)
    assert gm.dw.weight.shape == (7, 1, 3, 3)
    assert_exact_removal(model, x)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.c3(F.relu(self.bn(self.g(F.relu(self.c1(x)))))).sum((2, 3))


def test_grouped_conv_keeps_widths_multiples_of_groups():
    model, x = Grouped().eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    g_in, g_out = groups[("c1",)], groups[("g",)]
    assert (g_in.size, g_in.divisor, g_out.size, g_out.divisor) == (16, 4, 16, 4)
    with pytest.raises(ChannelError, match="multiple of 4"):
        fxconet.resize(graph, {g_in.id: 10})
    gm = fxconet.resize(graph, {g_in.id: 8, g_out.id: 12})
    assert (gm.g.in_channels, gm.g.out_channels, gm.g.groups) == (8, 12, 4)
    assert gm.g.weight.shape == (12, 2, 3, 3)
    assert_exact_removal(model, x)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s).flatten(1, -1).sum(1, keepdim=True)


def test_squeeze_excitation_multiply_ties_the_scale():
    model, x = SqueezeExcite().eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    assert set(groups) == {("conv", "fc2"), ("fc1",), ("out",)}
    assert groups[("conv", "fc2")].free and groups[("fc1",)].free
    gm = fxconet.resize(graph, {groups[("conv", "fc2")].id: 9, groups[("fc1",)].id: 3})
    assert (gm.fc2.out_channels, gm.conv.out_channels, gm.fc1.in_channels) == (9, 9, 9)
    assert_exact_removal(model, x)


class ShuffleBlock(nn.Module):
    """Two ShuffleNetV2 stride-1 units: split, branch, concat, channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.units = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(8, 6, 1),
                nn.BatchNorm2d(6),
                nn.ReLU(),
                nn.Conv2d(6, 6, 3, padding=1, groups=6),
                nn.Conv2d(6, 8, 1),
                nn.ReLU(),
            )
            for _ in range(2)
        )
        self.head = nn.Conv2d(16, 4, 1)

    @staticmethod
    def shuffle(x, groups):
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            a, b = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat((a, unit(b)), dim=1), 2)
        return self.head(x).mean((2, 3))


def test_channel_split_and_shuffle_are_followed():
    model, x = ShuffleBlock().eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    mids = [g for g in graph.groups if g.producers in (("units.0.0",), ("units.1.0",))]
    assert len(mids) == 2 and all(g.free and g.size == 6 for g in mids)
    for result in testing.check_all(model, x):
        assert result.ok, result
    # resizing the shuffled stream keeps the view/chunk consistent at run time
    stream = [g for g in graph.free if "stem" in g.producers]
    assert stream, graph
    gm = fxconet.resize(graph, {g.id: g.size // 2 for g in stream if g.size // 2 % g.divisor == 0})
    assert run(gm, x).shape == (2, 4)


class ChannelsLast(nn.Module):
    """A ConvNeXt block: depthwise conv, permute, LayerNorm, MLP, layer scale, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_channels_last_layernorm_linear():
    model, x = ChannelsLast().eval(), torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    stream, hidden = groups[("fc2", "stem")], groups[("fc1",)]
    assert stream.free and not stream.exact  # LayerNorm takes statistics across it
    assert hidden.free and hidden.exact
    assert {"norm", "dw", "gamma"} <= set(stream.layers)
    gm = fxconet.resize(graph, {stream.id: 6, hidden.id: 20})
    assert gm.norm.normalized_shape == (6,) and gm.gamma.shape == (6,)
    assert (gm.fc1.in_features, gm.fc1.out_features, gm.fc2.out_features) == (6, 20, 6)
    assert run(gm, x).shape == (2, 3)
    assert_exact_removal(model, x)


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((2, 3))
        self.fc = nn.Linear(8 * 6, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def test_flatten_to_linear_scales_by_spatial_size():
    model, x = FlattenLinear().eval(), torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    g = by_producers(graph)[("conv",)]
    assert g.free and g.size == 8 and "fc" in g.consumers
    gm = fxconet.resize(graph, {g.id: 3})
    assert gm.fc.in_features == 18
    plan = gm.meta["fxconet"]
    kept = plan.kept(g.id).tolist()
    cols = plan.layer_channels("fc")["in"].tolist()
    assert cols == [c * 6 + s for c in kept for s in range(6)]
    assert_exact_removal(model, x)


class LiteralReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        n = x.shape[0]
        y = self.conv(x).reshape(n, 12, -1).mean(-1)
        return self.fc(y)


def test_literal_sizes_are_rewritten():
    model, x = LiteralReshape().eval(), torch.randn(2, 3, 4, 4)
    graph = fxconet.analyze(model, x)
    g = by_producers(graph)[("conv",)]
    assert g.free
    gm = fxconet.resize(graph, {g.id: 7})
    assert "reshape(getitem, 7, -1)" in gm.code.replace("getitem_0", "getitem")
    assert run(gm, x).shape == (2, 2)
    assert_exact_removal(model, x)


class SplitConvCat(nn.Module):
    """YOLO C2f: cv1 -> chunk(2) -> bottlenecks on the second half -> concat -> cv2."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 16, 1)
        self.m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.SiLU())
        self.cv2 = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1)).mean((2, 3))


def test_split_chunk_conv_cat():
    model, x = SplitConvCat().eval(), torch.randn(2, 3, 6, 6)
    graph = fxconet.analyze(model, x)
    halves = [g for g in graph.groups if g.producers == ("cv1",)]
    assert len(halves) == 2 and all(g.free and g.size == 8 for g in halves)
    first, second = halves
    assert "m.0" in second.consumers and "m.0" not in first.consumers
    gm = fxconet.resize(graph, {first.id: 3, second.id: 5})
    assert gm.cv1.out_channels == 8 and gm.get_submodule("m.0").in_channels == 5
    assert "torch.functional.split(cv1, [3, 5], dim = 1)" in gm.code
    assert run(gm, x).shape == (2, 6)
    assert_exact_removal(model, x)


class Slicing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 1)
        self.a = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return (self.a(y[:, :4]) + self.b(y[:, 4:])).mean((2, 3))


def test_channel_slicing():
    model, x = Slicing().eval(), torch.randn(2, 3, 5, 5)
    graph = fxconet.analyze(model, x)
    parts = [g for g in graph.groups if g.producers == ("conv",)]
    assert [g.size for g in parts] == [4, 6] and all(g.free for g in parts)
    gm = fxconet.resize(graph, {parts[0].id: 2, parts[1].id: 9})
    assert (gm.a.in_channels, gm.b.in_channels, gm.conv.out_channels) == (2, 9, 11)
    assert run(gm, x).shape == (2, 2)
    assert_exact_removal(model, x)


class GhostModule(nn.Module):
    """GhostNet: cat of a conv and a cheap depthwise copy, sliced to a literal width that
    happens to be the whole concatenation."""

    def __init__(self, out_chs: int) -> None:
        super().__init__()
        self.out_chs = out_chs
        self.primary = nn.Conv2d(3, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Conv2d(out_chs, 2, 1)

    def forward(self, x):
        x1 = torch.relu(self.primary(x))
        out = torch.cat([x1, torch.relu(self.cheap(x1))], dim=1)
        return self.head(out[:, : self.out_chs, :, :]).mean((2, 3))


@pytest.mark.parametrize("out_chs", [8, 6])
def test_literal_slice_bounds_are_rewritten_even_when_whole(out_chs):
    model, x = GhostModule(out_chs).eval(), torch.randn(2, 3, 5, 5)
    graph = fxconet.analyze(model, x)
    for result in testing.check_all(model, x):
        assert result.ok, result
    gm = fxconet.resize(graph, {g.id: g.size + 3 for g in graph.free})
    assert run(gm, x).shape == (2, 2)


class EfficientChannelAttention(nn.Module):
    """ECA: a conv1d slides along the pooled channels; its output gates the feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        y = self.eca(x.mean((2, 3)).view(x.shape[0], 1, -1))
        y = torch.sigmoid(y).view(x.shape[0], -1, 1, 1)
        return self.head(x * y.expand_as(x)).mean((2, 3))


def test_conv_along_channels_keeps_the_group_free():
    model, x = EfficientChannelAttention().eval(), torch.randn(2, 3, 5, 5)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    g = groups[("conv",)]
    assert g.free and not g.exact and groups[("eca",)].frozen  # its 1 channel is reshaped away
    gm = fxconet.resize(graph, {g.id: 7})
    assert run(gm, x).shape == (2, 2)
    assert testing.check_random_resize(model, x, graph=graph).ok


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.out(self.up(self.conv(x)))


def test_pixel_shuffle_keeps_blocks_of_r_squared():
    model, x = PixelShuffleNet().eval(), torch.randn(1, 3, 4, 4)
    graph = fxconet.analyze(model, x)
    g = by_producers(graph)[("conv",)]
    assert (g.size, g.divisor, g.free) == (16, 4, True)
    gm = fxconet.resize(graph, {g.id: 8})
    assert gm.out.in_channels == 2
    assert run(gm, x).shape == (1, 3, 8, 8)
    assert_exact_removal(model, x)


class MaskMultiply(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 8, 1)
        self.mask = nn.Conv2d(3, 1, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.feat(x) * torch.sigmoid(self.mask(x))).mean((2, 3))


def test_one_channel_mask_broadcast_is_frozen():
    model, x = MaskMultiply().eval(), torch.randn(2, 3, 4, 4)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    mask = groups[("mask",)]
    assert mask.frozen and "broadcast" in mask.reason and mask.size == 1
    assert groups[("feat",)].free
    with pytest.raises(ChannelError, match="frozen"):
        fxconet.resize(graph, {mask.id: 2})
    assert_exact_removal(model, x)


class RawParameterConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(F.conv2d(x, self.weight, self.bias, padding=1))).mean((2, 3))


def test_raw_parameter_conv():
    model, x = RawParameterConv().eval(), torch.randn(2, 3, 5, 5)
    graph = fxconet.analyze(model, x)
    g = by_producers(graph)[("weight",)]
    assert g.free and g.size == 8 and "head" in g.consumers and g.layers == ("weight", "head")
    assert graph.layer("weight").kind == "conv" and graph.layer("weight").out_groups == (g.id,)
    gm = fxconet.resize(graph, {g.id: 5})
    assert gm.weight.shape == (5, 3, 3, 3) and gm.bias.shape == (5,)
    assert isinstance(gm.weight, nn.Parameter)
    assert_exact_removal(model, x)


class SharedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.shared(F.relu(self.shared(x)))
        return self.head(x).mean((2, 3))


def test_same_module_called_twice():
    model, x = SharedModule().eval(), torch.randn(2, 3, 5, 5)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    assert set(groups) == {("shared", "stem"), ("head",)}
    g = groups[("shared", "stem")]
    gm = fxconet.resize(graph, {g.id: 5})
    assert (gm.shared.in_channels, gm.shared.out_channels) == (5, 5)
    assert_exact_removal(model, x)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dec = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(F.relu(self.dec(F.relu(self.bn(self.enc(x))))))


def test_conv_transpose_decoder():
    model, x = Decoder().eval(), torch.randn(1, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    enc, dec = groups[("enc",)], groups[("dec",)]
    assert enc.free and dec.free and groups[("out",)].frozen
    assert graph.layer("dec").kind == "conv_transpose"
    gm = fxconet.resize(graph, {enc.id: 10, dec.id: 5})
    assert gm.dec.weight.shape == (10, 5, 2, 2)
    assert run(gm, x).shape == (1, 3, 8, 8)
    assert_exact_removal(model, x)


class FPN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.l3 = nn.Conv2d(16, 8, 1)
        self.l4 = nn.Conv2d(32, 8, 1)
        self.smooth = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        c3 = F.relu(self.c3(x))
        c4 = F.relu(self.c4(c3))
        p4 = self.l4(c4)
        p3 = self.l3(c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        return self.smooth(p3).mean((2, 3))


def test_fpn_upsample_add_ties_laterals():
    model, x = FPN().eval(), torch.randn(1, 3, 16, 16)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    assert ("l3", "l4") in groups and groups[("l3", "l4")].free
    gm = fxconet.resize(graph, {groups[("l3", "l4")].id: 3})
    assert (gm.l3.out_channels, gm.l4.out_channels, gm.smooth.in_channels) == (3, 3, 3)
    assert_exact_removal(model, x)


# ---------------------------------------------------------------------------------------------
# errors, freezing, registration


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.block = DataDependent()

    def forward(self, x):
        return self.block(self.conv(x))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_model_names_the_module_and_the_fix():
    with pytest.raises(TraceError) as info:
        fxconet.analyze(Untraceable(), torch.randn(1, 3, 4, 4), opaque=False)
    message = str(info.value)
    assert "`block`" in message and "DataDependent" in message
    assert "leaf_modules" in message and "concrete_args" in message
    assert info.value.module_path == "block"


def test_untraceable_module_is_kept_opaque_by_default_and_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"module `block` \(DataDependent\) is opaque"):
        graph = fxconet.analyze(Untraceable(), torch.randn(1, 3, 4, 4))
    (g,) = graph.groups
    assert g.frozen and "no channel rule" in g.reason and "block" in g.reason


def test_leaf_module_without_rule_is_frozen_with_reason():
    graph = fxconet.analyze(Untraceable(), torch.randn(1, 3, 4, 4), leaf_modules=[DataDependent])
    (g,) = graph.groups
    assert g.frozen and "no channel rule" in g.reason and "block" in g.reason


class ShapeBranch(nn.Module):
    """Python branches on shapes: timm-style padding checks and a channel-count switch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if x.shape[-1] % 2 == 1:  # spatial: decided on the example input
            x = F.pad(x, (0, 1, 0, 1))
        y = self.conv(x)
        repeats = y.shape[1] // 8
        if y.size(1) == 8:  # channels: the group must stay 8
            y = self.proj(y)
        for _ in range(repeats):
            y = torch.relu(y)
        return self.head(y).mean((2, 3))


def test_shape_dependent_branches_are_traced_and_guarded():
    model, x = ShapeBranch().eval(), torch.randn(2, 3, 7, 7)
    with pytest.warns(UserWarning, match="specialised"):
        graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    conv = groups[("conv",)]
    assert conv.frozen and ("branch" in conv.reason or "compared with a constant" in conv.reason)
    assert groups[("proj",)].free
    assert "specialised" in str(graph)
    gm = fxconet.resize(graph, {groups[("proj",)].id: 5})
    torch.testing.assert_close(run(fxconet.resize(graph, {}), x), run(model, x))
    assert run(gm, x).shape == (2, 2)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class WithSwish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.act = Swish()
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.act(self.conv(x)))


def test_register_op_for_a_leaf_module():
    x = torch.randn(1, 3, 4, 4)
    frozen = fxconet.analyze(WithSwish(), x, leaf_modules=[Swish])
    assert by_producers(frozen)[("conv",)].frozen
    with fxconet.ops.scoped():
        fxconet.register_op(Swish, "same")
        graph = fxconet.analyze(WithSwish(), x, leaf_modules=[Swish])
        g = by_producers(graph)[("conv",)]
        assert g.free
        gm = fxconet.resize(graph, {g.id: 4})
        assert run(gm, x).shape == (1, 2, 4, 4)
    assert by_producers(fxconet.analyze(WithSwish(), x, leaf_modules=[Swish]))[("conv",)].frozen


@torch.fx.wrap
def custom_gate(x):
    return x * (x > 0)


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(custom_gate(self.conv(x)))


def test_register_op_for_a_function():
    x = torch.randn(1, 3, 4, 4)
    graph = fxconet.analyze(WithGate(), x)
    g = by_producers(graph)[("conv",)]
    assert g.frozen and "custom_gate" in g.reason
    with fxconet.ops.scoped():
        fxconet.register_op(custom_gate, "same")
        assert by_producers(fxconet.analyze(WithGate(), x))[("conv",)].free


class ChannelScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.weight.view(1, self.channels, 1, 1)


class WithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.scale = ChannelScale(6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.scale(self.conv(x)))


def test_register_op_with_a_rule_for_parameters():
    def channel_scale(ctx):
        dims = ctx.dims(ctx.arg(0))
        ctx.tie(ctx.param("weight")[0], dims[1])
        ctx.layer("norm").notes["layouts"] = (dims[1],)
        return dims

    def update(module, size_of, notes):
        module.channels = size_of(notes["layouts"][0])

    model, x = WithScale().eval(), torch.randn(1, 3, 4, 4)
    assert by_producers(fxconet.analyze(model, x, leaf_modules=[ChannelScale]))[("conv",)].frozen
    with fxconet.ops.scoped():
        fxconet.register_op(ChannelScale, channel_scale, update=update)
        graph = fxconet.analyze(model, x, leaf_modules=[ChannelScale])
        g = by_producers(graph)[("conv",)]
        assert g.free and "scale" in g.layers
        gm = fxconet.resize(graph, {g.id: 4})
        assert gm.scale.channels == 4 and gm.scale.weight.shape == (4,)
        assert_exact_removal(model, x, leaf_modules=[ChannelScale])


def test_register_op_rejects_bad_rules():
    with pytest.raises(fxconet.UnsupportedOpError, match="unknown rule"):
        fxconet.register_op(Swish, "sometimes")
    with pytest.raises(fxconet.UnsupportedOpError):
        fxconet.register_op(int, "same")


def test_register_op_refuses_to_replace_a_rule_unless_asked():
    x = torch.randn(1, 3, 4, 4)
    with fxconet.ops.scoped():
        # a built-in rule is not silently overwritten (Conv2d as "same" would lose its widths)
        with pytest.raises(fxconet.UnsupportedOpError, match="already has the rule.*replace=True"):
            fxconet.register_op(nn.Conv2d, "same")
        assert by_producers(fxconet.analyze(WithSwish(), x))[("conv",)].free
        fxconet.register_op(Swish, "same")
        fxconet.register_op(Swish, "same")  # the same rule again: no-op
        with pytest.raises(fxconet.UnsupportedOpError, match="already has the rule"):
            fxconet.register_op(Swish, "opaque")
        fxconet.register_op(Swish, "opaque", replace=True)
        graph = fxconet.analyze(WithSwish(), x, leaf_modules=[Swish])
        assert "no channel rule" in by_producers(graph)[("conv",)].reason
        fxconet.register_op(nn.Conv2d, "opaque", replace=True)  # on purpose: frozen
        assert all(g.frozen for g in fxconet.analyze(WithSwish(), x).groups)
    # scoped() restored the built-in rule and dropped the user's
    assert by_producers(fxconet.analyze(WithSwish(), x))[("conv",)].free
    assert "Swish" not in fxconet.ops.registered_ops()["modules"]


def test_freeze_blocks_both_sides_of_a_layer():
    x = torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(Residual(), x, freeze=["c1"])
    groups = by_producers(graph)
    assert groups[("c1",)].frozen and "freeze" in groups[("c1",)].reason
    assert groups[("c2", "stem")].frozen  # the input side of c1
    graph = fxconet.analyze(Residual(), x, freeze=[nn.Linear])
    assert by_producers(graph)[("c2", "stem")].frozen
    assert by_producers(graph)[("c1",)].free
    with pytest.raises(KeyError, match="nope"):
        fxconet.analyze(Residual(), x, freeze=["nope"])


def test_bad_widths_raise_channel_errors_naming_the_group():
    graph = fxconet.analyze(Residual(), torch.randn(2, 3, 8, 8))
    groups = by_producers(graph)
    stream, head = groups[("c2", "stem")], groups[("head",)]
    with pytest.raises(ChannelError, match=rf"group {head.id} .*frozen \(model output\)"):
        fxconet.resize(graph, {head.id: 3})
    with pytest.raises(ChannelError, match=r">= 1.*got 0") as info:
        fxconet.resize(graph, {stream.id: 0})
    assert "stem" in str(info.value) and "c1" in str(info.value)
    with pytest.raises(ChannelError, match="unknown channel group 99"):
        fxconet.resize(graph, {99: 3})
    with pytest.raises(ValueError, match="integer"):
        fxconet.resize(graph, {stream.id: 2.5})
    with pytest.raises(ChannelError, match="example_inputs"):
        fxconet.resize(Residual(), {0: 4})
    # booleans are not widths or ids; NumPy/torch integers are; non-mappings say what to pass
    with pytest.raises(ChannelError, match="integer, got True"):
        fxconet.resize(graph, {stream.id: True})
    with pytest.raises(ChannelError, match="unknown channel group True"):
        fxconet.resize(graph, {True: 4})
    for bad in ([4], None, 4):
        with pytest.raises(ChannelError, match="mapping of group id -> width"):
            fxconet.resize(graph, bad)
    gm = fxconet.resize(graph, {np.int64(stream.id): np.int32(2)})
    assert gm.get_submodule("stem").out_channels == 2
    assert (
        fxconet.resize(graph, {stream.id: torch.tensor(2)}).get_submodule("stem").out_channels == 2
    )


def test_resize_refuses_widths_past_the_memory_limit_before_allocating():
    graph = fxconet.analyze(Residual(), torch.randn(2, 3, 8, 8))
    stream = by_producers(graph)[("c2", "stem")]
    # 10**9 channels would need terabytes: refused from the IR alone, instantly
    with pytest.raises(
        ChannelError, match=r"needs about .* GiB .* over the limit .*max_bytes=None"
    ):
        fxconet.resize(graph, {stream.id: 10**9})
    params = fxconet.cost.predict_params(graph, {stream.id: 64})
    with pytest.raises(ChannelError, match="max_bytes"):
        fxconet.resize(graph, {stream.id: 64}, max_bytes=4 * params - 1)
    gm = fxconet.resize(graph, {stream.id: 64}, max_bytes=4 * params)
    assert sum(p.numel() for p in gm.parameters()) == params  # the estimate is what was built
    assert (
        fxconet.resize(graph, {stream.id: 64}, max_bytes=None).get_submodule("stem").out_channels
        == 64
    )
    with pytest.raises(ChannelError, match="max_bytes=-1"):
        fxconet.resize(graph, {stream.id: 64}, max_bytes=-1)


def test_shape_errors_name_the_node():
    with pytest.raises(fxconet.ShapeError, match=r"node `stem` \(call_module stem, module `stem`"):
        fxconet.analyze(Residual(), torch.randn(2, 5, 8, 8))


@pytest.mark.parametrize(
    "a, b",
    [((2, 3, 4, 5), (3, 1, 1)), ((1,), (2, 3)), ((2, 1), (1, 3)), ((), (4,)), ((2, 0), (1, 1))]
    + [((2, 3), (4, 3)), ((5, 2, 1), (3, 7))],
)
def test_shape_broadcasting_rule_matches_torch(a, b):
    from fxconet.passes.shape_rules import broadcast_shape as _broadcast_shape

    try:
        want = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        want = None
    assert _broadcast_shape(a, b) == want


def test_multihead_attention_shape_rule_matches_the_module():
    from fxconet.passes.module_copy import to_meta as _to_meta
    from fxconet.passes.shape_rules import _attention_shape

    torch.manual_seed(0)
    for batch_first, kdim, need, average, batched in itertools.product(
        (False, True), (None, 12), (True, False), (True, False), (True, False)
    ):
        mod = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
        k_width = kdim or 16
        if batched:
            q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
            k = torch.randn(2, 7, k_width) if batch_first else torch.randn(7, 2, k_width)
        else:
            q, k = torch.randn(5, 16), torch.randn(7, k_width)
        kwargs = {"need_weights": need, "average_attn_weights": average}
        want = mod(q, k, k, **kwargs)
        got = _attention_shape(mod, (_to_meta(q), _to_meta(k), _to_meta(k)), kwargs)
        assert got is not None
        assert [None if t is None else tuple(t.shape) for t in got] == [
            None if t is None else tuple(t.shape) for t in want
        ]
    # what the rule does not cover runs the module: masks, mismatched widths
    mod = nn.MultiheadAttention(16, 4)
    q = _to_meta(torch.randn(5, 2, 16))
    assert _attention_shape(mod, (q, q, q), {"attn_mask": _to_meta(torch.ones(5, 5))}) is None
    assert _attention_shape(mod, (_to_meta(torch.randn(5, 2, 8)), q, q), {}) is None


@pytest.mark.parametrize("v2", [False, True])
def test_swin_window_attention_shape_rule_matches_the_function(v2):
    from torchvision.models.swin_transformer import shifted_window_attention

    from fxconet.passes.module_copy import to_meta as _to_meta
    from fxconet.passes.shape_rules import fast_function as _fast_function

    torch.manual_seed(0)
    c, heads, window = 12, 3, [4, 4]
    n = window[0] * window[1]
    for hw, shift in (((8, 8), [0, 0]), ((7, 10), [2, 2]), ((3, 3), [2, 2])):
        args = (
            torch.randn(2, *hw, c),
            torch.randn(3 * c, c),
            torch.randn(c, c),
            torch.randn(1, heads, n, n),
            window,
            heads,
            shift,
        )
        kwargs = {"qkv_bias": torch.randn(3 * c), "proj_bias": torch.randn(c), "training": False}
        if v2:
            kwargs["logit_scale"] = torch.rand(heads, 1, 1)
        want = shifted_window_attention(*args, **kwargs)
        meta_args = tuple(_to_meta(a) for a in args)
        meta_kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
        got = _fast_function(shifted_window_attention, meta_args, meta_kwargs)
        assert got is not None and got.shape == want.shape
        # weights that do not fit the input: the function itself runs (and fails)
        bad = (meta_args[0], _to_meta(torch.randn(3 * c, c + 1)), *meta_args[2:])
        assert _fast_function(shifted_window_attention, bad, meta_kwargs) is None


def test_the_dag_is_built_on_first_use_and_matches_the_graph():
    graph = fxconet.analyze(Residual(), torch.randn(2, 3, 8, 8))
    dag = graph.to_networkx()
    assert len(graph.tensors) == dag.number_of_nodes() > 0
    assert len(graph.edges) == dag.number_of_edges() > 0
    assert graph.tensors == tuple(graph.tensors) and graph.edges[0] == list(graph.edges)[0]
    assert {t.name for t in graph.tensors} == set(dag.nodes)


def test_the_shape_probe_leaves_the_model_untouched():
    import copy

    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5().eval()
    before = copy.deepcopy(model)
    attrs = {name: dict(vars(m)) for name, m in model.named_modules()}
    graph = fxconet.analyze(model, torch.randn(1, 3, 64, 64), probe=True)
    assert graph.free
    for name, m in model.named_modules():
        assert vars(m).keys() == attrs[name].keys()
        for k, v in vars(m).items():
            if not isinstance(v, dict):
                assert v is attrs[name][k] or v == attrs[name][k], (name, k)
    for (k, a), b in zip(model.state_dict().items(), before.state_dict().values(), strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b), k


def test_the_collector_pause_is_undone_after_success_errors_and_when_already_off():
    import gc

    assert gc.isenabled()
    fxconet.analyze(Residual(), torch.randn(2, 3, 8, 8))
    assert gc.isenabled()
    with pytest.raises(fxconet.ShapeError):
        fxconet.analyze(Residual(), torch.randn(2, 5, 8, 8))
    assert gc.isenabled()
    gc.disable()
    try:
        fxconet.resize(Residual(), {}, torch.randn(2, 3, 8, 8))
        assert not gc.isenabled()  # a user's own choice stays as it was
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# guarantees


def test_the_user_model_is_never_mutated_and_shares_nothing():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = repr(model)
    graph = fxconet.analyze(model, x)
    gm = fxconet.resize(graph, {g.id: g.size + 2 for g in graph.free})
    gm_same = fxconet.resize(graph, {})
    assert repr(model) == text
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    pointers = {t.data_ptr() for t in model.state_dict().values()}
    for out in (gm, gm_same):
        assert pointers.isdisjoint(t.data_ptr() for t in out.state_dict().values())
    assert all(isinstance(m, nn.Module) for m in model.modules())
    assert not hasattr(model, "meta")


def test_identity_resize_is_exact():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    gm = fxconet.resize(model, {}, x)
    assert torch.equal(run(gm, x), run(model, x))


def test_shrink_keeps_the_largest_norm_channels_ties_by_index():
    model = Concat().eval()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([1.0, 3.0, 3.0, 2.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
    graph = fxconet.analyze(model, torch.randn(1, 3, 4, 4))
    g = by_producers(graph)[("a",)]
    gm = fxconet.resize(graph, {g.id: 2})
    assert fxconet.kept_channels(gm)[g.id].tolist() == [1, 2]
    gm = fxconet.resize(graph, {g.id: 1})
    assert fxconet.kept_channels(gm)[g.id].tolist() == [1]  # tie between 1 and 2 -> lower index
    torch.testing.assert_close(gm.a.weight[:, 0], model.a.weight[1:2, 0])


def test_zero_removal_check_catches_a_wrong_channel_choice(monkeypatch):
    """The check is not vacuous: keeping channels by index instead of by norm must fail it."""
    from fxconet.passes import resize_layers

    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    assert testing.check_zero_removal(model, x, seed=1).ok

    def by_index(solution, leaves):
        return {v: -np.arange(solution.slots.size[v], dtype=np.float64) for v in leaves}

    monkeypatch.setattr(resize_layers, "_channel_scores", by_index)
    result = testing.check_zero_removal(model, x, seed=1)
    assert not result.ok and result.max_diff > 1e-3, result


def test_init_reset_reinitialises_every_layer():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    gm = fxconet.resize(model, {}, x, init="reset")
    assert not torch.equal(gm.c1.weight, model.c1.weight)
    assert run(gm, x).shape == (2, 4)
    with pytest.raises(ValueError, match="init"):
        fxconet.resize(model, {}, x, init="zeros")


def test_table_and_dag():
    graph = fxconet.analyze(Residual(), torch.randn(2, 3, 8, 8))
    text = str(graph)
    assert "3 groups, 2 free" in text and "model output" in text and "frozen" in text
    dag = graph.to_networkx()
    conv_edges = [(u, v) for u, v, d in dag.edges(data=True) if d["kind"] == "conv"]
    assert {v for _, v in conv_edges} == {"stem", "c1", "c2", "head"}
    assert dag.nodes["c1"]["channel_dim"] == 1
    assert dag.nodes["add"]["groups"] == (by_producers(graph)[("c2", "stem")].id,)


def test_group_ids_are_stable_across_runs():
    x = torch.randn(2, 3, 8, 8)
    a = fxconet.analyze(Residual(), x)
    b = fxconet.analyze(Residual(), x)
    assert [(g.id, g.producers, g.size) for g in a.groups] == [
        (g.id, g.producers, g.size) for g in b.groups
    ]


def test_label_edges_matches_the_dag():
    graph = fxconet.analyze(Separable(), torch.randn(1, 3, 4, 4))
    kinds = fxconet.passes.label_edges.label_edges(graph.state)
    assert kinds[("x", "expand")] == "conv" and kinds[("bn1", "relu6")] == "non-conv"
    assert {(e.src, e.dst): e.kind for e in graph.edges} == {k: v.value for k, v in kinds.items()}


def test_predicted_params_and_macs_match_the_resized_model():
    from fxconet.cost import count_macs, predict_macs, predict_params

    cases = [
        (Concat(), torch.randn(1, 3, 6, 6)),
        (ChannelsLast(), torch.randn(1, 3, 8, 8)),
        (Grouped(), torch.randn(1, 3, 6, 6)),
        (RawParameterConv(), torch.randn(1, 3, 5, 5)),
        (Decoder(), torch.randn(1, 3, 8, 8)),
    ]
    for model, x in cases:
        graph = fxconet.analyze(model.eval(), x)
        widths = {g.id: g.divisor * max(1, g.size // g.divisor // 2) for g in graph.free}
        gm = fxconet.resize(graph, widths)
        assert predict_params(graph, widths) == sum(p.numel() for p in gm.parameters())
        assert predict_macs(graph, widths) == count_macs(gm, x)
        assert predict_macs(graph, {}) == count_macs(model, x)


class BorrowedSize(nn.Module):
    """Reshapes one group with a size computed from another group at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(22, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        n, c, h, w = b.shape
        a = a.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, -1, h, w)
        return self.head(torch.cat([a, b, self.c(x)], 1)).mean((2, 3))


def test_probe_freezes_what_run_time_sizes_contradict():
    model, x = BorrowedSize().eval(), torch.randn(2, 3, 4, 4)
    graph = fxconet.analyze(model, x)
    groups = by_producers(graph)
    assert groups[("a",)].frozen and "shape probe" in groups[("a",)].reason
    assert groups[("b",)].frozen and groups[("c",)].free
    assert testing.check_random_resize(model, x, graph=graph).ok
    unprobed = fxconet.analyze(model, x, probe=False)
    a, b = by_producers(unprobed)[("a",)], by_producers(unprobed)[("b",)]
    assert a.free and b.free  # what the rules alone would claim
    with pytest.raises(fxconet.VerificationError, match="the resized graph fails"):
        fxconet.resize(unprobed, {a.id: 4})


def test_resized_weights_keep_the_channels_last_layout():
    model = Residual().to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    gm = fxconet.resize(graph, {by_producers(graph)[("c1",)].id: 6})
    for name in ("c1", "c2", "stem"):
        assert gm.get_submodule(name).weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x), rtol=0, atol=0)


def test_dead_code_is_removed_on_every_resize_and_skipped_only_when_there_is_none():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            _ = y.mean()  # traced, never used
            return self.b(y)

    x = torch.randn(1, 3, 8, 8)
    graph = fxconet.analyze(Unused(), x)
    for width in (4, 6):  # the second resize must not trust the first's clean bill
        gm = fxconet.resize(graph, {graph.free[0].id: width})
        assert not any(n.target == "mean" for n in gm.graph.nodes)
        assert gm(x).shape == (1, 4, 6, 6)
    clean = fxconet.analyze(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)), x)
    for width in (4, 6):
        gm = fxconet.resize(clean, {clean.free[0].id: width})
        assert gm.get_submodule("0").out_channels == width and gm(x).shape == (1, 4, 6, 6)


def test_kept_channels_count_in_the_producers_order_even_through_a_channel_shuffle():
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5().eval()
    graph = fxconet.analyze(model, torch.randn(1, 3, 64, 64))
    gm = fxconet.resize(graph, testing.random_widths(graph, seed=1, high=1.0))
    plan, kept = gm.meta["fxconet"], fxconet.kept_channels(gm)
    checked = 0
    for group in graph.free:
        for producer in group.producers:
            out = plan.layer_channels(producer)["out"]
            if len(out) == len(kept[group.id]):  # the producer emits this group alone
                assert torch.equal(out, kept[group.id]), (group.id, producer)
                checked += 1
    assert checked >= 10  # most groups (the others are emitted only inside concatenations)


def test_in_place_calls_whose_results_are_unused_survive_the_rewrite():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y.relu_()  # the results of these calls are unused: each changes y itself
            y.mul_(2.0)
            torch.sigmoid_(y)
            F.relu(y, inplace=True)
            F.hardtanh(y, 0.0, 0.4, True)  # inplace passed by position
            y[:, :2] = y[:, :2] * 3
            _ = y.mean()  # truly dead
            return self.b(y)

    model, x = InPlace().eval(), torch.randn(1, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))
    gm = fxconet.resize(graph, {})
    assert not any(n.target == "mean" for n in gm.graph.nodes)
    assert sum(n.op == "call_method" and n.target in ("relu_", "mul_") for n in gm.graph.nodes) == 2
