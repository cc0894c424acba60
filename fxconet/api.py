"""The analysis and rewrite entry points: thin wrappers that run the passes in order.

:func:`analyze` (trace, propagate shapes, solve, label, probe) -> :class:`~fxconet.ir.ChannelGraph`;
:func:`resize` -> a verified, resized ``torch.fx.GraphModule``; :func:`kept_channels`. The width
search, :func:`fxconet.optimize_channels`, lives in :mod:`fxconet.optimize`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fxconet.errors import ChannelError
from fxconet.ir import ChannelGraph, check_widths
from fxconet.passes.label_edges import label_edges
from fxconet.passes.module_copy import to_meta
from fxconet.passes.nodes import normalize_inputs
from fxconet.passes.probe import probe_channels
from fxconet.passes.resize_layers import ResizePlan, resize_layers
from fxconet.passes.shape_prop import propagate_shapes
from fxconet.passes.solve_channels import solution_of, solve_channels
from fxconet.passes.trace import trace_model

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


def analyze(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    freeze: Iterable[type | str] = (),
    probe: bool | str = "auto",
) -> ChannelGraph:
    """Find the independent channel groups of ``model``.

    Traces a structural copy of the model (the model itself is never modified), propagates
    shapes on the ``meta`` device (no real compute), labels every op conv / non-conv and solves
    the channel constraints. Python's cyclic garbage collector is paused meanwhile.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.
        example_inputs: a tensor, a tuple of inputs, or a dict of keyword inputs (only their
            shapes and dtypes are used).
        leaf_modules: module types or paths to keep opaque while tracing (their channels are
            frozen unless a rule is registered with :func:`fxconet.register_op`).
        concrete_args: passed to ``torch.fx`` to fix control-flow inputs.
        freeze: module paths or types whose input and output widths must not change.
        probe: confirm dynamic reshapes with a perturbed resize on ``meta`` tensors: ``"auto"``
            (when the graph computes sizes at run time), True or False.

    Returns:
        The :class:`~fxconet.ir.ChannelGraph`; ``print`` it for a table of groups.

    Raises:
        TraceError: the model cannot be traced (names the module path and the fix).
        ShapeError: the example inputs do not fit the model (names the node).

    Example:
        >>> graph = fxconet.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> [g.size for g in graph.free][:3]
        [64, 64, 64]
    """
    with _gc_paused():
        traced = trace_model(
            model,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
            example_inputs=example_inputs,
        )
        args, kwargs = normalize_inputs(example_inputs)
        propagate_shapes(traced, args, kwargs)
        graph, solution = solve_channels(traced, freeze=tuple(freeze), name=type(model).__name__)
        solution.example_args = to_meta(args)
        solution.example_kwargs = to_meta(kwargs)
        label_edges(solution)
        if probe is True or (probe == "auto" and solution.needs_probe):
            graph = probe_channels(graph)
    for note in graph.notes:
        warnings.warn(f"fxconet.analyze({graph.model_name}): {note}", stacklevel=2)
    return graph


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
) -> torch.fx.GraphModule:
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
        leaf_modules, concrete_args, freeze: as for :func:`analyze`.
        max_bytes: refuse a resize whose parameters would take more memory than this
            (counted from the IR before anything is allocated): ``"auto"`` is half this
            machine's physical memory, None no limit.

    Returns:
        The resized GraphModule. ``gm.meta["fxconet"]`` holds the
        :class:`~fxconet.passes.resize_layers.ResizePlan` with the kept channel indices
        (see :func:`kept_channels`).

    Raises:
        ChannelError: a width for an unknown, frozen group, below 1 or not a multiple of the
            group's divisor (the message names the group and its layers), or widths whose
            parameters would exceed ``max_bytes``.

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
        )
    check_memory(graph, widths, max_bytes)
    with _gc_paused():
        gm, _ = resize_layers(graph, widths, init=init)
    return gm


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
    records = solution_of(graph).params.values()
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

    Example:
        >>> gm = fxconet.resize(model, {1: 32}, x)
        >>> fxconet.kept_channels(gm)[1]   # 32 original indices
    """
    plan = gm.meta.get("fxconet") if hasattr(gm, "meta") else None
    if not isinstance(plan, ResizePlan):
        raise ValueError("this GraphModule was not produced by fxconet.resize")
    return dict(plan.index)
