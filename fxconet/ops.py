"""The op table: how every module type and function treats channels.

One rule per single op, keyed by module type, function or tensor-method name (never by chains of
ops). A rule is a function ``rule(ctx) -> outputs`` over a
:class:`fxconet.passes.solve_channels.RuleContext`: it reads the per-dim layouts of its inputs,
relates them (``ctx.tie``), creates new widths (``ctx.produce``), freezes what it cannot handle
(``ctx.freeze``/``ctx.opaque``) and returns the per-dim layouts of its output. Rules for modules
with parameters also give an ``update`` function that sets the module's attributes
(``in_channels``, ``num_features`` ...) once its parameters have been resized.

Users extend the table with :func:`register_op`. A rule for a module with per-channel
parameters ties them to the channels and says how to update the module once resized::

    class ChannelScale(nn.Module):            # y = x * weight[None, :, None, None]
        def __init__(self, channels):
            super().__init__()
            self.channels = channels
            self.weight = nn.Parameter(torch.ones(channels))

    def channel_scale(ctx):
        dims = ctx.dims(ctx.arg(0))           # one layout per dim of the input
        ctx.tie(ctx.param("weight")[0], dims[1])
        ctx.layer("norm").notes["layouts"] = (dims[1],)
        return dims                           # the output has the input's channels

    def update(module, size_of, notes):
        module.channels = size_of(notes["layouts"][0])

    fxconet.register_op(ChannelScale, channel_scale, update=update)
    graph = fxconet.analyze(model, x, leaf_modules=[ChannelScale])
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fxconet.errors import UnsupportedOpError

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = ["OpRule", "lookup", "register_op", "registered_ops"]

Layout = tuple[tuple[int, int, int], ...]
SizeOf = Callable[[Layout], int]


@dataclass(frozen=True)
class OpRule:
    """A channel rule and, for modules with parameters, how to update their attributes."""

    channels: Callable[[RuleContext], Any]
    update: Callable[[Any, SizeOf, dict[str, Any]], None] | None = None
    name: str = ""

    def __call__(self, ctx: RuleContext) -> Any:
        out = self.channels(ctx)
        if self.update is not None and ctx.path is not None and ctx.path in ctx.solver.layers:
            ctx.solver.layers[ctx.path].update = self.update
        return out


_MODULES: dict[type, OpRule] = {}
_FUNCTIONS: dict[Any, OpRule] = {}
_METHODS: dict[str, OpRule] = {}


def lookup(node: torch.fx.Node, module: nn.Module | None) -> OpRule | None:
    """The rule for a node, or None when the op is unknown (the caller freezes it)."""
    if node.op == "call_module":
        assert module is not None
        for cls in type(module).__mro__:
            rule = _MODULES.get(cls)
            if rule is not None:
                return rule
            if "forward" in cls.__dict__:  # a subclass with its own forward is a new op
                return None
        return None
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


def registered_ops() -> dict[str, list[str]]:
    """Names of the module types, functions and methods with a channel rule."""
    return {
        "modules": sorted(t.__name__ for t in _MODULES),
        "functions": sorted({getattr(f, "__name__", str(f)) for f in _FUNCTIONS}),
        "methods": sorted(_METHODS),
    }


def register_op(
    target: type | Callable[..., Any] | str,
    rule: str | Callable[[RuleContext], Any],
    *,
    update: Callable[[nn.Module, SizeOf, dict[str, Any]], None] | None = None,
) -> None:
    """Declare how a module type, function or tensor method treats channels.

    Args:
        target: an ``nn.Module`` subclass (mark it a leaf too: ``leaf_modules=[MyMod]``), a
            function called in ``forward`` (e.g. one wrapped with ``torch.fx.wrap``), or a tensor
            method name such as ``"my_method"``.
        rule: ``"same"`` (channels pass through unchanged: the output has the input's shape and
            channels; parameters, if any, do not depend on the channels), ``"elementwise"``
            (broadcasting op over several tensors), ``"opaque"`` (freeze every channel the op
            touches), or a function ``rule(ctx)`` returning the output layouts (see the module
            docstring and ``fxconet/ops.py`` for examples).
        update: for module types with parameters resized by a custom rule:
            ``update(module, size_of, notes)`` sets the module's attributes after resizing.

    Example:
        >>> fxconet.register_op(MySwish, "same")
        >>> graph = fxconet.analyze(model, x, leaf_modules=[MySwish])
    """
    if isinstance(rule, str):
        shorthand = {"same": _same_checked, "elementwise": elementwise, "opaque": _opaque}
        if rule not in shorthand:
            raise UnsupportedOpError(
                f"register_op({_name(target)}): unknown rule {rule!r}; use one of "
                f"{sorted(shorthand)} or a function rule(ctx)"
            )
        fn: Callable[[RuleContext], Any] = shorthand[rule]
    elif callable(rule):
        fn = rule
    else:
        raise UnsupportedOpError(
            f"register_op({_name(target)}): rule must be a string or a callable, got {rule!r}"
        )
    entry = OpRule(fn, update, name=_name(target))
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise UnsupportedOpError(f"register_op: {target!r} is a class but not an nn.Module")
        _MODULES[target] = entry
    elif isinstance(target, str):
        _METHODS[target] = entry
    elif callable(target):
        _FUNCTIONS[target] = entry
    else:
        raise UnsupportedOpError(f"register_op: cannot register {target!r}")


def _name(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)


def _reg(targets: Any, fn: Callable[[RuleContext], Any], update: Any = None) -> None:
    for t in targets if isinstance(targets, list | tuple) else [targets]:
        register_op(t, fn, update=update)


# ---------------------------------------------------------------------------------------------
# helpers


def _first_tensor(ctx: RuleContext) -> Any:
    for a in ctx.tensor_args():
        return a
    return None


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _variable(ctx: RuleContext, layout: Layout) -> bool:
    return not ctx.slots.is_fixed(layout)


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _outer(layout: Layout, times: int) -> Layout:
    """``layout`` repeated ``times`` times (outer repetition)."""
    if times == 1:
        return layout
    if len(layout) == 1:
        o, v, i = layout[0]
        return ((o * times, v, i),)
    return layout * times


def _inner(layout: Layout, times: int) -> Layout:
    """Every channel of ``layout`` repeated ``times`` times in place (inner repetition)."""
    if times == 1:
        return layout
    return tuple((o, v, i * times) for o, v, i in layout)


def _opaque(ctx: RuleContext) -> Any:
    return ctx.opaque()


def _same_checked(ctx: RuleContext) -> Any:
    """``"same"`` shorthand for user ops; refuses modules with channel-sized parameters."""
    x = _first_tensor(ctx)
    if x is None or not _is_tensor(ctx.out) or tuple(ctx.out.shape) != ctx.shape(x):
        return ctx.opaque(f"{ctx.describe()} was registered as 'same' but changes the shape")
    if ctx.module is not None and any(
        p.dim() > 0 and p.numel() > 1 for p in ctx.module.parameters()
    ):
        return ctx.opaque(
            f"{ctx.describe()} has parameters; a 'same' rule cannot resize them: register a "
            "rule that binds them with ctx.param(...)"
        )
    return ctx.dims(x)


# ---------------------------------------------------------------------------------------------
# shape-preserving and elementwise ops


def same(ctx: RuleContext) -> Any:
    """Output has the first tensor input's shape and channels (activations, dropout, casts)."""
    x = _first_tensor(ctx)
    if x is None or not _is_tensor(ctx.out):
        return ctx.opaque() if _is_tensor(ctx.out) else None
    if tuple(ctx.out.shape) != ctx.shape(x):
        return ctx.opaque(
            f"{ctx.describe()} changes the shape {ctx.shape(x)} -> {tuple(ctx.out.shape)}"
        )
    return ctx.dims(x)


