"""Numerical checks that a model's rewrite is correct (use them on your own models).

* :func:`check_identity`: resizing to the current widths gives the same outputs.
* :func:`check_random_resize`: resizing every free group to a random valid width runs and keeps
  the output shape.
* :func:`check_zero_removal`: zeroing some channels of the free groups (in every layer of the
  group) and shrinking by exactly those channels leaves the outputs unchanged.

Example:
    >>> from fxconet import testing
    >>> testing.check_all(torchvision.models.resnet18().eval(), torch.randn(2, 3, 64, 64))
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxconet.api import analyze, resize
from fxconet.ir import ChannelGraph
from fxconet.passes import parametrized
from fxconet.passes.module_copy import map_tensors
from fxconet.passes.nodes import normalize_inputs
from fxconet.passes.view import SolutionView, TensorLayout

__all__ = [
    "LIBRARY_CASES",
    "library_case",
    "meta_parameters",
    "CheckResult",
    "check_all",
    "check_identity",
    "check_random_resize",
    "check_zero_removal",
    "flat_tensors",
    "random_widths",
    "torchvision_case",
    "TORCHVISION_GIANTS",
]

#: input side per torchvision model (default 32): the smallest that every layer accepts
_TORCHVISION_INPUT = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}
#: constructor arguments besides ``num_classes``
_TORCHVISION_ARGS: dict[str, dict[str, Any]] = {
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
}
#: torchvision models of more than 100M parameters (the zoo checks them on the meta device: their
#: float64 copies alone would take GBs; smaller models of each family get the numerical checks)
TORCHVISION_GIANTS = frozenset(
    {
        "regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "vit_h_14", "vit_l_16", "vit_l_32",
        "convnext_large", "wide_resnet101_2", "efficientnet_v2_l",
    }
)  # fmt: skip


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: ``ok``, the largest output difference and a short note."""

    name: str
    ok: bool
    max_diff: float = 0.0
    note: str = ""


def _run(model: Any, example_inputs: Any, *, restore_buffers: bool = True) -> Any:
    """The model's output; its buffers (a train-mode BatchNorm's running statistics, which a
    resized model may share) are restored afterwards unless ``restore_buffers=False``."""
    args, kwargs = normalize_inputs(example_inputs)
    saved = [(b, b.detach().clone()) for b in model.buffers()] if restore_buffers else []
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, in order: dicts by value, lists and tuples."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, tuple | list):
        return [t for v in out for t in flat_tensors(v)]
    return []


def _max_diff(a: Any, b: Any, rtol: float = 1e-4) -> tuple[float, bool]:
    """Largest absolute difference, and whether it is within ``rtol`` of the output scale."""
    fa, fb = flat_tensors(a), flat_tensors(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb, strict=True)):
        return float("inf"), False
    pairs = [(x, y) for x, y in zip(fa, fb, strict=True) if x.numel()]
    diff = max((float((x - y).abs().max()) for x, y in pairs), default=0.0)
    scale = max((float(x.abs().max()) for x, _ in pairs), default=0.0)
    return diff, diff <= rtol * scale + 1e-12


def _double(value: Any) -> Any:
    return map_tensors(value, lambda t: t.double() if t.is_floating_point() else t)


def random_widths(
    graph: ChannelGraph, seed: int, *, low: float = 0.25, high: float = 2.0
) -> dict[int, int]:
    """A seeded random valid width for every free group, between ``low`` and ``high`` times its
    size (in multiples of the group's divisor, at least one)."""
    rng = np.random.default_rng(seed)
    widths = {}
    for g in graph.free:
        k = g.size // g.divisor
        lo, hi = max(1, int(k * low)), max(1, int(round(k * high)))
        widths[g.id] = g.divisor * int(rng.integers(lo, hi + 1))
    return widths


def check_identity(
    model: nn.Module,
    example_inputs: Any,
    *,
    graph: ChannelGraph | None = None,
    **analyze_kwargs: Any,
) -> CheckResult:
    """Resizing every group to its current width must give the model's outputs."""
    graph = graph or analyze(model, example_inputs, **analyze_kwargs)
    gm = resize(graph, graph.widths())
    diff, ok = _max_diff(_run(model, example_inputs), _run(gm, example_inputs))
    return CheckResult("identity", ok, diff)


