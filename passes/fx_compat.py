"""Every use of private ``torch.fx`` in fxconet, behind one availability self-test.

fxconet takes two shortcuts through fx's internals because they halve the cost of tracing:

* :func:`append_node`: creating a node without ``Graph.create_node``'s per-node scan of the
  arguments for raw SymInts (symbolic tracing makes none; the scan is ~10% of tracing).
* :func:`trace_module`: fx's ``Tracer.trace`` for a plain module root without its eager walk
  over every attribute of every module (``collect_tensor_attrs``, ~8% of an analysis): a tensor
  stored as a plain attribute is looked up only when the graph uses one (:class:`TensorAttrs`).

Both repeat the steps of fx's own code (torch 2.4 to 2.15) on its private members. At import,
:func:`self_test` checks that every private name listed in :data:`PRIVATE_NAMES` exists and that
:func:`append_node` builds the graph ``Graph.create_node`` builds; :data:`FAST_GRAPH` and
:data:`FAST_TRACE` turn a shortcut off where its check fails, and the callers then take fx's
public path (``Graph.create_node``, ``Tracer.trace``). ``tests/test_fx_compat.py`` checks that
both paths build the same graphs on real models.

Two smaller facts about fx's internals live here too: a graph remembers its tracer class
(:func:`detach_tracer`), and generated code registers wrapped functions with a ``wrap(...)``
line (:func:`split_wrap_registrations`).
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.fx
from torch import nn

if TYPE_CHECKING:  # the tracer subclass that calls trace_module
    from torch.fx import Tracer

__all__ = [
    "FAST_GRAPH",
    "FAST_TRACE",
    "PRIVATE_NAMES",
    "Availability",
    "TensorAttrs",
    "append_node",
    "detach_tracer",
    "self_test",
    "split_wrap_registrations",
    "trace_module",
]

_ST = "torch.fx._symbolic_trace"

#: every private name this module reads, by the object it is read from
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "graph": (  # torch.fx.Graph instances (append_node, trace_module)
        "_target_to_str",
        "_graph_namespace",
        "_insert",
        "_find_nodes_lookup_table",
        "_len",
        "_co_fields",
    ),
    "namespace": ("create_name", "associate_name_with_obj"),  # graph._graph_namespace
    "lookup": ("insert",),  # graph._find_nodes_lookup_table
    _ST: (  # trace_module, TensorAttrs
        "_get_is_fx_tracing",
        "_set_is_fx_tracing",
        "_orig_module_getattr",
        "_orig_module_call",
        "_new_patcher",
        "_patch_wrapped_functions",
        "_autowrap_check",
        "_constant_attribute_types",
    ),
    "tracer": ("create_args_for_root", "_autowrap_function_ids", "_autowrap_search"),
}


def append_node(
    graph: torch.fx.Graph,
    op: str,
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str | None,
    type_expr: Any,
) -> torch.fx.Node:
    """``graph.create_node`` for a graph being traced, without its per-node scan of the
    arguments for raw SymInts (the steps of ``Graph.create_node``, on private members; only
    where :data:`FAST_GRAPH`)."""
    candidate = name if name is not None else graph._target_to_str(target)
    name = graph._graph_namespace.create_name(candidate, None)
    node = torch.fx.Node(graph, name, op, target, args, kwargs, type_expr)
    graph._graph_namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node


class Availability(NamedTuple):
    """What :func:`self_test` found: which shortcut may run, and the private names missing."""

    graph: bool
    trace: bool
    missing: tuple[str, ...]


def _missing_names() -> tuple[list[str], list[str]]:
    """(names missing for the graph shortcut, names missing for the trace shortcut)."""
    graph = torch.fx.Graph()
    owners: dict[str, Any] = {
        "graph": graph,
        "namespace": getattr(graph, "_graph_namespace", None),
        "lookup": getattr(graph, "_find_nodes_lookup_table", None),
        _ST: torch.fx._symbolic_trace,
        "tracer": torch.fx.Tracer(),
    }
    missing = {
        owner: [f"{owner}.{n}" for n in names if not hasattr(owners[owner], n)]
        for owner, names in PRIVATE_NAMES.items()
    }
    graph_part = missing["graph"] + missing["namespace"] + missing["lookup"]
    return graph_part, graph_part + missing[_ST] + missing["tracer"]


def _same_graph_both_ways() -> bool:
    """:func:`append_node` and ``Graph.create_node`` build the same small graph."""
    graphs = []
    for fast in (False, True):
        g = torch.fx.Graph()
        make = functools.partial(append_node, g) if fast else g.create_node
        x = make("placeholder", "x", (), {}, None, None)
        y = make("call_function", operator.add, (x, 1), {}, None, None)
        z = make("call_method", "relu", (y,), {}, None, None)
        make("output", "output", (z,), {}, None, None)
        graphs.append(g)
    slow, fast_g = graphs
    return (
        str(slow) == str(fast_g)
        and len(slow.nodes) == len(fast_g.nodes)
        and vars(slow).keys() == vars(fast_g).keys()
        and [n.name for n in fast_g.find_nodes(op="call_method", target="relu")] == ["relu"]
    )


def self_test() -> Availability:
    """Check every private name of :data:`PRIVATE_NAMES` and the graph shortcut's result.

    Example:
        >>> self_test().missing
        ()
    """
    try:
        missing_graph, missing_trace = _missing_names()
        graph_ok = not missing_graph and _same_graph_both_ways()
    except Exception:  # private members changed shape: use the public paths
        return Availability(False, False, ("self-test failed",))
    # the trace shortcut creates its nodes through the graph shortcut's checks too
    return Availability(graph_ok, graph_ok and not missing_trace, tuple(missing_trace))


_AVAILABLE = self_test()
#: :func:`append_node` may replace ``Graph.create_node``
FAST_GRAPH: bool = _AVAILABLE.graph
#: :func:`trace_module` may replace ``Tracer.trace`` for plain module roots
FAST_TRACE: bool = _AVAILABLE.trace


class TensorAttrs(dict):  # type: ignore[type-arg]
    """fx's map from a tensor stored as a module attribute to its qualified name, filled on the
    first lookup (fx fills it eagerly by walking every attribute of every module)."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root: nn.Module | None = root

    def _fill(self) -> None:
        root, self._root = self._root, None
        if root is None:
            return
        kinds = torch.fx._symbolic_trace._constant_attribute_types
        found: dict[Any, str] = {}
        for path, mod in root.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            for k, v in mod.__dict__.items():
                if isinstance(v, kinds):
                    found[v] = prefix + k
        for k, v in found.items():
            super().setdefault(k, v)

    def get(self, key: Any, default: Any = None) -> Any:
        self._fill()
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self._fill()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._fill()
        return super().__contains__(key)


