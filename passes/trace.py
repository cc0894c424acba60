"""Front end: symbolic tracing of a structural copy of the user's model.

:func:`trace_model` traces a copy of the module tree (the model itself is never touched) with a
tracer that keeps user leaf modules opaque, records the module path of every node (for error
messages), and can iterate tuple-valued nodes while tracing (``list(x.chunk(2, 1))``), which
plain ``torch.fx`` refuses. :func:`trace` also propagates shapes
(:mod:`fxconet.passes.shape_prop`), so every node carries a :class:`NodeInfo` with its value
on the ``meta`` device.

The tracer's shortcuts through fx's internals live in :mod:`fxconet.passes.fx_compat`.
"""

from __future__ import annotations

import inspect
import operator
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from fxconet.errors import TraceError, first_line
from fxconet.passes import fx_compat, parametrized
from fxconet.passes.module_copy import structural_copy, to_meta
from fxconet.passes.nodes import (
    KWONLY_KEY,
    META_KEY,
    NodeInfo,
    NodeView,
    Traced,
    describe_node,
    has_submodule,
    normalize_inputs,
)
from fxconet.passes.shape_prop import bind_placeholders, eval_node, propagate_shapes

__all__ = [
    "META_KEY",
    "NodeInfo",
    "NodeView",
    "Traced",
    "describe_node",
    "normalize_inputs",
    "propagate_shapes",
    "trace",
    "trace_model",
    "trace_with_fallback",
]


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

    def __setitem__(self, key: Any, value: Any) -> None:
        """``y[:, 2::3] = v``: recorded as ``operator.setitem`` (fx keeps it: it is impure)."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

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
_Example = tuple[tuple[Any, ...], dict[str, Any]]


def _without_varargs(fn: Callable[..., Any], example: _Example | None) -> Callable[..., Any]:
    """``fn`` without its ``*args``/``**kwargs`` when the example inputs leave them empty.

    A ``forward(self, x, *args, **kwargs)`` (every ultralytics model) traces with ``args = ()``
    and ``kwargs = {}`` as constants, so code that unpacks or iterates them traces as it runs;
    fx alone makes them placeholders that no example input binds. The wrapper is generated with
    the named parameters and their defaults (fx reads its code object, so it cannot be a
    ``functools.wraps`` wrapper); the traced graph takes the named arguments only.
    """
    code = getattr(fn, "__code__", None)
    if code is None or not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return fn
    params = list(inspect.signature(fn).parameters.values())
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if example is not None:
        args, kwargs = example
        positional = [p for p in named if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) + 1 > len(positional) or set(kwargs) - {p.name for p in named}:
            return fn  # the example fills the varargs: fx's placeholders bind them
    env: dict[str, Any] = {"__fn": fn}
    head, call, star = [], [], False
    for i, p in enumerate(named):
        if not p.name.isidentifier() or p.name.startswith("__"):
            return fn
        text = p.name
        if p.default is not p.empty:
            env[f"__d{i}"] = p.default
            text += f"=__d{i}"
        if p.kind is p.KEYWORD_ONLY:
            if not star:
                head.append("*")
                star = True
            call.append(f"{p.name}={p.name}")
        else:
            call.append(p.name)
        head.append(text)
    src = f"def {code.co_name}({', '.join(head)}):\n    return __fn({', '.join(call)})\n"
    exec(compile(src, code.co_filename, "exec"), env)  # our own text: names and defaults only
    wrapper = env[code.co_name]
    wrapper.__qualname__ = getattr(fn, "__qualname__", code.co_name)
    return wrapper


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

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Any, list[Any]]:
        """fx's placeholders from the root's signature, with empty ``*args``/``**kwargs``
        bound as constants (:func:`_without_varargs`); a ``forward`` rebound on the root
        instance is the one traced (fx would trace the class's)."""
        if is_module:
            bound = self.root.__dict__.get("forward")  # rebound on the instance in __init__
            if isinstance(bound, types.MethodType) and bound.__self__ is self.root:
                root_fn = bound.__func__
            root_fn = _without_varargs(root_fn, self.example)
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        try:
            params = inspect.signature(inspect.unwrap(root_fn)).parameters.values()
        except (TypeError, ValueError):
            return fn, args
        kwonly = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        placeholders = list(self.graph.find_nodes(op="placeholder"))
        star = next((n for n in placeholders if str(n.target).startswith("*")), None)
        for node in placeholders:
            if node.target in kwonly:  # bound from keyword inputs or its default only
                node.meta[KWONLY_KEY] = True
                if star is not None:  # after ``*args`` the generated forward keeps it keyword-only
                    star.append(node)
                    star = node
        return fn, args

    def trace(
        self,
        root: nn.Module | Callable[..., Any],
        concrete_args: dict[str, Any] | None = None,
    ) -> torch.fx.Graph:
        """``Tracer.trace``; for a plain module root, fx's steps without its eager walk over
        every module attribute (:func:`fxconet.passes.fx_compat.trace_module`, where
        ``fx_compat.FAST_TRACE``). Other roots (functions, GraphModules) and traces that ask fx
        for per-node extras take fx's own ``trace``."""
        if (
            not fx_compat.FAST_TRACE
            or not self._plain
            or not isinstance(root, nn.Module)
            or isinstance(root, torch.fx.GraphModule)
            or self.traced_func_name != "forward"
        ):
            return super().trace(root, concrete_args)
        return fx_compat.trace_module(self, root, concrete_args, self.known_paths)

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
            self._inputs = bind_placeholders(placeholders, *self.example)
        view = self._view
        if view is None or view.root is not self.root or view.graph is not self.graph:
            paths = self.known_paths if self.known_paths is not None else {}
            view = self._view = Traced(root=self.root, graph=self.graph, name="", modules=paths)
        self._evaluating = True
        try:
            for n in order:
                self.values[n] = eval_node(view, n, self.values, self._inputs, self._cache, None)
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
            caller = self.stack[-1] if self.stack else ""
            raise TraceError(
                f"a {type(m).__name__} called inside `{caller}` "
                "is not a registered submodule (created inside forward?); register it in "
                "__init__ so it has a module path",
                module_path=caller,
                reason=f"calls a {type(m).__name__} that is not a registered submodule",
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
        elif fx_compat.FAST_GRAPH:
            node = fx_compat.append_node(self.graph, kind, target, args, kwargs, name, type_expr)
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


def _refuse_unsupported(model: nn.Module, kept: frozenset[str] = frozenset()) -> None:
    """Refuse what a trace would drop or a resize would break, naming the module and the fix:
    a parametrized root, the legacy ``weight_norm``/``spectral_norm`` hooks outside ``kept``
    (paths called whole, see :func:`kept_modules`), hooks on the root.
    """
    name = type(model).__name__
    for path, m in model.named_modules():
        if _within(path, kept):
            continue
        where = f"module `{path}` ({type(m).__name__})" if path else f"the root ({name})"
        if parametrized.is_parametrized(m) and (not path or parametrized.why_frozen(m) is not None):
            tensors = sorted(m.parametrizations.keys())  # type: ignore[union-attr, operator]
            raise TraceError(
                f"{where} has parametrized tensors {tensors} (torch.nn.utils.parametrize: "
                "weight_norm, spectral_norm, orthogonal ...), which fxconet cannot resize yet. "
                "Fix: torch.nn.utils.parametrize.remove_parametrizations(module, name) before "
                "analyze, and apply the parametrization again to the resized model"
            )
        for hook in m._forward_pre_hooks.values():
            kind = type(hook).__name__
            if kind in ("WeightNorm", "SpectralNorm"):
                fix = "remove_weight_norm" if kind == "WeightNorm" else "remove_spectral_norm"
                raise TraceError(
                    f"{where} uses the legacy torch.nn.utils.{kind[:-4].lower()}_norm hook "
                    f"({kind}), whose extra weights a resize would leave at the old width. Fix: "
                    f"torch.nn.utils.{fix}(module) before analyze, and apply it again to the "
                    "resized model, or keep it as written with hooks='freeze'"
                )
    hooks = [
        what
        for what, table in (
            ("forward hooks", model._forward_hooks),
            ("forward pre-hooks", model._forward_pre_hooks),
        )
        if table
    ]
    if hooks:
        raise TraceError(
            f"the root module ({name}) has {' and '.join(hooks)}, which a traced graph would "
            "drop (its forward is traced, not called). Fix: remove them before analyze and "
            "register them on the resized model, or analyze a wrapper module that calls the "
            "hooked model as a submodule"
        )


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
    _refuse_unsupported(model, frozenset(p for p in leaf_modules if isinstance(p, str) and p))
    paths: dict[str, nn.Module] = {}
    root = structural_copy(model, paths)
    leaf_types, leaf_paths = _leaf_spec(leaf_modules)
    missing = [p for p in leaf_paths if p and not has_submodule(root, p)]
    if missing:
        raise TraceError(f"leaf_modules names unknown module paths {sorted(missing)}")
    example = None
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
        example = (tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()})
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
        reason = first_line(e)
        hint = (
            f"pass leaf_modules=[{type(mod).__name__}] (or the path {where!r}) to keep it opaque"
            if where
            else "pass leaf_modules=[...] for the offending submodule"
        )
        raise TraceError(
            f"cannot trace {location}: {type(e).__name__}: {reason}. Fix: {hint}, or fix the "
            "control flow with concrete_args={...}",
            module_path=where,
            reason=f"{type(e).__name__}: {reason.split('. ')[0].rstrip('.')}",
        ) from e
    for node, scope in tracer.scopes.items():
        node.meta[META_KEY] = NodeInfo(None, scope)
    return Traced(root=root, graph=graph, name=name, modules=paths, guards=list(tracer.guards))


#: most submodules one trace makes opaque before it gives up (each costs a trace)
MAX_OPAQUE = 64


def trace_with_fallback(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    example_inputs: Any = None,
) -> tuple[Traced, tuple[tuple[str, str], ...]]:
    """:func:`trace_model`, keeping every submodule whose own code cannot be traced opaque.

    When tracing fails inside a submodule, the trace is repeated with that submodule's path
    among the leaf modules (called as one opaque op: the solver freezes its input and output
    channels), until it succeeds. The innermost failing module is made opaque first, so the
    opaque part stays as small as the failure allows.

    Returns:
        The trace and, in the order they were found, ``(path, reason)`` of every submodule
        made opaque.

    Raises:
        TraceError: the model's own ``forward`` cannot be traced (``module_path == ""``), the
            model was refused before tracing (``module_path is None``), or more than
            :data:`MAX_OPAQUE` submodules failed.

    Example:
        >>> traced, opaque = trace_with_fallback(model, example_inputs=x)
        >>> opaque   # (("block", "TraceError: symbolically traced variables ..."),)
    """
    leaves = list(leaf_modules)
    opaque: list[tuple[str, str]] = []
    while True:
        try:
            traced = trace_model(
                model,
                leaf_modules=[*leaves, *(path for path, _ in opaque)],
                concrete_args=concrete_args,
                example_inputs=example_inputs,
            )
        except TraceError as e:
            path = e.module_path
            if not path or any(path == p for p, _ in opaque) or len(opaque) >= MAX_OPAQUE:
                raise
            opaque.append((path, e.reason or str(e)))
            continue
        return traced, tuple(opaque)


_GRAD_MODE = re.compile(r"\b(no_grad|inference_mode|set_grad_enabled|enable_grad)\b")
_GRAD_MODE_BY_CLASS: dict[type, str | None] = {}


def _grad_mode_call(cls: type) -> str | None:
    """The grad-mode switch (``no_grad`` ...) named in ``cls.forward``'s source, if any."""
    if cls in _GRAD_MODE_BY_CLASS:
        return _GRAD_MODE_BY_CLASS[cls]
    found = None
    forward = getattr(cls, "forward", None)
    if forward is not None and not cls.__module__.startswith("torch."):
        try:
            match = _GRAD_MODE.search(inspect.getsource(forward))
        except (OSError, TypeError):
            match = None
        found = match.group(1) if match else None
    _GRAD_MODE_BY_CLASS[cls] = found
    return found


def grad_mode_notes(traced: Traced) -> list[str]:
    """A note for every traced-through module whose ``forward`` switches grad mode (``with
    torch.no_grad():``): fx records no grad mode, so the resized model computes those ops with
    gradients (their layers will train). Leaf modules run as they are and are not named."""
    leaves = {str(n.target) for n in traced.graph.find_nodes(op="call_module")}
    seen: dict[type, list[str]] = {}
    for path, mod in traced.root.named_modules():
        if _grad_mode_call(type(mod)) is None:  # cached per class: most modules stop here
            continue
        parts = path.split(".")
        if any(".".join(parts[:k]) in leaves for k in range(1, len(parts) + 1)):
            continue  # a leaf, or inside one: it runs as written
        seen.setdefault(type(mod), []).append(path or "(the model)")
    notes = []
    for cls, paths in seen.items():
        more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
        verb = "use" if len(paths) > 1 else "uses"
        notes.append(
            f"`{paths[0]}`{more} ({cls.__name__}.forward) {verb} "
            f"`torch.{_grad_mode_call(cls)}`, "
            "which torch.fx does not record: in the resized model those ops run with "
            f"gradients (their layers will train). Pass leaf_modules=[{cls.__name__}] to keep "
            "the module as written (its widths then stay frozen)"
        )
    return notes


def _within(path: str, prefixes: Iterable[str]) -> bool:
    """``path`` is one of ``prefixes`` or a module inside one."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _shown(paths: Sequence[str]) -> str:
    """The first four paths in backticks, ``...`` when there are more."""
    return ", ".join(f"`{p}`" for p in paths[:4]) + (" ..." if len(paths) > 4 else "")


def kept_modules(model: nn.Module, hooks: str) -> tuple[dict[str, str], list[str]]:
    """The submodules of ``model`` (not the model itself) that an analysis calls whole, each
    with the reason its widths stay frozen, and the paths of the hooked ones.

    Kept: modules with parametrized tensors (``torch.nn.utils.parametrize``) that do not resize
    (:func:`fxconet.passes.parametrized.why_frozen`: weight_norm/spectral_norm convs and linears
    do); modules
    with forward, forward-pre or backward hooks when ``hooks == "freeze"``. Only the outermost
    of nested ones are listed (the inner ones are kept whole with them), in one walk.
    """
    kept: dict[str, str] = {}
    hooked: list[str] = []
    for path, mod in model.named_modules():
        if not path or _within(path, kept):
            continue
        why = parametrized.why_frozen(mod)
        if why is not None:
            kept[path] = (
                f"`{path}` has {why} (torch.nn.utils.parametrize): kept as written, widths "
                "frozen (fxconet resizes weight_norm and spectral_norm weights of convs and "
                "linears only)"
            )
        elif not _within(path, hooked) and (
            mod._forward_hooks
            or mod._forward_pre_hooks
            or mod._backward_hooks
            or getattr(mod, "_backward_pre_hooks", None)
        ):
            hooked.append(path)
            if hooks == "freeze":
                kept[path] = (
                    f"`{path}` has hooks: kept as written so they see the widths they expect "
                    "(hooks='resize' resizes it)"
                )
    return kept, hooked


def parametrized_notes(kept: Mapping[str, str], hooked: Sequence[str]) -> list[str]:
    """A note naming the kept modules that are kept for their parametrized tensors."""
    paths = [p for p in kept if p not in hooked]
    if not paths:
        return []
    return [
        f"{len(paths)} module(s) have parametrized tensors ({_shown(paths)}): each "
        "is kept as written, called as one op with its input and output widths frozen (fxconet "
        "resizes only weight_norm and spectral_norm weights of convs and linears; "
        "remove_parametrizations before analyze to resize the others)"
    ]


def hook_notes(traced: Traced, hooked: Sequence[str], mode: str) -> list[str]:
    """A note naming the submodules with hooks and what ``analyze(hooks=mode)`` did with them."""
    if not hooked:
        return []
    shown = _shown(hooked)
    if mode == "freeze":
        return [
            f"{len(hooked)} module(s) have hooks ({shown}): each is kept as written, called as "
            "one op with its input and output widths frozen, so its hooks run in the resized "
            "model and see the widths they expect; hooks='resize' resizes them instead"
        ]
    leaves = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    through = [p for p in hooked if p not in leaves]
    note = (
        f"{len(hooked)} module(s) have hooks ({shown}), resized as hooks='resize' asks: "
        "hooked layers keep their hooks, which see the new widths (fxconet cannot check them)"
    )
    if through:
        note += (
            f"; the hooks of {_shown(through)} do NOT run in the resized model: torch.fx "
            "traces through those modules, so their hooks ran once while tracing (their tensor "
            "ops are in the graph, their Python side effects such as storing outputs are not); "
            "hooks='freeze' keeps them"
        )
    return [note]


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
