"""The shape probe: confirm the analysis where a graph computes sizes at run time.

When a graph reshapes with sizes computed from tensors (``x.view(n, c // g, ...)``), the rules
predict how those sizes follow the widths but cannot prove it. The probe resizes every free group
by a different amount on the ``meta`` device (no weights are touched) and checks every node's
shape against the prediction. A node that disagrees has the groups it touches frozen, with the
mismatch as the reason, and the probe repeats until the prediction holds.
"""

from __future__ import annotations

import torch
import torch.fx

from fxconet.ir import ChannelGraph
from fxconet.passes.nodes import META_KEY
from fxconet.passes.resize_layers import expected_shapes, plan_resize, probe_resized
from fxconet.passes.solve_channels import Solution, build_graph, freeze_dims, solution_of
from fxconet.passes.verify import ShapeMismatch, verify_channels

__all__ = ["probe_channels", "probe_widths"]


def probe_widths(graph: ChannelGraph) -> dict[int, int]:
    """A new width for every free group, all different from each other and from the groups'
    current widths, so a run-time size borrowed from the wrong group shows (nearest first,
    shrinking before growing)."""
    used = {g.size for g in graph.groups}
    widths: dict[int, int] = {}
    for g in graph.free:
        k = 1
        while g.id not in widths:
            for cand in (g.size - k * g.divisor, g.size + k * g.divisor):
                if cand >= g.divisor and cand not in used:
                    widths[g.id] = cand
                    used.add(cand)
                    break
            k += 1
    return widths


def probe_channels(graph: ChannelGraph, *, rounds: int = 6) -> ChannelGraph:
    """Freeze the groups whose predicted shapes a perturbed resize contradicts.

    Example:
        >>> graph = probe_channels(graph)   # analyze() does this when shapes are dynamic
    """
    solution = solution_of(graph)
    for attempt in range(rounds + 1):
        if not graph.free:
            return graph
        plan = plan_resize(graph, probe_widths(graph), select="first")
        overrides, owners = probe_resized(plan)
        try:
            verify_channels(
                solution.traced,
                (solution.example_args, solution.example_kwargs),
                expected=expected_shapes(plan),
                modules=owners,
                overrides=overrides,
            )
            return graph
        except ShapeMismatch as e:
            reason = f"shape probe: {e}"
            if attempt == rounds:
                _freeze_all(solution, reason)
            else:
                _freeze_around(solution, e.node_name, reason)
            graph = build_graph(solution, graph.model_name)
    return graph


def _freeze_all(solution: Solution, reason: str) -> None:
    for leaf in solution.leaf_of:
        if solution.slots.reason[leaf] is None:
            solution.slots.reason[leaf] = reason


def _freeze_around(solution: Solution, node_name: str, reason: str) -> None:
    """Freeze the node's layouts and those of every tensor it reads, including tensors whose
    sizes reach it through Python-level size arithmetic."""
    by_name = {n.name: n for n in solution.traced.graph.nodes}
    node = by_name.get(node_name)
    if node is None:
        return
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        freeze_dims(solution.slots, solution.dims.get(n.name), reason)
        for inp in n.all_input_nodes:
            value = inp.meta[META_KEY].value
            if isinstance(value, torch.Tensor):
                freeze_dims(solution.slots, solution.dims.get(inp.name), reason)
            else:  # a size computed from other tensors: follow it back
                stack.append(inp)