def check_random_resize(
    model: nn.Module,
    example_inputs: Any,
    *,
    seed: int = 0,
    high: float = 2.0,
    graph: ChannelGraph | None = None,
    **analyze_kwargs: Any,
) -> CheckResult:
    """A random resize of every free group (0.25 to ``high`` times its width) runs and keeps
    the output shape."""
    graph = graph or analyze(model, example_inputs, **analyze_kwargs)
    if not graph.free:
        return CheckResult("random", True, note="no free group")
    gm = resize(graph, random_widths(graph, seed, high=high))
    ref, out = flat_tensors(_run(model, example_inputs)), flat_tensors(_run(gm, example_inputs))
    ok = len(ref) == len(out) and all(a.shape == b.shape for a, b in zip(ref, out, strict=True))
    finite = all(torch.isfinite(t).all() for t in out)
    return CheckResult("random", ok and finite, note=f"{len(graph.free)} groups resized")


def _zero(
    model: nn.Module, layouts: Mapping[str, TensorLayout], gid: int, base: np.ndarray
) -> None:
    """Zero base channels ``base`` of group ``gid`` in every parameter dim that carries them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    # weight_norm's direction is not zeroed along its dim (0/0): its magnitude zeroes the weight
    keep = {
        (f"{path}.parametrizations.weight.original1" if path else "", parametrized.norm_dim(m))
        for path, m in model.named_modules()
        if parametrized.is_parametrized(m, "weight") and parametrized.why_frozen(m) is None
    }
    for name, layout in layouts.items():
        tensor = params.get(name)
        if tensor is None:
            continue  # buffers (running statistics) may keep their values
        for d, blocks in enumerate(layout.dims):
            if (name, d) in keep:
                continue
            positions = [
                (
                    b.offset
                    + np.arange(b.outer)[:, None, None] * (b.n * b.inner)
                    + base[None, :, None] * b.inner
                    + np.arange(b.inner)[None, None, :]
                ).reshape(-1)
                for b in blocks
                if b.group == gid
            ]
            if positions:
                idx = torch.from_numpy(np.concatenate(positions)).to(tensor.device)
                with torch.no_grad():
                    tensor.index_fill_(d, idx, 0.0)


def check_zero_removal(
    model: nn.Module,
    example_inputs: Any,
    *,
    seed: int = 0,
    max_groups: int | None = None,
    inplace: bool = False,
    dtype: torch.dtype = torch.float64,
    **analyze_kwargs: Any,
) -> CheckResult:
    """Zero random channels of the free groups and shrink by exactly those: outputs unchanged.

    Channels are zeroed in every parameter of the group (producers, norms, consumers' input
    weights), so any op between them is harmless. Groups whose ops take statistics across
    channels (``exact=False``: LayerNorm, GroupNorm, softmax over channels) are skipped, as their
    output legitimately depends on the number of channels. Works in float64 on a copy of
    ``model`` (``inplace=True`` converts and zeroes ``model`` itself, to save memory).
    ``dtype=torch.float32`` halves the memory for huge models; the outputs must then agree to
    1e-3 of their scale (summation order changes with the width) instead of 1e-7.
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype={dtype}: torch.float64 or torch.float32")
    work = (model if inplace else copy.deepcopy(model)).to(dtype).eval()
    example_inputs = _double(example_inputs) if dtype == torch.float64 else example_inputs
    graph = analyze(work, example_inputs, **analyze_kwargs)
    layouts = SolutionView(graph).tensors()
    rng = np.random.default_rng(seed)
    eligible = [g for g in graph.free if g.exact and g.size // g.divisor >= 2]
    if max_groups is not None and len(eligible) > max_groups:
        pick = rng.choice(len(eligible), size=max_groups, replace=False)
        eligible = [eligible[i] for i in sorted(pick)]
    if not eligible:
        return CheckResult("zero-removal", True, note="no exact free group")
    widths = {}
    for g in eligible:
        n = g.size // g.divisor  # slots of the group (each ``divisor`` channels wide)
        k = int(rng.integers(1, n // 2 + 1))
        base = np.sort(rng.choice(n, size=k, replace=False))
        _zero(work, layouts, g.id, base)
        widths[g.id] = (n - k) * g.divisor
    _calibrate_norms(work, example_inputs)
    ref = _run(work, example_inputs)
    gm = resize(graph, widths)
    rtol = 1e-7 if dtype == torch.float64 else 1e-3
    diff, ok = _max_diff(ref, _run(gm, example_inputs), rtol=rtol)
    scale = max((float(t.abs().max()) for t in flat_tensors(ref) if t.numel()), default=0.0)
    return CheckResult(
        "zero-removal", ok, diff, note=f"{len(eligible)} groups shrunk, output scale {scale:.3g}"
    )


def _doubled_batch(value: Any) -> Any:
    """Every tensor of a (nested) input concatenated with itself along the batch dim."""
    return map_tensors(value, lambda t: torch.cat([t, t]) if t.dim() else t)


def _calibrate_norms(model: nn.Module, example_inputs: Any, min_var: float = 1e-2) -> None:
    """Set BatchNorm running statistics from the zeroed model on ``example_inputs``, then freeze.

    Zeroing channels changes the scale of later activations, so randomly initialised running
    statistics could shrink the output to nothing (a vacuous check) or blow it up. Batch
    statistics in train mode keep unit scale but are chaotic on tiny batches (a channel whose
    two samples nearly agree normalises rounding noise to +-1), so the check runs in eval mode
    with statistics measured once and the variance floored at ``min_var``. An all-zero channel
    still normalises to exactly zero.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        if m.running_mean is None or m.running_var is None:
            continue
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
        m.train()
    try:
        _run(model, example_inputs, restore_buffers=False)  # the statistics are what it wants
    except ValueError as e:  # batch 1 and a 1x1 map: no batch statistics (training-mode BN)
        if "more than 1 value per channel" not in str(e):
            raise
        # two copies of the batch: the same means and spatial variances, and a pooled map's
        # variance 0 is floored at min_var below
        _run(model, _doubled_batch(example_inputs), restore_buffers=False)
    for m, (training, momentum) in zip(norms, saved, strict=True):
        m.train(training)
        m.momentum = momentum
        if m.running_var is not None:
            m.running_var.clamp_(min=min_var)
            m.eval()


def torchvision_case(
    name: str, *, num_classes: int = 10, batch: int = 2, seed: int = 0, meta: bool = False
) -> tuple[nn.Module, torch.Tensor]:
    """A torchvision classification model (random weights, eval mode) and the smallest input
    every layer of it accepts (32x32 unless the model needs more): cheap numerical checks.

    With ``meta=True`` the parameters, buffers and input live on the ``meta`` device (no
    memory; for shape-level checks of the largest models): each is created on the CPU and
    moved at once, so at most one layer's weights exist at a time."""
    import torchvision

    torch.manual_seed(seed)
    kwargs = _TORCHVISION_ARGS.get(name, {})
    with warnings.catch_warnings(), meta_parameters(meta):
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    size = kwargs.get("image_size", _TORCHVISION_INPUT.get(name, 32))
    x = torch.randn(batch, 3, size, size)
    return model.eval(), x.to("meta") if meta else x


@contextlib.contextmanager
def meta_parameters(enabled: bool = True) -> Iterator[None]:
    """Inside the block, every parameter and buffer a module registers moves to ``meta``.

    Unlike ``with torch.device("meta")`` this lets constructors compute on real tensors
    (torchvision's RegNets derive their widths with ``torch.pow(...).tolist()``).

    Example:
        >>> with meta_parameters():
        ...     conv = nn.Conv2d(3, 8, 3)
        >>> conv.weight.device.type
        'meta'
    """
    if not enabled:
        yield
        return
    from torch.nn.modules import module as module_mod

    def param(mod: nn.Module, name: str, p: nn.Parameter | None) -> nn.Parameter | None:
        if p is None or p.device.type == "meta":
            return None
        return nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    def buffer(mod: nn.Module, name: str, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if b is None or b.device.type == "meta" else b.to("meta")

    # the hooks may return a replacement (torch's docs), though the annotations say None
    handles = [
        module_mod.register_module_parameter_registration_hook(param),  # type: ignore[arg-type]
        module_mod.register_module_buffer_registration_hook(buffer),  # type: ignore[arg-type]
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _yolo(cfg: str) -> nn.Module:
    from ultralytics.nn import tasks

    kind = cfg.removesuffix(".yaml").split("-")[-1]
    cls = {"pose": tasks.PoseModel, "seg": tasks.SegmentationModel}.get(kind, tasks.DetectionModel)
    return cls(cfg, verbose=False)


def _smp(arch: str) -> nn.Module:
    import segmentation_models_pytorch as smp

    return getattr(smp, arch)("resnet18", encoder_weights=None, classes=3)


def _monai(name: str) -> nn.Module:
    from monai.networks import nets

    if name == "UNet":
        return nets.UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    if name == "BasicUNet":
        return nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)
    return nets.SegResNet(2, init_filters=8, in_channels=1, out_channels=2)


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


_RGB, _GRAY = (1, 3, 64, 64), (1, 1, 32, 32)
#: models of other libraries (name -> package, builder, input shape): random weights, small
#: inputs; shared by ``tests/test_libraries.py`` and ``benchmarks/libraries.py``
LIBRARY_CASES: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
    "yolov8n": ("ultralytics", lambda: _yolo("yolov8n.yaml"), _RGB),
    "yolo11n": ("ultralytics", lambda: _yolo("yolo11n.yaml"), _RGB),
    "yolo11n-pose": ("ultralytics", lambda: _yolo("yolo11n-pose.yaml"), _RGB),
    "yolov8n-seg": ("ultralytics", lambda: _yolo("yolov8n-seg.yaml"), _RGB),
    "smp-unet-resnet18": ("segmentation_models_pytorch", lambda: _smp("Unet"), _RGB),
    "smp-fpn-resnet18": ("segmentation_models_pytorch", lambda: _smp("FPN"), _RGB),
    "smp-deeplabv3plus-resnet18": (
        "segmentation_models_pytorch",
        lambda: _smp("DeepLabV3Plus"),
        _RGB,
    ),
    "monai-unet": ("monai", lambda: _monai("UNet"), _GRAY),
    "monai-segresnet": ("monai", lambda: _monai("SegResNet"), _GRAY),
    "monai-basicunet": ("monai", lambda: _monai("BasicUNet"), _GRAY),
    "timm-fasternet_t0": ("timm", lambda: _timm("fasternet_t0"), _RGB),  # forward rebound
    "timm-resnetv2_50x1_bit": ("timm", lambda: _timm("resnetv2_50x1_bit"), _RGB),  # StdConv2d
    "timm-efficientnet_b0": ("timm", lambda: _timm("efficientnet_b0"), _RGB),  # drop path
    "timm-resnet50d": ("timm", lambda: _timm("resnet50d"), _RGB),
    "timm-convnext_nano": ("timm", lambda: _timm("convnext_nano"), _RGB),
    "timm-mobilenetv3_large_100": ("timm", lambda: _timm("mobilenetv3_large_100"), _RGB),
}


def library_case(name: str, *, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model of :data:`LIBRARY_CASES` (random weights, eval mode) and its input.

    Raises:
        ImportError: its library is not installed (``pip install fxconet[zoo]``).
    """
    package, make, shape = LIBRARY_CASES[name]
    importlib.import_module(package)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().eval()
    return model, torch.randn(*shape)


def check_all(
    model: nn.Module, example_inputs: Any, *, seed: int = 0, **analyze_kwargs: Any
) -> list[CheckResult]:
    """The three checks, in order (``model`` is not modified)."""
    graph = analyze(model, example_inputs, **analyze_kwargs)
    return [
        check_identity(model, example_inputs, graph=graph),
        check_random_resize(model, example_inputs, seed=seed, graph=graph),
        check_zero_removal(model, example_inputs, seed=seed, **analyze_kwargs),
    ]
