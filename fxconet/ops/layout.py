"""The vocabulary of op rules: channel layouts and the helpers every rule family uses.

A *layout* describes one tensor dim as a sequence of :class:`Block` ``(outer, var, inner)``: a
block stands for ``outer * |var| * inner`` consecutive positions whose index is
``a * |var| * inner + c * inner + t`` (``a < outer``, ``c < |var|``, ``t < inner``), the
``c``-th channel of slot variable ``var`` repeated ``outer`` times around and ``inner`` times
inside (see :mod:`fxconet.passes.slots`, which solves them). A tensor's :data:`Dims` are one
layout per dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = [
    "Block",
    "Dims",
    "Layout",
    "SizeOf",
    "first_tensor",
    "is_layout",
    "is_tensor",
    "iter_layouts",
    "norm_dim",
    "repeat_inner",
    "repeat_outer",
]


class Block(NamedTuple):
    """``outer * |var| * inner`` positions: channel ``c`` of ``var`` at ``a * |var| * inner +
    c * inner + t``. Equal to (and interchangeable with) the plain tuple ``(outer, var,
    inner)``."""

    outer: int
    var: int
    inner: int


Layout = tuple[Block, ...]
Dims = tuple[Layout, ...]
SizeOf = Callable[[Layout], int]


def is_layout(x: Any) -> bool:
    """A Layout is a tuple of 3-int tuples (a Dims value is a tuple of Layouts, so its first
    item decides: an int-led triple, or a tuple)."""
    if type(x) is not tuple:
        return False
    if not x:
        return True
    b = x[0]
    return (type(b) is Block or type(b) is tuple) and len(b) == 3 and type(b[0]) is int


def iter_layouts(dims: Any) -> list[Layout]:
    """Every Layout in a (nested) Dims value, in order (None and non-tuple entries skipped)."""
    if type(dims) is tuple and dims and is_layout(dims[0]):
        return list(dims)  # a tensor's Dims (one layout per dim): by far the most common value
    out: list[Layout] = []
    stack = [dims]
    while stack:
        x = stack.pop()
        if is_layout(x):
            out.append(x)
        elif type(x) is tuple or type(x) is list:
            stack.extend(reversed(x))
    return out


def first_tensor(ctx: RuleContext) -> Any:
    """The first tensor-valued Node among a node's arguments (None if there is none)."""
    for a in ctx.tensor_args():
        return a
    return None


def is_tensor(v: Any) -> bool:
    """True for a tensor value."""
    return isinstance(v, torch.Tensor)


def norm_dim(d: int, n: int) -> int:
    """A dim index made non-negative for ``n`` dims."""
    return d + n if d < 0 else d


def repeat_outer(layout: Layout, times: int) -> Layout:
    """``layout`` repeated ``times`` times (outer repetition)."""
    if times == 1:
        return layout
    if len(layout) == 1:
        o, v, i = layout[0]
        return (Block(o * times, v, i),)
    return layout * times


def repeat_inner(layout: Layout, times: int) -> Layout:
    """Every channel of ``layout`` repeated ``times`` times in place (inner repetition)."""
    if times == 1:
        return layout
    return tuple(Block(o, v, i * times) for o, v, i in layout)
