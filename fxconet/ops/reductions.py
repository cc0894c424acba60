"""Reductions and size queries.

A reduction over the channel dim takes statistics across the channels (inexact; ``sum`` too:
removing all-zero channels leaves a sum unchanged, but the new channels a growing group gets are
not zero, so growing would change it); ``x.size(1)`` / ``x.shape`` record which layout a size
measures (its provenance), so shape code computed from it can be checked and rewritten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fxconet.ops.elementwise import elementwise
from fxconet.ops.layout import is_tensor, norm_dim
from fxconet.ops.registry import builtin

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = []


@builtin(
    torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.var, torch.std,
    torch.norm, torch.logsumexp, torch.prod, torch.nansum, torch.argmax, torch.argmin, torch.all,
    torch.any,
    methods=[
        "mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod",
        "nansum", "argmax", "argmin", "all", "any",
    ],
)  # fmt: skip
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
        and is_tensor(ctx.value(ctx.arg(1, "other")))
    ):
        return elementwise(ctx)
    dim = ctx.arg(1, "dim")
    keepdim = ctx.arg(2, "keepdim", False)
    n = len(xd)
    if dim is None:
        dims = set(range(n))
    elif isinstance(dim, int):
        dims = {norm_dim(dim, n)}
    elif isinstance(dim, list | tuple) and all(isinstance(d, int) for d in dim):
        dims = {norm_dim(d, n) for d in dim}
    else:
        return ctx.opaque()
    for d in dims:
        ctx.inexact(xd[d])
    kept = tuple(
        ctx.fixed(1, "reduced dim") if i in dims else xd[i]
        for i in range(n)
        if keepdim or i not in dims
    )
    if isinstance(out, tuple | list):
        return tuple(kept for _ in out)
    if not is_tensor(out):
        return None
    if out.dim() != len(kept):
        return ctx.fixed_like(out)
    return kept


@builtin(methods=["size"])
def _size(ctx: RuleContext) -> Any:
    x = ctx.node.args[0]
    xd = ctx.dims(x)
    dim = ctx.arg(1, "dim")
    if xd is not None:
        if isinstance(dim, int):
            ctx.set_provenance(xd[norm_dim(dim, len(xd))])
        elif dim is None:
            ctx.set_provenance(tuple(xd))
    return None


@builtin(getattr)
def _getattr(ctx: RuleContext) -> Any:
    x, attr = ctx.node.args[0], ctx.node.args[1]
    if attr == "shape":
        return _size(ctx)
    if is_tensor(ctx.out):
        d = ctx.dims(x)
        if attr in ("data", "real") and d is not None:
            return d
        return ctx.opaque()
    return None
