"""The analysis and rewrite entry points: thin wrappers that run the passes in order.

:func:`analyze` (trace, propagate shapes, solve, label, probe) -> :class:`~fxconet.ir.ChannelGraph`;
:func:`resize` -> a verified, resized ``torch.fx.GraphModule``; :func:`kept_channels`. The width
search, :func:`fxconet.optimize_channels`, lives in :mod:`fxconet.optimize`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxconet.errors import ChannelError, ShapeError, TraceError, first_line
from fxconet.ir import ChannelGraph, check_widths
from fxconet.passes.composite import (
    Calls,
    assemble,
    capture_calls,
    combine_parts,
    composite_of,
    detached_inputs,
    join_path,
)
from fxconet.passes.label_edges import label_edges
from fxconet.passes.module_copy import structural_copy, to_meta
from fxconet.passes.nodes import has_submodule, normalize_inputs
from fxconet.passes.probe import probe_channels
from fxconet.passes.resize_layers import ResizePlan, resize_layers
from fxconet.passes.shape_prop import propagate_shapes
from fxconet.passes.solve_channels import solution_of, solve_channels
from fxconet.passes.trace import (
    grad_mode_notes,
    hook_notes,
    kept_modules,
    parametrized_notes,
    trace_model,
    trace_with_fallback,
)

__all__ = ["analyze", "kept_channels", "resize"]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the passes run.

    Tracing allocates tens of thousands of small objects. Whenever that trips a collection of
    the oldest generation, Python walks every tracked object of the process (torch alone
    brings ~350k), which costs up to 250 ms, more than a whole analysis. Reference counting
    still frees acyclic garbage at once; cycles wait for the first collection after the pause.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


_OPAQUE = ("auto", False)
_HOOKS = ("freeze", "resize")


def analyze(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    freeze: Iterable[type | str] = (),
    probe: bool | str = "auto",
    opaque: bool | str = "auto",
    hooks: str = "freeze",
) -> ChannelGraph:
    """Find the independent channel groups of ``model``.

    Traces a structural copy of the model (the model itself is never modified), propagates
    shapes on the ``meta`` device (no real compute), labels every op conv / non-conv and solves
    the channel constraints. Python's cyclic garbage collector is paused meanwhile.

    With ``opaque="auto"`` (the default), code that cannot be traced is kept opaque instead of
    stopping the analysis, and a warning (and a note in :attr:`ChannelGraph.notes`) names every
    module made opaque and why:

    * a submodule whose code cannot be traced is called as one opaque op (as with
      ``leaf_modules=``): its input and output widths are frozen. Its children are then
      analysed on their own where they trace (inputs recorded by one eager run of the model).
    * when the model's own ``forward`` cannot be traced (a detector looping over a list of
      images), the model runs once eagerly on the example inputs, and its largest submodules
      that trace (a backbone, an FPN, a head) are analysed on their own, each with its
      boundary widths frozen. The result is a composite analysis: its groups are numbered
      across the parts, and :func:`resize` returns a copy of the model with each part
      replaced by its resized GraphModule, checked to run end to end on the example inputs.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, a tuple of inputs, or a dict of keyword inputs (only their
            shapes and dtypes are used, unless the model has to run eagerly). A list is taken
            as a sequence of inputs: a model that takes a list of images takes ``([image],)``.
        leaf_modules: module types or paths to keep opaque while tracing (their channels are
            frozen unless a rule is registered with :func:`fxconet.register_op`).
        concrete_args: passed to ``torch.fx`` to fix control-flow inputs.
        freeze: module paths or types whose input and output widths must not change.
        probe: confirm dynamic reshapes with a perturbed resize on ``meta`` tensors: ``"auto"``
            (when the graph computes sizes at run time), True or False.
        opaque: ``"auto"`` (the fallback above) or False (raise :class:`TraceError` at the
            first code that cannot be traced).
        hooks: what to do with submodules that carry forward or backward hooks (the model's
            own hooks are refused either way). ``"freeze"`` (the default): each is kept as
            one opaque op (so its hooks run in the resized model, which ``torch.fx`` would
            otherwise trace through and drop) and its input and output widths are frozen
            (so the hooks see the widths they were written for). ``"resize"``: hooked
            layers are resized and keep their hooks, which then see the new widths unchecked;
            hooks of modules that ``torch.fx`` traces through (blocks, containers) run once
            while tracing, on proxies (their tensor ops are inlined into the graph, their
            side effects do not happen in the resized GraphModule). A note names the hooked
            modules either way.

    Returns:
        The :class:`~fxconet.ir.ChannelGraph`; ``print`` it for a table of groups.

    Raises:
        TraceError: the model cannot be traced and ``opaque=False``, or no part of it can be
            analysed (names the module path and the fix).
        ShapeError: the example inputs do not fit the model (names the node).

    Example:
        >>> graph = fxconet.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> [g.size for g in graph.free][:3]
        [64, 64, 64]
    """
    if opaque not in _OPAQUE or opaque is True:
        raise ValueError(f"opaque must be 'auto' or False, got {opaque!r}")
    if hooks not in _HOOKS:
        raise ValueError(f"hooks must be one of {_HOOKS}, got {hooks!r}")
    options = _Options(tuple(leaf_modules), concrete_args, tuple(freeze), probe, hooks)
    with _gc_paused():
        if opaque == "auto":
            graph = _analyze_auto(model, example_inputs, options)
        else:
            graph, _ = _analyze_traced(model, example_inputs, options, fallback=False)
    for note in graph.notes:
        warnings.warn(f"fxconet.analyze({graph.model_name}): {note}", stacklevel=2)
    return graph


@dataclass(frozen=True)
class _Options:
    leaf_modules: tuple[type | str, ...]
    concrete_args: Mapping[str, Any] | None
    freeze: tuple[type | str, ...]
    probe: bool | str
    hooks: str = "freeze"

    def under(self, path: str) -> _Options | None:
        """The options of the submodule at ``path`` (paths made relative to it), or None when
        a leaf or freeze path names it or a module around it (it is not analysed)."""
        if not path:
            return self
        rel: list[list[type | str]] = [[], []]
        for k, items in enumerate((self.leaf_modules, self.freeze)):
            for item in items:
                if not isinstance(item, str):
                    rel[k].append(item)
                elif item == path or path.startswith(item + ".") or not item:
                    return None
                elif item.startswith(path + "."):
                    rel[k].append(item[len(path) + 1 :])
        return _Options(tuple(rel[0]), None, tuple(rel[1]), self.probe, self.hooks)


def _analyze_traced(
    model: nn.Module, example_inputs: Any, options: _Options, *, fallback: bool
) -> tuple[ChannelGraph, tuple[tuple[str, str], ...]]:
    """The analysis of one traced module, and the submodules the trace kept opaque."""
    kept, hooked = kept_modules(model, options.hooks)  # called whole (a leaf), widths frozen
    if kept:
        options = dataclasses.replace(options, leaf_modules=options.leaf_modules + tuple(kept))
    if fallback:
        traced, opaque = trace_with_fallback(
            model,
            leaf_modules=options.leaf_modules,
            concrete_args=options.concrete_args,
            example_inputs=example_inputs,
        )
    else:
        opaque = ()
        traced = trace_model(
            model,
            leaf_modules=options.leaf_modules,
            concrete_args=options.concrete_args,
            example_inputs=example_inputs,
        )
    args, kwargs = normalize_inputs(example_inputs)
    propagate_shapes(traced, args, kwargs)
    graph, solution = solve_channels(
        traced, freeze=options.freeze, kept=kept, name=type(model).__name__
    )
    opaque_notes = [
        f"module `{path}` ({type(traced.module(path)).__name__}) is opaque (its input and "
        f"output widths are frozen): it cannot be traced: {reason}"
        for path, reason in opaque
    ]
    extra = [
        *grad_mode_notes(traced),
        *hook_notes(traced, hooked, options.hooks),
        *parametrized_notes(kept, hooked),
    ]
    if opaque_notes or extra:
        solution.notes[:] = [*opaque_notes, *solution.notes, *extra]
        graph = dataclasses.replace(graph, notes=tuple(solution.notes))
    solution.example_args = to_meta(args)
    solution.example_kwargs = to_meta(kwargs)
    label_edges(solution)
    if options.probe is True or (options.probe == "auto" and solution.needs_probe):
        graph = probe_channels(graph)
    return graph, opaque


def _analyze_auto(model: nn.Module, example_inputs: Any, options: _Options) -> ChannelGraph:
    """``analyze(..., opaque="auto")``: the traced analysis when the model's own code traces
    (submodules that fail kept opaque, their children analysed on their own), else a
    composite of the submodules that trace."""
    name = type(model).__name__
    root_error: TraceError | None = None
    try:
        graph, opaque = _analyze_traced(model, example_inputs, options, fallback=True)
    except TraceError as e:
        if e.module_path != "":
            raise  # refused before tracing: the message names the fix
        root_error = e
    else:
        if not opaque:
            return graph
    inputs = detached_inputs(example_inputs)
    for path in (p for p in options.freeze if isinstance(p, str)):
        if not has_submodule(model, path):
            raise KeyError(f"freeze= names unknown module paths {[path]}")
    try:
        calls = capture_calls(model, inputs)
    except Exception as e:
        if root_error is None:  # the traced analysis stands; its opaque parts stay whole
            note = (
                f"the children of the opaque modules are not analysed: running {name} "
                f"eagerly on the example inputs failed ({type(e).__name__}: {first_line(e)})"
            )
            return dataclasses.replace(graph, notes=(*graph.notes, note))
        hint = (
            "; example_inputs is a list, whose items are passed as separate arguments: a "
            "model that takes a list of images takes ([image],)"
            if isinstance(example_inputs, list)
            else ""
        )
        raise TraceError(
            f"{root_error}; the opaque fallback could not run {name} eagerly on the example "
            f"inputs either: {type(e).__name__}: {first_line(e)}{hint}",
            module_path="",
            reason=root_error.reason,
        ) from e
    parts: list[tuple[str, ChannelGraph]] = []
    notes: list[str] = []
    opaque_paths: list[tuple[str, str]] = []
    if root_error is None:
        parts.append(("", graph))
        for path, reason in opaque:
            opaque_paths.append((path, reason))
            _descend(model, path, calls, options, parts, notes, opaque_paths)
    else:
        reason = root_error.reason or str(root_error)
        opaque_paths.append(("", reason))
        notes.append(
            f"{name}.forward is opaque (it cannot be traced: {reason}); its submodules are "
            "analysed on their own where they trace, each with its input and output widths "
            "frozen"
        )
        _descend(model, "", calls, options, parts, notes, opaque_paths)
    if root_error is None and len(parts) == 1:
        return graph  # no child of an opaque module has a free group
    if not parts:
        raise TraceError(
            f"{root_error}; the opaque fallback found no submodule of {name} that traces and "
            "has a free channel group",
            module_path="",
            reason=root_error.reason if root_error else None,
        )
    notes.append(
        "analysed on their own: "
        + ", ".join(
            f"`{path or name}` ({len(g.free)} of {len(g.groups)} groups free)" for path, g in parts
        )
    )
    return combine_parts(name, structural_copy(model), parts, opaque_paths, inputs, notes)


def _descend(
    model: nn.Module,
    path: str,
    calls: Calls,
    options: _Options,
    parts: list[tuple[str, ChannelGraph]],
    notes: list[str],
    opaque: list[tuple[str, str]],
) -> None:
    """Analyse the children of the opaque module at ``path`` on their own: each child called
    once on the example inputs is traced with the inputs it got (boundary widths frozen);
    a child that does not trace is opaque in turn, and its children are tried."""
    module = model.get_submodule(path) if path else model
    for name, child in module.named_children():
        cpath = join_path(path, name)
        if not any(True for _ in child.parameters()):
            continue  # nothing to resize
        sub = options.under(cpath)
        if sub is None:
            continue  # a leaf or frozen module of the user's: left as it is
        count = calls.counts.get(cpath, 0)
        if count != 1:
            why = "is not called" if count == 0 else f"is called {count} times"
            notes.append(
                f"module `{cpath}` ({type(child).__name__}) {why} on the example inputs: "
                "left as it is"
            )
            continue
        try:
            graph, inner = _analyze_traced(child, calls.inputs[cpath], sub, fallback=True)
        except (TraceError, ShapeError) as e:
            reason = (e.reason if isinstance(e, TraceError) else None) or first_line(e)
            opaque.append((cpath, reason))
            notes.append(
                f"module `{cpath}` ({type(child).__name__}) is opaque (it cannot be analysed: "
                f"{reason}); its children are analysed on their own where they trace"
            )
            _descend(model, cpath, calls, options, parts, notes, opaque)
            continue
        if graph.free:
            parts.append((cpath, graph))
        for leaf, reason in inner:
            lpath = join_path(cpath, leaf)
            opaque.append((lpath, reason))
            _descend(model, lpath, calls, options, parts, notes, opaque)


def resize(
    model: nn.Module | ChannelGraph,
    widths: Mapping[int, int],
    example_inputs: Any = None,
    *,
    init: str = "inherit",
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    freeze: Iterable[type | str] = (),
    max_bytes: int | None | str = "auto",
    opaque: bool | str = "auto",
    hooks: str = "freeze",
) -> nn.Module:
    """Re-emit ``model`` with new channel widths, as a runnable ``torch.fx.GraphModule``.

    Every layer a changed group touches is resized consistently (convs of any kind, linears,
    norms with their running statistics, biases, flatten -> linear, literal sizes in
    ``view``/``reshape``/``split``). The result shares no tensor with ``model`` and is verified
    on ``meta`` tensors before it is returned.

    Args:
        model: the model, or the :class:`~fxconet.ir.ChannelGraph` from :func:`analyze`.
        widths: group id -> new width, for any subset of the free groups (the others keep
            their size). Ids are those of ``analyze(model, ...)`` with the same options.
        example_inputs: required when ``model`` is a module.
        init: ``"inherit"`` (keep the largest-norm channels; new channels preserve the
            function, see :mod:`fxconet.passes.resize_layers`) or ``"reset"`` (fresh default
            initialisation of every layer).
        leaf_modules, concrete_args, freeze, opaque, hooks: as for :func:`analyze`.
        max_bytes: refuse a resize whose parameters would take more memory than this
            (counted from the IR before anything is allocated): ``"auto"`` is half this
            machine's physical memory, None no limit.

    Returns:
        The resized GraphModule. ``gm.meta["fxconet"]`` holds the
        :class:`~fxconet.passes.resize_layers.ResizePlan` with the kept channel indices
        (see :func:`kept_channels`). For a composite analysis (a model whose own ``forward``
        is opaque, see :func:`analyze`): a copy of the model, of its own class, whose analysed
        parts are resized GraphModules, checked to run on the example inputs.

    Raises:
        ChannelError: a width for an unknown, frozen group, below 1 or not a multiple of the
            group's divisor (the message names the group and its layers), or widths whose
            parameters would exceed ``max_bytes``.
        VerificationError: the resized model does not compute the predicted shapes (or, for
            a composite, does not run on the example inputs).

    Example:
        >>> gm = fxconet.resize(torchvision.models.resnet18(), {1: 32}, torch.randn(1, 3, 64, 64))
        >>> gm.get_submodule("layer1.0.conv1").out_channels
        32
    """
    if isinstance(model, ChannelGraph):
        graph = model
    else:
        if example_inputs is None:
            raise ChannelError("resize(model, widths, example_inputs): example_inputs is required")
        graph = analyze(
            model,
            example_inputs,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
            freeze=freeze,
            opaque=opaque,
            hooks=hooks,
        )
    check_memory(graph, widths, max_bytes)
    composite = composite_of(graph)
    with _gc_paused():
        if composite is None:
            gm, _ = resize_layers(graph, widths, init=init)
            return gm
        local = composite.split(check_widths(graph, widths))  # global ids, validated
        resized = {
            p.path: resize_layers(p.graph, local[p.path], init=init)[0] for p in composite.parts
        }
        return assemble(composite, resized)


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(
    graph: ChannelGraph, widths: Mapping[int, int], max_bytes: int | None | str = "auto"
) -> None:
    """Refuse ``widths`` whose parameters would need more than ``max_bytes``
    (``"auto"``: half of :func:`physical_memory`, 16 GiB where unknown; None: no limit).

    Only widths that grow a group are costed (shrinking never allocates more than the model).

    Raises:
        ChannelError: the estimate exceeds the limit (says how much and how to allow it).
    """
    if max_bytes is None:
        return
    if max_bytes == "auto":
        total = physical_memory()
        limit = total // 2 if total else 16 * 2**30
        why = "half this machine's memory" if total else "the default when memory is unknown"
    elif isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes > 0:
        limit, why = max_bytes, "max_bytes"
    else:
        raise ChannelError(f"max_bytes={max_bytes!r}: give a positive int, 'auto' or None")
    full = check_widths(graph, widths)
    if all(full[g.id] <= g.size for g in graph.groups):
        return
    from fxconet.cost import CostModel  # noqa: PLC0415 (cost imports the passes)

    params = CostModel(graph).params(full, check=False)
    try:
        records = list(solution_of(graph).params.values())
    except ChannelError:  # a composite analysis: its parts hold the tensors
        records = []
    itemsize = max((r.tensor.element_size() for r in records), default=4)
    need = params * itemsize
    if need > limit:
        grown = {g.id: full[g.id] for g in graph.groups if full[g.id] > g.size}
        shown = dict(list(grown.items())[:4])
        more = f" and {len(grown) - 4} more" if len(grown) > 4 else ""
        raise ChannelError(
            f"resizing {graph.model_name} to widths {shown}{more} needs about "
            f"{need / 2**30:.1f} GiB for its {params:,} parameters, over the limit of "
            f"{limit / 2**30:.1f} GiB ({why}). Pass max_bytes=None (or a larger byte count) "
            "to allow it"
        )


def kept_channels(gm: torch.fx.GraphModule) -> dict[int, torch.Tensor]:
    """For each group of a resized GraphModule, the original channel index of every new
    channel (``-1`` for channels added by growing).

    Indices count the group's channels as its producers emit them (the output channels of
    the layers in ``ChannelGroup.producers``, in their order). A consumer that sees the group
    rearranged (after a channel shuffle, or inside a concatenation with other groups) reads
    them at other positions: ``gm.meta["fxconet"].layer_channels(path)`` gives each layer's
    kept input and output positions in its own order.

    Example:
        >>> gm = fxconet.resize(model, {1: 32}, x)
        >>> fxconet.kept_channels(gm)[1]   # 32 original indices
    """
    plan = gm.meta.get("fxconet") if hasattr(gm, "meta") else None
    if not isinstance(plan, ResizePlan):
        raise ValueError("this GraphModule was not produced by fxconet.resize")
    return dict(plan.index)
