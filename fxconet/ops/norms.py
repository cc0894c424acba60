"""Normalisation layers: batch/instance norm, layer norm, group norm, PReLU.

Their per-channel parameters and statistics are tied to the input's channels. Norms that take
statistics across channels (LayerNorm over the channel dim, GroupNorm) mark them inexact;
GroupNorm keeps whole groups (a width is a number of groups times the group size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fxconet.ops.layout import Layout, SizeOf
from fxconet.ops.registry import builtin

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = []


def _update_batch_norm(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.num_features = size_of(notes["layouts"][0])


@builtin(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, update=_update_batch_norm,
)  # fmt: skip
def _batch_norm(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or len(xd) < 2:
        return ctx.opaque()
    lc = xd[1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        p = ctx.param(name, like=(lc,))
        if p is not None:
            ctx.tie(p[0], lc)
    layer = ctx.layer("norm")
    layer.in_layout = layer.out_layout = lc
    layer.notes["layouts"] = (lc,)
    return xd


@builtin(F.batch_norm, F.instance_norm)
def _functional_batch_norm(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or len(xd) < 2:
        return ctx.opaque()
    for idx, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        a = ctx.arg(idx, name)
        d = ctx.dims(a) if isinstance(a, torch.fx.Node) else None
        if d is not None:
            ctx.tie(d[0], xd[1])
    for k, layout in enumerate(xd):
        if k != 1 and ctx.variable(layout):
            # statistics over these dims (weight standardisation: the input channels)
            ctx.inexact(layout)
    return xd


def _update_layer_norm(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.normalized_shape = tuple(size_of(layout) for layout in notes["layouts"])


@builtin(nn.LayerNorm, update=_update_layer_norm)
def _layer_norm(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.LayerNorm)  # the rule is registered for LayerNorm and subclasses
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    k = len(m.normalized_shape)
    norm = xd[len(xd) - k :]
    for j, layout in enumerate(norm):
        ctx.inexact(layout)
        for name in ("weight", "bias"):
            p = ctx.param(name, like=tuple(norm))
            if p is not None:
                ctx.tie(p[j], layout)
    layer = ctx.layer("norm")
    layer.in_layout = layer.out_layout = norm[-1]
    layer.notes["layouts"] = tuple(norm)
    return xd


@builtin(F.layer_norm)
def _functional_layer_norm(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    shape = ctx.arg(1, "normalized_shape")
    if (
        xd is None
        or not isinstance(shape, list | tuple)
        or not all(isinstance(s, int) for s in shape)
    ):
        return ctx.opaque()
    k = len(shape)
    norm = xd[len(xd) - k :]
    for idx, name in ((2, "weight"), (3, "bias")):
        a = ctx.arg(idx, name)
        d = ctx.dims(a) if isinstance(a, torch.fx.Node) else None
        if d is not None:
            for j in range(k):
                ctx.tie(d[j], norm[j])
    for layout in norm:
        ctx.inexact(layout)
    if any(ctx.variable(layout) for layout in norm):
        args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

        def fix(size_of: SizeOf) -> dict[str, Any]:
            new = [size_of(layout) for layout in norm]
            if len(args) > 1:
                return {"args": (args[0], type(shape)(new), *args[2:])}
            return {"kwargs": {**kwargs, "normalized_shape": type(shape)(new)}}

        ctx.rewrite(fix)
    return xd


def _update_group_norm(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    c = size_of(notes["layouts"][0])
    m.num_channels = c
    if notes["groups"] != 1:
        m.num_groups = c // notes["per_group"]


@builtin(nn.GroupNorm, update=_update_group_norm)
def _group_norm(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.GroupNorm)
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or len(xd) < 2:
        return ctx.opaque()
    lc = xd[1]
    g, c = m.num_groups, m.num_channels
    _group_structure(ctx, lc, g, c)
    for name in ("weight", "bias"):
        p = ctx.param(name, like=(lc,))
        if p is not None:
            ctx.tie(p[0], lc)
    layer = ctx.layer("norm")
    layer.in_layout = layer.out_layout = lc
    layer.notes.update(layouts=(lc,), per_group=c // g, groups=g)
    return xd


def _group_structure(ctx: RuleContext, lc: Layout, g: int, c: int) -> None:
    """GroupNorm keeps whole groups: a width is a number of groups times the group size."""
    if g == 1:
        ctx.inexact(lc)  # statistics over every channel
    elif g != c and ctx.factor(lc, 1, c // g) is None:
        ctx.freeze(lc, reason=f"{ctx.describe()}: channels are not whole groups")


@builtin(F.group_norm)
def _functional_group_norm(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    g = ctx.arg(1, "num_groups")
    if xd is None or len(xd) < 2 or not isinstance(g, int):
        return ctx.opaque()
    c = ctx.shape(x)[1]
    lc = xd[1]
    _group_structure(ctx, lc, g, c)
    for idx, name in ((2, "weight"), (3, "bias")):
        a = ctx.arg(idx, name)
        d = ctx.dims(a) if isinstance(a, torch.fx.Node) else None
        if d is not None:
            ctx.tie(d[0], lc)
    if g not in (1, c) and ctx.variable(lc):
        per = c // g
        args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

        def fix(size_of: SizeOf) -> dict[str, Any]:
            new_g = size_of(lc) // per
            if len(args) > 1:
                return {"args": (args[0], new_g, *args[2:])}
            return {"kwargs": {**kwargs, "num_groups": new_g}}

        ctx.rewrite(fix)
    elif g == c and ctx.variable(lc):
        args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

        def fix_all(size_of: SizeOf) -> dict[str, Any]:
            if len(args) > 1:
                return {"args": (args[0], size_of(lc), *args[2:])}
            return {"kwargs": {**kwargs, "num_groups": size_of(lc)}}

        ctx.rewrite(fix_all)
    return xd


def _update_prelu(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.num_parameters = size_of(notes["layouts"][0])


@builtin(nn.PReLU, update=_update_prelu)
def _prelu(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.PReLU)
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    if m.num_parameters == 1:
        return xd
    if len(xd) < 2:
        return ctx.opaque()
    w = ctx.param("weight")
    if w is None:
        return ctx.opaque(f"{ctx.describe()}: PReLU without a weight")
    ctx.tie(w[0], xd[1])
    layer = ctx.layer("norm")
    layer.notes["layouts"] = (xd[1],)
    return xd