def elementwise(ctx: RuleContext) -> Any:
    """Broadcasting op: equal-size dims are tied, a size-1 dim broadcast against a larger one is
    frozen (resizing it would change the broadcast)."""
    out = ctx.out
    if not _is_tensor(out):
        _freeze_compared_sizes(ctx)
        return None
    oshape = tuple(out.shape)
    n = len(oshape)
    result: list[Layout | None] = [None] * n
    for a in ctx.tensor_args():
        d = ctx.dims(a)
        s = ctx.shape(a)
        off = n - len(s)
        for k, size in enumerate(s):
            od = off + k
            if od < 0:
                continue
            if size == oshape[od]:
                if result[od] is None:
                    result[od] = d[k]
                else:
                    ctx.tie(result[od], d[k])
            elif size == 1:
                ctx.freeze(
                    d[k],
                    reason=f"size-1 dim broadcast against {oshape[od]} at {ctx.describe()}",
                )
    return tuple(
        r if r is not None else ctx.fixed(oshape[i], "broadcast dim") for i, r in enumerate(result)
    )


def _freeze_compared_sizes(ctx: RuleContext) -> None:
    """``x.size(1) == 64`` style checks pin the measured width."""
    if ctx.node.target not in (
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
    ):
        return
    for a in ctx.node.args:
        p = ctx.provenance(a)
        if p is not None and isinstance(p, tuple) and p and isinstance(p[0], tuple):
            ctx.freeze_dims(p, f"its size is compared with a constant at {ctx.describe()}")


def _like(ctx: RuleContext) -> Any:
    """``zeros_like(x)`` and friends: same channels as ``x``, no constraint."""
    x = ctx.arg(0, "input")
    d = ctx.dims(x)
    if d is None or not _is_tensor(ctx.out) or tuple(ctx.out.shape) != ctx.shape(x):
        return ctx.fixed_like(ctx.out)
    return d


def _inexact_dim(
    ctx: RuleContext, dim_index: int = 1, dim_name: str = "dim", default: Any = None
) -> Any:
    x = _first_tensor(ctx)
    d = ctx.dims(x)
    if d is None:
        return ctx.opaque()
    dim = ctx.arg(dim_index, dim_name, default)
    if dim is None and ctx.module is not None:
        dim = getattr(ctx.module, "dim", None)
    if dim is None:
        for layout in d:
            ctx.inexact(layout)
    elif isinstance(dim, int):
        ctx.inexact(d[_norm_dim(dim, len(d))])
    return same(ctx)


def softmax(ctx: RuleContext) -> Any:
    """Softmax-like ops: channels pass through, but removing one changes the others."""
    return _inexact_dim(ctx)


# ---------------------------------------------------------------------------------------------
# layers that choose widths


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
            lout = _inner(lin, multiplier)
            ctx.tie(w[0], lout)
        else:
            ctx.tie(lin, _outer(w[1], groups))
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
            lout = _inner(lin, multiplier)
        else:
            ctx.factor(w[0], groups, 1)
            ctx.tie(lin, w[0])
            lout = _outer(w[1], groups)
            ctx.produce(w[1])
    if bias is not None:
        ctx.tie(bias[0], lout)
    strides = (stride,) * spatial if isinstance(stride, int) else tuple(stride)
    spatial_dims = []
    for k, d in enumerate(range(cdim + 1, len(xs))):
        size = ctx.out.shape[d]
        layout = xd[d]
        if not transposed and strides[k] == 1 and size == xs[d] and _variable(ctx, layout):
            # a conv sliding along channels (ECA attention: conv1d over pooled channels) keeps
            # their number; neighbouring channels mix, so removal is not exact
            ctx.inexact(layout)
            spatial_dims.append(layout)
        else:
            spatial_dims.append(ctx.fixed(size, "spatial dim"))
    return (*xd[:cdim], lout, *spatial_dims), lin, lout, multiplier


def _conv_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.modules.conv._ConvNd)
    transposed = bool(m.transposed)
    x = ctx.arg(0, "input")
    if ctx.dims(x) is None or not _is_tensor(ctx.out):
        return ctx.opaque()
    w = ctx.param("weight")
    b = ctx.param("bias")
    spatial = len(m.kernel_size)
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


