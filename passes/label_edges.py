"""Labelling: the role of every op, conv (chooses a new width) or non-conv.

The paper's DAG has feature maps as nodes and ops as edges; an edge is *conv* when the op creates
a new channel space whose width is a choice (Conv, Linear, ConvTranspose, Embedding, and their
functional forms), and *non-conv* otherwise (norms, activations, pooling, add, cat, depthwise
convs, reshapes ...). Labels come from the op table's rules, applied during solving.
"""

from __future__ import annotations

from enum import Enum

from fxconet.passes.nodes import META_KEY, NodeInfo
from fxconet.passes.solve_channels import Solution

__all__ = ["EdgeKind", "label_edges"]


class EdgeKind(str, Enum):
    """Role of an op in the paper's DAG."""

    CONV = "conv"
    NON_CONV = "non-conv"


def label_edges(solution: Solution) -> dict[tuple[str, str], EdgeKind]:
    """Label each (producer, consumer) edge of tensors as CONV or NON_CONV.

    Writes the kind into each node's :class:`NodeInfo` (``node.meta[META_KEY].kind``); does not
    change the graph.

    Example:
        >>> graph = fxconet.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> kinds = label_edges(solution_of(graph))
        >>> kinds[("x", "conv1")]
        <EdgeKind.CONV: 'conv'>
    """
    kinds: dict[tuple[str, str], EdgeKind] = {}
    dims = solution.dims
    for node in solution.traced.graph.nodes:
        info = node.meta.get(META_KEY)
        kind = solution.kinds.get(node.name)
        if isinstance(info, NodeInfo) and kind is not None:
            node.meta[META_KEY] = NodeInfo(info.value, info.scope, kind)
        if kind is None or dims.get(node.name) is None:
            continue
        edge = _KINDS[kind]
        for inp in node.all_input_nodes:
            if dims.get(inp.name) is not None:
                kinds[(inp.name, node.name)] = edge
    return kinds


_KINDS = {k.value: k for k in EdgeKind}
