"""Concatenation, splitting and indexing along a dim.

``torch.cat`` along the channels makes a layout that concatenates its inputs' layouts (the
output width is their sum); ``split``/``chunk`` and slicing ``x[:, a:b]`` take slices of a
layout (refining the slots at the cut points) and are rewritten with the new sizes.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch

from fxconet.ops.layout import Block, Layout, SizeOf, is_tensor, norm_dim
from fxconet.ops.registry import builtin

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = []


@builtin(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: RuleContext) -> Any:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    if not isinstance(tensors, list | tuple) or not isinstance(dim, int) or not is_tensor(ctx.out):
        return ctx.opaque()
    n = ctx.out.dim()
    dim = norm_dim(dim, n)
    parts: list[Block] = []
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
            kept = result[k]
            if kept is None:
                result[k] = d[k]
            else:
                ctx.tie(kept, d[k])
        parts.extend(d[dim])
    result[dim] = tuple(parts)
    return tuple(r if r is not None else ctx.fixed(ctx.out.shape[i]) for i, r in enumerate(result))


@builtin(torch.stack)
def _stack(ctx: RuleContext) -> Any:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    if not isinstance(tensors, list | tuple) or not isinstance(dim, int) or not is_tensor(ctx.out):
        return ctx.opaque()
    n = ctx.out.dim()
    dim = norm_dim(dim, n)
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


@builtin(
    torch.split, torch.chunk, torch.tensor_split, torch.split_with_sizes,
    methods=["chunk", "split", "tensor_split"],
)  # fmt: skip
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
    dim = norm_dim(dim, n)
    layout = xd[dim]
    sizes = [o.shape[dim] for o in outs]
    if not ctx.variable(layout):
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


@builtin(torch.unbind, methods=["unbind"])
def _unbind(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    dim = ctx.arg(1, "dim", 0)
    if xd is None or not isinstance(dim, int):
        return ctx.opaque()
    dim = norm_dim(dim, len(xd))
    ctx.freeze(xd[dim], reason=f"{ctx.describe()} unbinds the dim into separate tensors")
    return tuple((*xd[:dim], *xd[dim + 1 :]) for _ in ctx.out)


@builtin(operator.getitem)
def _getitem(ctx: RuleContext) -> Any:
    obj, idx = ctx.node.args[0], ctx.node.args[1]
    value = ctx.value(obj)
    if isinstance(obj, torch.fx.Node) and not is_tensor(value):
        d = ctx.layouts(obj)
        prov = ctx.provenance(obj)
        if prov is not None and isinstance(idx, int) and isinstance(prov, tuple):
            ctx.set_provenance(prov[idx])
        if isinstance(d, tuple) and isinstance(idx, int | slice):
            try:
                return d[idx]
            except IndexError:
                return None
        return ctx.fixed_like(ctx.out) if is_tensor(ctx.out) else None
    if not is_tensor(value):
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
            if ctx.variable(layout):
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
        elif not ctx.variable(layout):
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


@builtin(operator.setitem)
def _setitem(ctx: RuleContext) -> Any:
    """``y[key] = v`` in place: every channel of ``y`` and ``v`` frozen (the assignment's
    indices are literals of the original widths, and ``y``'s later readers see the writes)."""
    return ctx.opaque("in-place item assignment (y[...] = v) keeps the original widths")
