"""Shape propagation: every node's value on the ``meta`` device, with no real compute.

Common ops take their closed-form shape rules (:mod:`fxconet.passes.shape_rules`); everything
else runs on ``meta`` tensors (module parameters are swapped for ``meta`` copies, which cost
nothing). Only an op without a meta kernel falls back to running on zero tensors on the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from fxconet.errors import ShapeError
from fxconet.passes.module_copy import is_namedtuple, meta_module, real_copy, to_meta
from fxconet.passes.nodes import (
    KWONLY_KEY,
    META_KEY,
    NodeInfo,
    NodeView,
    Traced,
    describe_node,
    get_attr,
    has_submodule,
)
from fxconet.passes.shape_rules import fast_function, fast_method, fast_module

__all__ = ["bind_placeholders", "eval_node", "propagate_shapes"]


def _materialize(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, tuple | list) and not is_namedtuple(value):
        return type(value)(_materialize(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    return value


def _run_on_zeros(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        out = fn(*_materialize(args), **_materialize(kwargs))
    return to_meta(out)


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
    inputs = bind_placeholders(placeholders, args, kwargs)
    record = modules is None
    overrides = overrides or {}
    for node in traced.graph.nodes:
        try:
            value = eval_node(traced, overrides.get(node, node), env, inputs, cache, modules)
        except ShapeError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ShapeError(
                f"{describe_node(node)} failed during shape propagation: "
                f"{type(e).__name__}: {first}{_hint(traced, node, first)}"
            ) from e
        env[node] = value
        if record:
            info = node.meta.get(META_KEY)
            scope = info.scope if isinstance(info, NodeInfo) else ""
            node.meta[META_KEY] = NodeInfo(value, scope)
        if check is not None:
            check(node, value)
    return env


_WIDTH_MISMATCH = re.compile(
    r"to have \d+ channels|mat1 and mat2 shapes cannot be multiplied|running_mean should contain"
    r"|[Ee]xpected .*channels|must match the size of tensor b"
)


def _after_a_layer(node: torch.fx.Node) -> bool:
    """Whether a module call lies between the model's inputs and ``node`` (else a width
    mismatch is the example inputs', not a branch's)."""
    seen: set[torch.fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            return True
        stack.extend(n.all_input_nodes)
    return False


def _hint(traced: Traced, node: torch.fx.Node, message: str) -> str:
    """What to check after an op failed: the inputs, or (a layer got another width than its
    weights expect) a Python branch that went another way under tracing."""
    if not _WIDTH_MISMATCH.search(message) or not _after_a_layer(node):
        return " (do the example inputs fit the model?)"
    info = node.meta.get(META_KEY)
    scope = info.scope if isinstance(info, NodeInfo) else ""
    path = str(node.target) if node.op == "call_module" else scope + "."
    parts = path.split(".")[:-1]  # the modules around the layer
    outer = parts[0] if parts else ""
    if outer and has_submodule(traced.root, outer):
        kind = type(traced.root.get_submodule(outer)).__name__
        where = f"`{outer}` ({kind})"
        fix = f"pass leaf_modules=[{kind}] (or the path {outer!r}) to keep that module opaque"
    else:
        where, fix = f"`{traced.name}.forward`", "pass leaf_modules=[...] for the module"
    return (
        ". A layer received another width than its weights expect: if the example inputs fit "
        f"the model, a Python branch in {where} or a module inside it probably went another way "
        "while tracing than it does when the model runs (an isinstance check on a tensor, "
        f"torch.jit.isinstance, a test of a tensor's value). Fix: {fix}, or fix the branch "
        "with concrete_args={...}"
    )


def bind_placeholders(
    placeholders: list[torch.fx.Node], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[torch.fx.Node, Any]:
    bound: dict[torch.fx.Node, Any] = {}
    pos = list(args)
    kwargs = dict(kwargs)
    named = {str(p.target) for p in placeholders if not str(p.target).startswith("*")}
    for ph in placeholders:
        target = str(ph.target)
        name = target.lstrip("*")
        if target.startswith("**"):  # what is left of the keyword inputs
            rest = {k: v for k, v in kwargs.items() if k not in named}
            bound[ph] = to_meta(rest)
            for k in rest:
                kwargs.pop(k)
        elif target.startswith("*"):  # what is left of the positional inputs
            bound[ph] = to_meta(tuple(pos))
            pos.clear()
        elif name in kwargs:
            bound[ph] = to_meta(kwargs.pop(name))
        elif pos and not ph.meta.get(KWONLY_KEY):
            bound[ph] = to_meta(pos.pop(0))
        elif ph.args:  # default value recorded by the tracer
            bound[ph] = to_meta(ph.args[0])
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


def eval_node(
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
            value = get_attr(traced.root, target)
        return to_meta(value)
    args = _load_arg(env, node.args)
    kwargs = _load_arg(env, node.kwargs)
    if op == "call_module":
        path = str(node.target)
        mod = modules.get(path) if modules is not None else None
        if mod is None:
            mod = traced.module(path)
        out = fast_module(mod, args, kwargs)
        if out is not None:
            return out
        mm = meta_module(mod, cache)
        try:
            with torch.no_grad():
                return mm(*args, **kwargs)
        except (NotImplementedError, RuntimeError):
            return _run_on_zeros(real_copy(mm), args, kwargs)
    if op == "call_function":
        out = fast_function(node.target, args, kwargs)
        if out is not None:
            return out
        try:
            with torch.no_grad():
                return node.target(*args, **kwargs)  # type: ignore[operator]
        except (NotImplementedError, RuntimeError):
            return _run_on_zeros(node.target, args, kwargs)  # type: ignore[arg-type]
    if op == "call_method":
        name = str(node.target)
        out = fast_method(name, args, kwargs)
        if out is not None:
            return out
        self_obj, *rest = args
        try:
            with torch.no_grad():
                return getattr(self_obj, name)(*rest, **kwargs)
        except (NotImplementedError, RuntimeError):
            return _run_on_zeros(lambda s, *a, **k: getattr(s, name)(*a, **k), args, kwargs)
    raise ShapeError(f"{describe_node(node)}: unknown fx op {op!r}")
