"""Every torchvision model: analysed, and rewritten correctly (the three numerical checks).

Per-model settings (input size, constructor arguments) live in
:func:`fxconet.testing.torchvision_case`, shared with ``benchmarks/zoo.py``. The giant models run
one after another in one xdist group to bound memory.
"""

from __future__ import annotations

import gc

import pytest
import torch
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
    model, x = testing.torchvision_case(name)
    graph = fxconet.analyze(model, x)
    assert graph.groups and all(g.frozen for g in graph.groups if not g.consumers and g.producers)
    if name.startswith(CNN_FAMILIES):
        total, free = graph.conv_params()
        assert free > 0.5 * total, (name, free, total, str(graph))
    identity = testing.check_identity(model, x, graph=graph)
    assert identity.ok, identity
    high = 1.0 if name in testing.TORCHVISION_GIANTS else 2.0
    random = testing.check_random_resize(model, x, seed=0, high=high, graph=graph)
    assert random.ok, random
    del graph
    gc.collect()
    giant = name in testing.TORCHVISION_GIANTS  # float32: a float64 copy alone is 5 GB
    dtype = torch.float32 if giant else torch.float64
    zero = testing.check_zero_removal(model, x, seed=0, inplace=True, dtype=dtype)
    assert zero.ok, zero
