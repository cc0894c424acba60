"""Analysis: solve the channel constraints of a traced graph (paper Alg. 1, generalised).

Every node is visited once in graph (topological) order. Its op rule (``fxconet.ops``) reads the
layouts of its inputs and returns the layouts of its outputs, tying, refining, producing or
freezing channel slots through a :class:`RuleContext`. Model inputs and outputs are frozen. The
leaves of the slot union-find that a width-choosing layer produces are the channel groups.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from fxconet import ops as _ops
from fxconet.errors import ChannelError
from fxconet.ir import ChannelGraph, ChannelGroup, Deferred, EdgeInfo, LayerInfo, TensorInfo
from fxconet.ops.layout import Block, Dims, Layout, is_layout, iter_layouts
from fxconet.passes import parametrized
from fxconet.passes.nodes import META_KEY, NodeInfo, Traced, describe_node, get_attr, has_submodule
from fxconet.passes.slots import Conflict, Slots

__all__ = [
    "LayerRecord",
    "ParamRecord",
    "RuleContext",
    "Solution",
    "build_graph",
    "freeze_dims",
    "is_layout",
    "iter_layouts",
    "solution_of",
    "solve_channels",
]

Rewrite = Callable[[Callable[[Layout], int]], dict[str, Any]]


@dataclass
class ParamRecord:
    """A parameter or buffer whose dims carry channel slots."""

    path: str  # qualified name in the model (the first one for a shared tensor)
    tensor: torch.Tensor
    dims: Dims
    roles: dict[int, str] = field(default_factory=dict)  # dim -> "in" | "out"
    producer: bool = False  # out-dim channels are chosen by this tensor's layer


@dataclass
class LayerRecord:
    """A module called by the graph (or a raw parameter used as a layer), for resizing."""

    path: str
    kind: str  # conv | linear | conv_transpose | depthwise | norm | param | other
    module: nn.Module | None
    params: dict[str, int] = field(default_factory=dict)  # attribute name -> id(tensor)
    notes: dict[str, Any] = field(default_factory=dict)
    update: Callable[..., None] | None = None  # sets module attributes after resizing
    in_layout: Layout | None = None
    out_layout: Layout | None = None


@dataclass
class Solution:
    """Everything the rewrite needs: slots, layouts per node, parameters, layers, rewrites."""

    traced: Traced
    slots: Slots
    dims: dict[str, Any]  # node.name -> Dims | nested tuple of Dims | None
    params: dict[int, ParamRecord]
    layers: dict[str, LayerRecord]
    rewrites: dict[str, list[Rewrite]]
    kinds: dict[str, str]
    provenance: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    group_of: dict[int, int] = field(default_factory=dict)  # leaf var -> group id
    leaf_of: list[int] = field(default_factory=list)  # group id -> leaf var
    unit: list[int] = field(default_factory=list)  # group id -> channels per base slot
    needs_probe: bool = False
    # id(parametrized weight) -> records of the tensors it is computed from (they resize with it)
    followers: dict[int, list[ParamRecord]] = field(default_factory=dict)
    computed_by: dict[int, nn.Module] = field(default_factory=dict)  # id(weight) -> its layer
    # True once a rewrite of this trace found no dead code and passed lint(), where no node is
    # rewritten (the graph copied for a resize is then the traced one: dead-code elimination
    # and lint() are skipped)
    free_of_dead_code: bool = False
    example_args: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)


class RuleContext:
    """What an op rule sees: its node, its inputs' layouts, and the constraint operations.

    A rule is a function ``rule(ctx) -> outputs`` where ``outputs`` are the per-dim layouts of
    the node's tensor output (a tuple with one :data:`Layout` per dim), a list/tuple of those for
    ops returning several tensors, or ``None`` for non-tensor results.
    """

    def __init__(self, solver: _Solver, node: torch.fx.Node, module: nn.Module | None) -> None:
        self._solver = solver
        self._slots = solver.slots
        self.node = node
        self.module = module
        self.path: str | None = str(node.target) if node.op == "call_module" else None
        self.is_conv = False

    # -- reading --------------------------------------------------------------------------------

    @property
    def args(self) -> tuple[Any, ...]:
        return self.node.args

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.node.kwargs)

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name`` (raw: a Node or a literal)."""
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def value(self, a: Any) -> Any:
        """The meta value of a Node argument, or the literal itself."""
        if isinstance(a, torch.fx.Node):
            return a.meta[META_KEY].value
        return a

    @property
    def out(self) -> Any:
        """This node's meta value."""
        return self.node.meta[META_KEY].value

    def shape(self, a: Any) -> tuple[int, ...]:
        v = self.value(a)
        return tuple(v.shape)

    def dims(self, a: Any) -> Dims | None:
        """Per-dim layouts of a tensor argument (None for non-tensors)."""
        if isinstance(a, torch.fx.Node):
            d = self._solver.dims.get(a.name)
            if isinstance(d, tuple) and (not d or isinstance(d[0], tuple) and is_layout(d[0])):
                return d
            return None
        return None

    def layouts(self, a: Any) -> Any:
        """The raw layouts of any Node argument: a tensor's Dims, a tuple of them for a
        tuple-valued node, or None."""
        if isinstance(a, torch.fx.Node):
            return self._solver.dims.get(a.name)
        return None

    def variable(self, layout: Layout) -> bool:
        """True when some channel of ``layout`` may still change size (not every slot frozen)."""
        return not self._slots.is_fixed(layout)

    def size_terms(self, layout: Layout) -> dict[int, int]:
        """The size of ``layout`` as a sum over free slots (``{slot: multiplicity}``) plus the
        frozen part under key ``-1``: two layouts have the same size for every choice of widths
        exactly when their terms are equal."""
        slots = self._slots
        terms: dict[int, int] = {}
        for b in slots.expand(layout):
            if slots.reason[b.var] is not None:
                terms[-1] = terms.get(-1, 0) + b.outer * slots.size[b.var] * b.inner
            else:
                terms[b.var] = terms.get(b.var, 0) + b.outer * b.inner
        return terms

    def tensor_args(self) -> list[torch.fx.Node]:
        """Every tensor-valued Node among the (nested) args and kwargs."""
        found: list[torch.fx.Node] = []

        def visit(a: Any) -> Any:
            if isinstance(self.value(a), torch.Tensor) and self.dims(a) is not None:
                found.append(a)
            return a

        torch.fx.node.map_arg((self.node.args, self.node.kwargs), visit)
        return found

    def provenance(self, a: Any) -> Any:
        """For a size value computed from a tensor (``x.size(1)``), the layout it measures."""
        if isinstance(a, torch.fx.Node):
            return self._solver.provenance.get(a.name)
        return None

    def set_provenance(self, value: Any) -> None:
        """Record the layout a size value (``x.size(1)``) computed by this node measures."""
        self._solver.provenance[self.node.name] = value

    def describe(self) -> str:
        return describe_node(self.node)

    # -- building layouts -----------------------------------------------------------------------

    def fresh(self, size: int, *, produced: bool = False) -> Layout:
        """A layout of one new free variable (``produced``: a width-choosing layer makes it)."""
        return self._slots.layout(size, produced=produced)

    def fixed(self, size: int, what: str = "dim") -> Layout:
        """A layout of one new frozen variable (a dim whose size can never change)."""
        return self._slots.layout(size, reason=f"{what} of `{self.node.name}` is fixed")

    def fixed_dims(self, shape: Sequence[int], what: str = "dim") -> Dims:
        return tuple(self.fixed(int(s), what) for s in shape)

    def fixed_like(self, value: Any, what: str = "output") -> Any:
        """Frozen layouts for every tensor in a (nested) value."""
        if isinstance(value, torch.Tensor):
            return self.fixed_dims(value.shape, what)
        if isinstance(value, tuple | list):
            return tuple(self.fixed_like(v, what) for v in value)
        return None

    def param(
        self,
        name: str,
        module: nn.Module | None = None,
        *,
        like: tuple[Layout | None, ...] | None = None,
    ) -> Dims | None:
        """Per-dim layouts of parameter/buffer ``name`` of this node's module (None if unset).

        ``like``: the layouts the parameter's dims are about to be tied to (a norm's weight to
        its input channels); a parameter seen for the first time takes them directly. Tie them
        anyway: a shared parameter keeps the layouts it got first.
        """
        mod = module if module is not None else self.module
        if mod is None:
            raise AssertionError("param() needs a module")
        t = self._solver.tensor_attr(mod, name)
        if not isinstance(t, torch.Tensor):
            return None
        layer = self.layer()
        layer.params[name] = id(t)
        path = f"{self.path}.{name}" if self.path else name
        dims = self._solver.param_dims(t, path, like)
        if parametrized.is_parametrized(mod, name):
            self._solver.follow_weight(mod, t, dims, path)
        return dims

    def role(self, name: str, dim: int, role: str) -> None:
        """Mark dim ``dim`` of parameter ``name`` as the layer's "in" or "out" channels."""
        assert self.module is not None
        t = self._solver.tensor_attr(self.module, name)
        rec = self._solver.params[id(t)]
        rec.roles[dim] = role
        if role == "out" and self.is_conv:
            rec.producer = True
        for other in self._solver.followers.get(id(t), ()):  # a parametrized weight's originals
            if other.tensor.dim() == rec.tensor.dim():
                other.roles[dim] = role

    def layer(self, kind: str | None = None) -> LayerRecord:
        """The :class:`LayerRecord` of this node's module (created on first use)."""
        assert self.path is not None
        rec = self._solver.layers.get(self.path)
        if rec is None:
            rec = LayerRecord(path=self.path, kind=kind or "other", module=self.module)
            self._solver.layers[self.path] = rec
        elif kind is not None:
            rec.kind = kind
        return rec

    def raw_layer(
        self,
        weight: Any,
        bias: Any,
        kind: str,
        lin: Layout | None,
        lout: Layout | None,
    ) -> None:
        """Make raw parameters used by a functional conv/linear (``F.conv2d(x, self.w, self.b)``)
        a layer like a module's weight: in/out roles, the bias attached to the weight's layer,
        and the layer's channel layouts. A weight computed from a parameter of the same shape
        through a chain of ops on their first argument (weight standardisation:
        ``F.batch_norm(w.reshape(1, o, -1), ...).reshape_as(w)``) is that parameter's layer;
        other nodes are ignored."""
        solver = self._solver

        def record(node: Any) -> ParamRecord | None:
            if not isinstance(node, torch.fx.Node):
                return None
            shape = _shape_of(node)
            for _ in range(8):
                if node.op == "get_attr" or not node.args:
                    break
                if not isinstance(node.args[0], torch.fx.Node):
                    return None
                node = node.args[0]
            if node.op != "get_attr" or _shape_of(node) != shape:
                return None
            return next((r for r in solver.params.values() if r.path == str(node.target)), None)

        w, b = record(weight), record(bias)
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

    # -- constraints ----------------------------------------------------------------------------

    def tie(self, a: Layout, b: Layout, why: str | None = None) -> bool:
        """Constrain two layouts to the same channels; on conflict freeze both and return False."""
        try:
            self._slots.unify(a, b)
            return True
        except Conflict as e:
            reason = why or f"incompatible channel layouts at {self.describe()}: {e}"
            self._slots.freeze(a, reason)
            self._slots.freeze(b, reason)
            return False

    def freeze(self, *layouts: Layout | None, reason: str) -> None:
        for layout in layouts:
            if layout is not None:
                self._slots.freeze(layout, reason)

    def freeze_dims(self, dims: Any, reason: str) -> None:
        """Freeze every layout in a (nested) Dims value."""
        freeze_dims(self._slots, dims, reason)

    def produce(self, layout: Layout) -> None:
        """Mark the leaves of ``layout`` as chosen by this (width-choosing) layer."""
        self.is_conv = True
        for v in self._slots.leaves(layout):
            self._slots.produced[v] = True

    def inexact(self, layout: Layout) -> None:
        """This op takes statistics across the channels of ``layout``."""
        self._slots.mark_inexact(layout)

    def factor(self, layout: Layout, outer: int, inner: int) -> Layout | None:
        """Constrain ``layout`` to ``(outer, u, inner)`` for a new variable ``u``; returns ``u``'s
        layout, or None (and freezes ``layout``) when impossible."""
        total = self._slots.total(layout)
        if outer * inner == 0 or total % (outer * inner):
            self.freeze(layout, reason=f"{self.describe()} needs {outer}x{inner} structure")
            return None
        u = self._slots.new(total // (outer * inner))
        ok = self.tie(layout, (Block(outer, u, inner),))
        return (Block(1, u, 1),) if ok else None

    def slice(self, layout: Layout, start: int, stop: int) -> Layout:
        """Positions ``[start, stop)`` of ``layout`` (refines at the cut points)."""
        try:
            return self._slots.slice(layout, start, stop)
        except Conflict as e:
            self.freeze(layout, reason=f"cannot slice channels at {self.describe()}: {e}")
            return self.fixed(stop - start, "slice")

    def rewrite(self, fn: Rewrite) -> None:
        """Register how to update this node's target/args/kwargs for new widths.

        ``fn(size_of)`` gets a function returning the new total size of a layout and returns a
        dict with any of ``target``, ``args``, ``kwargs``.
        """
        self._solver.rewrites.setdefault(self.node.name, []).append(fn)

    def dynamic(self) -> None:
        """This node's shapes depend on values computed at run time (the analysis then probes a
        resize to confirm its predictions)."""
        self._solver.needs_probe = True

    def opaque(self, why: str | None = None) -> Any:
        """Freeze every channel slot this node touches; its outputs get fixed layouts."""
        reason = why or f"no channel rule for {self.describe()}"
        for a in self.tensor_args():
            self.freeze_dims(self.dims(a), reason)
        if self.module is not None:
            for _, t in self.module.named_parameters(recurse=True):
                if id(t) in self._solver.params:
                    self.freeze_dims(self._solver.params[id(t)].dims, reason)
        return self.fixed_like(self.out, "output of an opaque op")


def _shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    info = node.meta.get(META_KEY)
    value = info.value if isinstance(info, NodeInfo) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def freeze_dims(slots: Slots, dims: Any, reason: str) -> None:
    """Freeze every Layout in a (nested) Dims value."""
    for layout in iter_layouts(dims):
        slots.freeze(layout, reason)


class _Solver:
    def __init__(
        self, traced: Traced, freeze: Iterable[Any], kept: Mapping[str, str] | None = None
    ) -> None:
        self.traced = traced
        self.kept = dict(kept or {})
        self.slots = Slots()
        self.dims: dict[str, Any] = {}
        self.params: dict[int, ParamRecord] = {}
        # a parametrized layer's computed weight, read once (each read computes a new tensor)
        self.computed: dict[tuple[int, str], torch.Tensor] = {}
        self.followers: dict[int, list[ParamRecord]] = {}  # id(weight) -> its originals' records
        self.computed_by: dict[int, nn.Module] = {}  # id(weight) -> the layer computing it
        self.layers: dict[str, LayerRecord] = {}
        self.rewrites: dict[str, list[Rewrite]] = {}
        self.kinds: dict[str, str] = {}
        self.provenance: dict[str, Any] = {}
        self.needs_probe = False
        self.notes: list[str] = []
        self.freeze_types = tuple(f for f in freeze if isinstance(f, type))
        self.freeze_paths = {f for f in freeze if isinstance(f, str)}
        bad = [f for f in freeze if not isinstance(f, type | str)]
        if bad:
            raise TypeError(f"freeze= takes module paths or nn.Module types, got {bad!r}")
        unknown = [p for p in self.freeze_paths if not has_submodule(traced.root, p)]
        if unknown:
            raise KeyError(f"freeze= names unknown module paths {sorted(unknown)}")

    def tensor_attr(self, mod: nn.Module, name: str) -> Any:
        """``getattr(mod, name)``; a parametrized tensor is computed once and remembered."""
        if not parametrized.is_parametrized(mod, name):
            return getattr(mod, name, None)
        key = (id(mod), name)
        hit = self.computed.get(key)
        if hit is None:
            hit = self.computed[key] = parametrized.computed(mod, name)
            self.computed_by[id(hit)] = mod
        return hit

    def follow_weight(self, mod: nn.Module, weight: torch.Tensor, dims: Dims, path: str) -> None:
        """Records for the tensors a parametrized weight is computed from (see
        :mod:`fxconet.passes.parametrized`), whose dims follow the weight's ``dims``."""
        if id(weight) in self.followers or parametrized.why_frozen(mod) is not None:
            return
        owner = path.rpartition(".")[0]
        prefix = f"{owner}." if owner else ""
        recs = []
        for name, t in parametrized.originals(mod):
            odims = tuple(
                d if t.shape[k] == weight.shape[k] else self.slots.layout(1, reason="broadcast dim")
                for k, d in enumerate(dims)
            )
            recs.append(self._follower(t, odims, prefix + name))
        sp = parametrized.spectral(mod)
        if sp is not None:
            sub, sn = sp
            recs.append(self._follower(sn._u, (dims[int(sn.dim)],), f"{prefix}{sub}._u"))
        self.followers[id(weight)] = recs

    def _follower(self, t: torch.Tensor, dims: Dims, path: str) -> ParamRecord:
        rec = self.params.get(id(t))
        if rec is None:
            rec = self.params[id(t)] = ParamRecord(path=path, tensor=t, dims=dims)
        return rec

    def param_dims(
        self,
        t: torch.Tensor,
        path: str,
        like: tuple[Layout | None, ...] | None = None,
        *,
        kernel_from: int | None = None,
    ) -> Dims:
        """Per-dim layouts of a parameter: ``like`` for one seen here first whose shape fits it
        (what a fresh layout tied to ``like`` would become, without the variables; a None entry
        of ``like`` is a fresh variable), else one fresh variable per dim (dims from
        ``kernel_from`` on frozen: a conv weight's kernel)."""
        rec = self.params.get(id(t))
        if rec is None:
            slots = self.slots

            def fresh(k: int, s: int) -> Layout:
                if kernel_from is not None and k >= kernel_from:
                    return slots.layout(int(s), reason=f"kernel dim of `{path}`")
                return slots.layout(int(s))

            if (
                like is not None
                and len(like) == t.dim()
                and all(
                    lay is None or slots.total(lay) == s
                    for lay, s in zip(like, t.shape, strict=True)
                )
            ):
                dims = tuple(
                    fresh(k, s) if lay is None else lay
                    for k, (lay, s) in enumerate(zip(like, t.shape, strict=True))
                )
            else:
                dims = tuple(fresh(k, s) for k, s in enumerate(t.shape))
            rec = ParamRecord(path=path, tensor=t, dims=dims)
            self.params[id(t)] = rec
        return rec.dims

    def run(self) -> None:
        for node in self.traced.graph.nodes:
            self.visit(node)
        for guard in self.traced.guards:
            self.freeze_guard(guard)

    def freeze_guard(self, guard: torch.fx.Node) -> None:
        """Python control flow decided on ``guard``'s value while tracing: freeze the sizes it
        measured, so no resize can take the other branch."""
        scope = guard.meta[META_KEY].scope if META_KEY in guard.meta else ""
        where = f"`{scope}`" if scope else "the model's forward"
        reason = (
            f"a Python branch in {where} (node `{guard.name}`) depends on this size; the trace "
            "took the branch of the example input"
        )
        self.notes.append(
            f"{where}: Python control flow at node `{guard.name}` was decided on the example "
            "input's shapes; the traced graph is specialised to them there"
        )
        seen: set[str] = set()
        stack = [guard]
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            prov = self.provenance.get(n.name)
            if prov is not None:
                freeze_dims(self.slots, prov, reason)
                continue
            if isinstance(n.meta[META_KEY].value, torch.Tensor):
                freeze_dims(self.slots, self.dims.get(n.name), reason)
                continue
            stack.extend(n.all_input_nodes)

    def visit(self, node: torch.fx.Node) -> None:
        info: NodeInfo = node.meta[META_KEY]
        value = info.value
        ctx: RuleContext
        if node.op == "placeholder":
            self.dims[node.name] = _fixed_value(self.slots, value, f"model input `{node.name}`")
            return
        if node.op == "output":
            reason = "model output"
            ctx = RuleContext(self, node, None)
            for a in ctx.tensor_args():
                ctx.freeze_dims(ctx.dims(a), reason)
            return
        if node.op == "get_attr":
            if isinstance(value, torch.Tensor):
                target = str(node.target)
                t = get_attr(self.traced.root, target)
                owner, _, attr = target.rpartition(".")
                mod = (
                    self.traced.module(owner)
                    if owner and has_submodule(self.traced.root, owner)
                    else None
                )
                # a conv's own weight read raw (weight standardisation): its kernel dims are fixed
                kernel = isinstance(mod, nn.modules.conv._ConvNd) and attr == "weight"
                self.dims[node.name] = self.param_dims(t, target, kernel_from=2 if kernel else None)
                rec = self.layers.get(str(node.target))
                if rec is None:
                    self.layers[str(node.target)] = LayerRecord(
                        path=str(node.target), kind="param", module=None, params={"": id(t)}
                    )
            else:
                self.dims[node.name] = None
            return
        module = self.traced.module(str(node.target)) if node.op == "call_module" else None
        ctx = RuleContext(self, node, module)
        rule = _ops.lookup(node, module)
        if module is not None and parametrized.why_frozen(module) is not None:
            rule = None  # its weights are computed: called whole, as an opaque op (frozen)
        if rule is None:
            out = ctx.opaque() if _has_tensor(value) or ctx.tensor_args() else None
        else:
            out = rule(ctx)
            if rule.update is not None and ctx.path is not None and ctx.path in self.layers:
                self.layers[ctx.path].update = rule.update
        why = None if module is None else self._frozen_reason(str(node.target), module)
        if module is not None and why is not None:
            for a in ctx.tensor_args():
                ctx.freeze_dims(ctx.dims(a), why)
            ctx.freeze_dims(out, why)
            for _, t in module.named_parameters():
                if id(t) in self.params:
                    ctx.freeze_dims(self.params[id(t)].dims, why)
        self.dims[node.name] = out
        self.kinds[node.name] = "conv" if ctx.is_conv else "non-conv"

    def _frozen_reason(self, path: str, module: nn.Module) -> str | None:
        """Why the user's settings freeze the module called at ``path``, or None."""
        if path in self.kept:
            return self.kept[path]
        frozen = (
            path in self.freeze_paths
            or any(path.startswith(p + ".") for p in self.freeze_paths)
            or (bool(self.freeze_types) and isinstance(module, self.freeze_types))
        )
        return f"frozen by the user (freeze= names `{path}`)" if frozen else None


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, tuple | list):
        return any(_has_tensor(v) for v in value)
    return False


