"""What the passes record about a traced graph's nodes, shared by every pass.

* :data:`META_KEY`, :class:`NodeInfo`: the one ``node.meta`` entry fxconet writes.
* :class:`Traced`: a traced model before a GraphModule is built.
* :class:`NodeView`: a node with other op, target or arguments (a rewrite evaluated in place).
* :func:`describe_node`: a node named for error messages; :func:`normalize_inputs` (and
  :class:`CallInputs`, inputs with both positional and keyword arguments); :func:`get_attr`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

__all__ = [
    "META_KEY",
    "KWONLY_KEY",
    "CallInputs",
    "NodeInfo",
    "NodeView",
    "Traced",
    "describe_node",
    "get_attr",
    "has_submodule",
    "normalize_inputs",
]

META_KEY = "fxconet"  # the node.meta key of every node fxconet traces
KWONLY_KEY = "fxconet_kwonly"  # placeholder meta: a keyword-only argument of forward


class NodeInfo(NamedTuple):
    """What the passes know about a node (stored in ``node.meta[META_KEY]``; a named tuple:
    one is made per node and pass, and a tuple costs a third of a frozen dataclass).

    Attributes:
        value: the node's value on the ``meta`` device: a tensor, a tuple/list of tensors, a
            ``torch.Size``, an int, or any other Python value the node computes.
        scope: path of the module whose ``forward`` created the node ("" for the root).
        kind: ``"conv"`` or ``"non-conv"`` once :func:`fxconet.passes.label_edges` ran.
    """

    value: Any
    scope: str = ""
    kind: str | None = None


@dataclass
class Traced:
    """A traced model before a GraphModule is built (building one costs a code compile).

    Attributes:
        root: a structural copy of the user's model that shares its parameters and buffers.
        graph: the traced graph; nodes carry :class:`NodeInfo` after shape propagation.
        name: the model's class name.
        modules: submodules of ``root`` by path (filled on first use).
        guards: nodes whose values Python control flow used while tracing.
    """

    root: nn.Module
    graph: torch.fx.Graph
    name: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    guards: list[torch.fx.Node] = field(default_factory=list)

    def module(self, path: str) -> nn.Module:
        """The submodule at ``path`` of the traced copy."""
        mod = self.modules.get(path)
        if mod is None:
            if not self.modules:  # one walk instead of a get_submodule per path
                self.modules.update(self.root.named_modules(remove_duplicate=False))
                mod = self.modules.get(path)
            if mod is None:
                mod = self.root.get_submodule(path)
                self.modules[path] = mod
        return mod

    def graph_module(self) -> torch.fx.GraphModule:
        """Build (once) the GraphModule of the traced copy."""
        gm = self.__dict__.get("_gm")
        if gm is None:
            gm = torch.fx.GraphModule(self.root, self.graph, self.name)
            self.__dict__["_gm"] = gm
        return gm


@dataclass(frozen=True)
class NodeView:
    """A node of a graph with other op, target or arguments, for evaluating a rewrite without
    copying the graph (arguments name nodes of the original graph)."""

    name: str
    op: str
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    meta: dict[str, Any]

    @classmethod
    def of(cls, node: torch.fx.Node, change: Mapping[str, Any]) -> NodeView:
        """``node`` with the fields in ``change`` (op, target, args, kwargs) replaced."""
        return cls(
            name=node.name,
            op=change.get("op", node.op),
            target=change.get("target", node.target),
            args=tuple(change.get("args", node.args)),
            kwargs=dict(change.get("kwargs", node.kwargs)),
            meta=node.meta,
        )


def describe_node(node: torch.fx.Node | NodeView) -> str:
    """One-line description of a node for error messages: name, op, target and module path.

    Example:
        >>> describe_node(node)
        'node `conv1` (call_module conv1, module `conv1`)'
    """
    info = node.meta.get(META_KEY)
    scope = info.scope if isinstance(info, NodeInfo) else ""
    if node.op == "call_module":
        where = f"module `{node.target}`"
    elif scope:
        where = f"in module `{scope}`"
    else:
        where = "in the model's forward"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    module = getattr(target, "__module__", None)
    if node.op == "call_function" and module and module not in ("_operator", "builtins"):
        name = f"{module}.{name}"
    return f"node `{node.name}` ({node.op} {name}, {where})"


@dataclass(frozen=True)
class CallInputs:
    """The positional and keyword arguments of one call, as example inputs (what a forward
    pre-hook sees of a submodule's call).

    Example:
        >>> normalize_inputs(CallInputs((x,), {"mask": m})) == ((x,), {"mask": m})
        True
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a tensor, a sequence of inputs, a mapping of keyword inputs or a
    :class:`CallInputs` into (args, kwargs).

    Example:
        >>> normalize_inputs(torch.zeros(1, 3))[0][0].shape
        torch.Size([1, 3])
    """
    if isinstance(example_inputs, CallInputs):
        return tuple(example_inputs.args), dict(example_inputs.kwargs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def get_attr(root: nn.Module, target: str) -> Any:
    """The attribute at a dotted ``target`` of ``root`` (a ``get_attr`` node's value)."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def has_submodule(root: nn.Module, path: str) -> bool:
    """True when ``root`` has a submodule at ``path``."""
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True
