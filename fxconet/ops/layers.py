"""Layers that choose widths: convolutions (plain, grouped, depthwise, transposed), linear
layers and embeddings, as modules and as functions on raw parameters (``F.conv2d(x, w)``).

A conv's output dim is a new channel space (``ctx.produce``: the paper's *conv* edge) unless it
is depthwise (``groups == in_channels``: the output is the input's channels, repeated by the
channel multiplier). Grouped convs see their input as ``groups`` copies of a per-group slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fxconet.ops.layout import Layout, SizeOf, is_tensor, repeat_inner, repeat_outer
from fxconet.ops.registry import builtin

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = []


def _conv_core(
    ctx: RuleContext,
    x: Any,
    w: tuple[Layout, ...],
    bias: tuple[Layout, ...] | None,
    groups: int,
    spatial: int,
    transposed: bool,
    stride: Any = 1,
) -> tuple[Any, Layout, Layout, int | None]:
    """Shared by conv modules and functional convs: returns (out dims, in, out, dw multiplier)."""
    xd = ctx.dims(x)
    xs = ctx.shape(x)
    cdim = len(xs) - spatial - 1
    if xd is None or cdim < 0:
        return ctx.opaque(), (), (), None
    lin = xd[cdim]
    cin = xs[cdim]
    multiplier = None
    if not transposed:
        cout = ctx.out.shape[cdim]
        if groups == 1:
            ctx.tie(lin, w[1])
            lout = w[0]
            ctx.produce(lout)
        elif groups == cin and cout % cin == 0:  # depthwise: output slot = input slot
            multiplier = cout // cin
            lout = repeat_inner(lin, multiplier)
            ctx.tie(w[0], lout)
        else:
            ctx.tie(lin, repeat_outer(w[1], groups))
            if ctx.factor(w[0], groups, 1) is None:
                ctx.freeze(lin, reason=f"{ctx.describe()}: grouped conv with uneven groups")
            lout = w[0]
            ctx.produce(lout)
    else:
        cout = ctx.out.shape[cdim]
        if groups == 1:
            ctx.tie(lin, w[0])
            lout = w[1]
            ctx.produce(lout)
        elif groups == cin and cout % cin == 0:
            multiplier = cout // cin
            ctx.tie(lin, w[0])
            lout = repeat_inner(lin, multiplier)
        else:
            ctx.factor(w[0], groups, 1)
            ctx.tie(lin, w[0])
            lout = repeat_outer(w[1], groups)
            ctx.produce(w[1])
    if bias is not None:
        ctx.tie(bias[0], lout)
    strides = (stride,) * spatial if isinstance(stride, int) else tuple(stride)
    spatial_dims = []
    for k, d in enumerate(range(cdim + 1, len(xs))):
        size = ctx.out.shape[d]
        layout = xd[d]
        if not transposed and strides[k] == 1 and size == xs[d] and ctx.variable(layout):
            # a conv sliding along channels (ECA attention: conv1d over pooled channels) keeps
            # their number; neighbouring channels mix, so removal is not exact
            ctx.inexact(layout)
            spatial_dims.append(layout)
        else:
            spatial_dims.append(ctx.fixed(size, "spatial dim"))
    return (*xd[:cdim], lout, *spatial_dims), lin, lout, multiplier


def _update_conv(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    lin, lout = notes["layouts"]
    m.in_channels = size_of(lin)
    m.out_channels = size_of(lout)
    if notes.get("multiplier") is not None:
        m.groups = m.in_channels


@builtin(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    update=_update_conv,
)  # fmt: skip
def _conv_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.modules.conv._ConvNd)
    transposed = bool(m.transposed)
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or not is_tensor(ctx.out):
        return ctx.opaque()
    spatial = len(m.kernel_size)
    # an ungrouped conv's input dim is the input's channel layout: the weight takes it directly
    # (tying a fresh one would split it once per block of a concatenation, then link each part)
    cdim = len(xd) - spatial - 1
    like = None
    if m.groups == 1 and cdim >= 0:
        like = (xd[cdim], None) if transposed else (None, xd[cdim])
        like = (*like, *([None] * spatial))
    w = ctx.param("weight", like=like)
    b = ctx.param("bias")
    if w is None:
        return ctx.opaque(f"{ctx.describe()}: a convolution without a weight")
    out, lin, lout, mult = _conv_core(ctx, x, w, b, m.groups, spatial, transposed, m.stride)
    if mult is not None:
        kind = "depthwise"
    else:
        kind = "conv_transpose" if transposed else "conv"
    layer = ctx.layer(kind)
    layer.in_layout, layer.out_layout = lin, lout
    layer.notes.update(multiplier=mult, layouts=(lin, lout))
    if mult is None:
        ctx.role("weight", 0 if not transposed else 1, "out")
        ctx.role("weight", 1 if not transposed else 0, "in")
    else:
        ctx.role("weight", 0, "out")
    if b is not None:
        ctx.role("bias", 0, "out")
    return out


def _functional_conv(spatial: int, transposed: bool) -> Callable[[RuleContext], Any]:
    # F.convNd(input, weight, bias, stride, padding, dilation, groups)
    # F.conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, dilation)
    gpos = 6

    def rule(ctx: RuleContext) -> Any:
        x, wnode, bnode = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
        groups = ctx.arg(gpos, "groups", 1)
        w = ctx.dims(wnode)
        if w is None or ctx.dims(x) is None or not isinstance(groups, int):
            return ctx.opaque()
        b = ctx.dims(bnode) if isinstance(bnode, torch.fx.Node) else None
        stride = ctx.arg(3, "stride", 1)
        if not isinstance(stride, int | tuple | list):
            return ctx.opaque()
        out, lin, lout, mult = _conv_core(ctx, x, w, b, groups, spatial, transposed, stride)
        kind = "depthwise" if mult is not None else ("conv_transpose" if transposed else "conv")
        ctx.raw_layer(wnode, bnode, kind, lin, lout)
        if mult is not None and ctx.variable(lin):
            args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

            def fix_groups(size_of: SizeOf) -> dict[str, Any]:
                if len(args) > gpos:
                    return {"args": (*args[:gpos], size_of(lin), *args[gpos + 1 :])}
                return {"kwargs": {**kwargs, "groups": size_of(lin)}}

            ctx.rewrite(fix_groups)
        return out

    return rule


for _fn, _spatial, _transposed in (
    (F.conv1d, 1, False), (F.conv2d, 2, False), (F.conv3d, 3, False),
    (F.conv_transpose1d, 1, True), (F.conv_transpose2d, 2, True), (F.conv_transpose3d, 3, True),
):  # fmt: skip
    builtin(_fn)(_functional_conv(_spatial, _transposed))


def _update_linear(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    lin, lout = notes["layouts"]
    m.in_features = size_of(lin)
    m.out_features = size_of(lout)


@builtin(nn.Linear, update=_update_linear)
def _linear_module(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or not xd:
        return ctx.opaque()
    w = ctx.param("weight")
    b = ctx.param("bias")
    if w is None:
        return ctx.opaque(f"{ctx.describe()}: a linear layer without a weight")
    ctx.tie(xd[-1], w[1])
    ctx.produce(w[0])
    if b is not None:
        ctx.tie(b[0], w[0])
        ctx.role("bias", 0, "out")
    ctx.role("weight", 0, "out")
    ctx.role("weight", 1, "in")
    layer = ctx.layer("linear")
    layer.in_layout, layer.out_layout = xd[-1], w[0]
    layer.notes["layouts"] = (xd[-1], w[0])
    return (*xd[:-1], w[0])


@builtin(F.linear)
def _functional_linear(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    wnode = ctx.arg(1, "weight")
    bnode = ctx.arg(2, "bias")
    xd, w = ctx.dims(x), ctx.dims(wnode)
    if xd is None or w is None or len(w) != 2:
        return ctx.opaque()
    ctx.tie(xd[-1], w[1])
    ctx.produce(w[0])
    bd = ctx.dims(bnode) if isinstance(bnode, torch.fx.Node) else None
    if bd is not None:
        ctx.tie(bd[0], w[0])
    ctx.raw_layer(wnode, bnode, "linear", xd[-1], w[0])
    return (*xd[:-1], w[0])


def _update_embedding(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.embedding_dim = size_of(notes["layouts"][0])


@builtin(nn.Embedding, update=_update_embedding)
def _embedding(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    w = ctx.param("weight")
    if w is None:
        return ctx.opaque(f"{ctx.describe()}: an embedding without a weight")
    ctx.produce(w[1])
    ctx.role("weight", 1, "out")
    layer = ctx.layer("linear")
    layer.out_layout = w[1]
    layer.notes["layouts"] = (w[1],)
    return (*xd, w[1])


@builtin(nn.MultiheadAttention)
def _attention(ctx: RuleContext) -> Any:
    return ctx.opaque(
        f"{ctx.describe()}: nn.MultiheadAttention ties its embedding width to its heads"
    )