def trace_module(
    tracer: Tracer,
    root: nn.Module,
    concrete_args: dict[str, Any] | None,
    known_paths: dict[str, nn.Module] | None = None,
) -> torch.fx.Graph:
    """fx's ``Tracer.trace`` of a plain module root, on fx's own helpers (only where
    :data:`FAST_TRACE`): module ``__getattr__``/``__call__`` patched for the duration,
    ``torch.fx.wrap``-ed and autowrapped functions patched, placeholders from the signature,
    one output node; tensor attributes are looked up on demand (:class:`TensorAttrs`).

    Args:
        tracer: the tracer (its ``getattr``, ``call_module``, ``create_node`` and
            ``create_arg`` do the work, as in fx).
        root: the module to trace.
        concrete_args: as for ``Tracer.trace``.
        known_paths: the root's submodules by path, when the caller has them (saves a walk).
    """
    st = torch.fx._symbolic_trace
    was_tracing = st._get_is_fx_tracing()
    st._set_is_fx_tracing(True)
    try:
        return _trace_module(tracer, root, concrete_args, known_paths)
    finally:
        st._set_is_fx_tracing(was_tracing)


def _trace_module(
    tracer: Any,
    root: nn.Module,
    concrete_args: dict[str, Any] | None,
    known: dict[str, nn.Module] | None,
) -> torch.fx.Graph:
    st = torch.fx._symbolic_trace
    tracer.root = root
    fn = type(root).forward
    tracer.root_module_name = root._get_name()
    if known is not None and known.get("") is root:
        tracer.submodule_paths = {}
        for path, mod in known.items():
            tracer.submodule_paths.setdefault(mod, path)
    else:
        tracer.submodule_paths = {mod: name for name, mod in root.named_modules()}
    tracer.graph = torch.fx.Graph(tracer_cls=type(tracer))
    code = getattr(fn, "__code__", None)
    if code is not None:
        tracer.graph._co_fields = {
            "co_name": code.co_name,
            "co_filename": code.co_filename,
            "co_firstlineno": code.co_firstlineno,
        }
    tracer.tensor_attrs = TensorAttrs(root)
    fn_globals = fn.__globals__  # read before patching
    fn, args = tracer.create_args_for_root(fn, True, concrete_args)
    parameter_proxy_cache: dict[str, torch.fx.Proxy] = {}
    orig_getattr, orig_call = st._orig_module_getattr, st._orig_module_call
    autowrap_ids = tracer._autowrap_function_ids

    @functools.wraps(orig_getattr)
    def module_getattr(mod: nn.Module, attr: str) -> Any:
        return tracer.getattr(attr, orig_getattr(mod, attr), parameter_proxy_cache)

    @functools.wraps(orig_call)
    def module_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return orig_call(mod, *args, **kwargs)

        st._autowrap_check(
            patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}), autowrap_ids
        )
        return tracer.call_module(mod, forward, args, kwargs)

    with st._new_patcher() as patcher:
        patcher.patch_method(nn.Module, "__getattr__", module_getattr, deduplicate=False)
        patcher.patch_method(nn.Module, "__call__", module_call, deduplicate=False)
        st._patch_wrapped_functions(patcher)
        st._autowrap_check(patcher, fn_globals, autowrap_ids)
        for module in tracer._autowrap_search:
            st._autowrap_check(patcher, module.__dict__, autowrap_ids)
        returns = inspect.get_annotations(inspect.unwrap(fn)).get("return")
        tracer.create_node(
            "output", "output", (tracer.create_arg(fn(*args)),), {}, type_expr=returns
        )
    tracer.submodule_paths = None
    graph: torch.fx.Graph = tracer.graph
    return graph


def detach_tracer(graph: torch.fx.Graph) -> None:
    """Forget the tracer class a graph remembers: a pickled GraphModule re-traces itself with
    it on load, and fx's default tracer keeps loading independent of fxconet."""
    for name in ("_tracer_cls", "_tracer_extras"):
        if hasattr(graph, name):
            setattr(graph, name, None)


_WRAP_PREFIX = f"{torch.fx.wrap.__module__}.{torch.fx.wrap.__name__}("


def split_wrap_registrations(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split generated code into the ``wrap("name")`` registrations of ``torch.fx.wrap``-ed
    functions (fx emits them before ``def forward``) and the other lines."""
    wraps = [ln for ln in lines if ln.startswith(_WRAP_PREFIX)]
    return wraps, [ln for ln in lines if not ln.startswith(_WRAP_PREFIX)]
