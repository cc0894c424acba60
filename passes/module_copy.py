"""Copies of modules and values that the passes work on, so the user's model is never touched.

* :func:`structural_copy`: the module tree copied, parameters and buffers shared (tracing).
* :func:`meta_module`: a shallow copy whose tensors live on ``meta`` (shape propagation).
* :func:`to_meta`: tensors in a (nested) value as ``meta`` tensors of the same shape and dtype.
* :func:`evaluating`: eval mode for a block, every submodule's own flag restored after it.
"""

from __future__ import annotations

import contextlib
import copy
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "HOOK_TABLES",
    "evaluating",
    "is_namedtuple",
    "map_tensors",
    "meta_module",
    "real_copy",
    "shallow_copy",
    "structural_copy",
    "to_meta",
]

# module class -> defines its own copy/pickle protocol (weak: GraphModules make a class each)
_CUSTOM_COPY: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()

#: the hook tables of a module (a structural copy shares them with the user's module)
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then give every submodule back its own
    training flag (a frozen ``bn.eval()`` inside a training model stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


#: ``__setstate__`` methods of torch's own modules that only fill in attributes a pickle from an
#: older torch lacks (a live module has them all): copying the ``__dict__`` is the same copy
_COMPAT_SETSTATE = (nn.modules.conv._ConvNd.__setstate__,)


def copies_itself(cls: type) -> bool:
    """True for a module class that customises how it is copied or pickled (``__reduce_ex__``,
    ``__copy__``, ``__getstate__``/``__setstate__`` of its own): copy it with :mod:`copy`.
    Convs are not counted: their ``__setstate__`` only back-fills ``padding_mode`` for old
    pickles."""
    custom = _CUSTOM_COPY.get(cls)
    if custom is None:
        setstate = getattr(cls, "__setstate__", None)
        getstate = getattr(cls, "__getstate__", None)
        custom = _CUSTOM_COPY[cls] = (
            cls.__reduce_ex__ is not object.__reduce_ex__
            or hasattr(cls, "__copy__")
            or (getstate is not getattr(nn.Module, "__getstate__", None) and not _refuses(getstate))
            or (
                setstate is not getattr(nn.Module, "__setstate__", None)
                and setstate not in _COMPAT_SETSTATE
            )
        )
    return custom


def _refuses(getstate: Any) -> bool:
    """The ``__getstate__`` that ``torch.nn.utils.parametrize`` gives a parametrized module's
    class only refuses pickling: its ``__dict__`` copies like any module's."""
    return getattr(getstate, "__module__", None) == "torch.nn.utils.parametrize"


def shallow_copy(m: nn.Module) -> nn.Module:
    """``copy.copy(m)``, without the generic reduce machinery for plain modules (5x faster);
    methods bound to ``m`` in its ``__dict__`` are bound to the copy."""
    cls = type(m)
    if copies_itself(cls):
        new = copy.copy(m)
    else:
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)
    # ``self.forward = self.forward_split`` in __init__: the copy's method is bound to the copy
    # (rare: the type scan runs in C, the loop only for modules holding a bound method)
    d = m.__dict__
    if types.MethodType in set(map(type, d.values())):
        for key, value in d.items():
            if isinstance(value, types.MethodType) and value.__self__ is m:
                new.__dict__[key] = types.MethodType(value.__func__, new)
    return new


#: attribute types a structural copy copies (shallowly), so that a forward writing into them
#: (``self.cache[key] = x``: timm's attention-bias caches) writes into the copy's
_CONTAINERS = frozenset({dict, list, set})
_OWN_DICTS = frozenset({"_parameters", "_buffers", "_modules"})  # copied on their own


def structural_copy(model: nn.Module, paths: dict[str, nn.Module] | None = None) -> nn.Module:
    """Copy the module tree but share parameters, buffers and other attribute values.

    Tracing must not touch the user's modules (a forward that assigns ``self.cache = x`` or
    ``self.cache[key] = x`` would store a Proxy on them), and copying the weights would cost
    memory and time. Each module is copied shallowly with its own ``__dict__``, its own
    child/parameter/buffer dicts, and its own copy of every plain dict, list and set attribute.
    ``paths``, when given, receives every copy by its module path (``""`` for the root; the
    children of a module reached twice only under its first path).

    Example:
        >>> copy = structural_copy(model)
        >>> copy.conv1 is not model.conv1 and copy.conv1.weight is model.conv1.weight
        True
    """
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module, path: str) -> nn.Module:
        hit = memo.get(id(m))
        if hit is not None:
            if paths is not None:
                paths.setdefault(path, hit)
            return hit
        new = shallow_copy(m)
        memo[id(m)] = new
        if paths is not None:
            paths[path] = new
        d = new.__dict__
        for key, value in m.__dict__.items():
            if type(value) in _CONTAINERS and key not in _OWN_DICTS:
                d[key] = type(value)(value)  # a cache the forward fills must not fill the user's
        d["_parameters"] = dict(m._parameters)
        d["_buffers"] = dict(m._buffers)
        prefix = f"{path}." if path else ""
        d["_modules"] = {
            k: (visit(c, prefix + k) if c is not None else None) for k, c in m._modules.items()
        }
        return new

    return visit(model, "")


def is_namedtuple(value: Any) -> bool:
    """True for an instance of a ``namedtuple`` / ``NamedTuple`` class."""
    return isinstance(value, tuple) and hasattr(value, "_fields")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` applied to every tensor of a (nested) value: lists, tuples and dicts are rebuilt,
    named tuples and other values are returned as they are (mappings come back as dicts).

    Example:
        >>> map_tensors((torch.zeros(2), [torch.ones(1)], 3), lambda t: t + 1)
        (tensor([1., 1.]), [tensor([2.])], 3)
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return value if is_namedtuple(value) else type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def _meta_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta":
        return t
    out = torch.empty_like(t, device="meta")
    if isinstance(t, nn.Parameter):
        out = nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def to_meta(value: Any) -> Any:
    """Tensors in a (nested) value as ``meta`` tensors (parameters stay parameters); named
    tuples and other values are returned as they are.

    Example:
        >>> to_meta((torch.zeros(2), 3))[0].device
        device(type='meta')
    """
    return map_tensors(value, _meta_tensor)


def meta_module(module: nn.Module, cache: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` (and its children) whose tensors live on ``meta`` and whose
    hooks are dropped, so running it costs nothing and touches no user state."""
    hit = cache.get(id(module))
    if hit is not None:
        return hit
    new = shallow_copy(module)  # a new __dict__, shallow
    d = new.__dict__
    d["_parameters"] = {k: to_meta(p) for k, p in module._parameters.items()}
    d["_buffers"] = {k: to_meta(b) for k, b in module._buffers.items()}
    d["_modules"] = {
        k: (meta_module(c, cache) if c is not None else None) for k, c in module._modules.items()
    }
    for hooks in HOOK_TABLES:
        if hooks in d:
            d[hooks] = type(d[hooks])()
    cache[id(module)] = new
    return new


def real_copy(mm: nn.Module) -> nn.Module:
    """A CPU copy of a meta module with zero weights (fallback for ops without meta kernels)."""
    real = copy.deepcopy(mm)
    real.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*real.parameters(), *real.buffers()]:
            t.zero_()
    return real
