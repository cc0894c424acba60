"""The opaque fallback: code that cannot be traced is kept opaque, the rest is analysed.

* leaf fallback: a submodule whose code does not trace is one opaque op (frozen boundary), its
  children analysed on their own where they trace;
* root fallback: a model whose own ``forward`` does not trace (a detector) is analysed as a
  composite of its submodules that trace, and resizes into a copy of itself that runs.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxconet
from fxconet import testing
from fxconet.cost import CostModel, count_macs, count_params
from fxconet.passes.composite import Composite, composite_of
from fxconet.passes.view import SolutionView


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], types: list) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert [type(m) for m in model.modules()] == types
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def _analyze(model: nn.Module, x, **kwargs) -> fxconet.ChannelGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxconet.analyze(model, x, **kwargs)


def _shrink(graph: fxconet.ChannelGraph) -> dict[int, int]:
    """Every free group at about half its width (a multiple of its divisor, at least one)."""
    return {g.id: max(g.divisor, (g.size // 2) // g.divisor * g.divisor) for g in graph.free}


# ---------------------------------------------------------------------------------------------
# inline models


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x)))


class ListDetector(nn.Module):
    """A root forward fx cannot trace: it takes a list of images and branches on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.head = Head()

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.stack([(img - 0.5) * 2 for img in images])
        out = self.head(self.backbone(x))
        if out.mean() > 0:  # data-dependent: a TraceError for fx
            out = out.flip(1)
        return [o for o in out]


class Gate(nn.Module):
    """A submodule fx cannot trace (a branch on the data) around a traceable body."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 0:
            return y
        return -y


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.tail = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(F.relu(self.gate(F.relu(self.stem(x)))))


def _list_case() -> tuple[ListDetector, tuple]:
    torch.manual_seed(0)
    return ListDetector().eval(), ([torch.rand(3, 16, 16), torch.rand(3, 16, 16)],)


def test_opaque_false_raises_the_trace_error_as_before():
    model, x = _list_case()
    with pytest.raises(fxconet.TraceError, match=r"cannot trace ListDetector\.forward") as info:
        fxconet.analyze(model, x, opaque=False)
    assert info.value.module_path == ""
    with pytest.raises(fxconet.TraceError, match=r"module `gate` \(Gate\)"):
        fxconet.analyze(Mixed(), torch.randn(1, 3, 8, 8), opaque=False)
    with pytest.raises(ValueError, match="opaque must be 'auto' or False"):
        fxconet.analyze(Mixed(), torch.randn(1, 3, 8, 8), opaque=True)


def test_a_root_that_does_not_trace_is_a_composite_of_its_parts():
    model, x = _list_case()
    before, types = _state(model), [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match=r"ListDetector\.forward is opaque"):
        graph = fxconet.analyze(model, x)
    state = composite_of(graph)
    assert isinstance(state, Composite)
    assert [p.path for p in state.parts] == ["backbone", "head"]
    assert [p.offset for p in state.parts] == [0, 2]
    # backbone: conv1 (8, free), conv2 (16: the part's output, frozen); head: conv (12, free),
    # out (4: the part's output, frozen); ids numbered across the parts
    assert [(g.size, g.free) for g in graph.groups] == [
        (8, True),
        (16, False),
        (12, True),
        (4, False),
    ]
    assert graph.group(0).producers == ("backbone.conv1",)
    assert graph.group(2).producers == ("head.conv",) and graph.group(2).consumers == ("head.out",)
    assert "model output" in (graph.group(1).reason or "")
    assert graph.layer("head.out").in_groups == (2,)
    assert ("", state.opaque[0][1]) == state.opaque[0] and "control flow" in state.opaque[0][1]

    same = fxconet.resize(graph, graph.widths())
    assert type(same) is ListDetector and isinstance(same.backbone, torch.fx.GraphModule)
    with torch.no_grad():
        ref = model(*x)
        for a, b in zip(ref, same(*x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    small = fxconet.resize(graph, {0: 3, 2: 5})
    assert small.backbone.conv1.out_channels == 3 and small.backbone.conv2.in_channels == 3
    assert small.head.conv.out_channels == 5 and small.head.out.in_channels == 5
    with torch.no_grad():
        out = small(*x)
    assert [o.shape for o in out] == [o.shape for o in ref]
    assert all(p.data_ptr() != q.data_ptr() for p in small.parameters() for q in model.parameters())
    _assert_untouched(model, before, types)


def test_a_composite_counts_parameters_and_macs_like_the_built_model():
    model, x = _list_case()
    graph = _analyze(model, x)
    cost = CostModel(graph)
    assert cost.params_before == count_params(model)
    one = ([x[0][0]],)  # MACs are per example: one image
    assert cost.macs_before == count_macs(model, one)
    widths = {0: 3, 2: 5}
    small = fxconet.resize(graph, widths)
    assert cost.params(widths) == count_params(small) < count_params(model)
    assert cost.macs(widths) == count_macs(small, one) < cost.macs_before
    with pytest.raises(fxconet.ChannelError, match="group 1 .* is frozen"):
        cost.macs({1: 8})


def test_a_composite_passes_the_numerical_checks():
    model, x = _list_case()
    before = _state(model)
    results = testing.check_all(model, x)
    assert [r.name for r in results] == ["identity", "random", "zero-removal"]
    assert all(r.ok for r in results), results
    assert results[2].note.startswith("2 groups shrunk")  # both free groups, one per part
    layouts = SolutionView(_analyze(model, x)).tensors()
    assert {"backbone.conv1.weight", "head.conv.weight", "head.out.weight"} <= set(layouts)
    assert layouts["head.out.weight"].groups() == (3, 2)  # global ids: out, in
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_search_strategies_refuse_a_composite_with_a_reason():
    model, x = _list_case()
    view = SolutionView(_analyze(model, x))
    with pytest.raises(fxconet.ChannelError, match="composite analysis .* parts 'backbone'"):
        view.sizer({})


def test_a_list_of_inputs_is_explained_when_the_eager_run_fails():
    model, x = _list_case()
    hint = r"could not run ListDetector eagerly.*\(\[image\],\)"
    with pytest.raises(fxconet.TraceError, match=hint):
        _analyze(model, x[0])  # the list's items become two positional arguments


def test_user_freeze_and_leaf_paths_apply_to_the_parts():
    model, x = _list_case()
    graph = _analyze(model, x, freeze=["head"])
    assert [p.path for p in composite_of(graph).parts] == ["backbone"]
    # a part with no free group left is no part: relative paths and types reach the parts
    graph = _analyze(model, x, freeze=["head.conv"])
    assert [p.path for p in composite_of(graph).parts] == ["backbone"]
    with pytest.raises(fxconet.TraceError, match="no submodule of ListDetector that traces"):
        _analyze(model, x, freeze=[nn.Conv2d])
    graph = _analyze(model, x, leaf_modules=["backbone"])  # not traced into: not analysed
    assert [p.path for p in composite_of(graph).parts] == ["head"]
    graph = _analyze(model, x, freeze=[nn.BatchNorm2d])
    assert [p.path for p in composite_of(graph).parts] == ["head"]
    with pytest.raises(KeyError, match="head.nope"):
        _analyze(model, x, freeze=["head.nope"])


class Twice(nn.Module):
    """A root that does not trace and calls its shared block twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Backbone()
        self.block = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.block(self.block(y))
        return y if y.sum() > 0 else -y


