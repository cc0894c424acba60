"""Every torchvision model: analysed, and rewritten correctly (the three numerical checks).

Per-model settings (input size, constructor arguments) live in
:func:`fxconet.testing.torchvision_case`, shared with ``benchmarks/zoo.py``. The giant models
(over 100M parameters) are checked on the meta device, one after another in one xdist group.
"""

from __future__ import annotations

import gc

import pytest
import torchvision

import fxconet
from fxconet import testing

ZOO = torchvision.models.list_models(module=torchvision.models)

#: families that must keep most conv parameters free (transformers may stay mostly frozen)
CNN_FAMILIES = (
    "alexnet", "vgg", "resnet", "resnext", "wide_resnet", "densenet", "squeezenet", "googlenet",
    "inception", "mobilenet", "mnasnet", "shufflenet", "efficientnet", "regnet", "convnext",
)  # fmt: skip


def marks(name: str) -> list[pytest.MarkDecorator]:
    group = "giant" if name in testing.TORCHVISION_GIANTS else name
    return [pytest.mark.slow, pytest.mark.xdist_group(group)]


@pytest.mark.parametrize("name", [pytest.param(n, marks=marks(n)) for n in ZOO])
def test_zoo_model(name: str) -> None:
    if name in testing.TORCHVISION_GIANTS:
        return check_giant(name)
    model, x = testing.torchvision_case(name)
    graph = fxconet.analyze(model, x)
    check_groups(name, graph)
    identity = testing.check_identity(model, x, graph=graph)
    assert identity.ok, identity
    random = testing.check_random_resize(model, x, seed=0, graph=graph)
    assert random.ok, random
    del graph
    gc.collect()
    zero = testing.check_zero_removal(model, x, seed=0, inplace=True)
    assert zero.ok, zero


def check_groups(name: str, graph: fxconet.ChannelGraph) -> None:
    assert graph.groups and all(g.frozen for g in graph.groups if not g.consumers and g.producers)
    if name.startswith(CNN_FAMILIES):
        total, free = graph.conv_params()
        assert free > 0.5 * total, (name, free, total, str(graph))


def check_giant(name: str) -> None:
    """A model of over 100M parameters, on the meta device (a float64 copy of regnet_y_128gf is
    5 GB): the analysis, and resized models (same widths; random shrink and growth) whose
    every layer has the predicted shape (resize verifies it) and whose output keeps its shape.
    The numerical checks run on the smaller models of each family."""
    model, x = testing.torchvision_case(name, meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    graph = fxconet.analyze(model, x)
    check_groups(name, graph)
    expected = model(x).shape
    same = fxconet.resize(graph, {g.id: g.size for g in graph.free})
    assert same(x).shape == expected
    widths = testing.random_widths(graph, seed=0)
    resized = fxconet.resize(graph, widths)
    assert resized(x).shape == expected
    kept = fxconet.kept_channels(resized)
    assert {g: len(kept[g]) for g in widths} == widths


def test_meta_parameters_move_registrations_inside_the_block_only():
    with testing.meta_parameters():
        model = torchvision.models.regnet_y_400mf()  # computes its widths on real tensors
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert next(torchvision.models.regnet_y_400mf().parameters()).device.type == "cpu"
