"""Spatial ops: pooling, resampling, pixel (un)shuffle and padding.

They change only the trailing spatial dims (fixed sizes), except pixel shuffles, which move a
factor ``r * r`` between the channels and space, and constant padding along the channels,
which adds fixed slots around them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fxconet.ops.layout import is_tensor, repeat_inner
from fxconet.ops.registry import builtin

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = []


@builtin(
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample,
    F.upsample_nearest, F.upsample_bilinear, F.grid_sample,
)  # fmt: skip
def _spatial(ctx: RuleContext, k: int | None = None) -> Any:
    """Ops that change only the trailing spatial dims (pooling, interpolation)."""
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    out = ctx.out
    if xd is None or not is_tensor(out):
        return ctx.opaque()
    xs = ctx.shape(x)
    if k is None:
        k = max(len(xs) - 2, 1)
    if len(out.shape) != len(xs) or tuple(out.shape[:-k]) != xs[:-k]:
        return ctx.opaque(f"{ctx.describe()} changes non-spatial dims")
    return (*xd[:-k], *ctx.fixed_dims(out.shape[-k:], "spatial dim"))


@builtin(
    nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
    F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d,
)  # fmt: skip
def _spatial_1d(ctx: RuleContext) -> Any:
    return _spatial(ctx, 1)


@builtin(
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
    nn.FractionalMaxPool2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.lp_pool2d, torch._C._nn.avg_pool2d,
)  # fmt: skip
def _spatial_2d(ctx: RuleContext) -> Any:
    return _spatial(ctx, 2)


@builtin(
    nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.max_pool3d,
    F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d, torch._C._nn.avg_pool3d,
)  # fmt: skip
def _spatial_3d(ctx: RuleContext) -> Any:
    return _spatial(ctx, 3)


@builtin(
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)  # fmt: skip
def _pad_module(ctx: RuleContext) -> Any:
    """Padding modules pad only the trailing ``len(padding) // 2`` (spatial) dims."""
    padding = getattr(ctx.module, "padding", None)
    if not isinstance(padding, tuple | list):
        return ctx.opaque(f"{ctx.describe()}: padding {padding!r} is not a tuple")
    return _spatial(ctx, len(padding) // 2)


@builtin(nn.PixelShuffle, F.pixel_shuffle)
def _pixel_shuffle(ctx: RuleContext) -> Any:
    r = ctx.module.upscale_factor if ctx.module is not None else ctx.arg(1, "upscale_factor")
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or not isinstance(r, int) or len(xd) < 3:
        return ctx.opaque()
    u = ctx.factor(xd[-3], 1, r * r)
    lc = u if u is not None else ctx.fixed(ctx.out.shape[-3])
    return (*xd[:-3], lc, *ctx.fixed_dims(ctx.out.shape[-2:], "spatial dim"))


@builtin(nn.PixelUnshuffle, F.pixel_unshuffle)
def _pixel_unshuffle(ctx: RuleContext) -> Any:
    r = ctx.module.downscale_factor if ctx.module is not None else ctx.arg(1, "downscale_factor")
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or not isinstance(r, int) or len(xd) < 3:
        return ctx.opaque()
    return (
        *xd[:-3],
        repeat_inner(xd[-3], r * r),
        *ctx.fixed_dims(ctx.out.shape[-2:], "spatial dim"),
    )


@builtin(F.pad)
def _pad(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    pad = ctx.arg(1, "pad")
    mode = ctx.arg(2, "mode", "constant")
    if xd is None or not isinstance(pad, list | tuple) or not all(isinstance(p, int) for p in pad):
        return ctx.opaque()
    n = len(xd)
    out = list(xd)
    for j in range(len(pad) // 2):
        d = n - 1 - j
        before, after = pad[2 * j], pad[2 * j + 1]
        if before == 0 and after == 0:
            continue
        layout = xd[d]
        if not ctx.variable(layout):
            out[d] = ctx.fixed(ctx.out.shape[d], "padded dim")
        elif mode == "constant" and before >= 0 and after >= 0:
            # padding channels with constants: the pads are fixed slots around the channels
            parts: tuple = ()
            if before:
                parts += ctx.fixed(before, "channel padding")
            parts += layout
            if after:
                parts += ctx.fixed(after, "channel padding")
            out[d] = parts
        else:
            ctx.freeze(layout, reason=f"{ctx.describe()} pads channels with mode {mode!r}")
            out[d] = ctx.fixed(ctx.out.shape[d], "padded dim")
    return tuple(out)
