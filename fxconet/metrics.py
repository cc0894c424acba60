"""Low-rank metrics of conv weights: EVBMF rank, condition, knowledge gain and rank slope.

CONet (Hosseini et al., Sec. 2) probes every conv weight ``W[out, in, kh, kw]`` through two
unfoldings: mode 3 ("input", ``in x out*kh*kw``) and mode 4 ("output", ``out x in*kh*kw``). Each
unfolding ``Y`` (``L x M``) is factorised by empirical variational Bayesian matrix factorisation
(EVBMF, Nakajima et al. 2013/2015), which estimates the noise variance ``sigma2`` and keeps the
``N'`` singular values above the EVB threshold, shrunk to ``d_1 >= ... >= d_N'``. Then

* rank (Eq. 1)         ``R = N' / N`` with ``N`` the channel count of the unfolding (its rows),
* condition (Eq. 2)    ``kappa = d_1 / d_N'`` (0 when ``N' = 0``, as in the reference code),
* knowledge gain       ``G = sum_h d_h / d_1 / N`` (0 when ``N' = 0``; used by AdaS),
* mean rank            ``R_bar = (R_3 + R_4) / 2``,
* rank slope (Eq. 3)   ``S = (R_bar[t2] - R_bar[t1]) / (t2 - t1)`` over the epochs of a trial.

EVBMF of ``Y`` with singular values ``s_1 >= ... >= s_K`` (``K = min(L, M)``), ``alpha = L / M``,
``tau = 2.5129 sqrt(alpha)`` and ``x_bar = (1 + tau)(1 + alpha / tau)``:

* ``sigma2`` minimises ``Phi(sigma2) = sum_h psi(x_h) + (L - K) ln sigma2`` with
  ``x_h = s_h^2 / (M sigma2)``, ``psi(x) = x - ln x`` for ``x <= x_bar`` and
  ``psi(x) = x - ln x + ln(tau(x) + 1) + alpha ln(tau(x) / alpha + 1) - tau(x)`` above, where
  ``tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``; the minimiser lies in
  ``[max(s_{H+1}^2 / (M x_bar), mean_{h > H} s_h^2 / M), sum_h s_h^2 / (L M)]`` with
  ``H = ceil(L / (1 + alpha)) - 1``;
* ``N' = #{h : s_h > sqrt(M sigma2 x_bar)}``;
* ``d_h = s_h / 2 * (1 - (L + M) sigma2 / s_h^2 + sqrt((1 - (L + M) sigma2 / s_h^2)^2
  - 4 L M sigma2^2 / s_h^4))``.

Two modes, chosen by ``reference=``:

* ``reference=False`` (default, sound): an unfolding with ``L > M`` is transposed (EVBMF is only
  defined for ``L <= M``; ``N`` stays the channel count, so ``R <= M / L`` there); singular values
  in float64 from the Gram matrix of the shorter side; ``sigma2`` is the *global* minimiser of
  ``Phi`` on the bounds, exact to rounding. ``Phi`` is piecewise smooth with a kink wherever a
  singular value crosses the threshold and often has several shallow local minima, each giving a
  different ``N'``; the search bounds ``Phi`` from below on a grid, cuts the cells that can hold
  the minimum at every kink, and solves ``Phi' = 0`` on every piece holding a local minimum
  (see ``_search_default``). The objective is written in ``ln(sigma2 / upper bound)``, so scaling
  ``W`` scales sigma2 by the square and changes no rank.
* ``reference=True`` reproduces the paper's code (github.com/mahdihosseini/CONet, ``VBMF.py``
  and ``metrics.py``): no transpose, float32 singular values, float32 bounds, scipy's bounded
  Brent search with its default *absolute* ``xatol = 1e-5`` and 500 evaluations (a local search),
  strict ``>`` threshold, and every case where the reference's ``try/except`` fires (lower bound
  above upper bound, non-finite weights) reported as rank 0 with ``failed=True``. The Brent
  iterations follow scipy's step for step (same iterates and evaluation counts), batched over all
  matrices; the objective is evaluated in float64 (the 2021 code, under numpy 1.19 promotion,
  evaluated it in float32, which today's numpy does not reproduce bit for bit).

The reference keeps ``tau = 2.5129 sqrt(alpha)`` for every ``alpha`` (exact only at ``alpha = 1``);
both modes do the same, so ``x_bar`` is up to 2% below the exact root for thin matrices.

Example:
    >>> import torch, torchvision
    >>> from fxconet.metrics import layer_metrics
    >>> ms = layer_metrics(torchvision.models.resnet18())
    >>> ms[0].path, ms[0].in_rank, ms[0].out_rank
    ('conv1', 0.0, 0.0)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import nn

from fxconet.errors import MetricsError
from fxconet.ir import ChannelGraph, LayerInfo

__all__ = [
    "AGGREGATIONS",
    "LAYER_KINDS",
    "METRIC_NAMES",
    "EVBMFResult",
    "LayerMetrics",
    "MetricsError",
    "RankTracker",
    "evbmf",
    "layer_metrics",
    "metrics_table",
    "rank_slope",
]

# tau_bar ~= 2.5129 sqrt(alpha): the root of ln(t + 1) + alpha ln(t / alpha + 1) = t is exactly
# 2.5129 at alpha = 1; the reference (and the usual EVBMF code) uses this form for every alpha.
_TAU_COEF = 2.5129
_REF_XATOL = 1e-5  # scipy's default for method="bounded": absolute, hence coarse for small sigma2
_REF_MAXITER = 500  # scipy's default
_SLOPE_EPS = 1e-4  # the reference's denominator guard in Eq. 3
# scipy's fminbound constants, kept literally so the batched search takes the same steps.
_SQRT_EPS = math.sqrt(2.2e-16)
_GOLDEN = 0.5 * (3.0 - math.sqrt(5.0))
# Default mode: Phi is cut at _GRID even points in ln(sigma2) besides its kinks, and Phi' = 0 is
# solved (at most _ROOT_STEPS regula falsi steps) in cells holding a minimum; _LOG_FLOOR bounds
# ln(sigma2 / upper) when the lower bound is 0 (exactly low-rank input).
_GRID = 16
_LOG_FLOOR = -60.0
_ROOT_STEPS = 100
_TIE = 1e-12  # x_h within this relative distance of x_bar sits on a kink
# Matrices stacked into one batched decomposition hold at most this many elements; the sigma2
# search evaluates Phi on about _EVAL_ELEMENTS (point, singular value) pairs at a time.
_CHUNK_ELEMENTS = 1 << 24
_EVAL_ELEMENTS = 1 << 18

#: ``LayerMetrics.kind`` values, and the per-epoch series a :class:`RankTracker` stores.
LAYER_KINDS = ("conv", "linear", "conv_transpose", "depthwise")
METRIC_NAMES = ("in_rank", "out_rank", "in_condition", "out_condition", "in_gain", "out_gain")
#: how :class:`RankTracker` averages a channel group's rank terms
AGGREGATIONS = ("robust", "reference")


# ------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, eq=False)
class EVBMFResult:
    """The EVBMF factorisation of one matrix (singular values only; no U, V).

    Attributes:
        rank: ``N'``, the number of singular values kept.
        values: the kept shrunk singular values ``d_1 >= ... >= d_N'`` (float64).
        sigma2: the estimated noise variance (0 for an all-zero matrix, NaN when ``failed``).
        threshold: the EVB threshold the singular values were compared with.
        singular_values: all singular values of the matrix, descending (float64; float32-exact in
            reference mode).
        shape: the matrix shape as given, ``(L, M)``; ``L`` is the channel count ``N``.
        transposed: the formulas ran on the transpose (default mode with ``L > M``).
        failed: reference mode only: the paper's code would have raised here (bounds out of order,
            non-finite weights) and reported 0.
    """

    rank: int
    values: np.ndarray
    sigma2: float
    threshold: float
    singular_values: np.ndarray = field(repr=False)
    shape: tuple[int, int]
    transposed: bool = False
    failed: bool = False

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"EVBMFResult.shape={self.shape!r}: must be two sizes >= 1")
        if not 0 <= self.rank <= min(self.shape):
            raise ValueError(
                f"EVBMFResult.rank={self.rank!r}: must be in [0, {min(self.shape)}] for shape "
                f"{self.shape}"
            )
        if len(self.values) != self.rank:
            raise ValueError(
                f"EVBMFResult.values has {len(self.values)} entries: must equal rank={self.rank}"
            )

    @property
    def condition(self) -> float:
        """``d_1 / d_N'`` (Eq. 2), or 0 when nothing is kept (the reference's convention)."""
        return float(self.values[0] / self.values[-1]) if self.rank else 0.0

    @property
    def gain(self) -> float:
        """Knowledge gain ``sum_h d_h / d_1 / L`` (0 when nothing is kept)."""
        return float(self.values.sum() / self.values[0] / self.shape[0]) if self.rank else 0.0


@dataclass(frozen=True)
class LayerMetrics:
    """EVBMF metrics of one layer's two unfoldings.

    The "input" unfolding has the layer's input channels as rows (mode 3), the "output" one its
    output channels (mode 4). Weights are unfolded as stored: a grouped conv ``[out, in/g, *k]``
    gives ``in/g x out*k`` and ``out x in/g*k`` (``N = in/g`` and ``out``), a transposed conv
    ``[in, out/g, *k]`` gives ``in x out/g*k`` and ``out/g x in*k``, a Linear ``[out, in]`` is a
    ``[out, in, 1, 1]`` conv.

    Attributes:
        path: module path (``layer1.0.conv1``).
        kind: ``conv``, ``linear``, ``conv_transpose`` or ``depthwise`` (groups == in == out;
            reported, but the paper excludes these from decisions).
        shape: the weight shape as stored.
        in_rank: ``N'_3 / N_3`` of the input unfolding, in [0, 1].
        out_rank: ``N'_4 / N_4`` of the output unfolding, in [0, 1].
        in_condition: ``d_1 / d_N'`` of the input unfolding (0 when its rank is 0).
        out_condition: the same for the output unfolding.
        in_gain: knowledge gain ``sum d / max d / N`` of the input unfolding (0 when rank is 0).
        out_gain: the same for the output unfolding.
        in_failed: reference mode: the reference's EVBMF would have raised on the input unfolding.
        out_failed: the same for the output unfolding.
        mean_rank: ``(in_rank + out_rank) / 2``, the paper's ``R_bar`` (computed).
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    in_rank: float
    out_rank: float
    in_condition: float
    out_condition: float
    in_gain: float
    out_gain: float
    in_failed: bool = False
    out_failed: bool = False
    mean_rank: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"LayerMetrics.kind={self.kind!r}: must be one of {LAYER_KINDS}")
        for name in ("in_rank", "out_rank", "in_gain", "out_gain"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"LayerMetrics.{name}={value!r}: must be in [0, 1]")
        for name in ("in_condition", "out_condition"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"LayerMetrics.{name}={value!r}: must be >= 0")
        object.__setattr__(self, "mean_rank", 0.5 * (self.in_rank + self.out_rank))

    @property
    def depthwise(self) -> bool:
        """True for depthwise convs, which the paper treats as non-conv edges."""
        return self.kind == "depthwise"

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serialisable)."""
        out = {name: getattr(self, name) for name in ("path", "kind", *METRIC_NAMES)}
        out.update(shape=list(self.shape), in_failed=self.in_failed, out_failed=self.out_failed)
        out["mean_rank"] = self.mean_rank
        return out


# ------------------------------------------------------------------------------------------------
# Batched singular values


@dataclass
class _Spectra:
    """Singular values of many matrices, zero-padded to one width, and the (L, M) the formulas
    use for each."""

    s: np.ndarray  # (B, K) float64, descending, zero past count
    count: np.ndarray  # (B,) = min(L, M)
    rows: np.ndarray  # (B,) L (after the default mode's transpose)
    cols: np.ndarray  # (B,) M
    transposed: np.ndarray  # (B,) bool
    finite: np.ndarray  # (B,) bool: the matrix had no NaN/inf


def _spectra(
    matrices: Sequence[torch.Tensor],
    reference: bool,
    twin_of: Mapping[int, int] | None = None,
) -> _Spectra:
    """Singular values of every matrix, in a few batched calls.

    ``matrices`` are tensors of >= 2 dims read as ``(shape[0], prod(shape[1:]))`` matrices, so an
    unfolding can stay the strided view ``w.movedim(d, 0)``: each is copied once, in the working
    dtype. ``twin_of[i] = j`` says matrix i is the transpose of matrix j (the two unfoldings of a
    1x1 conv or a Linear): it shares j's values.

    Reference mode: one float32 ``svdvals`` per batch of equal shapes. Default mode: one float64
    Gram matrix per matrix (on CUDA one batched product per shape), then one ``eigvalsh`` per
    Gram size (matrices of different shapes share it).
    """
    twin_of = twin_of or {}
    n = len(matrices)
    svals: list[np.ndarray] = [np.zeros(0)] * n
    rows = np.zeros(n, dtype=np.int64)
    cols = np.zeros(n, dtype=np.int64)
    transposed = np.zeros(n, dtype=bool)
    finite = np.ones(n, dtype=bool)
    for i, m in enumerate(matrices):
        r, c = m.shape[0], m[0].numel()
        if not reference and r > c:
            rows[i], cols[i], transposed[i] = c, r, True
        else:
            rows[i], cols[i] = r, c
    # MPS and other backends lack float64 (and batched LAPACK): use the CPU there.
    devices = [
        m.device if m.device.type in ("cpu", "cuda") else torch.device("cpu") for m in matrices
    ]
    todo = [i for i in range(n) if i not in twin_of]
    # One BLAS thread-pool limit for the whole pass.
    with _blas_threads():
        if reference:
            buckets: dict[tuple[Any, ...], list[int]] = {}
            for i in todo:
                buckets.setdefault((int(rows[i]), int(cols[i]), devices[i]), []).append(i)
            for (r, c, device), idx in buckets.items():
                for chunk, x in _stacked(matrices, idx, r, c, torch.float32, device):
                    ok = torch.isfinite(x).flatten(1).all(dim=1)
                    if not bool(ok.all()):
                        # LAPACK errors out on NaN: decompose zeros and report the failure.
                        x[~ok] = 0.0
                    s = torch.linalg.svdvals(x)  # (b, min(r, c)) float32, as the reference's SVD
                    _scatter(
                        chunk,
                        s.to(device="cpu", dtype=torch.float64).numpy(),
                        ok.cpu().numpy(),
                        svals,
                        finite,
                    )
        else:
            # Matrices of different shapes share one eigvalsh call per Gram size.
            sizes: dict[tuple[Any, ...], list[int]] = {}
            for i in todo:
                sizes.setdefault((min(rows[i], cols[i]), devices[i]), []).append(i)
            cpu = {key: idx for key, idx in sizes.items() if key[1].type == "cpu"}
            for chunk, s_np, ok_np in _cpu_spectra(matrices, cpu):
                _scatter(chunk, s_np, ok_np, svals, finite)
            for (_, device), idx in sizes.items():
                if device.type == "cpu":
                    continue
                by_shape: dict[tuple[int, int], list[int]] = {}
                for i in idx:
                    by_shape.setdefault((matrices[i].shape[0], matrices[i][0].numel()), []).append(
                        i
                    )
                parts = []
                for (r, c), same in by_shape.items():
                    for chunk, x in _stacked(matrices, same, r, c, torch.float64, device):
                        parts.append((chunk, *_gram_torch(x, tall=r > c)))
                s_np = _eig_svals([g for _, g, _ in parts], device)
                at = 0
                for chunk, _, ok_np in parts:
                    _scatter(chunk, s_np[at : at + len(chunk)], ok_np, svals, finite)
                    at += len(chunk)
    for i, j in twin_of.items():
        svals[i], finite[i] = svals[j], finite[j]
    width = max((len(v) for v in svals), default=0)
    s_pad = np.zeros((n, max(width, 1)))
    for i, v in enumerate(svals):
        s_pad[i, : len(v)] = v
    count = np.minimum(rows, cols)
    return _Spectra(s_pad, count, rows, cols, transposed, finite)


def _scatter(
    chunk: Sequence[int], s: np.ndarray, ok: np.ndarray, svals: list[np.ndarray], finite: np.ndarray
) -> None:
    for j, i in enumerate(chunk):
        svals[i] = s[j]
        finite[i] = bool(ok[j])


def _stacked(
    matrices: Sequence[torch.Tensor],
    idx: Sequence[int],
    r: int,
    c: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The matrices ``idx`` (all r x c) copied into batches (b, r, c) of ``dtype`` on ``device``,
    about _CHUNK_ELEMENTS entries each."""
    per_chunk = max(1, _CHUNK_ELEMENTS // max(r * c, 1))
    for start in range(0, len(idx), per_chunk):
        chunk = list(idx[start : start + per_chunk])
        x = torch.empty((len(chunk), r, c), dtype=dtype, device=device)
        for j, i in enumerate(chunk):
            x[j].view(matrices[i].shape).copy_(matrices[i].detach())
        yield chunk, x


def _cpu_spectra(
    matrices: Sequence[torch.Tensor], sizes: Mapping[tuple[Any, ...], list[int]]
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Singular values of CPU matrices grouped by Gram size: ``(indices, values, finite)`` per
    chunk.

    Each chunk is a Gram stack and one ``eigvalsh``. With ``torch.get_num_threads() > 1`` the
    chunks run on that many Python threads (numpy releases the GIL in BLAS and LAPACK), each
    with a single-threaded BLAS: LAPACK's small symmetric eigenproblems hardly use a second
    core, whereas independent chunks use every core fully.
    """
    workers = max(1, torch.get_num_threads())
    tasks: list[tuple[list[int], int]] = []
    for (k, _), idx in sizes.items():
        k = int(k)
        per_chunk = max(1, _CHUNK_ELEMENTS // max(k * k, 1))
        if workers > 1:
            per_chunk = min(per_chunk, max(1, -(-len(idx) // workers)))
        tasks += [(idx[i : i + per_chunk], k) for i in range(0, len(idx), per_chunk)]

    def run(task: tuple[list[int], int]) -> tuple[list[int], np.ndarray, np.ndarray]:
        chunk, k = task
        gram, ok = _grams_cpu([matrices[i] for i in chunk], k)
        return chunk, _eig_svals([gram], torch.device("cpu")), ok

    if workers == 1 or len(tasks) == 1:
        yield from map(run, tasks)
        return
    # Largest first, so that no worker is left with a big chunk at the end.
    tasks.sort(key=lambda t: -len(t[0]) * t[1] ** 3)
    with _blas_threads(1), ThreadPoolExecutor(min(workers, len(tasks))) as pool:
        yield from pool.map(run, tasks)


def _grams_cpu(matrices: Sequence[torch.Tensor], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 Gram matrices (n, k, k) of the shorter side of each matrix, and which were finite.

    Only singular values are needed: the eigenvalues of the Gram matrix of the shorter side
    (``k = min(r, c)``) cost a fraction of an SVD and lose nothing that matters in float64
    (absolute error ~1e-16 s_1^2 on s^2). Each matrix is converted through one reused scratch
    buffer (no fresh pages to fault in) and multiplied as a 2-D ``a @ a.T``, which numpy runs
    as a symmetric rank-k update (half the flops of a general product). A NaN or inf anywhere
    in a matrix reaches its Gram's diagonal (a sum of squares), which is where finiteness is
    checked; such Grams are zeroed.
    """
    gram = np.empty((len(matrices), k, k))
    scratch = np.empty(max((m.numel() for m in matrices), default=0))
    for j, m in enumerate(matrices):
        r = m.shape[0]
        a = scratch[: m.numel()].reshape(r, -1)
        torch.from_numpy(a).view(m.shape).copy_(m.detach())
        if r <= a.shape[1]:
            np.matmul(a, a.T, out=gram[j])
        else:
            np.matmul(a.T, a, out=gram[j])
    ok = np.isfinite(np.einsum("bii->bi", gram)).all(axis=1)
    gram[~ok] = 0.0
    return gram, ok


def _gram_torch(x: torch.Tensor, tall: bool) -> tuple[torch.Tensor, np.ndarray]:
    # Off the CPU (CUDA) the product stays where the weights live.
    gram = x.mT @ x if tall else x @ x.mT
    ok = torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all(dim=1)
    gram[~ok] = 0.0
    return gram, ok.cpu().numpy()


def _eig_svals(grams: Sequence[Any], device: torch.device) -> np.ndarray:
    """Descending singular values (float64, numpy) from Gram batches of one size, in one call."""
    if device.type == "cpu":
        lam = np.linalg.eigvalsh(np.concatenate(grams) if len(grams) > 1 else grams[0])
        return np.sqrt(np.maximum(lam[:, ::-1], 0.0))
    lam_t = torch.linalg.eigvalsh(torch.cat(list(grams)))
    return lam_t.flip(-1).clamp_min(0.0).sqrt().cpu().numpy()


@functools.lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()  # finding the BLAS libraries takes ms: do it once


def _blas_threads(limit: int | None = None) -> contextlib.AbstractContextManager[Any]:
    """Hold numpy's BLAS to ``limit`` threads (default: torch's thread count)."""
    return _threadpools().limit(limits=limit or torch.get_num_threads(), user_api="blas")


# ------------------------------------------------------------------------------------------------
# Batched bounded Brent search


def _fminbound(
    func: Callable[[np.ndarray, np.ndarray], np.ndarray],
    lo: np.ndarray,
    hi: np.ndarray,
    xatol: float | np.ndarray,
    maxiter: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise ``func`` on ``[lo_i, hi_i]`` for every row i at once.

    The steps are those of the Forsythe-Malcolm-Moler ``fmin`` that scipy's
    ``minimize_scalar(method="bounded")`` implements (golden section plus parabolic
    interpolation, tolerance ``sqrt_eps |x| + xatol / 3``), applied row-wise with masks so that
    every row follows exactly the iterates scipy would take for it alone. ``func(x, rows)``
    evaluates the rows listed in ``rows`` (int array) at ``x`` (same length).

    Returns:
        ``(x, f(x), evaluations)`` per row.
    """
    a = np.asarray(lo, dtype=np.float64).copy()
    b = np.asarray(hi, dtype=np.float64).copy()
    n = a.shape[0]
    xatol_arr = np.broadcast_to(np.asarray(xatol, dtype=np.float64), (n,))
    xf = a + _GOLDEN * (b - a)
    nfc, fulc = xf.copy(), xf.copy()
    rat = np.zeros(n)
    e = np.zeros(n)
    num = np.ones(n, dtype=np.int64)
    xm = 0.5 * (a + b)
    tol1 = _SQRT_EPS * np.abs(xf) + xatol_arr / 3.0
    tol2 = 2.0 * tol1
    # NaN and inf propagate exactly as in scipy's scalar code; numpy need not warn about them.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        fx = func(xf, np.arange(n))
        fnfc, ffulc = fx.copy(), fx.copy()
        active = np.abs(xf - xm) > (tol2 - 0.5 * (b - a))
        while active.any():
            i = np.flatnonzero(active)
            ai, bi, xfi, fxi = a[i], b[i], xf[i], fx[i]
            nfci, fnfci, fulci, ffulci = nfc[i], fnfc[i], fulc[i], ffulc[i]
            ei, rati, xmi, t1, t2 = e[i], rat[i], xm[i], tol1[i], tol2[i]

            # Parabola through the three best points, tried when the step before last was big.
            para = np.abs(ei) > t1
            r = (xfi - nfci) * (fxi - ffulci)
            q = (xfi - fulci) * (fxi - fnfci)
            p = (xfi - fulci) * q - (xfi - nfci) * r
            q = 2.0 * (q - r)
            p = np.where(q > 0.0, -p, p)
            q = np.abs(q)
            accept = (
                para
                & (np.abs(p) < np.abs(0.5 * q * ei))
                & (p > q * (ai - xfi))
                & (p < q * (bi - xfi))
            )
            rat_p = (p + 0.0) / q
            x_p = xfi + rat_p
            near_end = ((x_p - ai) < t2) | ((bi - x_p) < t2)
            toward_mid = np.sign(xmi - xfi) + ((xmi - xfi) == 0)
            rat_p = np.where(near_end, t1 * toward_mid, rat_p)
            # Otherwise a golden-section step into the larger half.
            e_gold = np.where(xfi >= xmi, ai - xfi, bi - xfi)
            new_e = np.where(accept, rati, e_gold)
            new_rat = np.where(accept, rat_p, _GOLDEN * e_gold)

            step_sign = np.sign(new_rat) + (new_rat == 0)
            x = xfi + step_sign * np.maximum(np.abs(new_rat), t1)
            fu = func(x, i)
            num[i] += 1

            better = fu <= fxi
            right = x >= xfi
            new_a = np.where(better, np.where(right, xfi, ai), np.where(~right, x, ai))
            new_b = np.where(better, np.where(right, bi, xfi), np.where(~right, bi, x))
            # Bookkeeping of the three best points (x_f best, then nfc, then fulc).
            shift2 = ~better & ((fu <= fnfci) | (nfci == xfi))
            shift3 = ~better & ~shift2 & ((fu <= ffulci) | (fulci == xfi) | (fulci == nfci))
            fulc[i] = np.where(better | shift2, nfci, np.where(shift3, x, fulci))
            ffulc[i] = np.where(better | shift2, fnfci, np.where(shift3, fu, ffulci))
            nfc[i] = np.where(better, xfi, np.where(shift2, x, nfci))
            fnfc[i] = np.where(better, fxi, np.where(shift2, fu, fnfci))
            xf[i] = np.where(better, x, xfi)
            fx[i] = np.where(better, fu, fxi)
            a[i], b[i], e[i], rat[i] = new_a, new_b, new_e, new_rat

            xm[i] = 0.5 * (new_a + new_b)
            tol1[i] = _SQRT_EPS * np.abs(xf[i]) + xatol_arr[i] / 3.0
            tol2[i] = 2.0 * tol1[i]
            active[i] = (num[i] < maxiter) & (
                np.abs(xf[i] - xm[i]) > (tol2[i] - 0.5 * (new_b - new_a))
            )
    return xf, fx, num


# ------------------------------------------------------------------------------------------------
# EVBMF on a batch of spectra


def _tau(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    z = x - (1.0 + alpha)
    return 0.5 * (z + np.sqrt(np.maximum(z * z - 4.0 * alpha, 0.0)))


def _psi1(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    t = _tau(x, alpha)
    return np.log(t + 1.0) + alpha * np.log(t / alpha + 1.0) - t


@dataclass
class _Solved:
    sigma2: np.ndarray
    threshold: np.ndarray
    rank: np.ndarray
    values: list[np.ndarray]
    failed: np.ndarray

    def copy_row(self, dst: int, src: int) -> None:
        """Give row ``dst`` the solution of row ``src`` (the same problem)."""
        for arr in (self.sigma2, self.threshold, self.rank, self.failed):
            arr[dst] = arr[src]
        self.values[dst] = self.values[src]


def _search_default(
    ratio: np.ndarray,
    valid: np.ndarray,
    count: np.ndarray,
    alpha: np.ndarray,
    x_bar: np.ndarray,
    lower_ratio: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Global minimiser ``u = ln(sigma2 / upper)`` of Phi on the bounds, and N' there.

    With ``r_h = s_h^2 / (M upper)`` (scale-free, summing to L), ``x_h = r_h e^-u`` and, up to a
    constant, ``Phi(u) = K u + L e^-u + sum_{x_h > x_bar} psi1(x_h)``: no logarithm of tiny
    singular values, and scaling the matrix changes nothing but rounding. As
    ``x - x psi1'(x) = 1 + alpha + alpha / tau(x)``,
    ``Phi'(u) = K - L e^-u + sum_{x_h > x_bar} (x_h - 1 - alpha - alpha / tau_h)``.

    Phi is smooth between the "kinks" ``u_h = ln(r_h / x_bar)`` where a singular value crosses the
    threshold; at each kink its slope drops and (through the 2.5129 sqrt(alpha) approximation of
    tau_bar) its value jumps by ``psi1(x_bar)``. So it can have several shallow local minima, one
    per smooth piece, and a single bounded Brent run (the reference) ends in whichever basin its
    first golden-section point falls. Here:

    1. Phi is evaluated on _GRID even points of the bounds; the lowest value is an upper bound.
    2. On a grid cell ``[a, c]`` every psi1 term rises with u and each value leaving the kept set
       lowers ``Psi = Phi - Q`` by at most ``psi1(x_bar)``, so ``min Q + Psi(a) - leaving *
       max(psi1(x_bar), 0)`` bounds Phi from below; cells whose bound exceeds the upper bound
       cannot hold the minimum and are dropped.
    3. Live cells are cut at every kink inside them; Phi and its one-sided slopes are evaluated
       at the cuts; every piece whose slope goes from negative to positive has ``Phi' = 0``
       solved to rounding; the lowest value over cuts (both one-sided limits) and pieces wins.

    This is exact as long as Phi has at most one minimum inside a smooth piece (true in all of
    6,000 pieces we sampled), and checked against a brute-force search in the tests.

    Returns:
        ``(u, n)``: the minimiser and the number of singular values above the threshold there
        (taken from the winning piece, so a minimum at a kink is not decided by rounding).
    """
    b = ratio.shape[0]
    rows = np.arange(b)
    with np.errstate(divide="ignore"):
        u_lo = np.clip(np.log(np.maximum(lower_ratio, 0.0)), _LOG_FLOOR, 0.0)
    # Only a prefix of the (descending) values ever crosses the threshold inside the bounds; the
    # rest stay in the closed form K u + L e^-u.
    crosses = valid & (ratio * np.exp(-u_lo)[:, None] > x_bar[:, None] * (1.0 - _TIE))
    width = crosses.sum(axis=1)
    head = ratio[:, : max(int(width.max(initial=0)), 1)]
    head_ok = crosses[:, : head.shape[1]]
    rsum = (ratio * valid).sum(axis=1)

    def smooth(u: np.ndarray, r: np.ndarray) -> np.ndarray:
        return count[r] * u + rsum[r] * np.exp(-u)  # Q(u), convex

    def evaluate(u: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, ...]:
        """Phi, Phi' and N' at u, from the right (strict set) and from the left (ties in)."""
        w = max(int(width[r].max(initial=0)), 1)
        x = head[r, :w] * np.exp(-u)[:, None]
        xb = x_bar[r][:, None]
        a = alpha[r][:, None]
        loose = head_ok[r, :w] & (x > xb * (1.0 - _TIE))
        strict = loose & (x > xb * (1.0 + _TIE))
        tau = _tau(np.where(loose, x, xb), a)
        psi = np.log(tau + 1.0) + a * np.log(tau / a + 1.0) - tau
        base, dbase = smooth(u, r), count[r] - rsum[r] * np.exp(-u)
        out = []
        for big in (strict, loose):
            # d psi1(r_h e^-u) / du = tau_h
            out += [
                base + np.where(big, psi, 0.0).sum(axis=1),
                dbase + np.where(big, tau, 0.0).sum(axis=1),
                big.sum(axis=1),
            ]
        return tuple(out)

    def evaluate_many(u: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
        # Chunks of similar width (sorted by it), each about _EVAL_ELEMENTS entries, so that
        # narrow rows do not pay for wide ones.
        res = [np.empty(u.size) for _ in range(6)]
        order = np.argsort(width[r], kind="stable")
        sorted_width = np.maximum(width[r[order]], 1)
        start = 0
        while start < order.size:
            fits = np.arange(1, order.size - start + 1) * sorted_width[start:] <= _EVAL_ELEMENTS
            stop = start + (fits.size if fits.all() else max(1, int(np.argmin(fits))))
            sel = order[start:stop]
            for arr, val in zip(res, evaluate(u[sel], r[sel]), strict=True):
                arr[sel] = val
            start = stop
        return res

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # 1. A grid, and an upper bound of the minimum from it.
        frac = np.linspace(0.0, 1.0, _GRID)
        grid = u_lo[:, None] * (1.0 - frac)[None, :]  # (b, G): u_lo .. 0
        g_owner = np.repeat(rows, _GRID)
        g_vals = [v.reshape(b, _GRID) for v in evaluate_many(grid.ravel(), g_owner)]
        best_known = np.minimum(g_vals[0], g_vals[3]).min(axis=1)

        # 2. Grid cells that can hold the minimum. On [a, c] every psi1 term rises with u and a
        # value leaving the kept set changes Psi = Phi - Q by -psi1(x_bar) at most, so
        # Phi >= min Q + Psi(a) - (values leaving) * max(psi1(x_bar), 0).
        jump = np.maximum(_psi1(x_bar, alpha), 0.0)
        left, right = grid[:, :-1], grid[:, 1:]
        u_star = np.clip(np.log(rsum / np.maximum(count, 1))[:, None], left, right)
        q_min = count[:, None] * u_star + rsum[:, None] * np.exp(-u_star)
        psi_left = g_vals[0][:, :-1] - smooth(left, rows[:, None])
        leaving = g_vals[2][:, :-1] - g_vals[2][:, 1:]
        bound = q_min + psi_left - leaving * jump[:, None]
        live = bound <= best_known[:, None] + 1e-12 * np.abs(best_known[:, None])
        live &= right > left

        # 3. Cut live cells at every kink inside them and evaluate there.
        kinks = np.log(np.where(head_ok, head, 1.0) / x_bar[:, None])
        span = np.where(u_lo < 0.0, -u_lo, 1.0)
        cell = np.clip(
            ((kinks - u_lo[:, None]) / span[:, None] * (_GRID - 1)).astype(np.int64), 0, _GRID - 2
        )
        inside = head_ok & (kinks > u_lo[:, None]) & (kinks < 0.0)
        inside &= np.take_along_axis(live, cell, axis=1)
        k_owner, k_col = np.nonzero(inside)
        k_vals = evaluate_many(kinks[k_owner, k_col], k_owner)

    # All cuts of a row in order: grid points then kinks, sorted by position (inf pads).
    n_k = inside.sum(axis=1)
    width_cuts = _GRID + int(n_k.max(initial=0))
    cuts = np.full((b, width_cuts), np.inf)
    cuts[:, :_GRID] = grid
    slot_of_kink = _GRID + (np.cumsum(inside, axis=1) - 1)[k_owner, k_col]
    cuts[k_owner, slot_of_kink] = kinks[k_owner, k_col]
    tables = []
    for g, k in zip(g_vals, k_vals, strict=True):
        tab = np.full((b, width_cuts), np.nan)
        tab[:, :_GRID] = g
        tab[k_owner, slot_of_kink] = k
        tables.append(tab)
    # Keep each grid cell's liveness on the sub-cells it is cut into.
    live_cut = np.zeros((b, width_cuts), dtype=bool)
    live_cut[:, : _GRID - 1] = live
    live_cut[k_owner, slot_of_kink] = True
    order = np.argsort(cuts, axis=1, kind="stable")
    cuts = np.take_along_axis(cuts, order, axis=1)
    f_right, d_right, n_right, f_left, d_left, n_left = (
        np.take_along_axis(tab, order, axis=1) for tab in tables
    )
    live_cut = np.take_along_axis(live_cut, order, axis=1)
    slot = np.isfinite(cuts)

    # Best cut, over both one-sided values (the left limit at a kink is an infimum of its piece).
    f_right = np.where(slot, f_right, np.inf)
    f_left = np.where(slot, f_left, np.inf)
    use_left = f_left < f_right
    f_cut = np.where(use_left, f_left, f_right)
    k_best = np.argmin(f_cut, axis=1)
    u_best = cuts[rows, k_best]
    f_best = f_cut[rows, k_best]
    n_best = np.where(use_left, n_left, n_right)[rows, k_best].astype(np.int64)

    # Live cells (cut k, cut k+1) whose slope changes sign from - to + hold an interior minimum.
    cell_min = slot[:, 1:] & live_cut[:, :-1] & (d_right[:, :-1] < 0.0) & (d_left[:, 1:] > 0.0)
    c_row, c_col = np.nonzero(cell_min)
    if c_row.size:
        # Phi' is continuous inside a cell: solve Phi' = 0 to the last bit (a minimiser of Phi
        # itself is only defined to ~sqrt(eps), the flatness of Phi at its minimum) by the
        # Illinois variant of regula falsi, which keeps the bracket and converges superlinearly.
        lo, hi = cuts[c_row, c_col], cuts[c_row, c_col + 1]
        d_lo, d_hi = d_right[c_row, c_col], d_left[c_row, c_col + 1]
        last = np.zeros(c_row.size, dtype=np.int8)  # which end moved last: -1 lo, +1 hi
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            for _ in range(_ROOT_STEPS):
                open_ = (hi - lo) > 4.0 * np.finfo(float).eps * np.maximum(np.abs(lo), 1.0)
                if not open_.any():
                    break
                i = np.flatnonzero(open_)
                x = (lo[i] * d_hi[i] - hi[i] * d_lo[i]) / (d_hi[i] - d_lo[i])
                x = np.where((x > lo[i]) & (x < hi[i]), x, 0.5 * (lo[i] + hi[i]))
                dx = evaluate(x, c_row[i])[1]
                below = dx < 0.0
                # Illinois: an end kept twice in a row has its slope halved.
                d_hi[i] = np.where(below & (last[i] == -1), 0.5 * d_hi[i], d_hi[i])
                d_lo[i] = np.where(~below & (last[i] == 1), 0.5 * d_lo[i], d_lo[i])
                lo[i], d_lo[i] = np.where(below, x, lo[i]), np.where(below, dx, d_lo[i])
                hi[i], d_hi[i] = np.where(below, hi[i], x), np.where(below, d_hi[i], dx)
                last[i] = np.where(below, -1, 1)
                done = dx == 0.0
                lo[i[done]] = hi[i[done]] = x[done]
            u_in = np.where(np.abs(d_lo) < np.abs(d_hi), lo, hi)
            f_in = evaluate(u_in, c_row)[0]
        n_in = n_right[c_row, c_col].astype(np.int64)  # the piece's count: no kink in a cell
        better = np.flatnonzero(f_in < f_best[c_row])
        # Several cells of a row may improve: apply in decreasing value so the lowest lands last.
        for j in better[np.argsort(-f_in[better], kind="stable")]:
            i = c_row[j]
            if f_in[j] < f_best[i]:
                u_best[i], f_best[i], n_best[i] = u_in[j], f_in[j], n_in[j]
    return u_best, n_best


def _evbmf_spectra(sp: _Spectra, reference: bool, later: Sequence[int] = ()) -> _Solved:
    """EVBMF of every row of ``sp``: sigma2, threshold, N' and shrunk values.

    Rows listed in ``later`` are left unsolved (rank 0, NaN sigma2) for the caller to fill.
    """
    n, width = sp.s.shape
    L = sp.rows.astype(np.float64)
    M = sp.cols.astype(np.float64)
    K = sp.count
    s = sp.s
    s2 = s * s
    valid = np.arange(width)[None, :] < K[:, None]
    alpha = L / M
    tau_bar = _TAU_COEF * np.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    # Bounds of the minimiser (Nakajima et al. 2015): index H = ceil(L / (1 + alpha)) - 1 (0-based)
    # is always < K, even untransposed, since L / (1 + alpha) = L M / (L + M) < min(L, M).
    h = (np.ceil(L / (1.0 + alpha)) - 1.0).astype(np.int64)
    rows = np.arange(n)
    tail = valid & (np.arange(width)[None, :] >= h[:, None])
    tail_mean = (s2 * tail).sum(axis=1) / np.maximum(tail.sum(axis=1), 1)
    lower = np.maximum(s2[rows, h] / (M * x_bar), tail_mean / M)
    upper = (s2 * valid).sum(axis=1) / (L * M)

    zero = upper <= 0.0
    failed = ~sp.finite.copy()
    if reference:
        # The reference hands scipy float32 bounds; scipy refuses lower > upper (and non-finite
        # bounds), which its try/except turns into rank 0.
        lower = lower.astype(np.float32).astype(np.float64)
        upper = upper.astype(np.float32).astype(np.float64)
        failed |= ~(np.isfinite(lower) & np.isfinite(upper)) | (lower > upper)
    skip = zero | failed
    unsolved = np.zeros(n, dtype=bool)
    unsolved[list(later)] = True
    todo = np.flatnonzero(~skip & ~unsolved)
    sigma2 = np.where(zero & ~failed, 0.0, np.nan)
    n_kept = np.zeros(n, dtype=np.int64)

    if todo.size:
        s2t, vt = s2[todo], valid[todo]
        Lt, Mt, Kt, at, xbt = L[todo], M[todo], K[todo], alpha[todo], x_bar[todo]
        if reference:

            def objective(sig2: np.ndarray, r: np.ndarray) -> np.ndarray:
                x = s2t[r] / (Mt[r] * sig2)[:, None]
                big = vt[r] & (x > xbt[r][:, None])
                small = vt[r] & ~big
                xs = np.where(small, x, 1.0)
                xb = np.where(big, x, xbt[r][:, None])
                ar = at[r][:, None]
                tb = _tau(xb, ar)
                term_small = np.where(small, xs - np.log(xs), 0.0)
                term_big = np.where(
                    big, xb - tb + np.log((tb + 1.0) / xb) + ar * np.log(tb / ar + 1.0), 0.0
                )
                return (
                    term_small.sum(axis=1) + term_big.sum(axis=1) + (Lt[r] - Kt[r]) * np.log(sig2)
                )

            sig2_t, _, _ = _fminbound(objective, lower[todo], upper[todo], _REF_XATOL, _REF_MAXITER)
        else:
            u_opt, n_opt = _search_default(
                s2t / (Mt * upper[todo])[:, None], vt, Kt, at, xbt, lower[todo] / upper[todo]
            )
            sig2_t = upper[todo] * np.exp(u_opt)
            n_kept[todo] = n_opt
        sigma2[todo] = sig2_t

    with np.errstate(invalid="ignore"):
        if reference:
            # Same operation order as the reference: sqrt(M * sigma2 * (1 + tau) * (1 + a / tau)).
            threshold = np.sqrt(M * sigma2 * (1.0 + tau_bar) * (1.0 + alpha / tau_bar))
            kept = valid & (s > threshold[:, None])
            kept[skip] = False
            rank = kept.sum(axis=1)
        else:
            threshold = np.sqrt(M * sigma2 * x_bar)
            # N' comes from the piece of Phi the minimum lies on (equal to counting s_h above
            # the threshold, without letting rounding decide a minimum that sits on a kink).
            rank = np.where(skip, 0, n_kept)
    values: list[np.ndarray] = []
    for i in range(n):
        k = int(rank[i])
        if k == 0:
            values.append(np.zeros(0))
            continue
        si = s[i, :k]
        ratio_i = (L[i] + M[i]) * sigma2[i] / (si * si)
        disc = (1.0 - ratio_i) ** 2 - 4.0 * L[i] * M[i] * sigma2[i] ** 2 / si**4
        values.append(0.5 * si * (1.0 - ratio_i + np.sqrt(np.maximum(disc, 0.0))))
    return _Solved(sigma2, threshold, rank, values, failed)


def _as_matrix(matrix: Any) -> torch.Tensor:
    if isinstance(matrix, torch.Tensor):
        t = matrix.detach()
    else:
        t = torch.as_tensor(np.asarray(matrix))
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise MetricsError(
            f"evbmf needs a non-empty 2-D matrix, got shape {tuple(t.shape)}; unfold a conv "
            f"weight first (w.reshape(w.shape[0], -1))"
        )
    if t.is_complex():
        raise MetricsError(f"evbmf needs a real matrix, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def evbmf(matrix: torch.Tensor | np.ndarray, *, reference: bool = False) -> EVBMFResult:
    """EVBMF of one matrix: noise variance, kept rank and shrunk singular values.

    Args:
        matrix: a 2-D tensor or array, rows = channels (``L x M``); any device, any real dtype
            (half and bfloat16 are upcast).
        reference: reproduce the paper's code (no transpose, float32, scipy's coarse bounded
            search, strict threshold, failure -> rank 0) instead of the sound default; see the
            module docstring.

    Returns:
        The :class:`EVBMFResult`.

    Raises:
        MetricsError: not a non-empty real 2-D matrix, or (default mode) it holds NaN/inf.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randn(40, 3, generator=g) @ torch.randn(3, 90, generator=g)
        >>> y += 0.01 * torch.randn(40, 90, generator=g)
        >>> evbmf(y).rank
        3
    """
    t = _as_matrix(matrix)
    sp = _spectra([t], reference)
    if not reference and not sp.finite[0]:
        raise MetricsError(
            f"matrix of shape {tuple(t.shape)} holds NaN or inf; EVBMF is undefined "
            f"(reference=True reports rank 0 instead, as the paper's code does)"
        )
    sol = _evbmf_spectra(sp, reference)
    k = int(sp.count[0])
    return EVBMFResult(
        rank=int(sol.rank[0]),
        values=sol.values[0],
        sigma2=float(sol.sigma2[0]),
        threshold=float(sol.threshold[0]),
        singular_values=sp.s[0, :k].copy(),
        shape=(int(t.shape[0]), int(t.shape[1])),
        transposed=bool(sp.transposed[0]),
        failed=bool(sol.failed[0]),
    )


# ------------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class _Layer:
    path: str
    kind: str
    weight: torch.Tensor
    in_dim: int  # dim of the stored weight that indexes input channels
    out_dim: int


def _find_layers(model: nn.Module, graph: ChannelGraph | None = None) -> list[_Layer]:
    """Conv-like modules in registration order (the reference's ``parameters()`` order), then
    the raw weight parameters that ``graph`` lists as layers (``F.conv2d(x, self.weight)``)."""
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            kind = "conv_transpose" if module.transposed else "conv"
            g = module.groups
            if g > 1 and g == module.in_channels == module.out_channels:
                kind = "depthwise"
            # ConvTranspose stores [in, out/g, *k]; Conv stores [out, in/g, *k].
            in_dim, out_dim = (0, 1) if module.transposed else (1, 0)
        elif isinstance(module, nn.Linear):
            kind, in_dim, out_dim = "linear", 1, 0
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise MetricsError(
                f"{path} ({type(module).__name__}): weight is not initialised yet (lazy module); "
                f"run one forward pass before computing metrics"
            )
        layers.append(_Layer(path or "<root>", kind, weight, in_dim, out_dim))
    if graph is not None:
        seen = {layer.path for layer in layers}
        dims = {"conv": (1, 0), "linear": (1, 0), "conv_transpose": (0, 1)}
        for info in graph.layers:
            if info.kind not in dims or info.path in seen:
                continue
            try:
                weight = model.get_parameter(info.path)
            except AttributeError:
                continue
            if weight.dim() >= 2:
                layers.append(_Layer(info.path, info.kind, weight, *dims[info.kind]))
    return layers


def _unfold(weight: torch.Tensor, dim: int) -> torch.Tensor:
    # A view (C_dim, ...) read as the (C_dim, prod(other dims)) matrix by _spectra; column order
    # does not change singular values.
    return weight.detach().movedim(dim, 0)


def _compute(layers: Sequence[_Layer], reference: bool) -> list[LayerMetrics]:
    """Metrics of every layer: one batched spectrum pass and one batched sigma2 search."""
    if not layers:
        return []
    matrices = []
    twin_of = {}
    for j, layer in enumerate(layers):
        w = layer.weight
        matrices.append(_unfold(w, layer.in_dim))
        matrices.append(_unfold(w, layer.out_dim))
        if w.numel() == w.shape[layer.in_dim] * w.shape[layer.out_dim]:
            # 1x1 kernel or Linear: the input unfolding is the output one transposed.
            twin_of[2 * j] = 2 * j + 1
    sp = _spectra(matrices, reference, twin_of)
    if not reference and not sp.finite.all():
        bad = sorted({layers[i // 2].path for i in np.flatnonzero(~sp.finite)})
        raise MetricsError(
            f"weights of {', '.join(bad)} hold NaN or inf (diverged training?); EVBMF metrics are "
            f"undefined (reference=True reports rank 0 there, as the paper's code does)"
        )
    if reference:
        sol = _evbmf_spectra(sp, reference)
    else:
        # A twin is the same problem once transposed (same s, L, M): solve it once.
        sol = _evbmf_spectra(sp, reference, later=list(twin_of))
        for i, j in twin_of.items():
            sol.copy_row(i, j)
    out = []
    for j, layer in enumerate(layers):
        stats = []
        for i in (2 * j, 2 * j + 1):
            n_ch = matrices[i].shape[0]
            d = sol.values[i]
            k = int(sol.rank[i])
            rank = k / n_ch
            cond = float(d[0] / d[-1]) if k else 0.0
            gain = float(d.sum() / d[0] / n_ch) if k else 0.0
            stats.append((rank, cond, gain, bool(sol.failed[i])))
        (ir, ic, ig, ifail), (orr, oc, og, ofail) = stats
        out.append(
            LayerMetrics(
                path=layer.path,
                kind=layer.kind,
                shape=tuple(int(v) for v in layer.weight.shape),
                in_rank=ir,
                out_rank=orr,
                in_condition=ic,
                out_condition=oc,
                in_gain=min(ig, 1.0),
                out_gain=min(og, 1.0),
                in_failed=ifail,
                out_failed=ofail,
            )
        )
    return out


def layer_metrics(model: nn.Module, *, reference: bool = False) -> list[LayerMetrics]:
    """EVBMF rank, condition and knowledge gain of every conv and Linear layer of ``model``.

    Works from the weights alone (no forward pass, no tracing), on any device and dtype: all
    unfoldings of equal shape are decomposed in one batched call and ``sigma2`` is searched for
    all of them at once.

    Args:
        model: any module; every ``nn.Conv*d``, ``nn.ConvTranspose*d`` and ``nn.Linear`` in it
            (``named_modules()`` order) is measured. Depthwise convs are reported with
            ``kind="depthwise"``.
        reference: reproduce the paper's code (see the module docstring). The reference never
            evaluates Linear layers; here they get the same treatment as convs in both modes.

    Returns:
        One :class:`LayerMetrics` per layer.

    Raises:
        MetricsError: a lazy module is uninitialised, or (default mode) a weight holds NaN/inf.

    Example:
        >>> import torchvision
        >>> ms = layer_metrics(torchvision.models.mobilenet_v3_small())
        >>> sum(m.depthwise for m in ms) > 0, all(m.in_rank == 0 for m in ms)  # random init
        (True, True)
    """
    return _compute(_find_layers(model), reference)


def metrics_table(metrics: Sequence[LayerMetrics]) -> str:
    """A readable table of :class:`LayerMetrics`, one row per layer.

    Example:
        >>> import torch.nn as nn
        >>> print(metrics_table(layer_metrics(nn.Sequential(nn.Conv2d(3, 8, 3)))))
        path  kind  shape    R_in   R_out  R_bar  k_in  k_out
        -----------------------------------------------------
        0     conv  8x3x3x3  0.000  0.000  0.000  0.00  0.00
    """
    head = ("path", "kind", "shape", "R_in", "R_out", "R_bar", "k_in", "k_out")
    rows = [head]
    for m in metrics:
        rows.append(
            (
                m.path,
                m.kind,
                "x".join(map(str, m.shape)),
                f"{m.in_rank:.3f}",
                f"{m.out_rank:.3f}",
                f"{m.mean_rank:.3f}",
                f"{m.in_condition:.2f}",
                f"{m.out_condition:.2f}",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Rank slope and tracking


def rank_slope(values: Sequence[float] | np.ndarray, *, reference: bool = False) -> float:
    """Rank slope ``S`` of Eq. 3 over one trial's per-epoch mean ranks.

    ``t1 = 0`` (the first epoch of the trial: weights are fresh at its start) and ``t2`` is the
    epoch of the highest value (the first one if the maximum repeats): the reference's stand-in
    for the paper's "rank plateau epoch". Then ``S = (R[t2] - R[t1]) / (t2 - t1)``, and ``S = 0``
    when the maximum is at ``t1``. With ``reference=True`` the denominator is ``t2 - t1 + 1e-4``,
    as in the paper's code (the same value to 4 digits for ``t2 > 0``).

    Args:
        values: ``R_bar`` after each epoch of the trial, in order (at least one).
        reference: use the reference's ``1e-4`` denominator guard.

    Returns:
        The slope per epoch; NaN if any value is NaN (a channel group with no rank to measure).

    Raises:
        MetricsError: ``values`` is empty or not one-dimensional.

    Example:
        >>> rank_slope([0.1, 0.3, 0.5, 0.4])
        0.2
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise MetricsError(f"rank_slope needs a non-empty 1-D series, got shape {v.shape}")
    if np.isnan(v).any():
        return float("nan")
    t2 = int(np.argmax(v))
    if reference:
        return float((v[t2] - v[0]) / (t2 + _SLOPE_EPS))
    return float((v[t2] - v[0]) / t2) if t2 > 0 else 0.0


class RankTracker:
    """Per-epoch EVBMF metrics of a model's layers, and rank slopes per layer and channel group.

    Call :meth:`update` once per epoch (after the epoch's last optimiser step, as the reference
    does); it measures every layer in one batched pass and stores plain floats. A *trial* is the
    run of epochs since construction or :meth:`reset`; slopes use the current trial only.

    Per channel group ``g`` of a :class:`~fxconet.ir.ChannelGraph` (as the reference's
    hand-written maps do, generically):

    * ``R_bar_g(t)`` is the mean of the output ranks of the conv-like layers (``conv``,
      ``linear``, ``conv_transpose``) whose ``out_groups == (g,)`` and the input ranks of those
      whose ``in_groups == (g,)``. Layers fed by (or producing) a concat of several groups and
      depthwise convs are left out, as in the reference. If that leaves no term, layers where
      ``g`` is one of several groups are used; if still none, the group has no value (NaN series,
      NaN slope, NaN condition) and decisions should leave it alone.
    * ``kappa_bar_g`` is the mean condition of the same terms at the **last** epoch (the
      reference's choice; the paper says "average").
    * ``S_g = rank_slope(R_bar_g)`` (Eq. 3 with ``t1 = 0``, ``t2 = argmax``).

    With ``aggregation="robust"`` (the default), a group's terms leave out unfoldings that
    cannot show its rank: those *structurally capped* (an ``N x M`` unfolding with ``M < N`` has
    rank at most ``M / N``: a 1x1 shortcut conv that doubles the width, the classifier's input
    side) and those *degenerate* in the trial (rank 0 at every epoch), unless that leaves no
    term. On ResNets these are the stem, the 1x1 shortcut convs and the classifier, which the
    paper's code leaves out of its groups too; ``aggregation="reference"`` keeps every term.

    With ``reference=True`` metrics use the reference EVBMF, and an unfolding where the reference
    would have raised takes the previous epoch's rank, condition and gain of the same layer (0 at
    the first epoch), as its ``try/except`` does.

    Args:
        model: the module whose conv and Linear layers are measured.
        graph: the model's channel graph (needed only for the ``group_*`` methods).
        reference: reference-mode EVBMF, fallback and slope.
        aggregation: ``"robust"`` or ``"reference"`` (see above).

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
        >>> tracker = RankTracker(model)
        >>> for epoch in range(3):
        ...     _ = tracker.update()           # after each training epoch
        >>> tracker.epochs, sorted(tracker.layer_slopes())
        (3, ['0', '2'])
    """

    def __init__(
        self,
        model: nn.Module,
        graph: ChannelGraph | None = None,
        *,
        reference: bool = False,
        aggregation: str = "robust",
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise MetricsError(
                f"aggregation={aggregation!r}: choose one of {', '.join(AGGREGATIONS)}"
            )
        self.model = model
        self.graph = graph
        self.reference = reference
        self.aggregation = aggregation
        self._info: dict[str, dict[str, Any]] = {}
        self._history: dict[str, dict[str, list[float]]] = {}
        self._epochs = 0

    # -- recording --------------------------------------------------------------------------------

    @property
    def epochs(self) -> int:
        """Number of epochs recorded in the current trial."""
        return self._epochs

    @property
    def paths(self) -> tuple[str, ...]:
        """Module paths of the tracked layers, in registration order."""
        return tuple(self._history)

    def update(self) -> list[LayerMetrics]:
        """Measure every layer now and append the values to the trial's history.

        Returns:
            This epoch's metrics (in reference mode, with the previous-epoch fallback applied).

        Raises:
            MetricsError: the model's layers changed within a trial (call :meth:`reset`).
        """
        layers = _find_layers(self.model, self.graph)
        metrics = _compute(layers, self.reference)
        if self._epochs and [m.path for m in metrics] != list(self._history):
            raise MetricsError(
                f"the model's conv layers changed during a trial ({len(self._history)} tracked, "
                f"{len(metrics)} now); call tracker.reset(model) to start a new trial"
            )
        if self.reference:
            metrics = [self._fallback(m) for m in metrics]
        for m in metrics:
            if m.path not in self._history:
                self._info[m.path] = {"kind": m.kind, "shape": list(m.shape)}
                self._history[m.path] = {name: [] for name in METRIC_NAMES}
            hist = self._history[m.path]
            for name in METRIC_NAMES:
                hist[name].append(float(getattr(m, name)))
        self._epochs += 1
        return metrics

    def _fallback(self, m: LayerMetrics) -> LayerMetrics:
        # The reference's try/except: a failed unfolding repeats the previous epoch's values.
        changes: dict[str, Any] = {}
        for side, failed in (("in", m.in_failed), ("out", m.out_failed)):
            if failed and self._epochs and m.path in self._history:
                hist = self._history[m.path]
                for what in ("rank", "condition", "gain"):
                    changes[f"{side}_{what}"] = hist[f"{side}_{what}"][-1]
        return replace(m, **changes) if changes else m

    def reset(self, model: nn.Module | None = None, graph: ChannelGraph | None = None) -> None:
        """Start a new trial: forget the history, optionally for a new model and graph."""
        if model is not None:
            self.model = model
        if graph is not None:
            self.graph = graph
        self._info.clear()
        self._history.clear()
        self._epochs = 0

    # -- queries ----------------------------------------------------------------------------------

    def series(self, path: str, metric: str = "mean_rank") -> np.ndarray:
        """One layer's values over the trial's epochs.

        Args:
            path: module path of a tracked layer.
            metric: one of ``in_rank, out_rank, in_condition, out_condition, in_gain, out_gain,
                mean_rank``.

        Example:
            >>> import torch.nn as nn
            >>> tracker = RankTracker(nn.Sequential(nn.Conv2d(3, 8, 3)))
            >>> _ = tracker.update()
            >>> tracker.series("0", "out_rank")
            array([0.])
        """
        if path not in self._history:
            raise MetricsError(
                f"no tracked layer {path!r}; tracked: {', '.join(self._history) or 'none yet'}"
            )
        hist = self._history[path]
        if metric == "mean_rank":
            return 0.5 * (np.asarray(hist["in_rank"]) + np.asarray(hist["out_rank"]))
        if metric not in hist:
            raise MetricsError(
                f"unknown metric {metric!r}; choose from {', '.join(METRIC_NAMES)}, mean_rank"
            )
        return np.asarray(hist[metric], dtype=np.float64)

    def layer_slopes(self, *, include_depthwise: bool = True) -> dict[str, float]:
        """Rank slope ``S`` (Eq. 3) of every layer's ``R_bar = (R_in + R_out) / 2``."""
        self._need_epochs()
        return {
            path: rank_slope(self.series(path), reference=self.reference)
            for path in self._history
            if include_depthwise or self._info[path]["kind"] != "depthwise"
        }

    def _need_epochs(self) -> None:
        if not self._epochs:
            raise MetricsError("no epochs recorded in this trial; call tracker.update() first")

    def _group_terms(self, graph: ChannelGraph | None) -> dict[int, list[tuple[str, str]]]:
        graph = graph if graph is not None else self.graph
        if graph is None:
            raise MetricsError(
                "no channel graph: pass one to RankTracker(model, graph) or to this method"
            )
        conv_like = [info for info in graph.layers if info.is_conv]
        for info in conv_like:
            if info.path not in self._history:
                raise MetricsError(
                    f"channel graph layer {info.path!r} ({info.kind}) is not a tracked module of "
                    f"this model; the graph must come from fxconet.analyze() of the tracked model"
                )
        terms: dict[int, list[tuple[str, str]]] = {}
        for g in graph.groups:
            exact = _terms(conv_like, g.id, lambda groups, gid: groups == (gid,))
            found = exact or _terms(
                conv_like, g.id, lambda groups, gid: len(groups) > 1 and gid in groups
            )
            if self.aggregation == "robust":
                found = [t for t in found if not self._uninformative(t)] or found
            terms[g.id] = found
        return terms

    def _uninformative(self, term: tuple[str, str]) -> bool:
        """A structurally capped unfolding, or one at rank 0 in every epoch of the trial."""
        path, side = term
        if not any(self._history[path][f"{side}_rank"]):
            return True
        rows, cols = _unfolding_shape(self._info[path]["kind"], self._info[path]["shape"], side)
        return cols < rows

    def excluded_terms(self, graph: ChannelGraph | None = None) -> dict[int, list[str]]:
        """Per group, the ``path:side`` terms the robust aggregation leaves out this trial."""
        self._need_epochs()
        saved = self.aggregation
        try:
            self.aggregation = "reference"
            every = self._group_terms(graph)
            self.aggregation = "robust"
            kept = self._group_terms(graph)
        finally:
            self.aggregation = saved
        return {g: [f"{p}:{s}" for p, s in ts if (p, s) not in kept[g]] for g, ts in every.items()}

    def group_series(self, graph: ChannelGraph | None = None) -> dict[int, np.ndarray]:
        """``R_bar_g`` per epoch for every group id (all-NaN for a group with no term)."""
        self._need_epochs()
        out = {}
        for gid, terms in self._group_terms(graph).items():
            if not terms:
                out[gid] = np.full(self._epochs, np.nan)
                continue
            out[gid] = np.mean([self.series(path, f"{side}_rank") for path, side in terms], axis=0)
        return out

    def group_slopes(self, graph: ChannelGraph | None = None) -> dict[int, float]:
        """Rank slope ``S_g`` (Eq. 3) of every group id (NaN for a group with no term)."""
        return {
            gid: rank_slope(r, reference=self.reference)
            for gid, r in self.group_series(graph).items()
        }

    def group_conditions(self, graph: ChannelGraph | None = None) -> dict[int, float]:
        """Mean condition ``kappa_bar_g`` of every group at the last epoch (NaN with no term)."""
        self._need_epochs()
        out = {}
        for gid, terms in self._group_terms(graph).items():
            last = [self._history[path][f"{side}_condition"][-1] for path, side in terms]
            out[gid] = float(np.mean(last)) if last else float("nan")
        return out

    # -- checkpoints ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The trial's history as plain Python (JSON-serialisable); see :meth:`from_dict`."""
        return {
            "version": 1,
            "reference": self.reference,
            "aggregation": self.aggregation,
            "epochs": self._epochs,
            "layers": [
                {"path": path, **self._info[path], **{k: list(v) for k, v in hist.items()}}
                for path, hist in self._history.items()
            ],
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        model: nn.Module,
        graph: ChannelGraph | None = None,
    ) -> RankTracker:
        """Rebuild a tracker from :meth:`to_dict` output, to continue the trial on ``model``.

        Example:
            >>> import json, torch.nn as nn
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3))
            >>> t = RankTracker(model); _ = t.update()
            >>> RankTracker.from_dict(json.loads(json.dumps(t.to_dict())), model).epochs
            1
        """
        if data.get("version") != 1:
            raise MetricsError(f"RankTracker data version={data.get('version')!r}: expected 1")
        tracker = cls(
            model,
            graph,
            reference=bool(data["reference"]),
            aggregation=str(data.get("aggregation", "robust")),
        )
        epochs = int(data["epochs"])
        for layer in data["layers"]:
            hist = {name: [float(v) for v in layer[name]] for name in METRIC_NAMES}
            if any(len(v) != epochs for v in hist.values()):
                raise MetricsError(
                    f"RankTracker data layer {layer['path']!r}: every series must have "
                    f"epochs={epochs} values"
                )
            tracker._info[layer["path"]] = {"kind": layer["kind"], "shape": list(layer["shape"])}
            tracker._history[layer["path"]] = hist
        tracker._epochs = epochs
        return tracker

    def __repr__(self) -> str:
        return (
            f"RankTracker({len(self._history)} layers, epochs={self._epochs}, "
            f"reference={self.reference})"
        )


def _unfolding_shape(kind: str, shape: Sequence[int], side: str) -> tuple[int, int]:
    """``(rows, cols)`` of a weight's input or output unfolding (rows: that side's channels)."""
    n_in, n_out = (shape[0], shape[1]) if kind == "conv_transpose" else (shape[1], shape[0])
    rest = math.prod(shape[2:])
    rows = n_in if side == "in" else n_out
    cols = (n_out if side == "in" else n_in) * rest
    return rows, cols


def _terms(
    layers: Iterable[LayerInfo], gid: int, match: Callable[[tuple[int, ...], int], bool]
) -> list[tuple[str, str]]:
    """(path, "out"|"in") rank terms of group ``gid``: producers first, then consumers."""
    produced = [(info.path, "out") for info in layers if match(info.out_groups, gid)]
    consumed = [(info.path, "in") for info in layers if match(info.in_groups, gid)]
    return produced + consumed
