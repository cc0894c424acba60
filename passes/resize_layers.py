"""Back end: choose kept channels for new widths and re-emit a resized GraphModule.

Weight inheritance (``init="inherit"``):

* **shrink**: a group keeps the channels with the largest L2 norm of its producers' weights,
  summed over every producer of the group (and over every repetition of a channel, e.g. the
  ``groups`` copies of a grouped conv's input). Ties go to the lower index. Kept channels stay in
  their original order.
* **grow**: every old channel is kept; new channels come after the old ones of the group. New
  output channels of a layer get the layer's default initialisation (``reset_parameters``); new
  *input* weights of consumers (conv/linear ``in`` dims) start at zero, so the model's function is
  unchanged (exactly, unless a LayerNorm/GroupNorm takes statistics across the new channels).
* Raw parameters used through ``F.conv2d``/``F.linear`` get PyTorch's default conv/linear init for
  new output channels; other raw parameters (a layer scale, a positional embedding) get zeros.

``init="reset"`` re-initialises every layer that has ``reset_parameters`` (the CONet reference's
behaviour between trials); raw parameters keep the inheritance rule.
"""

from __future__ import annotations

import copy
import operator
import types
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from fxconet.ir import ChannelGraph, check_widths
from fxconet.ops import registry as op_registry
from fxconet.ops.layout import Layout, is_layout
from fxconet.passes import fx_compat, parametrized
from fxconet.passes.module_copy import copies_itself, shallow_copy, structural_copy
from fxconet.passes.nodes import META_KEY, NodeView, get_attr
from fxconet.passes.solve_channels import LayerRecord, ParamRecord, Solution, solution_of
from fxconet.passes.verify import verify_channels

__all__ = [
    "ResizePlan",
    "build_resized",
    "emit",
    "expected_shapes",
    "plan_resize",
    "probe_resized",
    "resize_layers",
]

_INITS = ("inherit", "reset")