def test_a_module_called_twice_is_left_as_it_is():
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(1, 3, 8, 8)
    graph = _analyze(model, x)
    assert [p.path for p in composite_of(graph).parts] == ["stem"]
    assert any("`block` (Sequential) is called 2 times" in n for n in graph.notes)
    same = fxconet.resize(graph, graph.widths())
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)


def test_a_submodule_that_does_not_trace_is_opaque_and_its_children_are_analysed():
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    before, types = _state(model), [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match=r"module `gate` \(Gate\) is opaque"):
        graph = fxconet.analyze(model, x)
    state = composite_of(graph)
    assert [p.path for p in state.parts] == ["", "gate.body"]
    root_part = state.parts[0].graph
    # stem's output feeds the opaque gate and the gate's output feeds the tail: both frozen
    assert [(g.producers, g.free) for g in root_part.groups] == [
        (("stem",), False),
        (("tail.0",), True),
        (("tail.2",), False),
    ]
    assert "no channel rule" in (root_part.group(0).reason or "")
    assert [(g.size, g.free) for g in graph.groups][3:] == [(16, True), (8, False)]
    assert graph.group(3).producers == ("gate.body.0",)

    gm = fxconet.resize(graph, {1: 3, 3: 5})
    assert isinstance(gm, torch.fx.GraphModule)  # the root traced: its resized GraphModule
    assert gm.get_submodule("tail.0").out_channels == 3
    assert gm.get_submodule("gate.body.0").out_channels == 5
    assert isinstance(gm.get_submodule("gate.body"), torch.fx.GraphModule)
    with torch.no_grad():
        assert gm(x).shape == model(x).shape
        same = fxconet.resize(graph, graph.widths())
        torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
    assert all(r.ok for r in testing.check_all(model, x))
    _assert_untouched(model, before, types)


