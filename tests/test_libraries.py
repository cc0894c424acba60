"""Models of other libraries, as given (random weights, small inputs): ultralytics YOLO,
segmentation_models_pytorch, MONAI and timm. Each is analysed with most of its conv parameters
free, passes the three numerical checks, and is left untouched.

The libraries come with the ``zoo`` extra (``pip install -e ".[dev,export,zoo]"``, as CI
does); without one its models are skipped, saying which package is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fxconet
from fxconet import testing


def _yolo(cfg: str) -> nn.Module:
    from ultralytics.nn import tasks

    cls = {"pose": tasks.PoseModel, "seg": tasks.SegmentationModel}.get(
        cfg.split("-")[-1].removesuffix(".yaml"), tasks.DetectionModel
    )
    return cls(cfg, verbose=False)


def _smp(arch: str) -> nn.Module:
    import segmentation_models_pytorch as smp

    return getattr(smp, arch)("resnet18", encoder_weights=None, classes=3)


def _monai(name: str) -> nn.Module:
    from monai.networks import nets

    if name == "UNet":
        return nets.UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    return nets.SegResNet(2, init_filters=8, in_channels=1, out_channels=2)


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


RGB, GRAY = (1, 3, 64, 64), (1, 1, 32, 32)
CASES: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
    "yolov8n": ("ultralytics", lambda: _yolo("yolov8n.yaml"), RGB),
    "yolo11n-pose": ("ultralytics", lambda: _yolo("yolo11n-pose.yaml"), RGB),
    "smp-unet-resnet18": ("segmentation_models_pytorch", lambda: _smp("Unet"), RGB),
    "smp-fpn-resnet18": ("segmentation_models_pytorch", lambda: _smp("FPN"), RGB),
    "monai-unet": ("monai", lambda: _monai("UNet"), GRAY),
    "monai-segresnet": ("monai", lambda: _monai("SegResNet"), GRAY),
    "timm-fasternet_t0": ("timm", lambda: _timm("fasternet_t0"), RGB),  # forward rebound
    "timm-resnetv2_50x1_bit": ("timm", lambda: _timm("resnetv2_50x1_bit"), RGB),  # StdConv2d
    "timm-efficientnet_b0": ("timm", lambda: _timm("efficientnet_b0"), RGB),  # drop path
}


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_library_model_as_given(name: str) -> None:
    package, make, shape = CASES[name]
    pytest.importorskip(package, reason=f"{package} is in the zoo extra")
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
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