@dataclass(frozen=True, eq=False)
class ResizePlan:
    """Which original channels each group keeps.

    Attributes:
        widths: new width of every group, by id.
        index: per group id, a LongTensor of the new width whose entry ``j`` is the original
            channel index that new channel ``j`` comes from, or ``-1`` for a new channel.
        base: the same per leaf slot (internal; in units of the group's divisor).
    """

    widths: dict[int, int]
    index: dict[int, torch.Tensor]
    base: dict[int, np.ndarray] = field(repr=False)
    solution: Solution = field(repr=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save`` of a resized model): the widths and kept indices only, not
        the analysis (which holds a copy of the model and closures that do not pickle)."""
        return {"widths": self.widths, "index": self.index, "base": {}, "solution": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> ResizePlan:
        """A copy sharing the (read-only) analysis."""
        return ResizePlan(
            widths=dict(self.widths),
            index={g: t.clone() for g, t in self.index.items()},
            base={v: m.copy() for v, m in self.base.items()},
            solution=self.solution,
        )

    def _analysis(self) -> Solution:
        if self.solution is None:
            raise ValueError(
                "this resize plan was loaded from a file and keeps only the kept channels of "
                "each group (fxconet.kept_channels); per-layer positions need the analysis: "
                "resize the model again"
            )
        return self.solution

    def kept(self, gid: int) -> torch.Tensor:
        """Original channel indices that group ``gid`` keeps, ascending."""
        idx = self.index[gid]
        return idx[idx >= 0]

    def size_of(self, layout: Layout) -> int:
        """New total size of a layout (memoised per layout: the shape check asks for every
        node's, the modules' updates again)."""
        memo = self.__dict__.setdefault("_size_memo", {})
        hit = memo.get(layout)
        if hit is None:
            slots = self._analysis().slots
            hit = 0
            for b in slots.expand(layout):
                m = self.base.get(b.var)
                hit += b.outer * (len(m) if m is not None else slots.size[b.var]) * b.inner
            memo[layout] = hit
        return hit

    def positions(self, layout: Layout) -> np.ndarray:
        """For each position of the resized dim, the original position (or -1 for new).

        Memoised per layout (a norm's four tensors share one); do not modify the result."""
        memo = self.__dict__.setdefault("_position_memo", {})
        hit = memo.get(layout)
        if hit is None:
            hit = memo[layout] = self._positions(layout)
        return hit

    def _positions(self, layout: Layout) -> np.ndarray:
        slots = self._analysis().slots
        local = self.__dict__.setdefault("_block_memo", {})  # (var, outer, inner) -> positions
        parts: list[np.ndarray] = []
        offsets: list[int] = []
        changed = False
        off = 0
        for b in slots.expand(layout):
            n = slots.size[b.var]
            m = self.base.get(b.var)
            same = m is None or len(m) == n  # plan_resize keeps an unchanged slot as arange(n)
            key = (b.var, b.outer, b.inner)
            pos = local.get(key)
            if pos is None:
                pos = local[key] = _block_positions(n, b.outer, b.inner, None if same else m)
            changed = changed or not same
            parts.append(pos)
            offsets.append(off)
            off += b.outer * n * b.inner
        if not changed:
            return np.arange(off)
        # one concatenation and one offset add for the whole layout (a DenseNet concatenation
        # has dozens of blocks), instead of a few numpy calls per block
        cat = np.concatenate(parts)
        shift = np.repeat(np.asarray(offsets, dtype=np.int64), [len(p) for p in parts])
        return np.where(cat < 0, -1, cat + shift)

    def layer_channels(self, path: str) -> dict[str, torch.Tensor]:
        """Kept original indices of a layer's input (``"in"``) and output (``"out"``) channels
        (``-1`` marks new channels)."""
        rec = self._analysis().layers.get(path)
        if rec is None:
            raise KeyError(f"no layer {path!r}")
        out: dict[str, torch.Tensor] = {}
        for key, layout in (("in", rec.in_layout), ("out", rec.out_layout)):
            if layout is not None:
                out[key] = torch.from_numpy(self.positions(layout))
        return out


def _block_positions(n: int, outer: int, inner: int, m: np.ndarray | None) -> np.ndarray:
    """Positions of one layout block (``outer`` x ``n`` slot entries x ``inner``) relative to
    its start: the original position of each new one (``-1`` = new), ``m`` the slot's kept
    entries (None: unchanged)."""
    if m is None:
        return np.arange(outer * n * inner)
    if outer == 1 and inner == 1:
        return m
    a = np.arange(outer)[:, None, None] * (n * inner)
    c = m[None, :, None]
    t = np.arange(inner)[None, None, :]
    pos = a + c * inner + t
    return np.where(np.broadcast_to(c < 0, pos.shape), -1, pos).reshape(-1)


def _channel_scores(solution: Solution, leaves: set[int]) -> dict[int, np.ndarray]:
    """Per leaf slot, the sum over producers of the L2 norm of each channel's weights (over
    every repetition of the channel in the producer's output dim)."""
    slots = solution.slots
    scores = {v: np.zeros(slots.size[v], dtype=np.float64) for v in leaves}
    for rec in solution.params.values():
        if not rec.producer or rec.tensor.dim() < 2:  # weights only, not biases
            continue
        for d, role in rec.roles.items():
            if role != "out":
                continue
            blocks = slots.expand(rec.dims[d])
            if not any(b.var in scores for b in blocks):
                continue
            layer = solution.computed_by.get(id(rec.tensor))  # a parametrized weight, as it is now
            norms = _dim_norms(rec.tensor if layer is None else parametrized.computed(layer), d)
            off = 0
            for b in blocks:
                n = slots.size[b.var]
                size = b.outer * n * b.inner
                if b.var in scores:
                    per = norms[off : off + size].reshape(b.outer, n, b.inner)
                    scores[b.var] += per.sum(axis=(0, 2))
                off += size
    return scores


def _dim_norms(tensor: torch.Tensor, d: int) -> np.ndarray:
    t = tensor.detach()
    if t.device.type == "meta":
        return np.zeros(t.shape[d])
    others = tuple(i for i in range(t.dim()) if i != d)
    # accumulate in at least float32 without materialising a converted copy (a float64 copy
    # of every producer weight was a fifth of a resize); equal channels still tie exactly
    acc = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    if not others:
        return t.abs().to(torch.float64).cpu().numpy()
    return torch.linalg.vector_norm(t, dim=others, dtype=acc).to(torch.float64).cpu().numpy()


def plan_resize(
    graph: ChannelGraph, widths: Mapping[int, int], *, select: str = "norm"
) -> ResizePlan:
    """Validate ``widths`` (group id -> new width) and choose the kept channels of each group.

    ``select="norm"`` keeps the channels with the largest producer weight norms (ties by index);
    ``select="first"`` keeps the first channels (used by the shape probe, which needs no weights).

    Raises:
        ChannelError: unknown id, frozen group, width < 1 or not a multiple of the divisor.

    Example:
        >>> plan = plan_resize(graph, {1: 32})
        >>> plan.kept(1)   # the 32 channels of group 1 with the largest producer weight norms
    """
    solution = solution_of(graph)
    full = check_widths(graph, widths)
    base: dict[int, np.ndarray] = {}
    index: dict[int, torch.Tensor] = {}
    shrinking = {
        solution.leaf_of[gid]
        for gid, width in full.items()
        if width // solution.unit[gid] < solution.slots.size[solution.leaf_of[gid]]
    }
    scores = _channel_scores(solution, shrinking) if select == "norm" and shrinking else {}
    for gid, width in full.items():
        leaf = solution.leaf_of[gid]
        unit = solution.unit[gid]
        n = solution.slots.size[leaf]
        n_new = width // unit
        if n_new == n:
            m = np.arange(n)
        elif n_new > n:
            m = np.concatenate([np.arange(n), -np.ones(n_new - n, dtype=np.int64)])
        elif select == "first":
            m = np.arange(n_new)
        else:
            score = scores[leaf]
            order = np.lexsort((np.arange(n), -score))  # by score desc, then index asc
            m = np.sort(order[:n_new])
        base[leaf] = m.astype(np.int64)
        # user-facing index: channels of the group's narrowest appearance (unit per slot)
        u = np.arange(unit)
        full_idx = np.where(m[:, None] >= 0, m[:, None] * unit + u[None, :], -1).reshape(-1)
        index[gid] = torch.from_numpy(full_idx)
    return ResizePlan(widths=full, index=index, base=base, solution=solution)


# ---------------------------------------------------------------------------------------------
# building resized tensors and modules


class _DimMap:
    """How one dim of a tensor is resized: ``pos`` maps each new position to its original one
    (``-1`` = new). Derived once per position map and shared by every tensor resized along it
    (a norm's four tensors; a concatenation's consumers), with the index tensors ready."""

    __slots__ = ("grows", "kept_at", "new_at", "pos", "src")

    def __init__(self, pos: np.ndarray, old_size: int) -> None:
        self.pos = pos
        keep = pos >= 0
        src = pos[keep]
        self.grows = len(src) < len(pos)
        # None: the old entries are kept whole and in order (nothing to gather)
        prefix = len(src) == old_size and bool((src == np.arange(len(src))).all())
        self.src = None if prefix else torch.from_numpy(src)
        self.kept_at = torch.from_numpy(np.flatnonzero(keep)) if self.grows else None
        self.new_at = torch.from_numpy(np.flatnonzero(~keep)) if self.grows else None

    def __len__(self) -> int:
        return len(self.pos)


def _on(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    return index if device.type == "cpu" else index.to(device)


def _gather(
    old: torch.Tensor,
    maps: list[_DimMap | None],
    roles: dict[int, str],
    fresh: torch.Tensor | None,
) -> torch.Tensor:
    """Index ``old`` along every dim with a position map (``-1`` = new position).

    New positions take their values from ``fresh`` (the layer's default initialisation), except
    along input dims, where they are zero so consumers ignore new channels.
    """
    out = old.detach()
    copied = False
    for d, m in enumerate(maps):
        if m is not None and m.src is not None:
            out = out.index_select(d, _on(m.src, out.device))
            copied = True
    grown = [(d, m) for d, m in enumerate(maps) if m is not None and m.grows]
    if not grown:
        return out if copied else out.clone()
    shape = [len(m) if m is not None else s for m, s in zip(maps, old.shape, strict=True)]
    if fresh is None:
        full = torch.zeros(shape, dtype=old.dtype, device=old.device)
    else:
        full = fresh.detach().to(old.dtype)
    # move the grown dims to the front so one advanced-index assignment places the old block
    dims = [d for d, _ in grown]
    perm = dims + [d for d in range(old.dim()) if d not in dims]
    index = []
    for k, (_, m) in enumerate(grown):
        view = [1] * len(grown)
        view[k] = -1
        assert m.kept_at is not None
        index.append(_on(m.kept_at, old.device).view(view))
    with torch.no_grad():
        full.permute(perm)[tuple(index)] = out.permute(perm)
        for d, m in grown:
            if roles.get(d) == "in":
                assert m.new_at is not None
                full.index_fill_(d, _on(m.new_at, old.device), 0)
    return full


def _maps(
    plan: ResizePlan, rec: ParamRecord, cache: dict[tuple[int, int], _DimMap | None]
) -> list[_DimMap | None]:
    """Per dim of a parameter, how it is resized (None: unchanged); ``cache`` holds the maps
    already derived, by position map and old size."""
    maps: list[_DimMap | None] = []
    for d, layout in enumerate(rec.dims):
        pos = plan.positions(layout)
        n = rec.tensor.shape[d]
        key = (id(pos), n)  # positions are memoised per layout: the array outlives the cache
        if key in cache:
            maps.append(cache[key])
            continue
        m = _DimMap(pos, n)
        hit = cache[key] = None if m.src is None and not m.grows else m
        maps.append(hit)
    return maps


def _has_new(maps: list[_DimMap | None]) -> bool:
    """Whether some dim of a tensor gains positions."""
    return any(m is not None and m.grows for m in maps)


def _new_shape(rec: ParamRecord, maps: list[_DimMap | None]) -> tuple[int, ...]:
    return tuple(
        len(m) if m is not None else s for m, s in zip(maps, rec.tensor.shape, strict=True)
    )


def _default_raw_init(rec: ParamRecord, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Default values for new entries of a raw parameter (no module to reset)."""
    if rec.producer and len(shape) >= 2:
        return parametrized.default_weight(shape, like)  # nn.Conv2d / nn.Linear default
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (channels-last weights stay channels-last)."""
    if t.device.type == "meta" or t.dim() not in (4, 5) or like.is_contiguous():
        return t
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt) if like.is_contiguous(memory_format=fmt) else t


def _as_param(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(like, nn.Parameter):
        return nn.Parameter(t, requires_grad=like.requires_grad)
    return t


class _Builder:
    """Builds new modules and tensors for a plan (real weights, or meta for probing)."""

    def __init__(self, plan: ResizePlan, init: str, meta: bool, shallow: bool = False) -> None:
        self.plan = plan
        self.init = init
        self.meta = meta
        # shallow: module copies share attribute values with the model (only for the probe,
        # whose copies live for one shape check and are changed only by trusted updates)
        self.shallow = shallow and meta
        self.solution = plan.solution
        self.tensors: dict[int, torch.Tensor] = {}  # id(old tensor) -> new tensor
        self._maps: dict[int, list[_DimMap | None]] = {}
        self._dim_maps: dict[tuple[int, int], _DimMap | None] = {}

    def maps(self, rec: ParamRecord) -> list[_DimMap | None]:
        key = id(rec.tensor)
        hit = self._maps.get(key)
        if hit is None:
            hit = self._maps[key] = _maps(self.plan, rec, self._dim_maps)
        return hit

    def tensor(self, old: torch.Tensor, fresh: torch.Tensor | None = None) -> torch.Tensor:
        key = id(old)
        hit = self.tensors.get(key)
        if hit is not None:
            return hit
        rec = self.solution.params.get(key)
        if rec is None:
            new = torch.empty_like(old, device="meta") if self.meta else old.detach().clone()
        elif self.meta:  # shapes only: no position maps
            new = torch.empty(self._meta_shape(rec), dtype=old.dtype, device="meta")
        else:
            maps = self.maps(rec)
            if fresh is None and _has_new(maps):
                fresh = _default_raw_init(rec, _new_shape(rec, maps), old)
            new = _gather(old, maps, rec.roles, fresh)
        new = _as_param(_same_layout(new, old), old)
        self.tensors[key] = new
        return new

    def module(self, rec: LayerRecord | None, mod: nn.Module) -> nn.Module:
        """A resized copy of ``mod`` that shares nothing with it."""
        changed = rec is not None and self._changes(mod, rec)
        if not changed and not (self.init == "reset" and hasattr(mod, "reset_parameters")):
            return self._copy(mod)
        update = rec.update if rec is not None else None
        new = self._structural(mod, shallow=update is None or op_registry.assigns_only(update))
        size_of = self.plan.size_of
        if rec is not None and rec.update is not None:
            rec.update(new, size_of, rec.notes)
        own = [
            (n, t) for n, t in [*mod._parameters.items(), *mod._buffers.items()] if t is not None
        ]
        fresh: dict[str, torch.Tensor] = {}
        weighted = rec if rec is not None and parametrized.is_parametrized(mod, "weight") else None
        if weighted is not None:  # the weight lives in the parametrization: see _parametrized
            self._grow_originals(weighted, mod)
        elif not self.meta and (self.init == "reset" or self._grows(own)):
            for name, t in own:
                shape = self._shape_of(t)
                empty = torch.empty(shape, dtype=t.dtype, device=t.device)
                _set(new, name, _as_param(empty, t))
            reset = getattr(new, "reset_parameters", None)
            if callable(reset):
                with torch.no_grad():
                    reset()
            fresh = {name: _get(new, name).detach() for name, _ in own}
        for name, t in own:
            if self.init == "reset" and not self.meta and name in fresh:
                new_t = _as_param(fresh[name], t)
                self.tensors[id(t)] = new_t
            else:
                new_t = self.tensor(t, fresh.get(name))
            _set(new, name, new_t)
        if new._modules:
            for sub in new.modules():  # children of a resized module (a leaf with submodules)
                if sub is not new:
                    self._remap(sub)
        if weighted is not None:
            self._parametrized(weighted, mod, new)
        return new

    def _weight_record(self, layer: LayerRecord) -> ParamRecord | None:
        return self.solution.params.get(layer.params.get("weight", -1))

    def _grow_originals(self, layer: LayerRecord, mod: nn.Module) -> None:
        """A spectral-norm layer's new output channels: its original takes the default
        initialisation there (and zeros in new input channels, as any layer), not the zeros a
        raw tensor gets. (weight_norm's tensors are derived in :meth:`_parametrized`.)"""
        wrec = self._weight_record(layer)
        if wrec is None or self.meta or parametrized.norm_dim(mod) is not None:
            return
        for frec in self.solution.followers.get(id(wrec.tensor), []):
            if tuple(frec.tensor.shape) != tuple(wrec.tensor.shape):
                continue
            maps = self.maps(frec)
            if id(frec.tensor) in self.tensors or not _has_new(maps):
                continue
            old = frec.tensor
            init = parametrized.default_weight(_new_shape(frec, maps), old)
            self.tensors[id(old)] = _as_param(_gather(old, maps, frec.roles, init), old)

    def _parametrized(self, layer: LayerRecord, mod: nn.Module, new: nn.Module) -> None:
        """Finish a resized parametrized layer (see :mod:`fxconet.passes.parametrized`): the
        weight_norm tensors come from the old weight resized as a plain layer's; the spectral
        norm's ``_v`` follows the weight matrix's kept columns; ``init="reset"`` re-initialises
        the layer, the weight through its parametrization."""
        wrec = self._weight_record(layer)
        if wrec is None:
            return
        sp = parametrized.spectral(new)
        if sp is not None:
            positions = [self.plan.positions(layout) for layout in wrec.dims]
            shape = tuple(wrec.tensor.shape)
            parametrized.spectral_vectors(sp[1], shape, positions, meta=self.meta)
        if self.meta:
            return
        if self.init == "reset":
            reset = getattr(new, "reset_parameters", None)
            with torch.no_grad():
                if callable(reset):
                    reset()  # the bias (the weight it writes is computed, then dropped)
            parametrized.reset_weight(new)
        elif parametrized.norm_dim(new) is not None:
            old = parametrized.computed(mod)
            maps = self.maps(wrec)
            fresh = (
                parametrized.default_weight(_new_shape(wrec, maps), old) if _has_new(maps) else None
            )
            parametrized.set_weight_norm(new, _gather(old, maps, wrec.roles, fresh))

    def _shape_of(self, t: torch.Tensor) -> tuple[int, ...]:
        rec = self.solution.params.get(id(t))
        return tuple(t.shape) if rec is None else _new_shape(rec, self.maps(rec))

    def _grows(self, own: list[tuple[str, torch.Tensor]]) -> bool:
        for _, t in own:
            rec = self.solution.params.get(id(t))
            if rec is not None and _has_new(self.maps(rec)):
                return True
        return False

    def _meta_shape(self, rec: ParamRecord) -> tuple[int, ...]:
        """A parameter's new shape from the new sizes alone (all a shape check needs)."""
        return tuple(self.plan.size_of(layout) for layout in rec.dims)

    def _changes(self, mod: nn.Module, layer: LayerRecord) -> bool:
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is None:
                continue
            rec = self.solution.params.get(id(t))
            if rec is None:
                continue
            if self.meta:
                if self._meta_shape(rec) != tuple(t.shape):
                    return True
            elif any(m is not None for m in self.maps(rec)):
                return True
        for layout in layer.notes.get("layouts", ()):
            if self.plan.size_of(layout) != self.solution.slots.total(layout):
                return True
        return False

    def _structural(self, mod: nn.Module, shallow: bool = True) -> nn.Module:
        """A copy of the module tree that still holds the old tensors (in new dicts)."""
        if self.shallow and shallow:
            return structural_copy(mod)
        if mod._modules:
            memo: dict[int, Any] = {id(t): t for t in [*mod.parameters(), *mod.buffers()]}
        else:  # a leaf (most modules): its own tensors, without walking a module tree
            memo = {
                id(t): t
                for t in [*mod._parameters.values(), *mod._buffers.values()]
                if t is not None
            }
        return detached_copy(mod, memo)

    def _copy(self, mod: nn.Module) -> nn.Module:
        new = self._structural(mod)
        if new._modules:
            for sub in new.modules():
                self._remap(sub)
        else:
            self._remap(new)
        return new

    def _remap(self, sub: nn.Module) -> None:
        """Replace a copied module's own tensors by their new versions."""
        for name, t in list(sub._parameters.items()):
            if t is not None:
                sub._parameters[name] = self.tensor(t)  # type: ignore[assignment]
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = self.tensor(b)


#: attribute values a copy may share: immutable, or copied as themselves by ``deepcopy``
_SHARED = (
    int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, type,
    types.FunctionType, types.BuiltinFunctionType,
)  # fmt: skip


_ATOMS = frozenset({int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device})


def _shareable(value: Any) -> bool:
    t = type(value)
    if t in _ATOMS:  # exact types first: most attributes, without an isinstance walk
        return True
    if t is tuple:
        return all(type(v) in _ATOMS or isinstance(v, _SHARED) for v in value)
    return isinstance(value, _SHARED)


def detached_copy(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(mod, memo)``, faster: immutable attribute values are shared instead of
    copied, the parameter and buffer dicts are new dicts of the same tensors (``memo`` maps the
    tensors to themselves; the caller replaces them), every other value is deep-copied.
    Modules of classes that customise copying are deep-copied as they ask."""
    hit = memo.get(id(mod))
    if hit is not None:
        return hit
    cls = type(mod)
    if hasattr(cls, "__deepcopy__") or copies_itself(cls):
        return copy.deepcopy(mod, memo)
    new = shallow_copy(mod)
    memo[id(mod)] = new
    d = new.__dict__
    atoms = _ATOMS
    for key, value in mod.__dict__.items():
        t = type(value)
        if t in atoms:  # most attributes: shared, decided without a call
            continue
        if key in ("_parameters", "_buffers"):
            d[key] = t(value)
        elif key == "_modules":
            d[key] = {
                k: (detached_copy(c, memo) if c is not None else None) for k, c in value.items()
            }
        elif (t is dict or t is OrderedDict) and not value:
            d[key] = t()  # the hook dicts
        elif _shareable(value):
            continue
        elif t is list and all(type(v) in atoms for v in value):
            d[key] = list(value)  # a conv's _reversed_padding_repeated_twice
        elif type(value) is set and all(type(v) is str for v in value):
            d[key] = set(value)  # _non_persistent_buffers_set: names only
        elif key in d and d[key] is not value:  # rebound by shallow_copy (a bound method)
            continue
        elif isinstance(value, torch.Tensor) and not value.is_leaf:
            # a tensor computed from parameters and kept as an attribute (the legacy weight_norm
            # stores ``weight`` so, recomputed before every call): its value, without history
            d[key] = value.detach().clone()
        else:
            d[key] = copy.deepcopy(value, memo)
    return new


def _set(mod: nn.Module, name: str, t: torch.Tensor) -> None:
    if name in mod._parameters:
        mod._parameters[name] = t  # type: ignore[assignment]
    else:
        mod._buffers[name] = t


def _get(mod: nn.Module, name: str) -> torch.Tensor:
    t = mod._parameters.get(name)
    return t if t is not None else mod._buffers[name]  # type: ignore[return-value]


def _node_changes(solution: Solution, plan: ResizePlan) -> dict[str, dict[str, Any]]:
    """Per rewritten node name, its new fields (``op``/``target``/``args``/``kwargs``; the
    arguments name nodes of the traced graph)."""
    changes: dict[str, dict[str, Any]] = {}
    for name, fns in solution.rewrites.items():
        merged: dict[str, Any] = {}
        for fn in fns:
            merged.update(fn(plan.size_of))
        changes[name] = merged
    return changes


def _rewritten_graph(solution: Solution, plan: ResizePlan) -> torch.fx.Graph:
    graph = copy.deepcopy(solution.traced.graph)
    fx_compat.detach_tracer(graph)
    by_name = {n.name: n for n in graph.nodes}

    def remap(a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: by_name[n.name])

    for name, change in _node_changes(solution, plan).items():
        node = by_name[name]
        if "op" in change:
            node.op = change["op"]
        if "target" in change:
            node.target = change["target"]
        if "args" in change:
            node.args = remap(tuple(change["args"]))
        if "kwargs" in change:
            node.kwargs = remap(dict(change["kwargs"]))
    for node in graph.nodes:
        node.meta.pop(META_KEY, None)
    return graph


def build_resized(
    plan: ResizePlan, *, init: str = "inherit", meta: bool = False
) -> tuple[torch.fx.Graph, dict[str, Any]]:
    """The rewritten graph and its new modules/tensors by qualified name."""
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    solution = plan.solution
    builder = _Builder(plan, init, meta)
    owners = _owners(builder, copy_values=True)
    graph = _rewritten_graph(solution, plan)
    return graph, owners


def _owners(builder: _Builder, *, copy_values: bool) -> dict[str, Any]:
    """New modules and tensors of the graph's call_module and get_attr targets, by path (other
    attribute values are deep-copied when ``copy_values``, else left out)."""
    solution = builder.solution
    traced = solution.traced
    owners: dict[str, Any] = {}
    for node in traced.graph.nodes:
        target = str(node.target)
        if node.op not in ("call_module", "get_attr") or target in owners:
            continue
        value = traced.module(target) if node.op == "call_module" else get_attr(traced.root, target)
        if isinstance(value, nn.Module):
            owners[target] = builder.module(solution.layers.get(target), value)
        elif isinstance(value, torch.Tensor):
            owners[target] = builder.tensor(value)
        elif copy_values:
            owners[target] = copy.deepcopy(value)
    return owners


def probe_resized(plan: ResizePlan) -> tuple[dict[torch.fx.Node, NodeView], dict[str, Any]]:
    """What a shape check of ``plan`` needs, without building a graph: the rewritten nodes as
    views of the traced ones, and ``meta`` versions of the modules and tensors that change
    (copied shallowly: they must not outlive the check)."""
    solution = plan.solution
    traced = solution.traced
    builder = _Builder(plan, "inherit", meta=True, shallow=True)
    owners = _owners(builder, copy_values=False)
    by_name = {n.name: n for n in traced.graph.nodes}
    overrides = {
        by_name[name]: NodeView.of(by_name[name], change)
        for name, change in _node_changes(solution, plan).items()
    }
    return overrides, owners


def expected_shapes(plan: ResizePlan) -> dict[str, Any]:
    """Predicted shape of every tensor node after resizing (nested for tuple outputs)."""

    def shape(d: Any) -> Any:
        if d is None:
            return None
        if len(d) == 0 or is_layout(d[0]):
            return tuple(plan.size_of(layout) for layout in d)
        return tuple(shape(x) for x in d)

    return {name: shape(d) for name, d in plan.solution.dims.items()}


def _mutates(node: torch.fx.Node) -> bool:
    """A call that changes one of its inputs (``y.relu_()``, ``torch.sigmoid_(y)``,
    ``F.relu(y, inplace=True)``, ``y[:, k] = v``, ``out=``): needed even when nothing uses
    its result."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target is operator.setitem or "out" in node.kwargs:
            return True
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True


def eliminate_dead_code(graph: torch.fx.Graph) -> bool:
    """Remove nodes whose results nothing uses, keeping every node with a side effect: fx's
    impure ones and the in-place calls fx's own ``eliminate_dead_code`` removes (a ``y.relu_()``
    whose result is unused changes ``y``; torch 2.4 also drops ``operator.setitem``).
    Returns True when a node was removed."""
    removed = False
    for node in reversed(graph.nodes):
        if node.users or node.op in ("placeholder", "output"):
            continue
        if node.is_impure() or _mutates(node):
            continue
        graph.erase_node(node)
        removed = True
    return removed


def emit(plan: ResizePlan, *, init: str = "inherit", meta: bool = False) -> torch.fx.GraphModule:
    """Build the GraphModule of ``plan`` and end as every rewrite ends: dead code eliminated,
    ``lint()``, unused submodules deleted, recompiled, and verified on ``meta`` tensors against
    the channel analysis' predicted shapes.

    Args:
        plan: the widths and kept channels (:func:`plan_resize`).
        init: ``"inherit"`` or ``"reset"`` (see the module docstring).
        meta: build ``meta`` tensors only (a weight-less skeleton, as APS runs with
            ``torch.func.functional_call``).

    Raises:
        VerificationError: the rewritten graph does not compute the predicted shapes.
    """
    solution = plan.solution
    new_graph, owners = build_resized(plan, init=init, meta=meta)
    gm = torch.fx.GraphModule(owners, new_graph, solution.traced.name)  # compiles its code
    dead = False
    if solution.rewrites or not solution.free_of_dead_code:
        # an unrewritten copy of a traced graph that was found clean is clean again
        dead = eliminate_dead_code(gm.graph)
        gm.graph.lint()
        solution.free_of_dead_code = not dead and not solution.rewrites
    if dead:  # the code changed: compile it again
        gm.delete_all_unused_submodules()
        gm.recompile()
    verify_channels(
        gm,
        (solution.example_args, solution.example_kwargs),
        expected=expected_shapes(plan),
    )
    gm.meta["fxconet"] = plan
    gm.training = solution.traced.root.training  # submodules keep their own flags
    return gm


def resize_layers(
    graph: ChannelGraph, widths: Mapping[int, int], *, init: str = "inherit"
) -> tuple[torch.fx.GraphModule, ResizePlan]:
    """Resize every layer the changed groups touch and re-emit a verified GraphModule.

    The result shares no tensor with the input model. Kept channel indices are in the returned
    :class:`ResizePlan` (also stored as ``gm.meta["fxconet"]``).

    Raises:
        ChannelError: invalid widths, or a graph without solver state.
        VerificationError: the rewritten graph does not compute the predicted shapes.
    """
    solution_of(graph)  # a clear error for a graph not built by analyze()
    plan = plan_resize(graph, widths)
    return emit(plan, init=init), plan
