"""Shape ops: view/reshape/flatten/unflatten, permute/transpose, (un)squeeze, expand/repeat.

A reshape that merges channels with fixed dims repeats each channel inside (``flatten`` before
a linear layer: ``Linear.in = C x spatial``); one that splits a channel dim needs exactly one
computed size (``-1`` or ``x.size(1) // g``); literal sizes are rewritten for new widths.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fxconet.ops.layout import Layout, SizeOf, is_tensor, norm_dim, repeat_inner, repeat_outer
from fxconet.ops.registry import builtin

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = []


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
    ctx: RuleContext, x: Any, kinds: list[str] | None, *, by_structure: bool = False
) -> tuple[Any, list[Layout] | None]:
    """Layouts of a reshape's output; ``kinds`` says for each output dim whether its size was a
    literal, inferred (-1) or computed at run time (None: flatten, which only merges).
    ``by_structure``: where channels split into several computed sizes, the one that carries
    them is the dim whose outer and inner sizes match the channels' layout (``reshape_as``)."""
    xd = ctx.dims(x)
    out = ctx.out
    if xd is None or not is_tensor(out):
        return ctx.opaque(), None
    ins = ctx.shape(x)
    outs = tuple(out.shape)
    if math.prod(ins) != math.prod(outs):
        return ctx.opaque(), None
    if kinds is None or len(kinds) != len(outs):
        kinds = ["dynamic"] * len(outs)
    result: list[Layout | None] = [None] * len(outs)
    for i, s in enumerate(ins):
        if s == 1 and ctx.variable(xd[i]):
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
        _reshape_segment(ctx, xd, ins, outs, seg_in, seg_out, kinds, result, by_structure)
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
    by_structure: bool = False,
) -> None:
    """Input dims ``seg_in`` become output dims ``seg_out`` (equal products)."""
    variable = [k for k in seg_in if ctx.variable(xd[k])]
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
        merged = repeat_inner(xd[k], inner)
        if len(variable) > 1 or (outer > 1 and len(merged) * outer > 4096):
            for m in seg_in:
                ctx.freeze(xd[m], reason=why)
            result[seg_out[0]] = ctx.fixed(outs[seg_out[0]], "reshaped dim")
            return
        result[seg_out[0]] = repeat_outer(merged, outer)
        return
    if len(seg_in) == 1:  # split: one output dim carries the channels, the others are counts
        cands = [j for j in seg_out if kinds[j] in ("infer", "dynamic")]
        if len(cands) > 1 and by_structure:
            cands = _carrier(xd[seg_in[0]], outs, seg_out, cands)
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


def _carrier(
    layout: Layout, outs: tuple[int, ...], seg_out: list[int], cands: list[int]
) -> list[int]:
    """The candidate dim ``j`` of a split whose outer/inner sizes equal every block's
    (``(o, c, 9)`` split into ``(c, 3, 3)``: the first); all candidates when none fits."""
    outer = {b.outer for b in layout}
    inner = {b.inner for b in layout}
    if len(outer) != 1 or len(inner) != 1:
        return cands
    fit = [
        j
        for j in cands
        if math.prod(outs[m] for m in seg_out if m < j) == next(iter(outer))
        and math.prod(outs[m] for m in seg_out if m > j) == next(iter(inner))
    ]
    return fit if len(fit) == 1 else cands


@builtin(torch.reshape, methods=["view", "reshape"])
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
        if isinstance(a, int) and a != -1 and ctx.variable(layouts[j])
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


@builtin(methods=["reshape_as", "view_as"])
def _view_as(ctx: RuleContext) -> Any:
    """``x.reshape_as(y)`` (weight standardisation: ``w.reshape(1, o, -1)`` normalised, then
    reshaped back): ``x.reshape(y.shape)``, each output dim sized like ``y``'s."""
    x, other = ctx.node.args[0], ctx.arg(1, "other")
    yd = ctx.dims(other)
    if yd is None or not is_tensor(ctx.out):
        return ctx.opaque()
    ctx.dynamic()
    kinds = ["dynamic" if ctx.variable(layout) else "literal" for layout in yd]
    out, layouts = _reshape_to(ctx, x, kinds, by_structure=True)
    if layouts is not None:
        for a, b in zip(layouts, yd, strict=True):
            _same_size(ctx, a, b)
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
    if ctx.size_terms(a) != ctx.size_terms(b):
        reason = f"{ctx.describe()} sizes a dim from another tensor's size"
        ctx.freeze(a, reason=reason)
        ctx.freeze(b, reason=reason)


@builtin(nn.Flatten, torch.flatten, methods=["flatten"])
def _flatten(ctx: RuleContext) -> Any:
    out, _ = _reshape_to(ctx, ctx.node.args[0], None)
    return out


@builtin(torch.unflatten, methods=["unflatten"])
def _unflatten(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    dim = ctx.arg(1, "dim")
    sizes = ctx.arg(2, "sizes")
    xd = ctx.dims(x)
    if xd is None or not isinstance(dim, int) or not isinstance(sizes, list | tuple):
        return ctx.opaque()
    dim = norm_dim(dim, len(xd))
    kinds = ["dynamic"] * dim + _arg_kinds(list(sizes)) + ["dynamic"] * (len(xd) - dim - 1)
    out, layouts = _reshape_to(ctx, x, kinds)
    if layouts is not None and any(
        k == "literal" and ctx.variable(layouts[dim + j])
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


@builtin(torch.permute, methods=["permute"])
def _permute(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    if xd is None:
        return ctx.opaque()
    order, _ = _shape_args(ctx, 1)
    dims = ctx.node.kwargs.get("dims")
    if not order and isinstance(dims, list | tuple):
        order = list(dims)
    if len(order) != len(xd) or not all(isinstance(o, int) for o in order):
        return ctx.opaque()
    return tuple(xd[norm_dim(o, len(xd))] for o in order)


@builtin(
    torch.transpose, torch.swapaxes, torch.swapdims,
    methods=["transpose", "swapaxes", "swapdims", "t"],
)  # fmt: skip
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
    a, b = norm_dim(a, len(xd)), norm_dim(b, len(xd))
    out[a], out[b] = out[b], out[a]
    return tuple(out)


@builtin(torch.unsqueeze, methods=["unsqueeze"])
def _unsqueeze(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    dim = ctx.arg(1, "dim")
    if xd is None or not isinstance(dim, int):
        return ctx.opaque()
    dim = norm_dim(dim, len(xd) + 1)
    return (*xd[:dim], ctx.fixed(1, "new axis"), *xd[dim:])


@builtin(torch.squeeze, methods=["squeeze"])
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
        dims = {norm_dim(dim, len(xs))} if xs[norm_dim(dim, len(xs))] == 1 else set()
    elif isinstance(dim, list | tuple) and all(isinstance(d, int) for d in dim):
        dims = {norm_dim(d, len(xs)) for d in dim if xs[norm_dim(d, len(xs))] == 1}
    else:
        return ctx.opaque()
    for d in dims:
        ctx.freeze(xd[d], reason=f"a size-1 dim is squeezed at {ctx.describe()}")
    return tuple(layout for i, layout in enumerate(xd) if i not in dims)


@builtin(methods=["expand", "expand_as"])
def _expand(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    if xd is None or not is_tensor(ctx.out):
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


@builtin(methods=["repeat"])
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
            repeat_outer(layout, r)
            if r > 1 and ctx.variable(layout)
            else (layout if r == 1 else ctx.fixed(ctx.out.shape[off + k], "repeated dim"))
        )
    return tuple(out)
