"""The channel IR: independent channel groups of a traced model.

A :class:`ChannelGroup` is one width that may be chosen freely (unless frozen): every tensor dim,
layer input and layer output whose channels are (copies of, or slices of) that group changes
together. :class:`ChannelGraph` is the result of :func:`fxconet.analyze`; it prints as a table and
converts to the paper's DAG with :meth:`ChannelGraph.to_networkx`.

Records name layers by module path and nodes by ``node.name``; nothing here holds a
``torch.fx.Node``, so the IR outlives the GraphModule it was computed from.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import numpy as np
import torch

from fxconet.errors import ChannelError

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "Deferred",
    "EdgeInfo",
    "LayerInfo",
    "TensorInfo",
    "check_widths",
    "round_width",
]


def _require(cond: bool, record: str, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{record}.{name}={value!r}: {why}")


@dataclass(frozen=True)
class ChannelGroup:
    """One independent channel width.

    Attributes:
        id: stable index of the group (graph order of its first producer), equal across runs.
        size: current width, in channels of the group's narrowest appearance.
        divisor: new widths must be multiples of it (grouped convs, ``view(N, g, C // g, ...)``).
        frozen: the width cannot change.
        reason: why the group is frozen (``None`` for a free group).
        producers: module (or parameter) paths whose output channels are this group.
        consumers: module (or parameter) paths whose input channels contain this group.
        layers: every module or parameter path resized when the width changes.
        exact: removing channels whose weights are all zero, and growing (new channels reach
            no consumer's weights), leave the model's function unchanged. False when an op
            computes statistics across the channels (LayerNorm over channels, GroupNorm,
            softmax, a mean or a sum over the channel dim).
    """

    id: int
    size: int
    divisor: int = 1
    frozen: bool = False
    reason: str | None = None
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    exact: bool = True

    def __post_init__(self) -> None:
        _require(self.id >= 0, "ChannelGroup", "id", self.id, "must be >= 0")
        _require(self.size >= 1, "ChannelGroup", "size", self.size, "must be >= 1")
        _require(self.divisor >= 1, "ChannelGroup", "divisor", self.divisor, "must be >= 1")
        _require(
            self.size % self.divisor == 0,
            "ChannelGroup",
            "size",
            self.size,
            f"must be a multiple of divisor={self.divisor}",
        )
        _require(
            self.frozen == (self.reason is not None),
            "ChannelGroup",
            "reason",
            self.reason,
            "a frozen group needs a reason and a free group has none",
        )

    @property
    def free(self) -> bool:
        """True when the width may change."""
        return not self.frozen


@dataclass(frozen=True)
class LayerInfo:
    """A layer (module or raw parameter) and the groups on its channel dims.

    Attributes:
        path: module path (``layer1.0.conv1``) or parameter path for raw parameters.
        kind: ``conv``, ``linear``, ``conv_transpose`` (width-choosing layers) or ``depthwise``,
            ``norm``, ``param``, ``other``.
        in_groups: groups of the input channel dim, in channel order (several after a concat).
        out_groups: groups of the output channel dim, in channel order.
        params: number of parameters of the layer.
    """

    path: str
    kind: str
    in_groups: tuple[int, ...]
    out_groups: tuple[int, ...]
    params: int = 0

    @property
    def is_conv(self) -> bool:
        """True for layers whose output width is a choice (the paper's conv edges)."""
        return self.kind in ("conv", "linear", "conv_transpose")


@dataclass(frozen=True)
class TensorInfo:
    """A feature map of the traced graph: a node of the paper's DAG."""

    name: str
    shape: tuple[int, ...]
    channel_dim: int | None
    groups: tuple[int, ...]


@dataclass(frozen=True)
class EdgeInfo:
    """An op from one feature map to another: an edge of the paper's DAG."""

    src: str
    dst: str
    op: str
    kind: str  # "conv" or "non-conv"


_T = TypeVar("_T")


class Deferred(Sequence[_T], Generic[_T]):
    """A read-only sequence computed on first use.

    ``analyze`` fills :attr:`ChannelGraph.tensors` and :attr:`ChannelGraph.edges` with these:
    the DAG costs about 5% of an analysis and only :meth:`ChannelGraph.to_networkx` reads it.
    """

    __slots__ = ("_items", "_make")

    def __init__(self, make: Callable[[], Sequence[_T]]) -> None:
        self._make: Callable[[], Sequence[_T]] | None = make
        self._items: tuple[_T, ...] | None = None

    def _get(self) -> tuple[_T, ...]:
        if self._items is None:
            assert self._make is not None
            self._items = tuple(self._make())
            self._make = None
        return self._items

    @overload
    def __getitem__(self, i: int) -> _T: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[_T, ...]: ...
    def __getitem__(self, i: int | slice) -> _T | tuple[_T, ...]:
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[_T]:
        return iter(self._get())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Deferred):
            other = other._get()
        return self._get() == other if isinstance(other, tuple) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


@dataclass(frozen=True, eq=False)
class ChannelGraph:
    """Independent channel groups of a model, as found by :func:`fxconet.analyze`.

    Attributes:
        groups: the channel groups, ids 0..n-1.
        layers: every layer with its input and output groups.
        tensors, edges: the paper's DAG (see :meth:`to_networkx`); read-only sequences,
            computed on first use.
        model_name: the model's class name.
        notes: things the user should know (e.g. Python branches specialised to the example
            input's shapes while tracing).
        state: the solver's state, used by :func:`fxconet.resize` (internal).

    Example:
        >>> graph = fxconet.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> print(graph)                   # a table of groups
        >>> graph.free[0].size, graph.widths()
    """

    groups: tuple[ChannelGroup, ...]
    layers: tuple[LayerInfo, ...] = ()
    tensors: Sequence[TensorInfo] = ()
    edges: Sequence[EdgeInfo] = ()
    model_name: str = "model"
    notes: tuple[str, ...] = ()
    state: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for i, g in enumerate(self.groups):
            _require(
                g.id == i, "ChannelGraph", "groups", g.id, f"group ids must be 0..n-1 (at {i})"
            )

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def group(self, gid: int) -> ChannelGroup:
        """The group with id ``gid`` (``KeyError`` naming the valid range otherwise)."""
        if not isinstance(gid, int) or not 0 <= gid < len(self.groups):
            raise KeyError(f"no channel group {gid!r}; ids are 0..{len(self.groups) - 1}")
        return self.groups[gid]

    @property
    def free(self) -> tuple[ChannelGroup, ...]:
        """The groups whose width may change."""
        return tuple(g for g in self.groups if not g.frozen)

    @property
    def frozen(self) -> tuple[ChannelGroup, ...]:
        """The groups whose width is fixed, each with its reason."""
        return tuple(g for g in self.groups if g.frozen)

    def widths(self) -> dict[int, int]:
        """Current width of every group, by id."""
        return {g.id: g.size for g in self.groups}

    def layer(self, path: str) -> LayerInfo:
        """The :class:`LayerInfo` of a module or parameter path."""
        for info in self.layers:
            if info.path == path:
                return info
        raise KeyError(f"no layer {path!r} in the channel graph")

    def groups_of(self, path: str) -> tuple[ChannelGroup, ...]:
        """Groups whose width changes the layer at ``path``."""
        return tuple(g for g in self.groups if path in g.layers)

    def conv_params(self) -> tuple[int, int]:
        """(parameters of width-choosing layers, those of them touched by a free group)."""
        total = free = 0
        free_ids = {g.id for g in self.free}
        for info in self.layers:
            if info.kind in ("conv", "linear", "conv_transpose", "depthwise"):
                total += info.params
                if free_ids.intersection(info.in_groups + info.out_groups):
                    free += info.params
        return total, free

    def to_networkx(self) -> Any:
        """The paper's DAG as a ``networkx.MultiDiGraph``.

        Nodes are feature maps (``node.name``) with attributes ``shape``, ``channel_dim`` and
        ``groups``; edges are ops with attributes ``op`` and ``kind`` (``"conv"`` for layers that
        choose a new width, ``"non-conv"`` for everything else).
        """
        import networkx as nx

        dag = nx.MultiDiGraph(name=self.model_name)
        for t in self.tensors:
            dag.add_node(t.name, shape=t.shape, channel_dim=t.channel_dim, groups=t.groups)
        for e in self.edges:
            dag.add_edge(e.src, e.dst, op=e.op, kind=e.kind)
        return dag

    def table(self, *, max_layers: int = 3) -> str:
        """A readable table: one row per group."""
        rows = [("id", "size", "div", "state", "producers", "consumers", "reason")]
        for g in self.groups:
            rows.append(
                (
                    str(g.id),
                    str(g.size),
                    str(g.divisor),
                    "frozen" if g.frozen else "free",
                    _abbrev(g.producers, max_layers),
                    _abbrev(g.consumers, max_layers),
                    g.reason or "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = []
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)] + [r[-1]]
            lines.append("  ".join(cells).rstrip())
        total, free = self.conv_params()
        pct = 100.0 * free / total if total else 0.0
        lines.insert(1, "-" * len(lines[0]))
        header = (
            f"ChannelGraph({self.model_name}): {len(self.groups)} groups, {len(self.free)} free, "
            f"{pct:.1f}% of conv parameters free"
        )
        return "\n".join([header, *lines, *(f"note: {n}" for n in self.notes)])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"ChannelGraph({self.model_name!r}, groups={len(self.groups)}, free={len(self.free)})"
        )


def _abbrev(items: tuple[str, ...], n: int) -> str:
    if len(items) <= n:
        return ",".join(items) or "-"
    return ",".join(items[:n]) + f",+{len(items) - n}"


def check_widths(graph: ChannelGraph, widths: Mapping[int, int]) -> dict[int, int]:
    """Validate ``widths`` against ``graph`` and return the full width map (all groups).

    Raises:
        ChannelError: unknown id, frozen group, width < 1 or not a multiple of the divisor.
    """
    if not isinstance(widths, Mapping):
        raise ChannelError(
            f"widths must be a mapping of group id -> width (e.g. {{1: 32}}), got "
            f"{type(widths).__name__}"
        )
    full = graph.widths()
    for key, width in widths.items():
        gid = _integer(key)
        if gid is None or not 0 <= gid < len(graph.groups):
            raise ChannelError(
                f"unknown channel group {key!r}: {graph.model_name} has groups "
                f"0..{len(graph.groups) - 1}"
            )
        g = graph.groups[gid]
        where = f"group {gid} (producers {_abbrev(g.producers, 4)}; consumers " + (
            f"{_abbrev(g.consumers, 4)})"
        )
        as_int = _integer(width, integral_floats=True)
        if as_int is None:
            raise ChannelError(f"{where}: width must be an integer, got {width!r}")
        width = as_int
        if g.frozen and width != g.size:
            raise ChannelError(
                f"{where} is frozen ({g.reason}); it must stay {g.size}, got {width}"
            )
        if width < 1:
            raise ChannelError(f"{where}: width must be >= 1, got {width}")
        if width % g.divisor:
            raise ChannelError(
                f"{where}: width must be a multiple of {g.divisor}, got {width} "
                f"(nearest: {max(g.divisor, round(width / g.divisor) * g.divisor)})"
            )
        full[gid] = width
    return full


def _integer(value: Any, *, integral_floats: bool = False) -> int | None:
    """``value`` as a Python int when it is an integer (NumPy and torch integers included;
    floats with an integral value when ``integral_floats``), else None. Booleans are not."""
    if isinstance(value, bool | np.bool_) or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool
    ):
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    if integral_floats and isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    return None


def round_width(x: float, step: int, *, low: int = 1, high: int | None = None) -> int:
    """Nearest multiple of ``step`` to ``x`` (half to even), clamped to ``[low, high]`` and at
    least ``step``: a valid width for a group whose divisor divides ``step``.

    Example:
        >>> round_width(37.0, 8), round_width(3.0, 8), round_width(300.0, 8, high=256)
        (40, 8, 256)
    """
    w = int(round(x / step)) * step
    lo = max(step, int(math.ceil(low / step)) * step)
    w = max(w, lo)
    if high is not None:
        w = min(w, max(lo, (high // step) * step))
    return w