def _update_conv(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    lin, lout = notes["layouts"]
    m.in_channels = size_of(lin)
    m.out_channels = size_of(lout)
    if notes.get("multiplier") is not None:
        m.groups = m.in_channels


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
        _mark_param_roles(ctx, wnode, bnode, kind, lin, lout)
        if mult is not None and _variable(ctx, lin):
            args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

            def fix_groups(size_of: SizeOf) -> dict[str, Any]:
                if len(args) > gpos:
                    return {"args": (*args[:gpos], size_of(lin), *args[gpos + 1 :])}
                return {"kwargs": {**kwargs, "groups": size_of(lin)}}

            ctx.rewrite(fix_groups)
        return out

    return rule


def _mark_param_roles(
    ctx: RuleContext,
    wnode: Any,
    bnode: Any,
    kind: str,
    lin: Layout | None,
    lout: Layout | None,
) -> None:
    """Raw parameters used by functional convs/linears become a layer like a module's weight:
    in/out roles, the bias attached to the weight's layer, and the layer's channel layouts."""
    solver = ctx.solver

    def record(node: Any) -> Any:
        if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
            return None
        return next((r for r in solver.params.values() if r.path == str(node.target)), None)

    w, b = record(wnode), record(bnode)
    if w is None:
        return
    producer = kind != "depthwise"
    if kind == "depthwise":
        w.roles[0] = "out"
    elif kind == "conv_transpose":
        w.roles.update({0: "in", 1: "out"})
    else:
        w.roles.update({0: "out", 1: "in"})
    w.producer = producer
    layer = solver.layers[w.path]
    layer.kind, layer.in_layout, layer.out_layout = kind, lin, lout
    layer.notes["layouts"] = tuple(x for x in (lin, lout) if x is not None)
    if b is not None:
        b.roles[0] = "out"
        b.producer = producer
        if b.path in solver.layers and solver.layers[b.path].kind == "param":
            del solver.layers[b.path]
        layer.params["bias"] = id(b.tensor)


def _linear_module(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or not xd:
        return ctx.opaque()
    w = ctx.param("weight")
    b = ctx.param("bias")
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


def _update_linear(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    lin, lout = notes["layouts"]
    m.in_features = size_of(lin)
    m.out_features = size_of(lout)


def _functional_linear(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    wnode = ctx.arg(1, "weight")
    bnode = ctx.arg(2, "bias")
    xd, w = ctx.dims(x), ctx.dims(wnode)
    if xd is None or w is None or len(w) != 2:
        return ctx.opaque()
    ctx.tie(xd[-1], w[1])
    ctx.produce(w[0])
    if isinstance(bnode, torch.fx.Node) and ctx.dims(bnode) is not None:
        ctx.tie(ctx.dims(bnode)[0], w[0])
    _mark_param_roles(ctx, wnode, bnode, "linear", xd[-1], w[0])
    return (*xd[:-1], w[0])


def _embedding(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    w = ctx.param("weight")
    ctx.produce(w[1])
    ctx.role("weight", 1, "out")
    layer = ctx.layer("linear")
    layer.out_layout = w[1]
    layer.notes["layouts"] = (w[1],)
    return (*xd, w[1])


def _update_embedding(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.embedding_dim = size_of(notes["layouts"][0])


# ---------------------------------------------------------------------------------------------
# normalisation


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


def _update_batch_norm(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.num_features = size_of(notes["layouts"][0])


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
    return xd


def _layer_norm(ctx: RuleContext) -> Any:
    m = ctx.module
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


def _update_layer_norm(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.normalized_shape = tuple(size_of(layout) for layout in notes["layouts"])


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
    if any(_variable(ctx, layout) for layout in norm):
        args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

        def fix(size_of: SizeOf) -> dict[str, Any]:
            new = [size_of(layout) for layout in norm]
            if len(args) > 1:
                return {"args": (args[0], type(shape)(new), *args[2:])}
            return {"kwargs": {**kwargs, "normalized_shape": type(shape)(new)}}

        ctx.rewrite(fix)
    return xd


def _group_norm(ctx: RuleContext) -> Any:
    m = ctx.module
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


def _update_group_norm(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    c = size_of(notes["layouts"][0])
    m.num_channels = c
    if notes["groups"] != 1:
        m.num_groups = c // notes["per_group"]


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
    if g not in (1, c) and _variable(ctx, lc):
        per = c // g
        args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

        def fix(size_of: SizeOf) -> dict[str, Any]:
            new_g = size_of(lc) // per
            if len(args) > 1:
                return {"args": (args[0], new_g, *args[2:])}
            return {"kwargs": {**kwargs, "num_groups": new_g}}

        ctx.rewrite(fix)
    elif g == c and _variable(ctx, lc):
        args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

        def fix_all(size_of: SizeOf) -> dict[str, Any]:
            if len(args) > 1:
                return {"args": (args[0], size_of(lc), *args[2:])}
            return {"kwargs": {**kwargs, "num_groups": size_of(lc)}}

        ctx.rewrite(fix_all)
    return xd


def _prelu(ctx: RuleContext) -> Any:
    m = ctx.module
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    if m.num_parameters == 1:
        return xd
    if len(xd) < 2:
        return ctx.opaque()
    w = ctx.param("weight")
    ctx.tie(w[0], xd[1])
    layer = ctx.layer("norm")
    layer.notes["layouts"] = (xd[1],)
    return xd


def _update_prelu(m: Any, size_of: SizeOf, notes: dict[str, Any]) -> None:
    m.num_parameters = size_of(notes["layouts"][0])


# ---------------------------------------------------------------------------------------------
# spatial ops: pooling, resampling, pixel shuffle, padding


def _spatial(ctx: RuleContext, k: int | None = None) -> Any:
    """Ops that change only the trailing spatial dims (pooling, interpolation)."""
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    out = ctx.out
    if xd is None or not _is_tensor(out):
        return ctx.opaque()
    xs = ctx.shape(x)
    if k is None:
        k = max(len(xs) - 2, 1)
    if len(out.shape) != len(xs) or tuple(out.shape[:-k]) != xs[:-k]:
        return ctx.opaque(f"{ctx.describe()} changes non-spatial dims")
    return (*xd[:-k], *ctx.fixed_dims(out.shape[-k:], "spatial dim"))


def _spatial_k(k: int) -> Callable[[RuleContext], Any]:
    return lambda ctx: _spatial(ctx, k)


def _pixel_shuffle(ctx: RuleContext) -> Any:
    r = ctx.module.upscale_factor if ctx.module is not None else ctx.arg(1, "upscale_factor")
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or not isinstance(r, int) or len(xd) < 3:
        return ctx.opaque()
    u = ctx.factor(xd[-3], 1, r * r)
    lc = u if u is not None else ctx.fixed(ctx.out.shape[-3])
    return (*xd[:-3], lc, *ctx.fixed_dims(ctx.out.shape[-2:], "spatial dim"))


def _pixel_unshuffle(ctx: RuleContext) -> Any:
    r = ctx.module.downscale_factor if ctx.module is not None else ctx.arg(1, "downscale_factor")
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    if xd is None or not isinstance(r, int) or len(xd) < 3:
        return ctx.opaque()
    return (*xd[:-3], _inner(xd[-3], r * r), *ctx.fixed_dims(ctx.out.shape[-2:], "spatial dim"))


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
        if not _variable(ctx, layout):
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


# ---------------------------------------------------------------------------------------------
# concatenation, splitting, indexing


def _cat(ctx: RuleContext) -> Any:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    if not isinstance(tensors, list | tuple) or not isinstance(dim, int) or not _is_tensor(ctx.out):
        return ctx.opaque()
    n = ctx.out.dim()
    dim = _norm_dim(dim, n)
    parts: list[tuple[int, int, int]] = []
    result: list[Layout | None] = [None] * n
    for t in tensors:
        d = ctx.dims(t)
        if d is None:
            return ctx.opaque()
        if len(d) != n:  # legacy empty-tensor concat
            continue
        for k in range(n):
            if k == dim:
                continue
            if result[k] is None:
                result[k] = d[k]
            else:
                ctx.tie(result[k], d[k])
        parts.extend(d[dim])
    result[dim] = tuple(parts)
    return tuple(r if r is not None else ctx.fixed(ctx.out.shape[i]) for i, r in enumerate(result))


def _stack(ctx: RuleContext) -> Any:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    if not isinstance(tensors, list | tuple) or not isinstance(dim, int) or not _is_tensor(ctx.out):
        return ctx.opaque()
    n = ctx.out.dim()
    dim = _norm_dim(dim, n)
    first = None
    for t in tensors:
        d = ctx.dims(t)
        if d is None:
            return ctx.opaque()
        if first is None:
            first = d
        else:
            for a, b in zip(first, d, strict=True):
                ctx.tie(a, b)
    assert first is not None
    return (*first[:dim], ctx.fixed(len(tensors), "stacked dim"), *first[dim:])


def _split(ctx: RuleContext) -> Any:
    """chunk / split / split_with_sizes / tensor_split along a dim: slices of its layout."""
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    outs = ctx.out
    name = getattr(ctx.node.target, "__name__", ctx.node.target)
    default_dim = 0
    dim = ctx.arg(2, "dim", default_dim)
    if xd is None or not isinstance(outs, tuple | list) or not isinstance(dim, int):
        return ctx.opaque()
    n = len(xd)
    dim = _norm_dim(dim, n)
    layout = xd[dim]
    sizes = [o.shape[dim] for o in outs]
    if not _variable(ctx, layout):
        return tuple((*xd[:dim], ctx.fixed(s, "split dim"), *xd[dim + 1 :]) for s in sizes)
    pieces = []
    pos = 0
    for s in sizes:
        pieces.append(ctx.slice(layout, pos, pos + s))
        pos += s
    if name not in ("split", "chunk", "split_with_sizes", "tensor_split"):
        return ctx.opaque()

    def fix(size_of: SizeOf, x: Any = x, dim: int = dim, pieces: list = pieces) -> dict[str, Any]:
        # chunk(n) and split(k) depend on the total; explicit sizes say exactly what was analysed
        return {
            "op": "call_function",
            "target": torch.split,
            "args": (x, [size_of(p) for p in pieces]),
            "kwargs": {"dim": dim},
        }

    ctx.rewrite(fix)
    return tuple((*xd[:dim], p, *xd[dim + 1 :]) for p in pieces)


def _unbind(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    dim = ctx.arg(1, "dim", 0)
    if xd is None or not isinstance(dim, int):
        return ctx.opaque()
    dim = _norm_dim(dim, len(xd))
    ctx.freeze(xd[dim], reason=f"{ctx.describe()} unbinds the dim into separate tensors")
    return tuple((*xd[:dim], *xd[dim + 1 :]) for _ in ctx.out)


def _getitem(ctx: RuleContext) -> Any:
    obj, idx = ctx.node.args[0], ctx.node.args[1]
    value = ctx.value(obj)
    if isinstance(obj, torch.fx.Node) and not _is_tensor(value):
        d = ctx.solver.dims.get(obj.name)
        prov = ctx.provenance(obj)
        if prov is not None and isinstance(idx, int) and isinstance(prov, tuple):
            ctx.set_provenance(prov[idx])
        if isinstance(d, tuple) and isinstance(idx, int | slice):
            try:
                return d[idx]
            except IndexError:
                return None
        return ctx.fixed_like(ctx.out) if _is_tensor(ctx.out) else None
    if not _is_tensor(value):
        return None
    return _index(ctx, obj, idx)


def _index(ctx: RuleContext, x: Any, idx: Any) -> Any:
    """Basic indexing of a tensor: slices, ints, None and Ellipsis."""
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(not isinstance(i, int | slice | type(None) | type(Ellipsis)) for i in items):
        return ctx.opaque(f"{ctx.describe()}: advanced indexing with tensors")
    if any(
        isinstance(i, slice)
        and any(isinstance(v, torch.fx.Node) for v in (i.start, i.stop, i.step))
        for i in items
    ):
        ctx.dynamic()
        for i, it in enumerate(_expand_ellipsis(items, len(xd))):
            if isinstance(it, slice) and it != slice(None):
                ctx.freeze(xd[i], reason=f"{ctx.describe()} slices with run-time bounds")
        return ctx.fixed_like(ctx.out, "sliced")
    items = _expand_ellipsis(items, len(xd))
    xs = ctx.shape(x)
    out: list[Layout] = []
    new_items: list[Any] = []
    changed = False
    d = 0
    for it in items:
        if it is None:
            out.append(ctx.fixed(1, "new axis"))
            new_items.append(None)
            continue
        layout, size = xd[d], xs[d]
        if isinstance(it, int):
            pos = it + size if it < 0 else it
            if _variable(ctx, layout):
                prefix = ctx.slice(layout, 0, pos)
                part = ctx.slice(layout, pos, pos + 1)
                ctx.freeze(
                    part,
                    reason=f"channel {pos} is selected by an integer index at {ctx.describe()}",
                )
                new_items.append(("int", prefix, it))
                changed = True
            else:
                new_items.append(it)
            d += 1
            continue
        start, stop, step = it.indices(size)
        whole = (start, stop, step) == (0, size, 1)
        if whole and it.stop is None and it.start in (None, 0):
            out.append(layout)
            new_items.append(it)
        elif not _variable(ctx, layout):
            out.append(ctx.fixed(len(range(start, stop, step)), "sliced dim"))
            new_items.append(it)
        elif step != 1:
            ctx.freeze(layout, reason=f"{ctx.describe()} takes every {step}-th channel")
            out.append(ctx.fixed(len(range(start, stop, step)), "sliced dim"))
            new_items.append(it)
        else:
            prefix = ctx.slice(layout, 0, start) if start > 0 else ()
            part = ctx.slice(layout, start, stop)
            out.append(part)
            new_items.append(("slice", prefix, part, it))
            changed = True
        d += 1
    out.extend(xd[d:])
    if changed:
        base = ctx.node.args

        def fix(size_of: SizeOf) -> dict[str, Any]:
            rebuilt: list[Any] = []
            for item in new_items:
                if isinstance(item, tuple) and item[0] == "int":
                    rebuilt.append(size_of(item[1]) if item[1] else 0)
                elif isinstance(item, tuple) and item[0] == "slice":
                    _, prefix, part, orig = item
                    lo = size_of(prefix) if prefix else 0
                    hi = lo + size_of(part)
                    rebuilt.append(
                        slice(
                            None if orig.start is None else lo,
                            None if orig.stop is None else hi,
                            orig.step,
                        )
                    )
                else:
                    rebuilt.append(item)
            new_idx = tuple(rebuilt) if isinstance(idx, tuple) else rebuilt[0]
            if isinstance(idx, tuple) and len(rebuilt) != len(idx):  # Ellipsis was expanded
                new_idx = tuple(rebuilt)
            return {"args": (base[0], new_idx)}

        ctx.rewrite(fix)
    return tuple(out)


def _expand_ellipsis(items: tuple, ndim: int) -> tuple:
    if not any(i is Ellipsis for i in items):
        return items
    k = items.index(Ellipsis)
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    return items[:k] + (slice(None),) * (ndim - used) + items[k + 1 :]


# ---------------------------------------------------------------------------------------------
# shape ops: reshape/view/flatten, permute/transpose, squeeze/unsqueeze, expand/repeat


def _shape_args(ctx: RuleContext, start: int) -> tuple[list[Any], bool]:
    """The requested shape of view/reshape as a list, and whether it was passed as one tuple."""
    rest = ctx.node.args[start:]
    if not rest and "shape" in ctx.node.kwargs:
        rest = (ctx.node.kwargs["shape"],)
    if len(rest) == 1 and isinstance(rest[0], list | tuple):
        return list(rest[0]), True
    return list(rest), False


def _arg_kinds(shape_args: list[Any]) -> list[str]:
    """literal / infer (-1) / dynamic (computed at run time) for each requested size."""
    return [
        "dynamic" if isinstance(a, torch.fx.Node) else ("infer" if a == -1 else "literal")
        for a in shape_args
    ]


def _reshape_to(
    ctx: RuleContext, x: Any, kinds: list[str] | None
) -> tuple[Any, list[Layout] | None]:
    """Layouts of a reshape's output; ``kinds`` says for each output dim whether its size was a
    literal, inferred (-1) or computed at run time (None: flatten, which only merges)."""
    xd = ctx.dims(x)
    out = ctx.out
    if xd is None or not _is_tensor(out):
        return ctx.opaque(), None
    ins = ctx.shape(x)
    outs = tuple(out.shape)
    if math.prod(ins) != math.prod(outs):
        return ctx.opaque(), None
    if kinds is None or len(kinds) != len(outs):
        kinds = ["dynamic"] * len(outs)
    result: list[Layout | None] = [None] * len(outs)
    for i, s in enumerate(ins):
        if s == 1 and _variable(ctx, xd[i]):
            ctx.freeze(xd[i], reason=f"a size-1 channel dim is reshaped at {ctx.describe()}")
    in_pos = [i for i, s in enumerate(ins) if s != 1]
    out_pos = [j for j, s in enumerate(outs) if s != 1]
    i = j = 0
    while i < len(in_pos) and j < len(out_pos):
        seg_in, seg_out = [in_pos[i]], [out_pos[j]]
        pi, pj = ins[in_pos[i]], outs[out_pos[j]]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                seg_in.append(in_pos[i])
                pi *= ins[in_pos[i]]
                i += 1
            else:
                seg_out.append(out_pos[j])
                pj *= outs[out_pos[j]]
                j += 1
        _reshape_segment(ctx, xd, ins, outs, seg_in, seg_out, kinds, result)
    final = [
        r if r is not None else ctx.fixed(outs[k], "reshaped dim") for k, r in enumerate(result)
    ]
    return tuple(final), final


def _reshape_segment(
    ctx: RuleContext,
    xd: tuple[Layout, ...],
    ins: tuple[int, ...],
    outs: tuple[int, ...],
    seg_in: list[int],
    seg_out: list[int],
    kinds: list[str],
    result: list[Layout | None],
) -> None:
    """Input dims ``seg_in`` become output dims ``seg_out`` (equal products)."""
    variable = [k for k in seg_in if _variable(ctx, xd[k])]
    if len(seg_in) == 1 and len(seg_out) == 1:
        result[seg_out[0]] = xd[seg_in[0]]
        return
    if not variable:
        for j in seg_out:
            result[j] = ctx.fixed(outs[j], "reshaped dim")
        return
    why = f"{ctx.describe()} reshapes channels together with other dims in an untracked way"
    if len(seg_out) == 1:  # merge: channels times fixed dims
        k = variable[0]
        outer = math.prod(ins[m] for m in seg_in if m < k)
        inner = math.prod(ins[m] for m in seg_in if m > k)
        merged = _inner(xd[k], inner)
        if len(variable) > 1 or (outer > 1 and len(merged) * outer > 4096):
            for m in seg_in:
                ctx.freeze(xd[m], reason=why)
            result[seg_out[0]] = ctx.fixed(outs[seg_out[0]], "reshaped dim")
            return
        result[seg_out[0]] = _outer(merged, outer)
        return
    if len(seg_in) == 1:  # split: one output dim carries the channels, the others are counts
        cands = [j for j in seg_out if kinds[j] in ("infer", "dynamic")]
        if len(cands) != 1:
            ctx.freeze(
                xd[seg_in[0]],
                reason=f"{ctx.describe()} splits channels into {[outs[j] for j in seg_out]} "
                "and no single one of these sizes is computed (-1 or from x.size())",
            )
            for j in seg_out:
                result[j] = ctx.fixed(outs[j], "reshaped dim")
            return
        k = cands[0]
        outer = math.prod(outs[m] for m in seg_out if m < k)
        inner = math.prod(outs[m] for m in seg_out if m > k)
        u = ctx.factor(xd[seg_in[0]], outer, inner)
        for j in seg_out:
            if j == k and u is not None:
                result[j] = u
            else:
                result[j] = ctx.fixed(outs[j], "reshaped dim")
        return
    for m in seg_in:
        ctx.freeze(xd[m], reason=why)
    for j in seg_out:
        result[j] = ctx.fixed(outs[j], "reshaped dim")


def _view(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    shape_args, packed = _shape_args(ctx, 1)
    if len(shape_args) == 1 and isinstance(shape_args[0], torch.fx.Node):
        # x.view(y.shape) / x.view(sizes): the whole shape is computed at run time
        ctx.dynamic()
        out, layouts = _reshape_to(ctx, x, None)
        prov = ctx.provenance(shape_args[0])
        if layouts is not None and isinstance(prov, tuple) and len(prov) == len(layouts):
            for a, b in zip(layouts, prov, strict=True):
                _same_size(ctx, a, b)
        return out
    kinds = _arg_kinds(shape_args)
    if "dynamic" in kinds:
        ctx.dynamic()
    out, layouts = _reshape_to(ctx, x, kinds)
    if layouts is None:
        return out
    for j, a in enumerate(shape_args):
        prov = ctx.provenance(a)
        if prov is not None and _is_layout_like(prov):
            _same_size(ctx, layouts[j], prov)
    literal = [
        j
        for j, a in enumerate(shape_args)
        if isinstance(a, int) and a != -1 and _variable(ctx, layouts[j])
    ]
    if literal:
        args, kwargs = ctx.node.args, dict(ctx.node.kwargs)

        def fix(size_of: SizeOf) -> dict[str, Any]:
            new = list(shape_args)
            for j in literal:
                new[j] = size_of(layouts[j])
            if packed and len(args) > 1:
                return {"args": (args[0], tuple(new))}
            if packed:
                return {"kwargs": {**kwargs, "shape": tuple(new)}}
            return {"args": (args[0], *new)}

        ctx.rewrite(fix)
    return out


def _is_layout_like(x: Any) -> bool:
    return (
        isinstance(x, tuple)
        and bool(x)
        and all(isinstance(b, tuple) and len(b) == 3 and isinstance(b[0], int) for b in x)
    )


def _same_size(ctx: RuleContext, a: Layout, b: Layout) -> None:
    """A dim sized from another tensor's size: fine when both sizes are the same sum of
    slots for every choice of widths; otherwise freeze both."""
    if _size_poly(ctx, a) != _size_poly(ctx, b):
        reason = f"{ctx.describe()} sizes a dim from another tensor's size"
        ctx.freeze(a, reason=reason)
        ctx.freeze(b, reason=reason)


def _size_poly(ctx: RuleContext, layout: Layout) -> dict[int, int]:
    poly: dict[int, int] = {}
    for o, v, i in ctx.slots.expand(layout):
        if ctx.slots.reason[v] is not None:
            poly[-1] = poly.get(-1, 0) + o * ctx.slots.size[v] * i
        else:
            poly[v] = poly.get(v, 0) + o * i
    return poly


def _flatten(ctx: RuleContext) -> Any:
    out, _ = _reshape_to(ctx, ctx.node.args[0], None)
    return out


def _unflatten(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    dim = ctx.arg(1, "dim")
    sizes = ctx.arg(2, "sizes")
    xd = ctx.dims(x)
    if xd is None or not isinstance(dim, int) or not isinstance(sizes, list | tuple):
        return ctx.opaque()
    dim = _norm_dim(dim, len(xd))
    kinds = ["dynamic"] * dim + _arg_kinds(list(sizes)) + ["dynamic"] * (len(xd) - dim - 1)
    out, layouts = _reshape_to(ctx, x, kinds)
    if layouts is not None and any(
        k == "literal" and _variable(ctx, layouts[dim + j])
        for j, k in enumerate(_arg_kinds(list(sizes)))
    ):
        args = ctx.node.args

        def fix(size_of: SizeOf) -> dict[str, Any]:
            new = [
                size_of(layouts[dim + j]) if isinstance(s, int) and s != -1 else s
                for j, s in enumerate(sizes)
            ]
            return {"args": (args[0], args[1], type(sizes)(new), *args[3:])}

        ctx.rewrite(fix)
    return out


def _permute(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    order, _ = _shape_args(ctx, 1)
    if not order and "dims" in ctx.node.kwargs:
        order = list(ctx.node.kwargs["dims"])
    if len(order) != len(xd) or not all(isinstance(o, int) for o in order):
        return ctx.opaque()
    return tuple(xd[_norm_dim(o, len(xd))] for o in order)


def _transpose(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    a = ctx.arg(1, "dim0")
    b = ctx.arg(2, "dim1")
    if xd is None:
        return ctx.opaque()
    if a is None and b is None and len(xd) <= 2:  # .t()
        return tuple(reversed(xd))
    if not isinstance(a, int) or not isinstance(b, int):
        return ctx.opaque()
    out = list(xd)
    a, b = _norm_dim(a, len(xd)), _norm_dim(b, len(xd))
    out[a], out[b] = out[b], out[a]
    return tuple(out)


def _unsqueeze(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    dim = ctx.arg(1, "dim")
    if xd is None or not isinstance(dim, int):
        return ctx.opaque()
    dim = _norm_dim(dim, len(xd) + 1)
    return (*xd[:dim], ctx.fixed(1, "new axis"), *xd[dim:])


def _squeeze(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    dim = ctx.arg(1, "dim")
    if xd is None:
        return ctx.opaque()
    xs = ctx.shape(x)
    if dim is None:
        dims = {i for i, s in enumerate(xs) if s == 1}
    elif isinstance(dim, int):
        dims = {_norm_dim(dim, len(xs))} if xs[_norm_dim(dim, len(xs))] == 1 else set()
    elif isinstance(dim, list | tuple) and all(isinstance(d, int) for d in dim):
        dims = {_norm_dim(d, len(xs)) for d in dim if xs[_norm_dim(d, len(xs))] == 1}
    else:
        return ctx.opaque()
    for d in dims:
        ctx.freeze(xd[d], reason=f"a size-1 dim is squeezed at {ctx.describe()}")
    return tuple(layout for i, layout in enumerate(xd) if i not in dims)


def _expand(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    if xd is None or not _is_tensor(ctx.out):
        return ctx.opaque()
    xs = ctx.shape(x)
    outs = tuple(ctx.out.shape)
    off = len(outs) - len(xs)
    result = []
    for j, s in enumerate(outs):
        k = j - off
        if k < 0:
            result.append(ctx.fixed(s, "expanded dim"))
        elif xs[k] == s:
            result.append(xd[k])
        else:
            ctx.freeze(xd[k], reason=f"a size-1 dim is expanded at {ctx.describe()}")
            result.append(ctx.fixed(s, "expanded dim"))
    if any(isinstance(a, torch.fx.Node) for a in ctx.node.args[1:]):
        ctx.dynamic()
    return tuple(result)


def _repeat(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    reps, _ = _shape_args(ctx, 1)
    if xd is None or not all(isinstance(r, int) for r in reps) or len(reps) < len(xd):
        return ctx.opaque()
    off = len(reps) - len(xd)
    out = [ctx.fixed(r, "repeated dim") for r in reps[:off]]
    for k, layout in enumerate(xd):
        r = reps[off + k]
        out.append(
            _outer(layout, r)
            if r > 1 and _variable(ctx, layout)
            else (layout if r == 1 else ctx.fixed(ctx.out.shape[off + k], "repeated dim"))
        )
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# reductions and size queries

_EXACT_REDUCTIONS = {"sum", "nansum"}


def _reduce(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    name = getattr(ctx.node.target, "__name__", str(ctx.node.target))
    out = ctx.out
    if xd is None:
        return ctx.opaque()
    if (
        name in ("max", "min")
        and isinstance(ctx.arg(1, "other"), torch.fx.Node)
        and _is_tensor(ctx.value(ctx.arg(1, "other")))
    ):
        return elementwise(ctx)
    dim = ctx.arg(1, "dim")
    keepdim = ctx.arg(2, "keepdim", False)
    n = len(xd)
    if dim is None:
        dims = set(range(n))
    elif isinstance(dim, int):
        dims = {_norm_dim(dim, n)}
    elif isinstance(dim, list | tuple) and all(isinstance(d, int) for d in dim):
        dims = {_norm_dim(d, n) for d in dim}
    else:
        return ctx.opaque()
    if name not in _EXACT_REDUCTIONS:
        for d in dims:
            ctx.inexact(xd[d])
    kept = tuple(
        ctx.fixed(1, "reduced dim") if i in dims else xd[i]
        for i in range(n)
        if keepdim or i not in dims
    )
    if isinstance(out, tuple | list):
        return tuple(kept for _ in out)
    if not _is_tensor(out):
        return None
    if out.dim() != len(kept):
        return ctx.fixed_like(out)
    return kept


def _size(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    dim = ctx.arg(1, "dim")
    if xd is not None:
        if isinstance(dim, int):
            ctx.set_provenance(xd[_norm_dim(dim, len(xd))])
        elif dim is None:
            ctx.set_provenance(tuple(xd))
    return None


def _getattr(ctx: RuleContext) -> Any:
    x, attr = ctx.node.args[0], ctx.node.args[1]
    if attr == "shape":
        return _size(ctx)
    if _is_tensor(ctx.out):
        d = ctx.dims(x)
        if attr in ("data", "real") and d is not None:
            return d
        return ctx.opaque()
    return None


def _non_tensor(ctx: RuleContext) -> Any:
    """Python-level ops (int arithmetic, asserts): no channels, but sizes they use are dynamic."""
    if _is_tensor(ctx.out):
        return elementwise(ctx)
    if any(ctx.provenance(a) is not None for a in ctx.node.args):
        ctx.dynamic()
    _freeze_compared_sizes(ctx)
    return None


def _no_channels(ctx: RuleContext) -> Any:
    """Ops on Python values or metadata (``torch._assert``, ``x.dim()``, ``len``)."""
    return None


# ---------------------------------------------------------------------------------------------
# the table

_ACTIVATION_MODULES = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
]  # fmt: skip
_reg(_ACTIVATION_MODULES, same)
_reg([nn.Softmax, nn.LogSoftmax, nn.Softmin], softmax)
_reg(
    [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d],
    _conv_module,
    _update_conv,
)
_reg(nn.Linear, _linear_module, _update_linear)
_reg(nn.Bilinear, _opaque)
_reg(nn.Embedding, _embedding, _update_embedding)
_reg(
    [
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
    ],
    _batch_norm,
    _update_batch_norm,
)
_reg(nn.LayerNorm, _layer_norm, _update_layer_norm)
_reg(nn.GroupNorm, _group_norm, _update_group_norm)
_reg(nn.PReLU, _prelu, _update_prelu)
_reg(
    [nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d],
    _spatial_k(1),
)
_reg(
    [
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.LPPool2d,
        nn.FractionalMaxPool2d,
    ],
    _spatial_k(2),
)
_reg([nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d], _spatial_k(3))
_reg([nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d], _spatial)
_reg(
    [
        nn.ZeroPad2d,
        nn.ConstantPad1d,
        nn.ConstantPad2d,
        nn.ConstantPad3d,
        nn.ReflectionPad2d,
        nn.ReplicationPad2d,
    ],
    lambda ctx: _spatial(ctx, len(ctx.module.padding) // 2),
)
_reg(nn.PixelShuffle, _pixel_shuffle)
_reg(nn.PixelUnshuffle, _pixel_unshuffle)
_reg(nn.Flatten, _flatten)
_reg(
    nn.MultiheadAttention,
    lambda ctx: ctx.opaque(
        f"{ctx.describe()}: nn.MultiheadAttention ties its embedding width to its heads"
    ),
)

_UNARY_FUNCTIONS = [
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs,
    torch.sqrt, torch.rsqrt, torch.neg, torch.sin, torch.cos, torch.erf, torch.square,
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.nan_to_num, torch.sign,
    torch.reciprocal, torch.floor, torch.ceil, torch.round, torch.detach, torch.clone,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.elu, F.selu,
    F.celu, F.leaky_relu, F.softplus, F.hardtanh, F.sigmoid, F.tanh, F.logsigmoid, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    operator.neg, operator.pos, operator.invert, operator.abs,
]  # fmt: skip
_reg(_UNARY_FUNCTIONS, same)
_BINARY_FUNCTIONS = [
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.floordiv, operator.pow, operator.mod,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.xor,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.where, torch.eq, torch.ne,
    torch.lt, torch.gt, torch.le, torch.ge, torch.logical_and, torch.logical_or, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.fmod, torch.remainder, torch.atan2, torch.hypot,
    torch.masked_fill,
]  # fmt: skip
_reg(_BINARY_FUNCTIONS, _non_tensor)
_reg(
    [
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
    ],
    _like,
)
_reg([torch.cat, torch.concat, torch.concatenate], _cat)
_reg(torch.stack, _stack)
_reg([torch.split, torch.chunk, torch.tensor_split, torch.split_with_sizes], _split)
_reg(torch.unbind, _unbind)
_reg(operator.getitem, _getitem)
_reg(torch.flatten, _flatten)
_reg(torch.reshape, _view)
_reg(torch.unflatten, _unflatten)
_reg(torch.permute, _permute)
_reg([torch.transpose, torch.swapaxes, torch.swapdims], _transpose)
_reg(torch.unsqueeze, _unsqueeze)
_reg(torch.squeeze, _squeeze)
_reg(
    [
        torch.mean,
        torch.sum,
        torch.amax,
        torch.amin,
        torch.max,
        torch.min,
        torch.var,
        torch.std,
        torch.norm,
        torch.logsumexp,
        torch.prod,
        torch.nansum,
        torch.argmax,
        torch.argmin,
        torch.all,
        torch.any,
    ],
    _reduce,
)
_reg([torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, F.softmin], softmax)
_reg(F.normalize, lambda ctx: _inexact_dim(ctx, 2, "dim", 1))
_reg([F.conv1d], _functional_conv(1, False))
_reg([F.conv2d], _functional_conv(2, False))
_reg([F.conv3d], _functional_conv(3, False))
_reg([F.conv_transpose1d], _functional_conv(1, True))
_reg([F.conv_transpose2d], _functional_conv(2, True))
_reg([F.conv_transpose3d], _functional_conv(3, True))
_reg(F.linear, _functional_linear)
_reg([F.batch_norm, F.instance_norm], _functional_batch_norm)
_reg(F.layer_norm, _functional_layer_norm)
_reg(F.group_norm, _functional_group_norm)
_reg(
    [F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d],
    _spatial_k(1),
)
_reg(
    [
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
        F.lp_pool2d,
        torch._C._nn.avg_pool2d,
    ],
    _spatial_k(2),
)
_reg(
    [
        F.max_pool3d,
        F.avg_pool3d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool3d,
        torch._C._nn.avg_pool3d,
    ],
    _spatial_k(3),
)
_reg([F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.grid_sample], _spatial)
_reg(F.pixel_shuffle, _pixel_shuffle)
_reg(F.pixel_unshuffle, _pixel_unshuffle)
_reg(F.pad, _pad)
_reg(torch._assert, _no_channels)
_reg([getattr], _getattr)
_reg(len, _no_channels)

for _m in ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "sqrt",
           "rsqrt", "neg", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "contiguous",
           "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "type_as",
           "requires_grad_", "square", "sign", "erf", "hardswish", "nan_to_num", "cpu",
           "cuda"]:  # fmt: skip
    _METHODS[_m] = OpRule(same, name=_m)
for _m in ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
           "where", "masked_fill", "masked_fill_", "eq", "ne", "lt", "gt", "le", "ge", "lerp",
           "addcmul", "addcdiv", "__add__", "__mul__"]:  # fmt: skip
    _METHODS[_m] = OpRule(_non_tensor, name=_m)
for _m in ["mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod",
           "nansum", "argmax", "argmin", "all", "any"]:  # fmt: skip
    _METHODS[_m] = OpRule(_reduce, name=_m)
_METHODS.update(
    {
        "view": OpRule(_view, name="view"),
        "reshape": OpRule(_view, name="reshape"),
        "flatten": OpRule(_flatten, name="flatten"),
        "unflatten": OpRule(_unflatten, name="unflatten"),
        "permute": OpRule(_permute, name="permute"),
        "transpose": OpRule(_transpose, name="transpose"),
        "swapaxes": OpRule(_transpose, name="swapaxes"),
        "swapdims": OpRule(_transpose, name="swapdims"),
        "t": OpRule(_transpose, name="t"),
        "unsqueeze": OpRule(_unsqueeze, name="unsqueeze"),
        "squeeze": OpRule(_squeeze, name="squeeze"),
        "expand": OpRule(_expand, name="expand"),
        "expand_as": OpRule(_expand, name="expand_as"),
        "repeat": OpRule(_repeat, name="repeat"),
        "chunk": OpRule(_split, name="chunk"),
        "split": OpRule(_split, name="split"),
        "tensor_split": OpRule(_split, name="tensor_split"),
        "unbind": OpRule(_unbind, name="unbind"),
        "size": OpRule(_size, name="size"),
        "dim": OpRule(_no_channels, name="dim"),
        "numel": OpRule(_no_channels, name="numel"),
        "softmax": OpRule(softmax, name="softmax"),
        "log_softmax": OpRule(softmax, name="log_softmax"),
        "zero_": OpRule(same, name="zero_"),
    }
)