class Plain(nn.Module):
    """The leaf fallback alone: the opaque module has no child with a free group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.gate = GateOnly()
        self.tail = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.gate(F.relu(self.mid(F.relu(self.stem(x))))))


class GateOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_the_leaf_fallback_alone_keeps_one_traced_graph():
    torch.manual_seed(0)
    model, x = Plain().eval(), torch.randn(1, 3, 8, 8)
    graph = _analyze(model, x)
    assert composite_of(graph) is None
    assert any("module `gate` (GateOnly) is opaque" in n for n in graph.notes)
    assert [(g.producers, g.free) for g in graph.groups] == [
        (("stem",), True),
        (("mid",), False),
        (("tail",), False),
    ]
    gm = fxconet.resize(graph, {0: 4})
    assert isinstance(gm, torch.fx.GraphModule) and gm.stem.out_channels == 4
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# torchvision detectors (random weights, small inputs)

tv_detection = pytest.importorskip("torchvision.models.detection")


def _detector(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    if name == "ssdlite":
        model = tv_detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        side = 320
    else:
        model = tv_detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None,
            weights_backbone=None,
            min_size=128,
            max_size=128,
            box_score_thresh=0.0,  # random weights score below the default 0.05
        )
        side = 128
    return model.eval(), ([torch.rand(3, side, side)],)


@pytest.fixture(scope="module", params=["ssdlite", "fasterrcnn"])
def detector(request):
    model, x = _detector(request.param)
    before, types = _state(model), [type(m) for m in model.modules()]
    started = time.perf_counter()
    graph = _analyze(model, x)
    seconds = time.perf_counter() - started
    return request.param, model, x, graph, (before, types), seconds


#: free groups each part has at least (random weights; counted on torchvision 0.2x)
_PARTS = {
    "ssdlite": {"backbone": 25},
    "fasterrcnn": {"backbone": 25, "rpn.head": 1, "roi_heads.box_head": 1},
}


def _outputs(out: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [d[k] for d in out for k in ("boxes", "scores", "labels")]


def test_a_detector_analyses_with_free_groups_in_its_parts(detector):
    name, model, x, graph, untouched, seconds = detector
    state = composite_of(graph)
    assert state is not None and state.opaque[0][0] == ""
    free = {p.path: len(p.graph.free) for p in state.parts}
    assert free.keys() == _PARTS[name].keys()
    for path, at_least in _PARTS[name].items():
        assert free[path] >= at_least, (path, free)
    assert any(n.startswith(f"{type(model).__name__}.forward is opaque") for n in graph.notes)
    assert CostModel(graph).params_before == count_params(model)
    assert seconds < 30
    _assert_untouched(model, *untouched)


def test_a_detector_resized_to_its_widths_computes_the_same(detector):
    name, model, x, graph, untouched, _ = detector
    same = fxconet.resize(graph, graph.widths())
    assert type(same) is type(model)
    with torch.no_grad():
        ref, out = _outputs(model(*x)), _outputs(same(*x))
    assert ref[0].shape[0] > 0  # there are detections to compare
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_untouched(model, *untouched)


def test_a_detector_shrunk_runs_end_to_end(detector):
    name, model, x, graph, untouched, _ = detector
    widths = _shrink(graph)
    small = fxconet.resize(graph, widths)
    assert count_params(small) == CostModel(graph).params(widths) < count_params(model)
    images = torch.rand(1, *x[0][0].shape)
    with torch.no_grad():
        out = small(*x)
        features, ref = small.backbone(images), model.backbone(images)
    assert len(out) == 1 and out[0]["boxes"].shape[1] == 4
    assert all(torch.isfinite(t).all() for t in _outputs(out))
    # the backbone's outputs (the heads' inputs) keep their widths
    assert [f.shape for f in features.values()] == [f.shape for f in ref.values()]
    part = composite_of(graph).parts[0]
    first = next(g for g in part.graph.free)
    layer = small.backbone.get_submodule(first.producers[0])
    assert layer.out_channels == widths[part.offset + first.id] < first.size
    _assert_untouched(model, *untouched)


def test_a_detector_with_opaque_false_raises_as_before():
    model, x = _detector("ssdlite")
    with pytest.raises(fxconet.TraceError, match=r"cannot trace module `transform`"):
        fxconet.analyze(model, x, opaque=False)


def test_a_detector_passes_zero_removal():
    model, x = _detector("fasterrcnn")
    result = testing.check_zero_removal(model, x, max_groups=8)
    assert result.ok and result.note.startswith("8 groups shrunk"), result


def test_the_input_copy_is_what_the_composite_checks_against():
    model, x = _list_case()
    graph = _analyze(model, x)
    x[0][0].mul_(0)  # the user's tensors may change after analyze
    clone = copy.deepcopy(composite_of(graph).inputs.args[0][0])
    assert clone.abs().sum() > 0


def test_optimize_channels_refuses_a_composite_and_maps_opaque_through():
    model, x = _list_case()
    with pytest.raises(fxconet.SearchError, match=r"composite of the traced parts 'backbone'"):
        fxconet.optimize_channels(model, x, method="uniform", target_macs=0.5, progress=False)
    with pytest.raises(fxconet.TraceError, match=r"cannot trace ListDetector\.forward"):
        fxconet.optimize_channels(
            model, x, method="uniform", target_macs=0.5, progress=False, opaque=False
        )
