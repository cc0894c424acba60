"""Layers whose weight is computed by ``torch.nn.utils.parametrize``: which ones resize, and how.

A conv or linear layer whose ``weight`` is parametrized by ``parametrizations.weight_norm`` or
``parametrizations.spectral_norm`` resizes like the plain layer: its computed weight gets the
plain layer's channel dims, and each tensor the parametrization keeps follows them:

* ``weight_norm``: ``original1`` (the direction ``v``) has the weight's shape; ``original0`` (the
  magnitude ``g``) has it with size 1 on the normalised dims, which stay 1. Both are derived
  again from the old weight resized as a plain layer's (:func:`set_weight_norm`), so the kept
  weights are unchanged;
* ``spectral_norm``: ``original`` has the weight's shape; the power-iteration vectors follow the
  weight matrix (``_u`` its rows: the ``dim`` channels; ``_v`` its columns: the other dims
  flattened), so removing channels whose weights are zero leaves the estimated norm, and the
  output, unchanged.

Other parametrizations (``orthogonal``, user-written ones) compute the weight in ways whose
channels need not map to the originals' entries: such layers are kept as written, their widths
frozen, with a note that says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

__all__ = [
    "SPECTRAL_NORM", "WEIGHT_NORM", "computed", "default_weight", "is_parametrized", "norm_dim",
    "originals", "reset_weight",
    "why_frozen", "set_weight_norm", "spectral", "spectral_vectors",
]  # fmt: skip

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_WEIGHT_NORM = getattr(parametrizations, "_WeightNorm", None)
_SPECTRAL_NORM = getattr(parametrizations, "_SpectralNorm", None)
#: the parametrization classes of ``weight_norm`` and ``spectral_norm`` (for ``isinstance``;
#: an empty tuple matches nothing where a torch version lacks one)
WEIGHT_NORM: tuple[type, ...] = (_WEIGHT_NORM,) if _WEIGHT_NORM is not None else ()
SPECTRAL_NORM: tuple[type, ...] = (_SPECTRAL_NORM,) if _SPECTRAL_NORM is not None else ()
_SUPPORTED = WEIGHT_NORM + SPECTRAL_NORM


def is_parametrized(mod: nn.Module, name: str | None = None) -> bool:
    """``torch.nn.utils.parametrize.is_parametrized``, answered at once for a plain module (the
    torch function's attribute lookup fails through ``Module.__getattr__`` there, which cost a
    tenth of an analysis): a parametrization lives in the ``parametrizations`` child."""
    if "parametrizations" not in mod._modules:
        return False
    return parametrize.is_parametrized(mod, name)


def default_weight(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A conv's or linear layer's default weight initialisation, of ``shape``, in ``like``'s
    dtype and device."""
    t = torch.empty(shape, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(t, a=5**0.5)  # nn.Conv*d / nn.Linear reset_parameters
    return t


def _plist(mod: nn.Module, name: str = "weight") -> Any:
    """The ``ParametrizationList`` of ``mod``'s tensor ``name``."""
    return mod.parametrizations[name]  # type: ignore[index]


def why_frozen(mod: nn.Module) -> str | None:
    """Why the parametrized ``mod`` cannot resize through its parametrizations (it is then kept
    as written, its widths frozen); None for a module that resizes, or is not parametrized."""
    if not is_parametrized(mod):
        return None
    if not isinstance(mod, _LAYERS):
        return f"a parametrized {type(mod).__name__} (only convs and linears resize so)"
    names = sorted(mod.parametrizations.keys())  # type: ignore[union-attr, operator]
    if names != ["weight"]:
        return f"parametrized tensors {names} (only `weight` resizes)"
    plist = _plist(mod)
    kinds = [type(p).__name__ for p in plist]
    if len(plist) != 1 or not isinstance(plist[0], _SUPPORTED):
        return f"parametrizations {kinds} (weight_norm and spectral_norm resize)"
    # the weight's shape without computing it (a spectral norm in training would update its
    # vectors in place): weight_norm's direction and spectral norm's original have it
    full = plist.original1 if hasattr(plist, "original1") else plist.original
    shape = tuple(full.shape)
    for _, t in originals(mod):
        if t.dim() != len(shape) or any(
            a not in (b, 1) for a, b in zip(t.shape, shape, strict=True)
        ):
            return f"a parametrization whose tensors do not follow the weight's shape {shape}"
    return None


def computed(mod: nn.Module, name: str = "weight") -> torch.Tensor:
    """The value of a parametrized tensor now, computed as in evaluation (a spectral norm's
    power iteration, which updates its vectors in place in training, does not run)."""
    plist = _plist(mod, name)
    modes = [(m, m.training) for m in plist.modules()]
    for m, _ in modes:
        m.training = False
    try:
        with torch.no_grad():
            return getattr(mod, name)
    finally:
        for m, mode in modes:
            m.training = mode


def originals(mod: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors ``mod.weight`` is computed from, by their name in ``mod``."""
    plist = _plist(mod)
    prefix = "parametrizations.weight."
    return [(prefix + n, t) for n, t in plist._parameters.items() if t is not None]


def spectral(mod: nn.Module) -> tuple[str, Any] | None:
    """The ``spectral_norm`` parametrization of ``mod``'s weight with its path, or None."""
    plist = _plist(mod)
    p = plist[0]
    if _SPECTRAL_NORM is not None and isinstance(p, _SPECTRAL_NORM) and hasattr(p, "_v"):
        return "parametrizations.weight.0", p
    return None


def spectral_vectors(
    sn: Any, old_shape: tuple[int, ...], maps: list[np.ndarray], *, meta: bool
) -> None:
    """Give a resized layer's spectral-norm vectors the new weight matrix's sizes (in place on
    ``sn``, a copy): ``_v`` keeps the entries of the kept columns (the other dims' position maps
    ``maps``, ``-1`` = new, set to 0); ``_u`` was resized with the ``dim`` channels."""
    dim = int(sn.dim)
    others = [d for d in range(len(old_shape)) if d != dim]
    old_v = sn._v
    sizes = [len(maps[d]) for d in others]
    if meta:
        sn._v = torch.empty(int(np.prod(sizes)), dtype=old_v.dtype, device="meta")
        return
    strides = np.cumprod([1] + [old_shape[d] for d in reversed(others)][:-1])[::-1]
    flat = np.zeros(sizes, dtype=np.int64)
    new = np.zeros(sizes, dtype=bool)
    for k, d in enumerate(others):
        shape = [1] * len(others)
        shape[k] = -1
        m = maps[d].reshape(shape)
        flat = flat + np.where(m < 0, 0, m) * int(strides[k])
        new = new | (m < 0)
    idx = torch.from_numpy(flat.reshape(-1)).to(old_v.device)
    v = old_v.detach().index_select(0, idx)
    if new.any():
        v[torch.from_numpy(new.reshape(-1)).to(old_v.device)] = 0
    sn._v = v


def norm_dim(mod: nn.Module) -> int | None:
    """The dim weight_norm normalises ``mod``'s weight along (its magnitude's one non-1 dim),
    or None for another parametrization."""
    plist = _plist(mod)
    p = plist[0]
    if _WEIGHT_NORM is None or not isinstance(p, _WEIGHT_NORM) or p.dim is None or p.dim == -1:
        return None
    return int(p.dim) % plist.original1.dim()


def set_weight_norm(mod: nn.Module, weight: torch.Tensor) -> None:
    """Set a weight_norm layer's magnitude and direction so that it computes ``weight``, as
    ``weight_norm`` itself begins (``g = ||w||``, ``v = w``), except that a slice of ``weight``
    that is all zero along the norm's dim (a new input channel) keeps a nonzero direction (the
    default initialisation) with magnitude 0 (``v / ||v||`` would be 0/0)."""
    dim = norm_dim(mod)
    assert dim is not None
    plist = _plist(mod)
    with torch.no_grad():
        g = torch.norm_except_dim(weight, 2, dim)
        v = weight.clone()
        empty = (g == 0).reshape(-1)
        if empty.any():
            where = torch.nonzero(empty).reshape(-1)
            fresh = default_weight(tuple(v.shape), v)
            v.index_copy_(dim, where, fresh.index_select(dim, where))
        for name, value in (("original0", g), ("original1", v)):
            old = getattr(plist, name)
            value = value.to(old.dtype)
            if isinstance(old, nn.Parameter):
                value = nn.Parameter(value, requires_grad=old.requires_grad)
            plist._parameters[name] = value


def reset_weight(mod: nn.Module) -> None:
    """A fresh default initialisation of a resized parametrized layer's weight, set through the
    parametrization (``right_inverse``: weight_norm's magnitude and direction, spectral norm's
    original)."""
    weight = computed(mod)
    fresh = default_weight(tuple(weight.shape), weight)
    with torch.no_grad():
        mod.weight = fresh
    sp = spectral(mod)
    if sp is not None:
        sn = sp[1]
        mat = sn._reshape_weight_to_matrix(_plist(mod).original)
        with torch.no_grad():
            sn._power_method(mat, 15)