def _fixed_value(slots: Slots, value: Any, what: str) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(
            slots.layout(int(s), reason=f"{what} (dim {d}) is fixed")
            for d, s in enumerate(value.shape)
        )
    if isinstance(value, tuple | list):
        return tuple(_fixed_value(slots, v, what) for v in value)
    return None


# ---------------------------------------------------------------------------------------------


def solution_of(graph: ChannelGraph) -> Solution:
    """The solver state behind a :class:`~fxconet.ir.ChannelGraph` from ``analyze``.

    Raises:
        ChannelError: the graph was not built by :func:`fxconet.analyze` (no solver state).
    """
    state = graph.state
    if not isinstance(state, Solution):
        raise ChannelError(
            f"this ChannelGraph ({graph.model_name}) has no solver state; build it with "
            "fxconet.analyze(model, example_inputs)"
        )
    return state


def solve_channels(
    traced: Traced,
    *,
    freeze: Iterable[Any] = (),
    kept: Mapping[str, str] | None = None,
    name: str | None = None,
) -> tuple[ChannelGraph, Solution]:
    """Solve the channel constraints of a shape-annotated trace.

    Args:
        traced: output of :func:`fxconet.passes.trace.trace_model` after
            :func:`~fxconet.passes.shape_prop.propagate_shapes`.
        freeze: module paths or types whose input and output widths must not change.
        kept: paths of modules kept as written (hooked or parametrized), each frozen with the
            reason given.
        name: model name for the IR.

    Returns:
        The :class:`~fxconet.ir.ChannelGraph` and the :class:`Solution` the rewrite needs.

    Example:
        >>> traced = trace_model(model); propagate_shapes(traced, (x,))
        >>> graph, solution = solve_channels(traced)
    """
    solver = _Solver(traced, freeze, kept or {})
    solver.run()
    solution = Solution(
        traced=traced,
        slots=solver.slots,
        dims=solver.dims,
        params=solver.params,
        layers=solver.layers,
        rewrites=solver.rewrites,
        kinds=solver.kinds,
        provenance=solver.provenance,
        notes=solver.notes,
        needs_probe=solver.needs_probe,
        followers=solver.followers,
        computed_by=solver.computed_by,
    )
    return build_graph(solution, name or traced.name), solution


