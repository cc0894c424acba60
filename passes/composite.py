"""Composite analyses: a model analysed as separately traced parts around opaque code.

When a model's own ``forward`` cannot be traced (a detector loops over a list of images and
post-processes with data-dependent code), ``fxconet.analyze`` keeps that code opaque: the model
runs once eagerly on the example inputs (:func:`capture_calls` records what each submodule is
called with), the largest submodules that trace are analysed on their own, each with its
boundary widths frozen (a part's inputs and outputs are its model inputs and outputs), and
:func:`combine_parts` numbers their groups globally into one
:class:`~fxconet.ir.ChannelGraph` whose ``state`` is a :class:`Composite`.
:func:`assemble` builds the resized model: a copy of the original with every part replaced by
its resized GraphModule.

Records name parts by module path; nothing here holds a ``torch.fx.Node``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxconet.errors import ChannelError, VerificationError
from fxconet.ir import ChannelGraph, ChannelGroup, Deferred, EdgeInfo, LayerInfo, TensorInfo
from fxconet.passes.module_copy import HOOK_TABLES, map_tensors, structural_copy, to_meta
from fxconet.passes.nodes import CallInputs, normalize_inputs

__all__ = [
    "Calls",
    "Composite",
    "Part",
    "assemble",
    "capture_calls",
    "combine_parts",
    "composite_of",
    "detached_inputs",
    "join_path",
    "run_eagerly",
]


def join_path(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` for the root's prefix ``""``."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


@dataclass(frozen=True, eq=False)
class Part:
    """A submodule analysed on its own inside a composite analysis.

    Attributes:
        path: its module path in the model (``""`` for the model itself, traced with some
            submodules opaque).
        graph: its own analysis (group ids from 0).
        offset: the global id of its group 0.
    """

    path: str
    graph: ChannelGraph
    offset: int


@dataclass(frozen=True, eq=False)
class Composite:
    """The state of a composite :class:`~fxconet.ir.ChannelGraph` (see the module docstring).

    Attributes:
        root: a structural copy of the user's model (shares its parameters and buffers).
        parts: the analysed parts, in module order; nested parts (inside an opaque submodule
            of another part) come after the part that contains them.
        opaque: ``(path, reason)`` of every module kept opaque.
        inputs: the example inputs (detached copies), for the end-to-end check of a resize.
    """

    root: nn.Module
    parts: tuple[Part, ...]
    opaque: tuple[tuple[str, str], ...]
    inputs: CallInputs = field(repr=False)

    def split(self, widths: Mapping[int, int]) -> dict[str, dict[int, int]]:
        """Global ``{group id: width}`` as each part's local widths, by part path."""
        out: dict[str, dict[int, int]] = {p.path: {} for p in self.parts}
        for gid, width in widths.items():
            part = self.part_of(gid)
            out[part.path][gid - part.offset] = width
        return out

    def part_of(self, gid: int) -> Part:
        """The part that owns global group ``gid``."""
        for part in self.parts:
            if part.offset <= gid < part.offset + len(part.graph.groups):
                return part
        raise KeyError(f"no part owns channel group {gid}")


def composite_of(graph: ChannelGraph) -> Composite | None:
    """The :class:`Composite` behind ``graph``, or ``None`` for a single traced analysis."""
    return graph.state if isinstance(graph.state, Composite) else None


# ---------------------------------------------------------------------------------------------
# the eager run


@dataclass
class Calls:
    """What one eager run of a model saw of its submodules.

    Attributes:
        inputs: per module path, the inputs of its first call (tensors on ``meta``).
        counts: per module path, how many times it was called.
    """

    inputs: dict[str, CallInputs] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def _own_hooks(module: nn.Module) -> None:
    """Give a structurally copied module hook tables of its own (with the user's hooks), so
    hooks registered on the copy never reach the user's module."""
    d = module.__dict__
    for name in HOOK_TABLES:
        table = d.get(name)
        if table is not None:
            d[name] = type(table)(table)


