"""Front end: symbolic tracing and shape propagation.

``trace`` turns a model into a ``torch.fx`` graph whose every node carries, in
``node.meta[META_KEY]``, a :class:`NodeInfo` with the node's value computed on the ``meta``
device (shapes and dtypes, no data) and the module path it came from.

Shape propagation does no real compute: common ops have closed-form shape rules, everything else
runs on ``meta`` tensors (module parameters are swapped for ``meta`` copies, which cost nothing).
Only an op without a meta kernel falls back to running on zero tensors on the CPU.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

from fxconet.errors import ShapeError, TraceError

__all__ = [
    "META_KEY",
    "NodeInfo",
    "Traced",
    "describe_node",
    "normalize_inputs",
    "propagate_shapes",
    "trace",
    "trace_model",
]

META_KEY = "fxconet"  # the one node.meta key fxconet writes


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
        graph: the traced graph; nodes carry :class:`NodeInfo` after :func:`propagate_shapes`.
        name: the model's class name.
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
    """One-line description of a node for error messages: name, op, target and module path."""
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


# ---------------------------------------------------------------------------------------------
# tracing


class _ValueProxy(torch.fx.Proxy):
    """A proxy that can be iterated when its value is a tuple or list of known length.

    ``list(x.chunk(2, 1))`` or ``for y in x.split(8, 1)`` fail with plain ``torch.fx`` because a
    proxy has no length. Here the tracer computes the node's value on ``meta`` tensors (only for
    the nodes that are iterated) and iterates over ``proxy[i]``. Sizes stay symbolic: ``len`` of a
    tensor proxy is still an error, so no batch size is baked into the graph.
    """

    def _sequence_length(self) -> int | None:
        tracer = self.tracer
        if isinstance(tracer, _Tracer) and tracer.example is not None:
            value = tracer.value_of(self.node)
            if isinstance(value, tuple | list | torch.Size):
                return len(value)
        return None

    def __iter__(self) -> Any:
        n = self._sequence_length()
        if n is not None:
            return iter([self[i] for i in range(n)])  # type: ignore[index]
        return super().__iter__()

    def __len__(self) -> int:
        n = self._sequence_length()
        if n is not None:
            return n
        return super().__len__()

    def __index__(self) -> int:
        tracer = self.tracer
        if isinstance(tracer, _Tracer) and tracer.example is not None:
            value = tracer.value_of(self.node)
            if isinstance(value, int) and not isinstance(value, bool):
                tracer.guard(self.node)
                return value
        raise torch.fx.proxy.TraceError(
            f"{self.node.name} is a traced value and cannot be used as a Python int"
        )


_PLAIN_ARGS = frozenset({int, float, bool, str, type(None)})


def _append_node(
    graph: torch.fx.Graph,
    op: str,
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str | None,
    type_expr: Any,
) -> torch.fx.Node:
    """``graph.create_node`` for a graph being traced, without its per-node scan of the
    arguments for raw SymInts (symbolic tracing makes none; the scan is ~10% of tracing).

    The steps are those of ``Graph.create_node`` of torch 2.4 to 2.15, on private members;
    ``_FAST_GRAPH`` turns this off where they are missing, and a test checks that both build
    the same graph.
    """
    candidate = name if name is not None else graph._target_to_str(target)
    name = graph._graph_namespace.create_name(candidate, None)
    node = torch.fx.Node(graph, name, op, target, args, kwargs, type_expr)
    graph._graph_namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node


def _fast_graph_ok() -> bool:
    """Check, once, that ``_append_node`` builds what ``Graph.create_node`` builds here."""
    try:
        graphs = []
        for fast in (False, True):
            g = torch.fx.Graph()
            make = functools.partial(_append_node, g) if fast else g.create_node
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
    except Exception:  # private members moved: use the public path
        return False


_FAST_GRAPH = _fast_graph_ok()
_FAST_TRACE = all(
    hasattr(torch.fx._symbolic_trace, name)
    for name in (
        "_get_is_fx_tracing",
        "_set_is_fx_tracing",
        "_orig_module_getattr",
        "_orig_module_call",
        "_new_patcher",
        "_patch_wrapped_functions",
        "_autowrap_check",
    )
) and all(
    hasattr(torch.fx.Tracer(), name)
    for name in ("create_args_for_root", "_autowrap_function_ids", "_autowrap_search")
)


class _TensorAttrs(dict):  # type: ignore[type-arg]
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


class _Tracer(torch.fx.Tracer):
    """A tracer with user leaf modules, a module stack for error messages, node scopes, and
    iterable proxies for tuple-valued nodes."""

    def __init__(
        self,
        leaf_types: tuple[type, ...] = (),
        leaf_paths: frozenset[str] = frozenset(),
        example: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.stack: list[str] = []
        self.failed_at: list[str] | None = None
        self.scopes: dict[torch.fx.Node, str] = {}
        self.example = example
        self.values: dict[torch.fx.Node, Any] = {}
        self._cache: dict[int, nn.Module] = {}
        self._inputs: dict[torch.fx.Node, Any] | None = None
        self._evaluating = False  # computing values: modules run for real (on meta tensors)
        self.guards: list[torch.fx.Node] = []
        self.known_paths: dict[str, nn.Module] | None = None  # the root's modules by path
        self._names: tuple[nn.Module, dict[int, Any], dict[int, Any]] | None = None
        self._view: Traced | None = None  # the graph being traced, for value_of
        # Nothing asks fx for per-node extras: nodes are created straight on the graph.
        self._plain = not (
            self.check_mutable_operations
            or self.record_stack_traces
            or torch.fx.traceback.has_preserved_node_meta()
        )

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def trace(
        self,
        root: nn.Module | Callable[..., Any],
        concrete_args: dict[str, Any] | None = None,
    ) -> torch.fx.Graph:
        """``Tracer.trace`` for a plain module root, without fx's walk over every attribute of
        every module (``collect_tensor_attrs``, ~8% of an analysis): a tensor stored as a plain
        attribute is looked up only when the graph uses one (:class:`_TensorAttrs`).

        The other steps are those of fx's ``trace`` (torch 2.4 to 2.15), on fx's own helpers:
        module ``__getattr__``/``__call__`` patched for the duration, ``torch.fx.wrap``-ed and
        autowrapped functions patched, placeholders from the signature, one output node.
        ``_FAST_TRACE`` is off where those helpers are missing; a test checks that both build
        the same graph. Other roots (functions, GraphModules) and traces that ask fx for
        per-node extras take fx's own ``trace``.
        """
        if (
            not _FAST_TRACE
            or not self._plain
            or not isinstance(root, nn.Module)
            or isinstance(root, torch.fx.GraphModule)
            or self.traced_func_name != "forward"
        ):
            return super().trace(root, concrete_args)
        st = torch.fx._symbolic_trace
        was_tracing = st._get_is_fx_tracing()
        st._set_is_fx_tracing(True)
        try:
            return self._trace_module(root, concrete_args)
        finally:
            st._set_is_fx_tracing(was_tracing)

    def _trace_module(
        self, root: nn.Module, concrete_args: dict[str, Any] | None
    ) -> torch.fx.Graph:
        st = torch.fx._symbolic_trace
        self.root = root
        fn = type(root).forward
        self.root_module_name = root._get_name()
        known = self.known_paths
        if known is not None and known.get("") is root:
            self.submodule_paths = {}
            for path, mod in known.items():
                self.submodule_paths.setdefault(mod, path)
        else:
            self.submodule_paths = {mod: name for name, mod in root.named_modules()}
        self.graph = torch.fx.Graph(tracer_cls=type(self))
        code = getattr(fn, "__code__", None)
        if code is not None:
            self.graph._co_fields = {
                "co_name": code.co_name,
                "co_filename": code.co_filename,
                "co_firstlineno": code.co_firstlineno,
            }
        self.tensor_attrs = _TensorAttrs(root)
        fn_globals = fn.__globals__  # read before patching
        fn, args = self.create_args_for_root(fn, True, concrete_args)
        parameter_proxy_cache: dict[str, torch.fx.Proxy] = {}
        orig_getattr, orig_call = st._orig_module_getattr, st._orig_module_call
        autowrap_ids = self._autowrap_function_ids
        tracer = self

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
            for module in self._autowrap_search:
                st._autowrap_check(patcher, module.__dict__, autowrap_ids)
            returns = inspect.get_annotations(inspect.unwrap(fn)).get("return")
            self.create_node(
                "output", "output", (self.create_arg(fn(*args)),), {}, type_expr=returns
            )
        self.submodule_paths = None
        return self.graph

    def value_of(self, node: torch.fx.Node) -> Any:
        """The node's meta value, evaluating its not-yet-evaluated ancestors once."""
        if node in self.values:
            return self.values[node]
        assert self.example is not None
        order: list[torch.fx.Node] = []
        ordered: set[torch.fx.Node] = set()
        values = self.values
        stack = [node]
        while stack:
            n = stack[-1]
            pending = [i for i in n.all_input_nodes if i not in values and i not in ordered]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if n not in values and n not in ordered:
                order.append(n)
                ordered.add(n)
        if self._inputs is None:
            placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
            self._inputs = _bind_placeholders(placeholders, *self.example)
        view = self._view
        if view is None or view.root is not self.root or view.graph is not self.graph:
            paths = self.known_paths if self.known_paths is not None else {}
            view = self._view = Traced(root=self.root, graph=self.graph, name="", modules=paths)
        self._evaluating = True
        try:
            for n in order:
                self.values[n] = _eval_node(view, n, self.values, self._inputs, self._cache, None)
        finally:
            self._evaluating = False
        return self.values[node]

    def guard(self, node: torch.fx.Node) -> None:
        """Record that Python control flow used this node's value (the trace is specialised to
        the example inputs there)."""
        if node not in self.guards:
            self.guards.append(node)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        """``if x.shape[-1] % 2:`` and the like: decided on the example input's shapes, and
        recorded as a guard (the analysis freezes the channels such a branch depends on)."""
        if self.example is not None:
            value = self.value_of(obj.node)
            if isinstance(value, bool | int):
                self.guard(obj.node)
                return bool(value)
        return super().to_bool(obj)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's ``getattr``: a parameter (or buffer) read as a module attribute becomes a
        ``get_attr`` node of its qualified name. fx finds the name by walking every parameter of
        the model on each such read (half of tracing ConvNeXt, which reads ``layer_scale``);
        here the names are indexed once per trace. A tensor not in the index (added while
        tracing, or a plain attribute) takes fx's own search."""
        if self._evaluating:
            return attr_val
        if isinstance(attr_val, torch.Tensor) and not self.param_shapes_constant:
            name = None
            if isinstance(attr_val, nn.Parameter):
                name = self._indexed_name(attr_val, buffer=False)
            if name is None and self.proxy_buffer_attributes:
                name = self._indexed_name(attr_val, buffer=True)
            if name is not None:
                proxy = parameter_proxy_cache.get(name)
                if proxy is None:
                    proxy = parameter_proxy_cache[name] = self.create_proxy(
                        "get_attr", name, (), {}
                    )
                return proxy
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _indexed_name(self, t: torch.Tensor, *, buffer: bool) -> str | None:
        """The first qualified name of ``t`` among the root's buffers (or parameters), as
        ``named_buffers()``/``named_parameters()`` give it; the index is built once per root."""
        root = self.root
        cached = self._names
        if cached is None or cached[0] is not root:
            params = {id(p): (n, p) for n, p in root.named_parameters()}
            buffers = {id(b): (n, b) for n, b in root.named_buffers()}
            cached = self._names = (root, params, buffers)
        hit = (cached[2] if buffer else cached[1]).get(id(t))
        return hit[0] if hit is not None and hit[1] is t else None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or (
            self.leaf_types and isinstance(m, self.leaf_types)
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self._evaluating:  # fx patches Module.__call__ while tracing; run the module itself
            return forward(*args, **kwargs)
        try:
            path = self.path_of_module(m)
        except NameError as e:
            raise TraceError(
                f"a {type(m).__name__} called inside `{self.stack[-1] if self.stack else ''}` "
                "is not a registered submodule (created inside forward?); register it in "
                "__init__ so it has a module path"
            ) from e
        self.stack.append(path)
        try:
            # fx's own call_module also keeps ``scope`` and ``nn_module_stack`` (copied onto
            # every node); the analysis keeps its own scopes, so those copies are skipped.
            if self.is_leaf_module(m, path):
                return self.create_proxy("call_module", path, args, kwargs)
            return forward(*args, **kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.stack)
            raise
        finally:
            self.stack.pop()

    def create_node(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
    ) -> torch.fx.Node:
        if not self._plain:  # a caller asked fx for mutation checks, stack traces, node meta
            node = super().create_node(kind, target, args, kwargs, name, type_expr)
        elif _FAST_GRAPH:
            node = _append_node(self.graph, kind, target, args, kwargs, name, type_expr)
        else:
            node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        self.scopes[node] = self.stack[-1] if self.stack else ""
        return node

    def create_arg(self, a: Any) -> Any:
        # Fast path for the argument types of nearly every node; the rest go through fx's
        # checks for parameters, tensors, modules and custom classes.
        t = type(a)
        if t is _ValueProxy:
            return a.node
        if t in _PLAIN_ARGS:
            return a
        if t is tuple or t is list:
            return t(self.create_arg(x) for x in a)
        if t is dict and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        if t is nn.Parameter or t is torch.Tensor:
            return self._tensor_arg(a)
        return super().create_arg(a)

    def _tensor_arg(self, a: torch.Tensor) -> Any:
        """fx's ``create_arg`` for a concrete tensor, with names from the per-trace index (fx
        walks every parameter or buffer of the model for each one): a parameter or buffer
        becomes a ``get_attr`` of its first name, any other tensor a ``_tensor_constant``
        attribute (once per tensor)."""
        name = self._indexed_name(a, buffer=not isinstance(a, nn.Parameter))
        if name is not None:
            return self.create_node("get_attr", name, (), {})
        if isinstance(a, nn.Parameter) or not hasattr(self, "get_fresh_qualname"):
            return super().create_arg(a)  # not the model's: fx's search, and its error
        qualname = self.tensor_attrs.get(a)
        if not qualname:
            qualname = self.get_fresh_qualname("_tensor_constant")
            self.tensor_attrs[a] = qualname
            setattr(self.root, qualname, a)
        return self.create_node("get_attr", qualname, (), {})


# module class -> defines its own copy/pickle protocol (weak: GraphModules make a class each)
_CUSTOM_COPY: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _shallow_copy(m: nn.Module) -> nn.Module:
    """``copy.copy(m)``, without the generic reduce machinery for plain modules (5x faster)."""
    cls = type(m)
    custom = _CUSTOM_COPY.get(cls)
    if custom is None:
        custom = _CUSTOM_COPY[cls] = (
            cls.__reduce_ex__ is not object.__reduce_ex__
            or hasattr(cls, "__copy__")
            or getattr(cls, "__getstate__", None) is not getattr(nn.Module, "__getstate__", None)
            or getattr(cls, "__setstate__", None) is not getattr(nn.Module, "__setstate__", None)
        )
    if custom:
        return copy.copy(m)
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    return new


def _structural_copy(model: nn.Module, paths: dict[str, nn.Module] | None = None) -> nn.Module:
    """Copy the module tree but share parameters, buffers and other attribute values.

    Tracing must not touch the user's modules (a forward that assigns ``self.cache = x`` would
    store a Proxy on them), and copying the weights would cost memory and time. Each module is
    copied shallowly with its own ``__dict__`` and its own child/parameter/buffer dicts.
    ``paths``, when given, receives every copy by its module path (``""`` for the root; the
    children of a module reached twice only under its first path).
    """
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module, path: str) -> nn.Module:
        hit = memo.get(id(m))
        if hit is not None:
            if paths is not None:
                paths.setdefault(path, hit)
            return hit
        new = _shallow_copy(m)
        memo[id(m)] = new
        if paths is not None:
            paths[path] = new
        d = new.__dict__
        d["_parameters"] = dict(m._parameters)
        d["_buffers"] = dict(m._buffers)
        prefix = f"{path}." if path else ""
        d["_modules"] = {
            k: (visit(c, prefix + k) if c is not None else None) for k, c in m._modules.items()
        }
        return new

    return visit(model, "")


