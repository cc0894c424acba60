"""The CIFAR-style ResNets the papers search, and building any model from a name.

* :func:`cifar_resnet20`, :func:`cifar_resnet56`: He et al. (2016) CIFAR ResNets, three stages of
  BasicBlocks with widths ``width, 2 width, 4 width`` (16, 32, 64 by default), as APS searches.
* :func:`cifar_resnet34`: the ImageNet ResNet-34 layout ``[3, 4, 6, 3]`` with a 3x3 stride-1 stem
  and no max-pool, as CONet searches on CIFAR (its ``DASNet34``), widths 64..512 by default.

Shortcuts are identity when shape is kept and a 1x1 convolution + BatchNorm ("option B")
wherever the stride or the width changes. The papers' zero-padding "option A" shortcut ties a
stage's width to the previous one; a projection keeps every stage's width free to search. All
models end in a global average pool, so they accept any input of at least 8x8 pixels (digits
8x8, Fashion-MNIST 28x28, CIFAR 32x32), and have no data-dependent control flow, so
``torch.fx.symbolic_trace`` traces them.

:func:`build_model` turns a name into a module: one of ours, any torchvision classification
model, or ``"package.module:callable"``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxconet.errors import ModelError

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "available_models",
    "build_model",
    "cifar_resnet20",
    "cifar_resnet34",
    "cifar_resnet56",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (He et al., 2016).

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, where ``shortcut`` is the
    identity or, when ``stride != 1`` or ``in_planes != planes``, ``downsample``: a 1x1 conv
    with the block's stride followed by BN.

    Args:
        in_planes: input channels.
        planes: output channels (also the middle width).
        stride: stride of ``conv1`` and of the shortcut.

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        # The `is None` test is resolved while tracing (an attribute, not data): fx-safe.
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)  # out(conv2) == out(shortcut): one channel group per stage


class CifarResNet(nn.Module):
    """A ResNet for small images: 3x3 stride-1 stem, no max-pool, stages of BasicBlocks.

    Stage ``i`` has ``blocks[i]`` blocks of width ``widths[i]``; every stage but the first
    starts with stride 2. Modules are named as in torchvision (``conv1``, ``bn1``,
    ``layer1`` ..., ``avgpool``, ``fc``) so module paths read the same in reports.

    Args:
        blocks: blocks per stage.
        widths: channels per stage (the stem has ``widths[0]``).
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.

    Raises:
        ModelError: empty or mismatched ``blocks``/``widths``, or a value < 1.

    Example:
        >>> net = CifarResNet([1, 1], [8, 16], num_classes=3, in_channels=1)
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        blocks, widths = list(blocks), list(widths)
        if not blocks or len(blocks) != len(widths):
            raise ModelError(
                f"CifarResNet: blocks={blocks!r} and widths={widths!r} need one entry per stage"
            )
        for name, values in (("blocks", blocks), ("widths", widths)):
            if min(values) < 1:
                raise ModelError(f"CifarResNet: {name}={values!r} must all be >= 1")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if value < 1:
                raise ModelError(f"CifarResNet: {name}={value!r} must be >= 1")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        self._stages: tuple[str, ...] = ()
        for i, (count, planes) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(in_planes, planes, stride)]
            layers += [BasicBlock(planes, planes) for _ in range(count - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self._stages += (f"layer{i + 1}",)
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (N, widths[0], H, W)
        for name in self._stages:  # a fixed tuple: unrolled by symbolic_trace
            x = getattr(self, name)(x)
        x = self.avgpool(x)  # (N, widths[-1], 1, 1)
        return self.fc(torch.flatten(x, 1))


def _cifar_resnet_depth(depth: int, width: int, num_classes: int, in_channels: int) -> CifarResNet:
    # depth = 6n + 2: stem + 3 stages x n blocks x 2 convs + classifier.
    n = (depth - 2) // 6
    return CifarResNet(
        [n] * 3, [width, 2 * width, 4 * width], num_classes=num_classes, in_channels=in_channels
    )


def cifar_resnet20(*, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-20 for CIFAR: 3 stages x 3 BasicBlocks, widths ``width, 2 width, 4 width``.

    272,474 parameters at the defaults (269,722 with option-A shortcuts, the paper's 0.27M).

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        width: width of the first stage.

    Example:
        >>> cifar_resnet20(num_classes=10, in_channels=1)(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    return _cifar_resnet_depth(20, width, num_classes, in_channels)


def cifar_resnet56(*, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-56 for CIFAR: 3 stages x 9 BasicBlocks, widths ``width, 2 width, 4 width``.

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        width: width of the first stage.

    Example:
        >>> len(cifar_resnet56().layer3)
        9
    """
    return _cifar_resnet_depth(56, width, num_classes, in_channels)


def cifar_resnet34(*, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """ResNet-34 for CIFAR as CONet uses it: ``[3, 4, 6, 3]`` blocks, 3x3 stem, no max-pool.

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        width: width of the first stage; the stages are ``width x (1, 2, 4, 8)``.

    Example:
        >>> cifar_resnet34(width=8)(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return CifarResNet(
        [3, 4, 6, 3],
        [width, 2 * width, 4 * width, 8 * width],
        num_classes=num_classes,
        in_channels=in_channels,
    )


_OURS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet34": cifar_resnet34,
    "cifar_resnet56": cifar_resnet56,
}

# Per-model keyword arguments for torchvision builders (the one place for their exceptions):
# auxiliary heads change the output type in train mode; init_weights=True silences the warning
# about a future change of their default initialisation.
_TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
# Builders whose position embedding is sized by the input: image_size is passed through.
_TORCHVISION_TAKES_IMAGE_SIZE = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


def _torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Names :func:`build_model` accepts besides ``module:callable`` specs.

    Ours (``cifar_resnet20``, ``cifar_resnet34``, ``cifar_resnet56``) and every torchvision
    classification model, sorted.

    Example:
        >>> "cifar_resnet20" in available_models() and "resnet18" in available_models()
        True
    """
    return sorted({*_OURS, *_torchvision_models()})


def _image_size_arg(image_size: int | Sequence[int] | None) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return image_size
    height, width = image_size
    if height != width:
        raise ModelError(f"image_size={tuple(image_size)!r}: torchvision ViTs need square images")
    return int(height)


def _replace_first_conv(model: nn.Module, in_channels: int, spec: str, *, strict: bool) -> None:
    found = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        if strict:
            raise ModelError(f"{spec}: no nn.Conv2d found to take in_channels={in_channels}")
        return
    path, module = found
    if module.in_channels == in_channels:
        return
    if in_channels % module.groups:
        raise ModelError(
            f"{spec}: first conv {path!r} has groups={module.groups}, which does not divide "
            f"in_channels={in_channels}"
        )
    new = nn.Conv2d(
        in_channels,
        module.out_channels,
        module.kernel_size,  # type: ignore[arg-type]
        stride=module.stride,  # type: ignore[arg-type]
        padding=module.padding,  # type: ignore[arg-type]
        dilation=module.dilation,  # type: ignore[arg-type]
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def _build_torchvision(
    name: str, num_classes: int, in_channels: int, image_size: int | Sequence[int] | None
) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = dict(_TORCHVISION_KWARGS.get(name, {}))
    size = _image_size_arg(image_size)
    if name in _TORCHVISION_TAKES_IMAGE_SIZE and size is not None:
        kwargs["image_size"] = size
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, name, strict=True)
    return model


def _resolve_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ModelError(f"{spec!r}: expected 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as first:
        # the command's own folder, as `python -m` would see it (console scripts do not)
        cwd = os.getcwd()
        if cwd in sys.path:
            raise ModelError(f"{spec!r}: cannot import {module_name!r} ({first})") from first
        sys.path.insert(0, cwd)
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelError(
                f"{spec!r}: cannot import {module_name!r} from the current folder or the "
                f"installed packages ({e})"
            ) from e
        finally:
            sys.path.remove(cwd)
    except ImportError as e:
        raise ModelError(f"{spec!r}: cannot import {module_name!r} ({e})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelError(f"{spec!r}: {getattr(obj, '__name__', obj)!r} has no {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def _build_timm(name: str, num_classes: int, in_channels: int, *, strict: bool) -> nn.Module | None:
    """A timm model by name (``pretrained=False``, timm's ``num_classes`` and ``in_chans``);
    None when timm is not installed or does not know the name, unless ``strict``."""
    try:
        import timm
    except ImportError as e:
        if strict:
            raise ModelError(f"timm:{name}: timm is not installed (pip install timm)") from e
        return None
    if not timm.is_model(name):
        if not strict:
            return None
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"timm:{name}: timm has no model {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    assert isinstance(model, nn.Module)
    return model


# Keyword names of the class count and input channels for factories of libraries that take
# them through **kwargs (a factory's own named parameters are always used first).
_LIBRARY_KWARGS = {"timm": {"num_classes": "num_classes", "in_channels": "in_chans"}}


def _build_from_callable(
    spec: str, num_classes: int, in_channels: int, image_size: int | Sequence[int] | None
) -> nn.Module:
    factory = _resolve_callable(spec)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    # Only parameters the callable names explicitly: **kwargs are often forwarded to a
    # constructor that rejects unknown keywords (torchvision's builders do).
    kwargs = {
        k: v
        for k, v in offered.items()
        if k in params
        and params[k].kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and not (k == "image_size" and v is None)
    }
    library = getattr(factory, "__module__", "").partition(".")[0]
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if library in _LIBRARY_KWARGS and takes_kwargs:
        for ours, theirs in _LIBRARY_KWARGS[library].items():
            if ours not in kwargs and theirs not in params:
                kwargs[theirs] = offered[ours]
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r}: returned a {type(model).__name__}, not an nn.Module")
    if "in_channels" not in kwargs and "in_chans" not in kwargs:
        # A model without convs (an MLP, say) is the callable's business: leave it.
        _replace_first_conv(model, in_channels, spec, strict=False)
    return model


def build_model(
    spec: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | Sequence[int] | None = None,
) -> nn.Module:
    """Build an untrained model from a name.

    Args:
        spec: one of :func:`available_models`, a timm model (``"timm:resnet18d"``, or the
            bare name when neither we nor torchvision have it; timm must be installed), or
            ``"package.module:callable"``. Ours get
            ``num_classes`` and ``in_channels``. Torchvision models are built with
            ``weights=None`` and ``num_classes``; for ``in_channels != 3`` the first
            ``nn.Conv2d`` in module order is replaced by one taking ``in_channels`` with the
            same other hyper-parameters. A callable receives ``num_classes``, ``in_channels`` and
            ``image_size`` for each of them it names as a parameter; if it does not take
            ``in_channels``, its first conv is adapted the same way.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        image_size: ``(H, W)`` or ``H`` of the inputs; used by torchvision's ViTs and by
            callables that take it, ignored otherwise.

    Returns:
        The model.

    Raises:
        ModelError: unknown name (the message lists close matches), a spec that cannot be
            imported, or a callable that does not return an ``nn.Module``.

    Example:
        >>> build_model("resnet18", num_classes=10, in_channels=1).conv1.in_channels
        1
        >>> build_model("fxconet.models:cifar_resnet20", num_classes=100).fc.out_features
        100
    """
    if spec in _OURS:
        return _OURS[spec](num_classes=num_classes, in_channels=in_channels)
    if spec.startswith("timm:"):
        model = _build_timm(spec.removeprefix("timm:"), num_classes, in_channels, strict=True)
        assert model is not None  # strict: an unknown name raised
        return model
    if ":" in spec:
        return _build_from_callable(spec, num_classes, in_channels, image_size)
    if spec in _torchvision_models():
        return _build_torchvision(spec, num_classes, in_channels, image_size)
    timm_model = _build_timm(spec, num_classes, in_channels, strict=False)
    if timm_model is not None:
        return timm_model
    candidates = available_models()
    close = difflib.get_close_matches(spec, candidates, n=5, cutoff=0.6)
    close += [c for c in candidates if spec and spec.lower() in c.lower() and c not in close][:3]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelError(
        f"unknown model {spec!r}; {hint}see fxconet.models.available_models() "
        "or pass 'timm:NAME' or 'package.module:callable'"
    )
