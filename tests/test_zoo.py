"""Every torchvision model: analysed, and rewritten correctly (the three numerical checks).

Per-model settings (input size, constructor arguments, memory limits) live in the tables below,
not in ``if``s. The giant models run one after another in one xdist group to bound memory.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torchvision

import fxconet
from fxconet import testing

ZOO = torchvision.models.list_models(module=torchvision.models)

#: input side (default 32): the smallest that every layer of the model accepts
INPUT_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}
#: constructor arguments besides num_classes=10
BUILD_ARGS = {
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
}
#: models of more than 100M parameters only shrink in the random check, to bound memory
GIANT = {
    "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "vit_h_14", "vit_l_16", "vit_l_32",
    "convnext_large", "wide_resnet101_2", "efficientnet_v2_l",
}  # fmt: skip
#: families that must keep most conv parameters free (transformers may stay mostly frozen)
CNN_FAMILIES = (
    "alexnet", "vgg", "resnet", "resnext", "wide_resnet", "densenet", "squeezenet", "googlenet",
    "inception", "mobilenet", "mnasnet", "shufflenet", "efficientnet", "regnet", "convnext",
)  # fmt: skip


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, num_classes=10, **BUILD_ARGS.get(name, {}))
    size = BUILD_ARGS.get(name, {}).get("image_size", INPUT_SIZE.get(name, 32))
    return model.eval(), torch.randn(2, 3, size, size)


def marks(name: str) -> list[pytest.MarkDecorator]:
    group = "giant" if name in GIANT else name
    return [pytest.mark.slow, pytest.mark.xdist_group(group)]


@pytest.mark.parametrize("name", [pytest.param(n, marks=marks(n)) for n in ZOO])
def test_zoo_model(name: str) -> None:
    model, x = build(name)
    graph = fxconet.analyze(model, x)
    assert graph.groups and all(g.frozen for g in graph.groups if not g.consumers and g.producers)
    if name.startswith(CNN_FAMILIES):
        total, free = graph.conv_params()
        assert free > 0.5 * total, (name, free, total, str(graph))
    identity = testing.check_identity(model, x, graph=graph)
    assert identity.ok, identity
    high = 1.0 if name in GIANT else 2.0
    random = testing.check_random_resize(model, x, seed=0, high=high, graph=graph)
    assert random.ok, random
    del graph
    gc.collect()
    zero = testing.check_zero_removal(model, x, seed=0, inplace=True)
    assert zero.ok, zero