def build_graph(solution: Solution, name: str) -> ChannelGraph:
    """Number the groups (graph order of first appearance) and build the IR."""
    slots = solution.slots
    produced = slots.produced
    group_of: dict[int, int] = {}
    leaf_of: list[int] = []
    seen: set[int] = set()  # ids of the layouts visited (nodes share their inputs' layouts)

    parent, sub = slots.parent, slots.sub

    def visit(layout: Layout) -> None:
        leaves: Iterable[int] | None = None
        if len(layout) == 1:  # most layouts: one block over an unrefined root, found inline
            v = layout[0][1]
            if parent[v] != v:
                v = slots.find(v)
            if sub[v] is None:
                leaves = (v,)
        if leaves is None:
            key = id(layout)
            if key in seen:
                return
            seen.add(key)
            leaves = slots.leaves(layout)
        for v in leaves:
            if produced[v] and v not in group_of:
                group_of[v] = len(leaf_of)
                leaf_of.append(v)

    graph = solution.traced.graph
    for node in graph.nodes:
        for layout in iter_layouts(solution.dims.get(node.name)):
            visit(layout)
    for rec in solution.params.values():
        for layout in rec.dims:
            visit(layout)

    n = len(leaf_of)
    unit = [0] * n
    # dicts as ordered sets
    producers: list[dict[str, None]] = [{} for _ in range(n)]
    consumers: list[dict[str, None]] = [{} for _ in range(n)]
    touched: list[dict[str, None]] = [{} for _ in range(n)]
    layer_of_tensor: dict[int, str] = {}
    for lrec in solution.layers.values():
        for tid in lrec.params.values():
            layer_of_tensor.setdefault(tid, lrec.path)

    for tid, prec in solution.params.items():
        owner = layer_of_tensor.get(tid, prec.path)
        for d, layout in enumerate(prec.dims):
            role = prec.roles.get(d)
            if role == "out" and prec.producer:
                # a producer's repetition structure sets the group's divisor
                for b in slots.expand(layout):
                    g = group_of.get(b.var)
                    if g is not None:
                        touched[g][owner] = producers[g][owner] = None
                        m = b.outer * b.inner
                        unit[g] = m if unit[g] == 0 else min(unit[g], m)
                continue
            for v in slots.leaves(layout):
                g = group_of.get(v)
                if g is not None:
                    touched[g][owner] = None
                    if role == "in":
                        consumers[g][owner] = None
    for lrec in solution.layers.values():
        for layout in (lrec.in_layout, lrec.out_layout, *lrec.notes.get("layouts", ())):
            if layout is None:
                continue
            for v in slots.leaves(layout):
                g = group_of.get(v)
                if g is not None:
                    touched[g][lrec.path] = None

    groups = []
    for g, v in enumerate(leaf_of):
        u = unit[g] or 1
        size = slots.size[v] * u
        reason = slots.reason[v]
        groups.append(
            ChannelGroup(
                id=g,
                size=size,
                divisor=u,
                frozen=reason is not None,
                reason=reason,
                producers=tuple(producers[g]),
                consumers=tuple(consumers[g]),
                layers=tuple(touched[g]),
                exact=not slots.inexact[v],
            )
        )
    solution.group_of = group_of
    solution.leaf_of = leaf_of
    solution.unit = [u or 1 for u in unit]

    layers = []
    for lrec in solution.layers.values():
        if lrec.kind == "param":
            continue
        nparams = sum(
            int(solution.params[tid].tensor.numel())
            for tid in lrec.params.values()
            if tid in solution.params and isinstance(solution.params[tid].tensor, nn.Parameter)
        )
        layers.append(
            LayerInfo(
                path=lrec.path,
                kind=lrec.kind,
                in_groups=_group_ids(slots, group_of, lrec.in_layout),
                out_groups=_group_ids(slots, group_of, lrec.out_layout),
                params=nparams,
            )
        )
    dag = functools.cache(lambda: _dag(solution, group_of))
    return ChannelGraph(
        groups=tuple(groups),
        layers=tuple(layers),
        tensors=Deferred(lambda: dag()[0]),
        edges=Deferred(lambda: dag()[1]),
        model_name=name,
        notes=tuple(solution.notes),
        state=solution,
    )


