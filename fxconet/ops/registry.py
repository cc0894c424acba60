"""The op table itself: rules keyed by module type, function or tensor-method name.

Built-in rules register themselves where they are defined (:func:`builtin`); users add theirs
with :func:`register_op`. A target has one rule: registering a second one raises unless
``replace=True`` says it is on purpose, and :func:`scoped` undoes every registration made inside
it (for tests and notebooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from fxconet.errors import UnsupportedOpError

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = [
    "SHORTHANDS",
    "OpRule",
    "SizeOf",
    "Update",
    "assigns_only",
    "builtin",
    "lookup",
    "register_op",
    "registered_ops",
    "scoped",
]

Layout = tuple[tuple[int, int, int], ...]
SizeOf = Callable[[Layout], int]
Rule = Callable[["RuleContext"], Any]
Update = Callable[[Any, SizeOf, dict[str, Any]], None]
_R = TypeVar("_R", bound=Callable[..., Any])


@dataclass(frozen=True)
class OpRule:
    """A channel rule and, for modules with parameters, how to update their attributes.

    Attributes:
        channels: ``rule(ctx) -> output layouts`` (see :mod:`fxconet.ops`).
        update: ``update(module, size_of, notes)`` sets a resized module's attributes.
        name: the target's name, for messages.
    """

    channels: Rule
    update: Update | None = None
    name: str = ""

    def __call__(self, ctx: RuleContext) -> Any:
        return self.channels(ctx)


_MODULES: dict[type, OpRule] = {}
_FUNCTIONS: dict[Any, OpRule] = {}
_METHODS: dict[str, OpRule] = {}
_BY_NAME: dict[str, OpRule] = {}  # functions of other libraries by qualified name (not imported)
# fxconet's own update functions: they only assign module attributes, so the rewrite may run
# them on a shallow copy (a user's update might change an attribute's value in place)
_ASSIGNS_ONLY: set[Callable[..., Any]] = set()
#: the rules behind ``register_op``'s string shorthands (filled by the rule families)
SHORTHANDS: dict[str, Rule] = {}


def lookup(node: torch.fx.Node, module: nn.Module | None) -> OpRule | None:
    """The rule for a node, or None when the op is unknown (the caller freezes it).

    A module type without a rule of its own takes its nearest base class's rule, unless a class
    on the way defines its own ``forward`` (then it is a new op).
    """
    if node.op == "call_module":
        assert module is not None
        for cls in type(module).__mro__:
            rule = _MODULES.get(cls)
            if rule is not None:
                return rule
            if "forward" in cls.__dict__:  # a subclass with its own forward is a new op
                return None
        return None
    if node.op == "call_function":
        try:
            rule = _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
        if rule is None and _BY_NAME:
            rule = _BY_NAME.get(_qualified(node.target))
        return rule
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


def registered_ops() -> dict[str, list[str]]:
    """Names of the module types, functions and methods with a channel rule.

    Example:
        >>> "Conv2d" in registered_ops()["modules"]
        True
    """
    return {
        "modules": sorted(t.__name__ for t in _MODULES),
        "functions": sorted(
            {getattr(f, "__name__", str(f)) for f in _FUNCTIONS}
            | {name.rpartition(".")[2] for name in _BY_NAME}
        ),
        "methods": sorted(_METHODS),
    }


def _qualified(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def _name(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)


def _table(target: Any) -> dict[Any, OpRule]:
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise UnsupportedOpError(f"register_op: {target!r} is a class but not an nn.Module")
        return _MODULES
    if isinstance(target, str):
        return _METHODS
    if callable(target):
        return _FUNCTIONS
    raise UnsupportedOpError(f"register_op: cannot register {target!r}")


def _add(target: Any, entry: OpRule, *, replace: bool) -> None:
    table = _table(target)
    old = table.get(target)
    if (
        old is not None
        and not replace
        and (old.channels, old.update)
        != (
            entry.channels,
            entry.update,
        )
    ):
        raise UnsupportedOpError(
            f"register_op({_name(target)}): {_name(target)} already has the rule "
            f"{_name(old.channels)}; pass replace=True to override it"
        )
    table[target] = entry


def register_op(
    target: type | Callable[..., Any] | str,
    rule: str | Rule,
    *,
    update: Update | None = None,
    replace: bool = False,
) -> None:
    """Declare how a module type, function or tensor method treats channels.

    Args:
        target: an ``nn.Module`` subclass (mark it a leaf too: ``leaf_modules=[MyMod]``), a
            function called in ``forward`` (e.g. one wrapped with ``torch.fx.wrap``), or a tensor
            method name such as ``"my_method"``.
        rule: ``"same"`` (channels pass through unchanged: the output has the input's shape and
            channels; parameters, if any, do not depend on the channels), ``"elementwise"``
            (broadcasting op over several tensors), ``"opaque"`` (freeze every channel the op
            touches), or a function ``rule(ctx)`` returning the output layouts (see
            :mod:`fxconet.ops` for examples).
        update: for module types with parameters resized by a custom rule:
            ``update(module, size_of, notes)`` sets the module's attributes after resizing.
        replace: override a rule the target already has (a built-in one included); without
            it, a second, different rule for the same target raises.

    Raises:
        UnsupportedOpError: an unknown shorthand, a target that is not a module type, function
            or method name, or a target that already has another rule (without ``replace``).

    Example:
        >>> fxconet.register_op(MySwish, "same")
        >>> graph = fxconet.analyze(model, x, leaf_modules=[MySwish])
    """
    if isinstance(rule, str):
        if rule not in SHORTHANDS:
            raise UnsupportedOpError(
                f"register_op({_name(target)}): unknown rule {rule!r}; use one of "
                f"{sorted(SHORTHANDS)} or a function rule(ctx)"
            )
        fn: Rule = SHORTHANDS[rule]
    elif callable(rule):
        fn = rule
    else:
        raise UnsupportedOpError(
            f"register_op({_name(target)}): rule must be a string or a callable, got {rule!r}"
        )
    _add(target, OpRule(fn, update, name=_name(target)), replace=replace)


def builtin(
    *targets: Any,
    methods: Iterable[str] = (),
    functions: Iterable[str] = (),
    update: Update | None = None,
) -> Callable[[_R], _R]:
    """Register the decorated function as fxconet's rule for ``targets`` (module types and
    functions), tensor ``methods`` and ``functions`` of other libraries named by their
    qualified name (``"torchvision.ops.stochastic_depth.stochastic_depth"``: nothing is
    imported); a second built-in rule for a target is an error.

    Example:
        >>> @builtin(nn.ReLU, torch.relu, methods=["relu"])
        ... def same(ctx): ...
    """

    def register(fn: _R) -> _R:
        for t in (*targets, *methods):
            _add(t, OpRule(fn, update, name=_name(t)), replace=False)
        for name in functions:
            if name in _BY_NAME:
                raise UnsupportedOpError(f"{name} already has the rule {_BY_NAME[name].name}")
            _BY_NAME[name] = OpRule(fn, update, name=name.rpartition(".")[2])
        if update is not None:
            _ASSIGNS_ONLY.add(update)
        return fn

    return register


def assigns_only(update: Callable[..., Any] | None) -> bool:
    """True for fxconet's own ``update`` functions, which only assign module attributes (so
    they may run on a shallow copy of a module)."""
    return update in _ASSIGNS_ONLY


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Undo every registration made inside the block (the table is restored on exit).

    Example:
        >>> with fxconet.ops.scoped():
        ...     fxconet.register_op(MySwish, "same")
        ...     graph = fxconet.analyze(model, x, leaf_modules=[MySwish])
    """
    modules, functions, methods = dict(_MODULES), dict(_FUNCTIONS), dict(_METHODS)
    by_name = dict(_BY_NAME)
    try:
        yield
    finally:
        _BY_NAME.clear()
        _BY_NAME.update(by_name)
        _MODULES.clear()
        _MODULES.update(modules)
        _FUNCTIONS.clear()
        _FUNCTIONS.update(functions)
        _METHODS.clear()
        _METHODS.update(methods)
