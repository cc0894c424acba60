"""Verification: a rewritten graph computes exactly the shapes the channel analysis predicted.

``lint()`` accepts a graph whose widths disagree; shape propagation (on the ``meta`` device, so
free) is what proves a rewrite. Every transform of fxconet ends with :func:`verify_channels`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from fxconet.errors import ShapeError, VerificationError
from fxconet.passes.nodes import NodeView, Traced, describe_node, normalize_inputs
from fxconet.passes.shape_prop import propagate_shapes

__all__ = ["ShapeMismatch", "verify_channels"]


class ShapeMismatch(VerificationError):
    """A node's shape differs from the prediction (``node_name`` says which)."""

    def __init__(self, message: str, node_name: str) -> None:
        super().__init__(message)
        self.node_name = node_name


def _shape_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple | list):
        return tuple(_shape_tree(v) for v in value)
    return None


def verify_channels(
    gm: torch.fx.GraphModule | Traced,
    example_inputs: Any,
    *,
    expected: Mapping[str, Any] | None = None,
    modules: Mapping[str, Any] | None = None,
    overrides: Mapping[torch.fx.Node, NodeView] | None = None,
) -> None:
    """Check that every layer's width matches its inputs, on ``meta`` tensors.

    Args:
        gm: the GraphModule (or a :class:`Traced` graph with replacement ``modules``).
        example_inputs: a tensor, a tuple of inputs, a dict of keyword inputs, or an
            ``(args, kwargs)`` pair.
        expected: predicted shape per node name; any difference raises.
        modules: replacement modules/tensors by qualified name (for a :class:`Traced` graph).
        overrides: nodes evaluated with other ops or arguments (a rewrite applied in place).

    Raises:
        ShapeMismatch: a node computes a different shape than predicted, or fails
            (``node_name`` names it).

    Example:
        >>> verify_channels(resized_gm, torch.randn(1, 3, 224, 224))
    """
    traced = (
        gm if isinstance(gm, Traced) else Traced(root=gm, graph=gm.graph, name=type(gm).__name__)
    )
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[1], dict)
        and isinstance(example_inputs[0], tuple)
    ):
        args, kwargs = example_inputs
    else:
        args, kwargs = normalize_inputs(example_inputs)
    current: list[torch.fx.Node] = []

    def check(node: torch.fx.Node, value: Any) -> None:
        current[:] = [node]
        if expected is None or node.op == "output":
            return
        want = expected.get(node.name)
        if want is None:
            return
        got = _shape_tree(value)
        if got != want:
            raise ShapeMismatch(
                f"{describe_node(node)} computes shape {got} after resizing, but the channel "
                f"analysis predicted {want}",
                node.name,
            )

    try:
        propagate_shapes(
            traced, args, kwargs, modules=modules or {}, check=check, overrides=overrides
        )
    except ShapeMismatch:
        raise
    except ShapeError as e:
        failing = _failing_node(traced.graph, current)
        raise ShapeMismatch(f"the resized graph fails: {e}", failing) from e


def _failing_node(graph: torch.fx.Graph, current: list[torch.fx.Node]) -> str:
    """The node after the last one that succeeded."""
    if not current:
        return next(iter(graph.nodes)).name
    nxt = current[0].next
    return nxt.name if nxt is not None and nxt.op != "root" else current[0].name
