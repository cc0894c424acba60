"""Tests of fxconet.models: the CIFAR ResNets and build_model."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from fxconet.cost import count_params
from fxconet.errors import ModelError
from fxconet.models import (
    BasicBlock,
    CifarResNet,
    available_models,
    build_model,
    cifar_resnet20,
    cifar_resnet34,
    cifar_resnet56,
)


def _expected_params(blocks, widths, in_channels, num_classes):
    """Parameter count of CifarResNet from its definition, written out independently."""

    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(in_channels, widths[0], 3) + bn(widths[0])
    cin = widths[0]
    for stage, (n, w) in enumerate(zip(blocks, widths, strict=True)):
        for b in range(n):
            total += conv(cin, w, 3) + bn(w) + conv(w, w, 3) + bn(w)
            stride = 2 if stage > 0 and b == 0 else 1
            if stride != 1 or cin != w:
                total += conv(cin, w, 1) + bn(w)
            cin = w
    return total + widths[-1] * num_classes + num_classes


def test_resnet20_parameter_count():
    # 269,722 (the paper's 0.27M, zero-padding shortcuts) + two 1x1 projections with BN:
    # 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    assert count_params(cifar_resnet20()) == 272_474
    assert _expected_params([3] * 3, [16, 32, 64], 3, 10) == 272_474


@pytest.mark.parametrize(
    ("build", "blocks", "widths", "kwargs"),
    [
        (cifar_resnet20, [3] * 3, [16, 32, 64], {}),
        (cifar_resnet20, [3] * 3, [8, 16, 32], {"width": 8, "in_channels": 1}),
        (cifar_resnet56, [9] * 3, [16, 32, 64], {"num_classes": 100}),
        (cifar_resnet34, [3, 4, 6, 3], [64, 128, 256, 512], {}),
        (cifar_resnet34, [3, 4, 6, 3], [16, 32, 64, 128], {"width": 16, "in_channels": 1}),
    ],
)
def test_parameter_counts_match_the_architecture(build, blocks, widths, kwargs):
    in_channels, num_classes = kwargs.get("in_channels", 3), kwargs.get("num_classes", 10)
    assert count_params(build(**kwargs)) == _expected_params(
        blocks, widths, in_channels, num_classes
    )


def test_known_parameter_counts():
    assert count_params(cifar_resnet56()) == 855_770  # 853,018 (0.85M) with option A + 2,752
    assert count_params(cifar_resnet34()) == 21_282_122  # CONet's DASNet34 layout at width 64


def test_shortcuts_are_projections_exactly_where_shape_changes():
    net = cifar_resnet20()
    projected = [name for name, m in net.named_modules() if name.endswith("downsample")]
    assert projected == ["layer2.0.downsample", "layer3.0.downsample"]
    assert BasicBlock(8, 16).downsample is not None  # width change at stride 1
    assert BasicBlock(8, 8).downsample is None


@pytest.mark.parametrize("build", [cifar_resnet20, cifar_resnet56, cifar_resnet34])
@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_traceable_and_input_size_agnostic(build, in_channels, size):
    kwargs = {"width": 4} if build is cifar_resnet34 else {}
    net = build(num_classes=7, in_channels=in_channels, **kwargs).eval()
    gm = torch.fx.symbolic_trace(net)
    x = torch.randn(2, in_channels, size, size)
    out = net(x)
    assert out.shape == (2, 7)
    torch.testing.assert_close(gm(x), out)
    # Unrolled: one call per block conv, no control flow left in the graph.
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and "conv" in n.target]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in net.modules()) - sum(
        1 for name, _ in net.named_modules() if name.endswith("downsample.0")
    )


def test_cifar_resnet_rejects_bad_arguments():
    with pytest.raises(ModelError, match=r"blocks=\[1\] and widths=\[8, 16\]"):
        CifarResNet([1], [8, 16])
    with pytest.raises(ModelError, match=r"widths=\[8, 0\] must all be >= 1"):
        CifarResNet([1, 1], [8, 0])
    with pytest.raises(ModelError, match="num_classes=0"):
        cifar_resnet20(num_classes=0)


def test_build_model_our_names():
    net = build_model("cifar_resnet56", num_classes=100, in_channels=1)
    assert isinstance(net, CifarResNet) and net.fc.out_features == 100
    assert net.conv1.in_channels == 1


@pytest.mark.parametrize(
    ("name", "first_conv"),
    [("resnet18", "conv1"), ("mobilenet_v2", "features.0.0"), ("squeezenet1_0", "features.0")],
)
def test_build_model_torchvision_with_one_channel(name, first_conv):
    reference = build_model(name, num_classes=10)
    net = build_model(name, num_classes=10, in_channels=1).eval()
    old, new = reference.get_submodule(first_conv), net.get_submodule(first_conv)
    assert new.in_channels == 1 and old.in_channels == 3
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(new, attr) == getattr(old, attr)
    assert (new.bias is None) == (old.bias is None)
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_build_model_torchvision_extras(monkeypatch):
    import torchvision

    calls = []
    real_get_model = torchvision.models.get_model

    def recording_get_model(name, **kwargs):
        calls.append((name, kwargs))
        return nn.Sequential(nn.Conv2d(3, 2, 1))  # building a real ViT-B costs seconds

    monkeypatch.setattr(torchvision.models, "get_model", recording_get_model)
    build_model("vit_b_32", num_classes=5, image_size=(64, 64))
    build_model("resnet18", num_classes=5, image_size=64)
    assert calls == [
        ("vit_b_32", {"weights": None, "num_classes": 5, "image_size": 64}),
        ("resnet18", {"weights": None, "num_classes": 5}),
    ]
    with pytest.raises(ModelError, match="need square images"):
        build_model("vit_b_32", num_classes=5, image_size=(64, 32))
    monkeypatch.setattr(torchvision.models, "get_model", real_get_model)
    googlenet = build_model("googlenet", num_classes=3)
    googlenet.train()
    assert googlenet(torch.randn(2, 3, 64, 64)).shape == (2, 3)  # no auxiliary outputs


def test_build_model_module_callable(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def small(num_classes, in_channels=3, depth=1):
                return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(),
                                     nn.LazyLinear(num_classes))

            def fixed():
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

            class Holder:
                make = staticmethod(fixed)

            not_a_model = 3

            def returns_int(num_classes):
                return num_classes
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    net = build_model("my_nets:small", num_classes=6, in_channels=2)
    assert net[0].in_channels == 2 and net(torch.randn(1, 2, 5, 5)).shape == (1, 6)
    # A callable without in_channels gets its first conv adapted, nested attributes resolve.
    assert build_model("my_nets:Holder.make", num_classes=6, in_channels=1)[0].in_channels == 1
    assert build_model("fxconet.models:cifar_resnet20", num_classes=4).fc.out_features == 4
    with pytest.raises(ModelError, match=r"'my_nets' has no 'smal'; did you mean small\?"):
        build_model("my_nets:smal", num_classes=6)
    with pytest.raises(ModelError, match="cannot import 'no_such_module_xyz'"):
        build_model("no_such_module_xyz:net", num_classes=6)
    with pytest.raises(ModelError, match="is a int, not callable"):
        build_model("my_nets:not_a_model", num_classes=6)
    with pytest.raises(ModelError, match="returned a int, not an nn.Module"):
        build_model("my_nets:returns_int", num_classes=6)


def test_build_model_unknown_name_lists_close_matches():
    with pytest.raises(ModelError, match=r"unknown model 'resnet19'; did you mean .*resnet18"):
        build_model("resnet19", num_classes=10)
    with pytest.raises(ValueError, match=r"cifar_resnet20"):
        build_model("cifar_resnet", num_classes=10)
    with pytest.raises(ModelError, match="available_models"):
        build_model("zzzzzz", num_classes=10)


def test_available_models():
    names = available_models()
    assert names == sorted(names)
    assert {"cifar_resnet20", "cifar_resnet34", "cifar_resnet56", "resnet18", "vit_b_16"} <= set(
        names
    )
    assert "fasterrcnn_resnet50_fpn" not in names  # classification models only
