"""Models of other libraries, as given (random weights, small inputs): ultralytics YOLO,
segmentation_models_pytorch, MONAI and timm. Each is analysed with most of its conv parameters
free, passes the three numerical checks, and is left untouched.

The libraries come with the ``zoo`` extra (``pip install -e ".[dev,export,zoo]"``, as CI
does); without one its models are skipped, saying which package is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from torch import nn

import fxconet
from fxconet import testing

#: the test's sample of :data:`fxconet.testing.LIBRARY_CASES` (the benchmark runs them all)
CASES = [
    "yolov8n", "yolo11n-pose", "smp-unet-resnet18", "smp-fpn-resnet18", "monai-unet",
    "monai-segresnet", "timm-fasternet_t0", "timm-resnetv2_50x1_bit", "timm-efficientnet_b0",
]  # fmt: skip


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_library_model_as_given(name: str) -> None:
    package = testing.LIBRARY_CASES[name][0]
    pytest.importorskip(package, reason=f"{package} is in the zoo extra")
    model, x = testing.library_case(name)
    before = _state(model)
    graph = fxconet.analyze(model, x)
    total, free = graph.conv_params()
    assert free > 0.9 * total, (name, free, total, str(graph))
    results = testing.check_all(model, x)
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    after = _state(model)
    assert after["modes"] == before["modes"]
    for key, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][key], tensor), key


def test_monai_basic_unet_error_names_the_branch_and_its_fix() -> None:
    """BasicUNet's skip connection is behind ``torch.jit.isinstance``, False for a Proxy: the
    error says so and names the module to keep opaque; that fix analyses the model."""
    nets = pytest.importorskip("monai.networks.nets", reason="monai is in the zoo extra")
    basic_unet = importlib.import_module("monai.networks.nets.basic_unet")
    model = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2).eval()
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(fxconet.ShapeError, match=r"leaf_modules=\[UpCat\]"):
        fxconet.analyze(model, x)
    graph = fxconet.analyze(model, x, leaf_modules=[basic_unet.UpCat])
    assert graph.free
    torch.testing.assert_close(fxconet.resize(graph, {})(x), model(x))