def run_eagerly(model: nn.Module, inputs: CallInputs) -> Any:
    """``model(*args, **kwargs)`` under ``no_grad``; its buffers (a train-mode norm's running
    statistics, shared with the user's model by a structural copy) are restored afterwards."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad():
            return model(*inputs.args, **inputs.kwargs)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def capture_calls(model: nn.Module, inputs: CallInputs) -> Calls:
    """Run a structural copy of ``model`` once on ``inputs`` and record how often each
    submodule is called and, on ``meta``, what with (the first call).

    The user's model is not touched: the hooks live on the copy's own hook tables and the
    buffers are restored after the run.

    Example:
        >>> calls = capture_calls(detector, CallInputs(([image],)))
        >>> calls.counts["backbone"], calls.inputs["backbone"].args[0].shape
        (1, torch.Size([1, 3, 320, 320]))
    """
    calls = Calls()
    paths: dict[str, nn.Module] = {}
    root = structural_copy(model, paths)
    handles = []
    for path, module in paths.items():
        _own_hooks(module)
        if not path:
            continue

        def record(mod: nn.Module, args: Any, kwargs: Any, path: str = path) -> None:
            n = calls.counts.get(path, 0)
            calls.counts[path] = n + 1
            if n == 0:
                calls.inputs[path] = CallInputs(to_meta(tuple(args)), to_meta(dict(kwargs)))

        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        run_eagerly(root, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def detached_inputs(example_inputs: Any) -> CallInputs:
    """The example inputs as :class:`CallInputs`, tensors detached and copied (a composite
    keeps them for the end-to-end check of every resize)."""
    args, kwargs = normalize_inputs(example_inputs)

    def clone(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone()

    return CallInputs(map_tensors(tuple(args), clone), map_tensors(dict(kwargs), clone))


# ---------------------------------------------------------------------------------------------
# one graph from the parts


def _prefixed(paths: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    return tuple(join_path(prefix, p) for p in paths)


def combine_parts(
    name: str,
    root: nn.Module,
    parts: list[tuple[str, ChannelGraph]],
    opaque: list[tuple[str, str]],
    inputs: CallInputs,
    notes: list[str],
) -> ChannelGraph:
    """One :class:`~fxconet.ir.ChannelGraph` of ``parts`` (``(path, graph)`` each): groups
    numbered globally in part order, layer and tensor names prefixed with the part's path, the
    parts' notes after ``notes``.

    Example:
        >>> graph = combine_parts("SSD", root, [("backbone", g1), ("head", g2)], [], inputs, [])
        >>> graph.group(len(g1)).layers[0].startswith("head.")
        True
    """
    groups: list[ChannelGroup] = []
    layers: list[LayerInfo] = []
    records: list[Part] = []
    all_notes = list(notes)
    for path, graph in parts:
        offset = len(groups)
        records.append(Part(path, graph, offset))
        for g in graph.groups:
            reason = g.reason
            if reason is not None and path:  # "model output" is the part's boundary
                reason = f"{reason} (of the part `{path}`)"
            groups.append(
                dataclasses.replace(
                    g,
                    id=g.id + offset,
                    reason=reason,
                    producers=_prefixed(g.producers, path),
                    consumers=_prefixed(g.consumers, path),
                    layers=_prefixed(g.layers, path),
                )
            )
        for info in graph.layers:
            layers.append(
                dataclasses.replace(
                    info,
                    path=join_path(path, info.path),
                    in_groups=tuple(i + offset for i in info.in_groups),
                    out_groups=tuple(i + offset for i in info.out_groups),
                )
            )
        where = f"`{path}`" if path else "the model itself"
        all_notes.extend(f"{where}: {note}" for note in graph.notes)
    state = Composite(root=root, parts=tuple(records), opaque=tuple(opaque), inputs=inputs)
    return ChannelGraph(
        groups=tuple(groups),
        layers=tuple(layers),
        tensors=Deferred(lambda: tuple(_tensors(state))),
        edges=Deferred(lambda: tuple(_edges(state))),
        model_name=name,
        notes=tuple(all_notes),
        state=state,
    )


def _node_name(path: str, name: str) -> str:
    return f"{path}:{name}" if path else name


def _tensors(state: Composite) -> Iterator[TensorInfo]:
    for part in state.parts:
        for t in part.graph.tensors:
            yield dataclasses.replace(
                t,
                name=_node_name(part.path, t.name),
                groups=tuple(g + part.offset for g in t.groups),
            )


def _edges(state: Composite) -> Iterator[EdgeInfo]:
    for part in state.parts:
        for e in part.graph.edges:
            yield dataclasses.replace(
                e, src=_node_name(part.path, e.src), dst=_node_name(part.path, e.dst)
            )


# ---------------------------------------------------------------------------------------------
# the resized model


def _nested_in(path: str, outer: str) -> bool:
    return outer == "" and path != "" or path.startswith(outer + ".")


def assemble(state: Composite, resized: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of the model (sharing no tensor with it) with each part replaced by its resized
    module (``resized``: by part path), checked end to end on the example inputs.

    Parts inside an opaque submodule of another part are installed into that part's resized
    module, at the same place.

    Raises:
        VerificationError: the assembled model does not run on the example inputs.
    """
    paths = [p.path for p in state.parts]
    top = [p for p in paths if not any(_nested_in(p, q) for q in paths if q != p)]
    if "" in resized:
        result = resized[""]
    else:
        memo: dict[int, Any] = {id(state.root.get_submodule(p)): resized[p] for p in top}
        result = copy.deepcopy(state.root, memo)
    for path in sorted((p for p in paths if p not in top), key=lambda p: p.count(".")):
        parent, _, attr = path.rpartition(".")
        holder = result.get_submodule(parent) if parent else result
        if not hasattr(holder, attr) or not isinstance(getattr(holder, attr), nn.Module):
            raise ChannelError(
                f"cannot install the resized part `{path}`: the module that contains it has no "
                f"submodule `{attr}` after resizing"
            )
        setattr(holder, attr, resized[path])
    try:
        run_eagerly(result, state.inputs)
    except Exception as e:
        raise VerificationError(
            f"the resized {type(state.root).__name__} (parts "
            f"{', '.join(repr(p) for p in paths)} resized) does not run on the example inputs: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from e
    return result