def _leaf_spec(leaf_modules: Iterable[type | str]) -> tuple[tuple[type, ...], frozenset[str]]:
    types, paths = [], []
    for item in leaf_modules:
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str):
            paths.append(item)
        else:
            raise TypeError(
                f"leaf_modules entries must be nn.Module subclasses or module paths, got {item!r}"
            )
    return tuple(types), frozenset(paths)


def trace_model(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    example_inputs: Any = None,
) -> Traced:
    """Symbolically trace a structural copy of ``model`` (no shapes yet).

    With ``example_inputs``, tuple-valued nodes can be iterated while tracing
    (``list(x.chunk(2, 1))``), which plain ``torch.fx`` refuses.

    Raises:
        TraceError: naming the module path that failed, the reason, and the workaround.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    paths: dict[str, nn.Module] = {}
    root = _structural_copy(model, paths)
    leaf_types, leaf_paths = _leaf_spec(leaf_modules)
    missing = [p for p in leaf_paths if p and not _has_submodule(root, p)]
    if missing:
        raise TraceError(f"leaf_modules names unknown module paths {sorted(missing)}")
    example = None
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
        example = (tuple(_to_meta(a) for a in args), {k: _to_meta(v) for k, v in kwargs.items()})
    tracer = _Tracer(leaf_types, leaf_paths, example)
    tracer.known_paths = paths
    name = type(model).__name__
    try:
        graph = tracer.trace(root, concrete_args=dict(concrete_args) if concrete_args else None)
    except TraceError:
        raise
    except Exception as e:
        where = tracer.failed_at[-1] if tracer.failed_at else ""
        mod = root.get_submodule(where) if where else root
        location = f"module `{where}` ({type(mod).__name__})" if where else f"{name}.forward"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            f"pass leaf_modules=[{type(mod).__name__}] (or the path {where!r}) to keep it opaque"
            if where
            else "pass leaf_modules=[...] for the offending submodule"
        )
        raise TraceError(
            f"cannot trace {location}: {type(e).__name__}: {reason}. Fix: {hint}, or fix the "
            "control flow with concrete_args={...}"
        ) from e
    for node, scope in tracer.scopes.items():
        node.meta[META_KEY] = NodeInfo(None, scope)
    return Traced(root=root, graph=graph, name=name, modules=paths, guards=list(tracer.guards))


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a tensor, a sequence of inputs or a mapping of keyword inputs into (args, kwargs)."""
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


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Trace a copy of ``model`` into a GraphModule with a :class:`NodeInfo` on every node.

    Example:
        >>> gm = trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta[META_KEY].value.shape
        torch.Size([1, 64, 112, 112])
    """
    traced = trace_model(
        model, leaf_modules=leaf_modules, concrete_args=concrete_args, example_inputs=example_inputs
    )
    args, kwargs = normalize_inputs(example_inputs)
    propagate_shapes(traced, args, kwargs)
    return traced.graph_module()


# ---------------------------------------------------------------------------------------------
# shape propagation on the meta device


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return value
        out = torch.empty_like(value, device="meta")
        if isinstance(value, nn.Parameter):
            out = nn.Parameter(out, requires_grad=value.requires_grad)
        return out
    if isinstance(value, tuple | list):
        return type(value)(_to_meta(v) for v in value) if not _is_namedtuple(value) else value
    return value


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def meta_module(module: nn.Module, cache: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` (and its children) whose tensors live on ``meta`` and whose
    hooks are dropped, so running it costs nothing and touches no user state."""
    hit = cache.get(id(module))
    if hit is not None:
        return hit
    new = _shallow_copy(module)  # a new __dict__, shallow
    d = new.__dict__
    d["_parameters"] = {k: _to_meta(p) for k, p in module._parameters.items()}
    d["_buffers"] = {k: _to_meta(b) for k, b in module._buffers.items()}
    d["_modules"] = {
        k: (meta_module(c, cache) if c is not None else None) for k, c in module._modules.items()
    }
    for hooks in (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        if hooks in d:
            d[hooks] = type(d[hooks])()
    cache[id(module)] = new
    return new


def _same(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0]


def _broadcast(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(tensors) == 1 and tensors[0].dtype.is_floating_point:
        return tensors[0]
    if len(tensors) == 2 and tensors[0].dtype == tensors[1].dtype:
        a, b = tensors
        if a.shape == b.shape:
            return a
        shape = _broadcast_shape(tuple(a.shape), tuple(b.shape))
        if shape is not None:
            return torch.empty(shape, dtype=a.dtype, device="meta")
    return None  # fall back to running the op


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy broadcasting of two shapes (None when they do not broadcast: the op then runs and
    raises its own error). ``torch.broadcast_shapes`` costs 50x more in its symbolic checks."""
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + a
    b = (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


def _flatten(x: torch.Tensor, start: int = 0, end: int = -1) -> torch.Tensor:
    return x.flatten(start, end)  # view on meta: constant time


def _linear_shape(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], mod.out_features), dtype=x.dtype, device="meta")


def _adaptive_pool_shape(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    size: Any = mod.output_size
    k = 2 if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) else None
    if k is None or getattr(mod, "return_indices", False):
        return None
    sizes: tuple[Any, ...] = (size, size) if isinstance(size, int) else tuple(size)
    sizes = tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(sizes))
    return torch.empty((*x.shape[:-2], *sizes), dtype=x.dtype, device="meta")


_SAME_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Mish,
    nn.ELU,
    nn.SELU,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Softmax,
    nn.LogSoftmax,
)

_SAME_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.dropout,
    torch.nn.functional.softmax,
    torch.nn.functional.layer_norm,
    torch.nn.functional.group_norm,
    torch.nn.functional.batch_norm,
    operator.neg,
}
_SAME_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "detach",
    "softmax",
    "neg",
}
_BROADCAST_FUNCTIONS: set[Any] = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
}
_BROADCAST_METHODS = {"add", "add_", "mul", "mul_", "sub", "div"}


def _fast_module(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if type(mod) is nn.MultiheadAttention:
        return _attention_shape(mod, args, kwargs)
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    t = type(mod)
    if t in _SAME_MODULE_SET:
        return x
    if t is nn.Linear:
        return _linear_shape(mod, x)  # type: ignore[arg-type]
    if t in _CONV_DIMS:
        return _conv_shape(mod, x, _CONV_DIMS[t])  # type: ignore[arg-type]
    if t is nn.Flatten:
        return x.flatten(mod.start_dim, mod.end_dim)  # type: ignore[arg-type]
    if t in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        return _adaptive_pool_shape(mod, x)
    return None


_SAME_MODULE_SET = frozenset(_SAME_MODULES)
_ATTENTION_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def _attention_shape(
    mod: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``nn.MultiheadAttention``'s outputs from its shape rule: on ``meta`` its attention kernel
    runs through Python decompositions (~3 ms a call). Masks, or anything that does not fit,
    take the real module (which raises its own error)."""
    if len(args) > len(_ATTENTION_ARGS) or not set(kwargs) <= set(_ATTENTION_ARGS):
        return None
    bound = dict(zip(_ATTENTION_ARGS, args, strict=False)) | kwargs
    q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    assert isinstance(v, torch.Tensor)
    if bound.get("key_padding_mask") is not None or bound.get("attn_mask") is not None:
        return None
    if bound.get("is_causal", False) or not (q.dim() == k.dim() == v.dim() in (2, 3)):
        return None
    if not (q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point):
        return None
    if (q.shape[-1], k.shape[-1], v.shape[-1]) != (mod.embed_dim, mod.kdim, mod.vdim):
        return None
    batched = q.dim() == 3
    if batched and mod.batch_first:
        n, tgt, src = q.shape[0], q.shape[1], k.shape[1]
        if (k.shape[0], v.shape[0], v.shape[1]) != (n, n, src):
            return None
    elif batched:
        n, tgt, src = q.shape[1], q.shape[0], k.shape[0]
        if (k.shape[1], v.shape[1], v.shape[0]) != (n, n, src):
            return None
    else:
        n, tgt, src = 0, q.shape[0], k.shape[0]
        if v.shape[0] != src:
            return None
    out = torch.empty(q.shape, dtype=q.dtype, device="meta")
    if not bound.get("need_weights", True):
        return out, None
    heads = () if bound.get("average_attn_weights", True) else (mod.num_heads,)
    batch = (n,) if batched else ()
    return out, torch.empty((*batch, *heads, tgt, src), dtype=q.dtype, device="meta")


_CONV_DIMS: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _conv_shape(mod: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, n: int) -> Any:
    """Output of a plain convolution from the formula (the meta kernel costs ~50 us a call);
    ``None`` for anything unusual, so the real kernel runs and raises its own errors."""
    if x.dim() != n + 2 or x.shape[1] != mod.in_channels or x.dtype != mod.weight.dtype:
        return None
    if isinstance(mod.padding, str):
        if mod.padding != "valid":
            return None  # "same": let the kernel work out the asymmetric padding
        padding = (0,) * n
    else:
        padding = tuple(mod.padding)
    spatial = []
    for size, k, s, p, d in zip(
        x.shape[2:], mod.kernel_size, mod.stride, padding, mod.dilation, strict=True
    ):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out <= 0:
            return None
        spatial.append(out)
    return torch.empty((x.shape[0], mod.out_channels, *spatial), dtype=x.dtype, device="meta")


def _fast_function(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if target in _SAME_FUNCTIONS:
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        return None
    if target in _BROADCAST_FUNCTIONS:
        return _broadcast(args, kwargs)
    if target is torch.flatten and args and isinstance(args[0], torch.Tensor):
        return args[0].flatten(*args[1:], **kwargs)
    if target is operator.getitem and isinstance(args[0], tuple | list | torch.Size):
        return args[0][args[1]]
    if target is torch.cat:
        return _cat_shape(args, kwargs)
    if getattr(target, "__name__", None) == "shifted_window_attention":
        return _window_attention_shape(target, args, kwargs)
    return None


def _window_attention_shape(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torchvision's Swin ``shifted_window_attention`` (an fx-wrapped function): its output has
    the input's shape when the weights fit it (on ``meta`` the function costs ~4 ms a call).
    Anything else runs the function, which raises its own error."""
    if getattr(target, "__module__", None) != "torchvision.models.swin_transformer":
        return None
    try:
        bound = inspect.signature(target).bind(*args, **kwargs).arguments
    except TypeError:
        return None
    x, heads = bound.get("input"), bound.get("num_heads")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not isinstance(heads, int) or heads < 1:
        return None
    c = x.shape[-1]
    window = bound.get("window_size")
    if c % heads or not isinstance(window, list | tuple) or len(window) != 2:
        return None
    n = int(window[0]) * int(window[1])
    want = {
        "qkv_weight": (3 * c, c),
        "proj_weight": (c, c),
        "relative_position_bias": (1, heads, n, n),
        "qkv_bias": (3 * c,),
        "proj_bias": (c,),
        "logit_scale": (heads, 1, 1),
    }
    for name, shape in want.items():
        t = bound.get(name)
        if t is None and name not in ("qkv_weight", "proj_weight", "relative_position_bias"):
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            return None
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _cat_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch.cat of same-dtype tensors (the meta kernel is slow: ~2 ms per call)."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, list | tuple) or not tensors or not isinstance(dim, int):
        return None
    first = tensors[0]
    if not all(isinstance(t, torch.Tensor) and t.dim() == first.dim() for t in tensors):
        return None
    if any(t.dtype != first.dtype for t in tensors) or first.dim() == 0:
        return None
    d = dim % first.dim()
    shape = list(first.shape)
    for t in tensors[1:]:
        if any(a != b for k, (a, b) in enumerate(zip(t.shape, shape, strict=True)) if k != d):
            return None  # let the real kernel raise the error
        shape[d] += t.shape[d]
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _fast_method(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    if name in _SAME_METHODS:
        return args[0]
    if name in _BROADCAST_METHODS:
        return _broadcast(args, kwargs)
    return None


def _materialize(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, tuple | list) and not _is_namedtuple(value):
        return type(value)(_materialize(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    return value


def _run_on_zeros(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        out = fn(*_materialize(args), **_materialize(kwargs))
    return _to_meta(out)


def _load_arg(env: dict[torch.fx.Node, Any], a: Any) -> Any:
    return torch.fx.node.map_arg(a, lambda n: env[n])


def propagate_shapes(
    traced: Traced,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    modules: Mapping[str, nn.Module] | None = None,
    check: Callable[[torch.fx.Node, Any], None] | None = None,
    overrides: Mapping[torch.fx.Node, NodeView] | None = None,
) -> dict[torch.fx.Node, Any]:
    """Compute every node's value on the ``meta`` device and store it in its :class:`NodeInfo`.

    Args:
        traced: the traced model.
        args, kwargs: example inputs (real or meta tensors; only shapes and dtypes are used).
        modules: replacement modules by path (the rewrite's verifier passes resized ones); when
            given, node metadata is left untouched and only the values are returned.
        check: called with each node and its value (the verifier compares shapes there).
        overrides: nodes to evaluate as other ops or with other arguments (a rewrite's
            changes, without copying the graph); the values are stored under the original node.

    Raises:
        ShapeError: an op failed, naming the node, op and module path.
    """
    kwargs = dict(kwargs or {})
    cache: dict[int, nn.Module] = {}
    env: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    inputs = _bind_placeholders(placeholders, args, kwargs)
    record = modules is None
    overrides = overrides or {}
    for node in traced.graph.nodes:
        try:
            value = _eval_node(traced, overrides.get(node, node), env, inputs, cache, modules)
        except ShapeError:
            raise
        except Exception as e:
            raise ShapeError(
                f"{describe_node(node)} failed during shape propagation: "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                " (do the example inputs fit the model?)"
            ) from e
        env[node] = value
        if record:
            info = node.meta.get(META_KEY)
            scope = info.scope if isinstance(info, NodeInfo) else ""
            node.meta[META_KEY] = NodeInfo(value, scope)
        if check is not None:
            check(node, value)
    return env


def _bind_placeholders(
    placeholders: list[torch.fx.Node], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[torch.fx.Node, Any]:
    bound: dict[torch.fx.Node, Any] = {}
    pos = list(args)
    for ph in placeholders:
        name = str(ph.target).lstrip("*")
        if name in kwargs:
            bound[ph] = _to_meta(kwargs.pop(name))
        elif pos:
            bound[ph] = _to_meta(pos.pop(0))
        elif ph.args:  # default value recorded by the tracer
            bound[ph] = _to_meta(ph.args[0])
        else:
            raise ShapeError(
                f"no example input for the model's argument `{name}`; pass it in example_inputs"
            )
    if pos or kwargs:
        extra = len(pos) if pos else sorted(kwargs)
        raise ShapeError(
            f"too many example inputs ({extra} left over) for the traced forward's "
            f"arguments {[str(p.target) for p in placeholders]}"
        )
    return bound


def _eval_node(
    traced: Traced,
    node: torch.fx.Node | NodeView,
    env: dict[torch.fx.Node, Any],
    inputs: dict[torch.fx.Node, Any],
    cache: dict[int, nn.Module],
    modules: Mapping[str, nn.Module] | None,
) -> Any:
    op = node.op
    if op == "placeholder":
        assert isinstance(node, torch.fx.Node)  # rewrites never replace placeholders
        return inputs[node]
    if op == "output":
        return _load_arg(env, node.args[0])
    if op == "get_attr":
        target = str(node.target)
        value = modules.get(target) if modules is not None and target in modules else None
        if value is None:
            value = _get_attr(traced.root, target)
        return _to_meta(value)
    args = _load_arg(env, node.args)
    kwargs = _load_arg(env, node.kwargs)
    if op == "call_module":
        path = str(node.target)
        mod = modules.get(path) if modules is not None else None
        if mod is None:
            mod = traced.module(path)
        out = _fast_module(mod, args, kwargs)
        if out is not None:
            return out
        mm = meta_module(mod, cache)
        try:
            with torch.no_grad():
                return mm(*args, **kwargs)
        except (NotImplementedError, RuntimeError):
            return _run_on_zeros(_real_copy(mm), args, kwargs)
    if op == "call_function":
        out = _fast_function(node.target, args, kwargs)
        if out is not None:
            return out
        try:
            with torch.no_grad():
                return node.target(*args, **kwargs)  # type: ignore[operator]
        except (NotImplementedError, RuntimeError):
            return _run_on_zeros(node.target, args, kwargs)  # type: ignore[arg-type]
    if op == "call_method":
        name = str(node.target)
        out = _fast_method(name, args, kwargs)
        if out is not None:
            return out
        self_obj, *rest = args
        try:
            with torch.no_grad():
                return getattr(self_obj, name)(*rest, **kwargs)
        except (NotImplementedError, RuntimeError):
            return _run_on_zeros(lambda s, *a, **k: getattr(s, name)(*a, **k), args, kwargs)
    raise ShapeError(f"{describe_node(node)}: unknown fx op {op!r}")


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _real_copy(mm: nn.Module) -> nn.Module:
    """A CPU copy of a meta module with zero weights (fallback for ops without meta kernels)."""
    real = copy.deepcopy(mm)
    real.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*real.parameters(), *real.buffers()]:
            t.zero_()
    return real
