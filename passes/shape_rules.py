"""Shape rules: the output of common ops computed from their inputs' shapes, without running them.

Shape propagation (:mod:`fxconet.passes.shape_prop`) asks these first. Each returns a ``meta``
tensor (or a tuple of them), or ``None`` when the op is not covered or its inputs look unusual:
the op then runs on ``meta`` tensors and raises its own error if the inputs do not fit. Running
common layers on ``meta`` costs ~50 us a call (convolutions), ~2 ms (``torch.cat``) or ~3-4 ms
(attention, which runs Python decompositions there).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import nn

__all__ = ["broadcast_shape", "fast_function", "fast_method", "fast_module"]


def _broadcast(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if len(tensors) == 1 and tensors[0].dtype.is_floating_point:
        return tensors[0]
    if len(tensors) == 2 and tensors[0].dtype == tensors[1].dtype:
        a, b = tensors
        if a.shape == b.shape:
            return a
        shape = broadcast_shape(tuple(a.shape), tuple(b.shape))
        if shape is not None:
            return torch.empty(shape, dtype=a.dtype, device="meta")
    return None  # fall back to running the op


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
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


def fast_module(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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


def fast_function(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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


def fast_method(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    if name in _SAME_METHODS:
        return args[0]
    if name in _BROADCAST_METHODS:
        return _broadcast(args, kwargs)
    return None