def _group_ids(slots: Slots, group_of: dict[int, int], layout: Layout | None) -> tuple[int, ...]:
    if layout is None:
        return ()
    out: dict[int, None] = {}  # an ordered set: a concatenation has a group per input
    for v in slots.leaves(layout):
        g = group_of.get(v)
        if g is not None:
            out[g] = None
    return tuple(out)


def _dag(
    solution: Solution, group_of: dict[int, int]
) -> tuple[tuple[TensorInfo, ...], tuple[EdgeInfo, ...]]:
    slots = solution.slots
    tensors: list[TensorInfo] = []
    edges: list[EdgeInfo] = []
    is_tensor: set[str] = set()
    for node in solution.traced.graph.nodes:
        value = node.meta[META_KEY].value
        d = solution.dims.get(node.name)
        if not isinstance(value, torch.Tensor) or d is None or not is_layout(d[0] if d else ()):
            continue
        channel_dim = None
        ids: tuple[int, ...] = ()
        for i, layout in enumerate(d):
            gids = _group_ids(slots, group_of, layout)
            if gids:
                channel_dim, ids = i, gids
                break
        tensors.append(TensorInfo(node.name, tuple(value.shape), channel_dim, ids))
        is_tensor.add(node.name)
        kind = solution.kinds.get(node.name, "non-conv")
        op = (
            str(node.target)
            if node.op == "call_module"
            else getattr(node.target, "__name__", str(node.target))
        )
        seen: set[str] = set()
        for inp in node.all_input_nodes:
            if inp.name in is_tensor and inp.name not in seen:
                seen.add(inp.name)
                edges.append(EdgeInfo(inp.name, node.name, op, kind))
    return tuple(tensors), tuple(edges)
