"""A narrow, typed view of a solved channel graph for the cost model and the strategies.

The solver's :class:`~fxconet.passes.solve_channels.Solution` is the rewrite's working state
(slots, per-node layouts, records of every parameter and layer). Code outside the passes reads
it only through :class:`SolutionView`:

* :meth:`SolutionView.sizer`: the new size of any layout for given widths;
* :meth:`SolutionView.cost_terms`: the products of layouts that parameters and MACs are sums of;
* :meth:`SolutionView.tensors`: every parameter and buffer on a channel group, its dims as
  blocks of groups (what APS projects);
* :meth:`SolutionView.rewritten_args` / :meth:`SolutionView.updated_attributes`: what a
  resized model's forward reads of the widths besides the tensors' shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

from fxconet.errors import ChannelError
from fxconet.ir import ChannelGraph, check_widths
from fxconet.ops import registry as op_registry
from fxconet.ops.layout import Layout
from fxconet.passes.composite import Part, composite_of, join_path
from fxconet.passes.module_copy import structural_copy
from fxconet.passes.nodes import META_KEY
from fxconet.passes.resize_layers import ResizePlan, plan_resize
from fxconet.passes.solve_channels import Solution, solution_of

__all__ = ["CostTerms", "DimBlock", "SolutionView", "TensorLayout"]

#: layer kinds whose calls cost multiply-accumulates
MAC_KINDS = ("conv", "linear", "conv_transpose", "depthwise")


class DimBlock(NamedTuple):
    """One block of a tensor dim: ``outer * n * inner`` consecutive positions from ``offset``
    (at the original widths), ``n`` slots of channel group ``group`` (``None``: a block whose
    size never changes) repeated ``outer`` times around and ``inner`` times inside."""

    offset: int
    outer: int
    n: int
    inner: int
    group: int | None


@dataclass(frozen=True)
class TensorLayout:
    """A parameter or buffer whose dims carry channel groups.

    Attributes:
        name: qualified name in the model (as ``named_parameters``/``named_buffers`` give it).
        layer: path of the layer that owns it.
        kind: that layer's kind (``conv``, ``linear``, ``conv_transpose``, ``depthwise``,
            ``norm``, ``param``, ``other``).
        module_type: the owning module's type (None for a raw parameter).
        dims: per dim, its blocks.
        roles: dim -> ``"in"`` or ``"out"`` for the layer's input/output channel dims.
    """

    name: str
    layer: str
    kind: str
    module_type: type | None
    dims: tuple[tuple[DimBlock, ...], ...]
    roles: Mapping[int, str]

    def groups(self) -> tuple[int, ...]:
        """The groups on any dim, in order of appearance."""
        seen: dict[int, None] = {}
        for blocks in self.dims:
            for b in blocks:
                if b.group is not None:
                    seen.setdefault(b.group)
        return tuple(seen)


@dataclass(frozen=True)
class CostTerms:
    """Parameters and MACs as sums of products of layout sizes.

    Attributes:
        fixed_params: parameters no channel group touches.
        params: one layout per dim of every parameter on a channel group.
        macs: ``(positions, weight layouts)`` per call of a conv, transposed conv, depthwise
            conv or linear layer: its MACs per example are ``positions`` times the product of
            its weight's dim sizes.
    """

    fixed_params: int
    params: tuple[tuple[Layout, ...], ...]
    macs: tuple[tuple[int, tuple[Layout, ...]], ...]


class SolutionView:
    """The typed view of a channel graph's solution (see the module docstring).

    Example:
        >>> view = SolutionView(fxconet.analyze(model, x))
        >>> size_of = view.sizer({1: 32})
    """

    def __init__(self, graph: ChannelGraph) -> None:
        self.graph = graph
        self._composite = composite_of(graph)
        self._parts: tuple[tuple[Part, SolutionView], ...] = ()
        if self._composite is not None:
            self._parts = tuple((p, SolutionView(p.graph)) for p in self._composite.parts)
        else:
            self._single = solution_of(graph)

    @property
    def _solution(self) -> Solution:
        """The solution of a single traced analysis (a composite has one per part)."""
        if self._composite is not None:
            raise ChannelError(
                f"this ChannelGraph ({self.graph.model_name}) is a composite analysis (its "
                "forward is opaque; parts "
                f"{', '.join(repr(p.path) for p in self._composite.parts)} were traced on their "
                "own): what was asked of it needs one traced graph (the cost model, "
                "SolutionView.tensors and fxconet.resize work on a composite; the search "
                "strategies do not). Analyse a part on its own, or a model that traces"
            )
        return self._single

    @property
    def name(self) -> str:
        """The traced model's class name."""
        if self._composite is not None:
            return self.graph.model_name
        return self._solution.traced.name

    def parts(self) -> tuple[tuple[int, SolutionView], ...]:
        """``(offset, view)`` of every traced part: ``((0, self),)`` for a single traced
        analysis; a composite's parts, whose group ids start at ``offset``."""
        if self._composite is None:
            return ((0, self),)
        return tuple((p.offset, v) for p, v in self._parts)

    def _tracked(self) -> set[int]:
        """Ids of the parameters on a channel group (every part's)."""
        if self._composite is not None:
            return {t for _, v in self._parts for t in v._tracked()}
        params = self._solution.params
        return {t for t, rec in params.items() if isinstance(rec.tensor, nn.Parameter)}

    def fixed_params(self) -> int:
        """Parameters of the whole model that no channel group touches."""
        tracked = self._tracked()
        root = self._composite.root if self._composite is not None else self._solution.traced.root
        return sum(p.numel() for p in root.parameters() if id(p) not in tracked)

    def sizer(self, widths: Mapping[int, int]) -> Callable[[Layout], int]:
        """A function giving the new total size of a layout for ``widths`` (validated with
        :func:`fxconet.ir.check_widths`)."""
        solution = self._solution
        full = check_widths(self.graph, widths)
        sizes = {solution.leaf_of[g]: w // solution.unit[g] for g, w in full.items()}
        slots = solution.slots

        def size_of(layout: Layout) -> int:
            return sum(
                b.outer * sizes.get(b.var, slots.size[b.var]) * b.inner
                for b in slots.expand(layout)
            )

        return size_of

    def size_form(self, layout: Layout) -> tuple[int, dict[int, int]]:
        """A layout's size as a linear form in the groups' slots: ``(constant, {group id:
        coefficient})``, so its size for widths ``w`` is ``constant + sum(coef * w[g] //
        divisor[g])``."""
        solution = self._solution
        slots = solution.slots
        const = 0
        coef: dict[int, int] = {}
        for b in slots.expand(layout):
            g = solution.group_of.get(b.var)
            if g is None:
                const += b.outer * slots.size[b.var] * b.inner
            else:
                coef[g] = coef.get(g, 0) + b.outer * b.inner
        return const, coef

    def cost_terms(self) -> CostTerms:
        """The terms parameters and MACs are sums of (see :class:`CostTerms`)."""
        solution = self._solution
        tracked = {
            tid: rec for tid, rec in solution.params.items() if isinstance(rec.tensor, nn.Parameter)
        }
        fixed = sum(p.numel() for p in solution.traced.root.parameters() if id(p) not in tracked)
        layers = {p: rec for p, rec in solution.layers.items() if rec.kind in MAC_KINDS}
        macs = []
        for node in solution.traced.graph.nodes:
            path = _layer_path(node)
            rec = layers.get(path) if path is not None else None
            if rec is None:
                continue
            weight_id = rec.params.get("weight", rec.params.get(""))
            wrec = solution.params.get(weight_id) if weight_id is not None else None
            if wrec is None:
                continue
            arg = node.args[0]
            x = arg.meta[META_KEY].value if isinstance(arg, torch.fx.Node) else None
            out = node.meta[META_KEY].value
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                continue
            batch = x.shape[0] if x.dim() > 1 else 1
            if rec.kind == "linear":
                positions = x.numel() // (x.shape[-1] * batch)
            elif rec.kind == "conv_transpose":
                positions = math.prod(x.shape[2:]) if x.dim() > 2 else 1
            else:
                positions = math.prod(out.shape[2:]) if out.dim() > 2 else 1
            macs.append((int(positions), tuple(wrec.dims)))
        return CostTerms(
            fixed_params=int(fixed),
            params=tuple(tuple(rec.dims) for rec in tracked.values()),
            macs=tuple(macs),
        )

    def tensors(self) -> dict[str, TensorLayout]:
        """Every parameter and buffer of the traced model whose dims carry a channel group, by
        qualified name (every name of a shared tensor); for a composite, every part's, named
        in the whole model and with global group ids."""
        if self._composite is not None:
            out: dict[str, TensorLayout] = {}
            for part, view in self._parts:
                for name, tl in view.tensors().items():
                    full = join_path(part.path, name)
                    out[full] = dataclasses.replace(
                        tl,
                        name=full,
                        layer=join_path(part.path, tl.layer),
                        dims=tuple(
                            tuple(
                                b._replace(group=None if b.group is None else b.group + part.offset)
                                for b in blocks
                            )
                            for blocks in tl.dims
                        ),
                    )
            return out
        solution = self._solution
        slots = solution.slots
        owners: dict[int, str] = {}
        for lrec in solution.layers.values():
            for tid in lrec.params.values():
                owners.setdefault(tid, lrec.path)
        root = solution.traced.root
        named: dict[str, torch.Tensor] = dict(root.named_parameters(remove_duplicate=False))
        named.update(dict(root.named_buffers(remove_duplicate=False)))
        single: dict[str, TensorLayout] = {}
        for name, t in named.items():
            rec = solution.params.get(id(t))
            if rec is None:
                continue
            owner = owners.get(id(t), rec.path)
            layer = solution.layers.get(owner)
            dims = []
            for layout in rec.dims:
                blocks = []
                offset = 0
                for b in slots.expand(layout):
                    n = slots.size[b.var]
                    group = solution.group_of.get(b.var)
                    blocks.append(DimBlock(offset, b.outer, n, b.inner, group))
                    offset += b.outer * n * b.inner
                dims.append(tuple(blocks))
            single[name] = TensorLayout(
                name=name,
                layer=owner,
                kind=layer.kind if layer is not None else "param",
                module_type=type(layer.module)
                if layer is not None and layer.module is not None
                else None,
                dims=tuple(dims),
                roles=dict(rec.roles),
            )
        return single

    def plan(self, widths: Mapping[int, int]) -> ResizePlan:
        """The resize plan of ``widths`` keeping the first channels (no weights are read)."""
        return plan_resize(self.graph, widths, select="first")

    def rewritten_args(self, plan: ResizePlan) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Per rewritten node (``view``/``split`` sizes, ``groups=`` ...), the ``repr`` of its
        new fields for ``plan``'s widths, in node-name order."""
        return tuple(
            (name, tuple(repr(fn(plan.size_of)) for fn in fns))
            for name, fns in sorted(self._solution.rewrites.items())
        )

    def updated_attributes(
        self, plan: ResizePlan, *, ignore: Callable[[nn.Module, str], bool] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per layer with an ``update`` rule, the module attributes it sets for ``plan``'s
        widths that differ from the module's current ones (run on a copy of the module);
        ``ignore(module, attr)`` leaves attributes out."""
        out: dict[str, dict[str, Any]] = {}
        for path, rec in self._solution.layers.items():
            if rec.update is None or rec.module is None:
                continue
            module = rec.module
            if op_registry.assigns_only(rec.update):
                new = structural_copy(module)
            else:  # a user's update may change values in place: copy them (not the tensors)
                memo: dict[int, Any] = {id(t): t for t in [*module.parameters(), *module.buffers()]}
                new = copy.deepcopy(module, memo)
            rec.update(new, plan.size_of, rec.notes)
            old = module.__dict__
            changed = {
                k: v
                for k, v in new.__dict__.items()
                if k not in _TREE_KEYS
                and (k not in old or _differs(old[k], v))
                and not (ignore is not None and ignore(module, k))
            }
            if changed:
                out[path] = changed
        return out


_TREE_KEYS = frozenset({"_parameters", "_buffers", "_modules"})


def _differs(a: Any, b: Any) -> bool:
    if a is b:
        return False
    try:
        return bool(a != b)
    except Exception:  # values without a plain equality (tensors): compared by identity
        return True


def _layer_path(node: torch.fx.Node) -> str | None:
    """The layer a node calls: a module path, or a raw weight's path (``F.conv2d(x, w)``)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function" and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, torch.fx.Node) and w.op == "get_attr":
            return str(w.target)
    return None
