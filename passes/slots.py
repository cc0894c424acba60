"""Channel slots: union-find over channel index spaces, with layouts.

Every tensor dim of the traced graph is described by a *layout*: a sequence of blocks
``(outer, var, inner)``. A block stands for ``outer * |var| * inner`` consecutive positions whose
index is ``a * |var| * inner + c * inner + t`` (``a < outer``, ``c < |var|``, ``t < inner``): the
``c``-th channel of ``var``, repeated ``outer`` times around and ``inner`` times inside. Examples:

* ``(N, C, H, W)`` after a conv: dim 1 is ``((1, g, 1),)`` for the conv's new group ``g``.
* ``torch.cat([a, b], 1)``: ``((1, ga, 1), (1, gb, 1))``.
* ``flatten(1)`` of ``(N, C, 7, 7)``: ``((1, g, 49),)`` -- each channel repeated 49 times inside.
* the input of a conv with ``groups=4``: ``((4, v, 1),)`` -- the same per-group slots 4 times.

Unifying two layouts (a residual add, a conv's input meeting the producer's output) aligns their
blocks; where boundaries differ a variable is *refined*: split into a concatenation of new
variables, or factored into ``(outer, var', inner)``. Refinement never loses a solution: it only
names sub-spaces that must be resized consistently. The leaves of the refinement tree that carry a
producer are the channel groups of the IR.

A layout that cannot be aligned (a reshape that interleaves channels of two groups in a way no
refinement expresses) raises :class:`Conflict`; the caller then freezes every slot involved, which
is always safe because a frozen slot keeps all of its channels in place.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from fxconet.ops.layout import Block, Layout

__all__ = ["Block", "Conflict", "Layout", "Slots"]

_MAX_BLOCKS = 4096  # cap on explicit repetition when expanding refined variables


class Conflict(Exception):
    """Two layouts cannot be made consistent by refinement."""


class Slots:
    """The union-find of channel slot variables.

    Attributes per variable (valid on roots): ``size``; ``sub`` (its refinement: a layout over
    new variables, or None for a leaf); ``reason`` (why frozen, None if free); ``produced``
    (a width-choosing layer creates it); ``inexact`` (an op takes statistics across it).
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.sub: list[Layout | None] = []
        self.reason: list[str | None] = []
        self.produced: list[bool] = []
        self.inexact: list[bool] = []
        # expand() results, valid until the next refinement or union (both change leaves)
        self._memo: dict[Layout, list[Block]] = {}
        self._leaves_memo: dict[Layout, list[int]] = {}
        self._sub_memo: dict[int, list[Block]] = {}  # expansion of each refined root
        self._root_leaves: dict[int, list[int]] = {}  # leaves under each root
        self._totals: dict[Layout, int] = {}  # total() per layout, valid forever

    # -- variables ------------------------------------------------------------------------------

    def new(self, size: int, *, reason: str | None = None, produced: bool = False) -> int:
        """A fresh leaf variable of ``size`` channels."""
        if size < 0:
            raise ValueError(f"slot size must be >= 0, got {size}")
        v = len(self.parent)
        self.parent.append(v)
        self.size.append(size)
        self.sub.append(None)
        self.reason.append(reason)
        self.produced.append(produced)
        self.inexact.append(False)
        return v

    def layout(self, size: int, *, reason: str | None = None, produced: bool = False) -> Layout:
        """A layout made of one fresh variable."""
        return (Block(1, self.new(size, reason=reason, produced=produced), 1),)

    def find(self, v: int) -> int:
        parent = self.parent
        root = v
        while parent[root] != root:
            root = parent[root]
        while parent[v] != root:  # path compression
            parent[v], v = root, parent[v]
        return root

    def is_leaf(self, v: int) -> bool:
        return self.sub[self.find(v)] is None

    def _inherit(self, parent: int, size: int) -> int:
        child = self.new(size, reason=self.reason[parent], produced=self.produced[parent])
        self.inexact[child] = self.inexact[parent]
        return child

    def split(self, v: int, sizes: Iterable[int]) -> list[int]:
        """Refine leaf ``v`` into a concatenation of new variables of ``sizes``."""
        r = self.find(v)
        sizes = list(sizes)
        if self.sub[r] is not None:
            raise Conflict(f"slot {r} is already refined")
        if sum(sizes) != self.size[r] or any(s <= 0 for s in sizes):
            raise Conflict(f"cannot split {self.size[r]} channels into {sizes}")
        parts = [self._inherit(r, s) for s in sizes]
        self.sub[r] = tuple(Block(1, p, 1) for p in parts)
        self._invalidate()
        return parts

    def factor(self, v: int, outer: int, inner: int) -> int:
        """Refine leaf ``v`` into ``(outer, v', inner)``; returns ``v'``."""
        r = self.find(v)
        if outer == 1 and inner == 1:
            return r
        if self.sub[r] is not None:
            raise Conflict(f"slot {r} is already refined")
        n = self.size[r]
        if n % (outer * inner):
            raise Conflict(f"{n} channels are not {outer} x k x {inner}")
        child = self._inherit(r, n // (outer * inner))
        self.sub[r] = (Block(outer, child, inner),)
        self._invalidate()
        return child

    def link(self, v: int, w: int) -> int:
        """Merge two leaves of equal size; returns the new root."""
        a, b = self.find(v), self.find(w)
        if a == b:
            return a
        if self.sub[a] is not None or self.sub[b] is not None:
            raise AssertionError("link() takes leaves")
        if self.size[a] != self.size[b]:
            raise AssertionError(f"link of sizes {self.size[a]} and {self.size[b]}")
        if b < a:  # keep the older variable as root: first appearance order
            a, b = b, a
        self.parent[b] = a
        self._invalidate()
        self.reason[a] = self.reason[a] or self.reason[b]
        self.produced[a] = self.produced[a] or self.produced[b]
        self.inexact[a] = self.inexact[a] or self.inexact[b]
        return a

    def _invalidate(self) -> None:
        """Forget the expanded layouts (the structure changed)."""
        self._memo.clear()
        self._leaves_memo.clear()
        self._sub_memo.clear()
        self._root_leaves.clear()

    # -- layouts --------------------------------------------------------------------------------

    def width(self, v: int) -> int:
        return self.size[self.find(v)]

    def total(self, layout: Layout) -> int:
        """Positions of ``layout``. Never changes: a union joins slots of equal size, and a
        refinement keeps its slot's size, so the total is memoised per layout."""
        hit = self._totals.get(layout)
        if hit is None:
            size, find = self.size, self.find
            hit = self._totals[layout] = sum(o * size[find(v)] * i for o, v, i in layout)
        return hit

    def expand(self, layout: Layout) -> list[Block]:
        """The layout over leaf variables (refinements substituted), adjacent repeats merged.

        The returned list is shared with a cache: do not modify it.
        """
        hit = self._memo.get(layout)
        if hit is not None:
            return hit
        out = self._expand(layout)
        self._memo[layout] = out
        return out

    def _expand(self, layout: Layout) -> list[Block]:
        out: list[Block] = []
        for o, v, i in layout:
            r = self.find(v)
            sub = self.sub[r]
            if sub is None:
                parts = [Block(1, r, 1)]
            else:
                # Refinements nest (a DenseNet input is split once per concatenation): expand
                # each refined variable once.
                hit = self._sub_memo.get(r)
                if hit is None:
                    hit = self._sub_memo[r] = self._expand(sub)
                parts = hit
            if len(parts) == 1:
                po, pv, pi = parts[0]
                _push(out, Block(o * po, pv, pi * i))
                continue
            if o * len(parts) > _MAX_BLOCKS:
                raise Conflict(f"layout would need {o * len(parts)} blocks")
            scaled = [Block(po, pv, pi * i) for po, pv, pi in parts]
            for _ in range(o):
                for b in scaled:
                    _push(out, b)
        return out

    def leaves(self, layout: Layout) -> list[int]:
        """Distinct leaf variables of a layout, in order of appearance.

        The returned list is shared with a cache: do not modify it.
        """
        if len(layout) == 1:
            # One block (most layouts): its repetitions do not change which leaves appear, or
            # their order; the cache is keyed by the root (hashing a layout costs more).
            r = self.find(layout[0][1])
            if self.sub[r] is None:
                return [r]
            out = self._root_leaves.get(r)
            if out is None:
                out = self._root_leaves[r] = self._distinct(self.expand((Block(1, r, 1),)))
            return out
        hit = self._leaves_memo.get(layout)
        if hit is None:
            hit = self._leaves_memo[layout] = self._distinct(self.expand(layout))
        return hit

    @staticmethod
    def _distinct(blocks: list[Block]) -> list[int]:
        seen: dict[int, None] = {}
        for _, v, _ in blocks:
            seen.setdefault(v, None)
        return list(seen)

    def is_fixed(self, layout: Layout) -> bool:
        """True when every leaf of the layout is frozen (its size can never change)."""
        return all(self.reason[v] is not None for v in self.leaves(layout))

    def freeze(self, layout: Layout, reason: str) -> None:
        """Freeze every leaf of ``layout`` (no-op for leaves already frozen)."""
        try:
            leaves = self.leaves(layout)
        except Conflict:
            leaves = self._all_vars(layout)
        for v in leaves:
            if self.reason[v] is None:
                self.reason[v] = reason

    def _all_vars(self, layout: Layout) -> list[int]:
        """Every leaf under ``layout`` without expanding repetitions (for huge layouts)."""
        out: list[int] = []
        stack = [v for _, v, _ in layout]
        while stack:
            r = self.find(stack.pop())
            sub = self.sub[r]
            if sub is None:
                out.append(r)
            else:
                stack.extend(v for _, v, _ in sub)
        return out

    def mark_inexact(self, layout: Layout) -> None:
        for v in self._all_vars(layout):
            self.inexact[v] = True

    def unify(self, a: Layout, b: Layout) -> None:
        """Make two layouts of equal total size denote the same channels, refining as needed.

        Raises:
            Conflict: when no refinement makes them agree (the caller freezes both).
        """
        if a is b or a == b:  # a layout tied to itself: no element-wise comparison
            return
        if len(a) == 1 and len(b) == 1:
            # Fast path, most unions: two blocks of equal size over unrefined variables, which
            # the general path below would pair the same way (without expanding both first).
            # Tying what is tied already (a concatenation's spatial dims, once per input) ends
            # at the roots, without a call.
            x, y = a[0], b[0]
            parent = self.parent
            v, w = x[1], y[1]
            rv = v if parent[v] == v else self.find(v)
            rw = w if parent[w] == w else self.find(w)
            if rv == rw and x[0] == y[0] and x[2] == y[2]:
                return
            sub, size = self.sub, self.size
            if (
                sub[rv] is None
                and sub[rw] is None
                and x[0] * size[rv] * x[2] == y[0] * size[rw] * y[2]
            ):
                self._unify_blocks(x, y)
                return
        ea, eb = self.expand(a), self.expand(b)
        if len(ea) > 1 and len(eb) == 1:
            ea, eb = eb, ea
        if len(ea) == 1 and len(eb) > 1 and ea[0][0] == 1 and ea[0][2] == 1:
            # one variable against a concatenation: split it once into all the parts (binary
            # cuts would build a chain of refinements, quadratic in the number of parts)
            vars_b = [v for _, v, _ in eb]
            if len(set(vars_b)) == len(vars_b) and ea[0][1] not in vars_b:
                parts = self.split(ea[0][1], [self._bsize(y) for y in eb])
                for p, y in zip(parts, eb, strict=True):
                    self._unify_blocks(Block(1, p, 1), y)
                return
        qa, qb = deque(ea), deque(eb)
        while qa and qb:
            x, y = self._head(qa), self._head(qb)
            sx, sy = self._bsize(x), self._bsize(y)
            if sx == sy:
                qa.popleft()
                qb.popleft()
                self._unify_blocks(x, y)
            elif sx < sy:
                qb.popleft()
                qb.extendleft(reversed(self._cut(y, sx)))
            else:
                qa.popleft()
                qa.extendleft(reversed(self._cut(x, sy)))
        if any(self._bsize(x) for x in qa) or any(self._bsize(y) for y in qb):
            raise AssertionError("unify() of layouts with different totals")

    def slice(self, layout: Layout, start: int, stop: int) -> Layout:
        """The sub-layout of positions ``[start, stop)``, refining variables at the cut points."""
        q = deque(self.expand(layout))
        pos = 0
        out: list[Block] = []
        while q and pos < stop:
            x = self._head(q)
            s = self._bsize(x)
            if pos + s <= start:
                q.popleft()
                pos += s
                continue
            if pos < start:
                q.popleft()
                q.extendleft(reversed(self._cut(x, start - pos)))
                continue
            if pos + s > stop:
                q.popleft()
                q.extendleft(reversed(self._cut(x, stop - pos)))
                continue
            q.popleft()
            out.append(x)
            pos += s
        return tuple(out)

    # -- internals ------------------------------------------------------------------------------

    def _bsize(self, b: Block) -> int:
        return b[0] * self.size[self.find(b[1])] * b[2]

    def _head(self, q: deque[Block]) -> Block:
        """The first block of ``q``, re-expanded if its variable was refined meanwhile."""
        while True:
            o, v, i = q[0]
            r = self.find(v)
            if self.sub[r] is None:
                if r != v:
                    q[0] = Block(o, r, i)
                return q[0]
            q.popleft()
            q.extendleft(reversed(self.expand((Block(o, r, i),))))

    def _cut(self, b: Block, p: int) -> list[Block]:
        """Blocks equal to ``b`` with a boundary at position ``p`` (0 < p < size(b))."""
        o, v, i = b
        r = self.find(v)
        n = self.size[r]
        unit = n * i
        k, rem = divmod(p, unit)
        if rem == 0:
            return [Block(k, r, i), Block(o - k, r, i)]
        if k > 0:
            rest = [Block(o - k - 1, r, i)] if o - k - 1 > 0 else []
            return [Block(k, r, i), Block(1, r, i), *rest]
        if rem % i:
            raise Conflict(f"cut at {p} falls inside a repeated channel (inner {i})")
        first, second = self.split(r, [rem // i, n - rem // i])
        rest = [Block(o - 1, r, i)] if o > 1 else []
        return [Block(1, first, i), Block(1, second, i), *rest]

    def _unify_blocks(self, x: Block, y: Block) -> None:
        o1, v, i1 = x
        o2, w, i2 = y
        v, w = self.find(v), self.find(w)
        if o1 == o2 and i1 == i2:
            self.link(v, w)
            return
        if v == w:
            raise Conflict("a slot meets itself with a different repetition structure")
        big_o, big_i = math.lcm(o1, o2), math.lcm(i1, i2)
        fv = (big_o // o1, big_i // i1)
        fw = (big_o // o2, big_i // i2)
        if self.size[v] % (fv[0] * fv[1]) or self.size[w] % (fw[0] * fw[1]):
            raise Conflict(
                f"blocks ({o1}, {self.size[v]}, {i1}) and ({o2}, {self.size[w]}, {i2}) "
                "have no common refinement"
            )
        v2 = self.factor(v, *fv)
        w2 = self.factor(w, *fw)
        self.link(v2, w2)


def _push(out: list[Block], b: Block) -> None:
    if b[0] == 0:
        return
    if out and out[-1][1] == b[1] and out[-1][2] == b[2]:
        o, v, i = out[-1]
        out[-1] = Block(o + b[0], v, i)
    else:
        out.append(b)
