"""Shape-preserving and elementwise ops: activations, dropout, casts, arithmetic, softmax.

* ``same``: the output has the input's shape and channels.
* ``elementwise``: broadcasting over several tensors ties equal-size dims; a size-1 dim
  broadcast against a larger one is frozen (resizing it would change the broadcast).
* ``softmax``: channels pass through, but an op takes statistics across them (inexact).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fxconet.ops.layout import Layout, first_tensor, is_tensor, norm_dim
from fxconet.ops.registry import SHORTHANDS, builtin

if TYPE_CHECKING:
    from fxconet.passes.solve_channels import RuleContext

__all__ = ["elementwise", "opaque", "same", "same_checked", "softmax"]


@builtin(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs,
    torch.sqrt, torch.rsqrt, torch.neg, torch.sin, torch.cos, torch.erf, torch.square,
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.nan_to_num, torch.sign,
    torch.reciprocal, torch.floor, torch.ceil, torch.round, torch.detach, torch.clone,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.elu, F.selu,
    F.celu, F.leaky_relu, F.softplus, F.hardtanh, F.sigmoid, F.tanh, F.logsigmoid, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    operator.neg, operator.pos, operator.invert, operator.abs,
    methods=[
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "sqrt",
        "rsqrt", "neg", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "contiguous",
        "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "type_as",
        "requires_grad_", "square", "sign", "erf", "hardswish", "nan_to_num", "cpu", "cuda",
        "zero_",
    ],
    # channel-preserving: identity in eval mode, a per-sample (or per-element) mask in training
    functions=["torchvision.ops.stochastic_depth.stochastic_depth"],
)  # fmt: skip
def same(ctx: RuleContext) -> Any:
    """Output has the first tensor input's shape and channels (activations, dropout, casts)."""
    x = first_tensor(ctx)
    if x is None or not is_tensor(ctx.out):
        return ctx.opaque() if is_tensor(ctx.out) else None
    if tuple(ctx.out.shape) != ctx.shape(x):
        return ctx.opaque(
            f"{ctx.describe()} changes the shape {ctx.shape(x)} -> {tuple(ctx.out.shape)}"
        )
    return ctx.dims(x)


def elementwise(ctx: RuleContext) -> Any:
    """Broadcasting op: equal-size dims are tied, a size-1 dim broadcast against a larger one is
    frozen (resizing it would change the broadcast)."""
    out = ctx.out
    if not is_tensor(out):
        _freeze_compared_sizes(ctx)
        return None
    oshape = tuple(out.shape)
    n = len(oshape)
    result: list[Layout | None] = [None] * n
    for a in ctx.tensor_args():
        d = ctx.dims(a)
        if d is None:  # tensor_args() lists tensors with layouts only
            continue
        s = ctx.shape(a)
        off = n - len(s)
        for k, size in enumerate(s):
            od = off + k
            if od < 0:
                continue
            if size == oshape[od]:
                kept = result[od]
                if kept is None:
                    result[od] = d[k]
                else:
                    ctx.tie(kept, d[k])
            elif size == 1:
                ctx.freeze(
                    d[k],
                    reason=f"size-1 dim broadcast against {oshape[od]} at {ctx.describe()}",
                )
    return tuple(
        r if r is not None else ctx.fixed(oshape[i], "broadcast dim") for i, r in enumerate(result)
    )


def _freeze_compared_sizes(ctx: RuleContext) -> None:
    """``x.size(1) == 64`` style checks pin the measured width."""
    if ctx.node.target not in (
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
    ):
        return
    for a in ctx.node.args:
        p = ctx.provenance(a)
        if p is not None and isinstance(p, tuple) and p and isinstance(p[0], tuple):
            ctx.freeze_dims(p, f"its size is compared with a constant at {ctx.describe()}")


@builtin(
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like,
)  # fmt: skip
def _like(ctx: RuleContext) -> Any:
    """``zeros_like(x)`` and friends: same channels as ``x``, no constraint."""
    x = ctx.arg(0, "input")
    d = ctx.dims(x)
    if d is None or not is_tensor(ctx.out) or tuple(ctx.out.shape) != ctx.shape(x):
        return ctx.fixed_like(ctx.out)
    return d


def _inexact_dim(
    ctx: RuleContext, dim_index: int = 1, dim_name: str = "dim", default: Any = None
) -> Any:
    x = first_tensor(ctx)
    d = ctx.dims(x)
    if d is None:
        return ctx.opaque()
    dim = ctx.arg(dim_index, dim_name, default)
    if dim is None and ctx.module is not None:
        dim = getattr(ctx.module, "dim", None)
    if dim is None:
        for layout in d:
            ctx.inexact(layout)
    elif isinstance(dim, int):
        ctx.inexact(d[norm_dim(dim, len(d))])
    return same(ctx)


@builtin(
    nn.Softmax, nn.LogSoftmax, nn.Softmin, torch.softmax, torch.log_softmax, F.softmax,
    F.log_softmax, F.softmin, methods=["softmax", "log_softmax"],
)  # fmt: skip
def softmax(ctx: RuleContext) -> Any:
    """Softmax-like ops: channels pass through, but removing one changes the others."""
    return _inexact_dim(ctx)


@builtin(F.normalize)
def _normalize(ctx: RuleContext) -> Any:
    """``F.normalize(x, p, dim=1)``: statistics over ``dim``."""
    return _inexact_dim(ctx, 2, "dim", 1)


@builtin(nn.Bilinear)
def opaque(ctx: RuleContext) -> Any:
    return ctx.opaque()


def same_checked(ctx: RuleContext) -> Any:
    """``"same"`` shorthand for user ops; refuses modules with channel-sized parameters."""
    x = first_tensor(ctx)
    if x is None or not is_tensor(ctx.out) or tuple(ctx.out.shape) != ctx.shape(x):
        return ctx.opaque(f"{ctx.describe()} was registered as 'same' but changes the shape")
    if ctx.module is not None and any(
        p.dim() > 0 and p.numel() > 1 for p in ctx.module.parameters()
    ):
        return ctx.opaque(
            f"{ctx.describe()} has parameters; a 'same' rule cannot resize them: register a "
            "rule that binds them with ctx.param(...)"
        )
    return ctx.dims(x)


@builtin(
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.floordiv, operator.pow, operator.mod,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.xor,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.where, torch.eq, torch.ne,
    torch.lt, torch.gt, torch.le, torch.ge, torch.logical_and, torch.logical_or, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.fmod, torch.remainder, torch.atan2, torch.hypot,
    torch.masked_fill,
    methods=[
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
        "where", "masked_fill", "masked_fill_", "eq", "ne", "lt", "gt", "le", "ge", "lerp",
        "addcmul", "addcdiv", "__add__", "__mul__",
    ],
)  # fmt: skip
def _non_tensor(ctx: RuleContext) -> Any:
    """Python-level ops (int arithmetic, asserts): no channels, but sizes they use are dynamic."""
    if is_tensor(ctx.out):
        return elementwise(ctx)
    if any(ctx.provenance(a) is not None for a in ctx.node.args):
        ctx.dynamic()
    _freeze_compared_sizes(ctx)
    return None


@builtin(torch._assert, len, methods=["dim", "numel"])
def _no_channels(ctx: RuleContext) -> Any:
    """Ops on Python values or metadata (``torch._assert``, ``x.dim()``, ``len``)."""
    return None


SHORTHANDS.update(same=same_checked, elementwise=elementwise, opaque=opaque)
