"""Tests of fxconet.metrics: EVBMF (both modes), layer metrics, rank slope and RankTracker.

Two independent oracles written here from the published formulas (conet-paper Eq. 1-3, EVBMF of
Nakajima et al. as summarised in conet.md §1.2):

* ``direct_evbmf``: the sound mode, one matrix at a time in float64 with numpy's SVD, sigma2 by a
  4000-point grid over the bounds plus scipy refinement of the 5 best points (a brute-force
  global search);
* ``reference_evbmf``: the paper's code path step by step (no transpose, float32 singular values,
  float32 bounds, ``scipy.optimize.minimize_scalar(method="bounded")`` with default options,
  strict threshold, ``ValueError`` -> rank 0).
"""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from torch import nn

from fxconet.errors import FxconetError
from fxconet.ir import ChannelGraph, ChannelGroup, LayerInfo
from fxconet.metrics import (
    EVBMFResult,
    LayerMetrics,
    MetricsError,
    RankTracker,
    evbmf,
    layer_metrics,
    metrics_table,
    rank_slope,
)

TAU = 2.5129


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small LAPACK calls gain nothing from threads, and on a shared 2-core machine an OpenMP
    # barrier per call can cost a scheduler slice (0.8 s for a 64 x 576 SVD instead of 1 ms).
    # numpy's BLAS (the oracles' SVDs) has its own pool: hold it to one thread too when
    # threadpoolctl is installed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        except ImportError:
            pass
        yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Oracles


def _phi(s: np.ndarray, L: int, M: int, sig2: float) -> float:
    """The published EVBMF objective (conet.md §1.2 step 5), float64."""
    alpha = L / M
    tau = TAU * math.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    x = s**2 / (M * sig2)
    big = x > x_bar
    t = 0.5 * (x[big] - (1 + alpha) + np.sqrt((x[big] - (1 + alpha)) ** 2 - 4 * alpha))
    return float(
        np.sum(x[~big] - np.log(x[~big]))
        + np.sum(x[big] - t + np.log((t + 1) / x[big]) + alpha * np.log(t / alpha + 1))
        + (L - len(s)) * math.log(sig2)
    )


def _phi_grid(s: np.ndarray, L: int, M: int, sig2: np.ndarray) -> np.ndarray:
    """``_phi`` at many sigma2 at once (same formula, broadcast over a grid)."""
    alpha = L / M
    tau = TAU * math.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    x = s[None, :] ** 2 / (M * sig2[:, None])
    big = x > x_bar
    xb = np.where(big, x, x_bar)
    t = 0.5 * (xb - (1 + alpha) + np.sqrt((xb - (1 + alpha)) ** 2 - 4 * alpha))
    term_big = xb - t + np.log((t + 1) / xb) + alpha * np.log(t / alpha + 1)
    return np.where(big, term_big, x - np.log(x)).sum(axis=1) + (L - len(s)) * np.log(sig2)


def direct_evbmf(y: np.ndarray) -> dict:
    """Sound-mode EVBMF of one matrix: float64, transposed to L <= M, brute-force global sigma2."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = L / M
    tau = TAU * math.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    h = math.ceil(L / (1 + alpha)) - 1
    upper = np.sum(s**2) / (L * M)
    lower = max(s[h] ** 2 / (M * x_bar), np.mean(s[h:] ** 2) / M)
    grid = np.exp(np.linspace(math.log(lower), math.log(upper), 4000))
    values = _phi_grid(s, L, M, grid)
    best = None
    for j in np.argsort(values)[:5]:
        res = minimize_scalar(
            lambda v: _phi(s, L, M, v),
            bounds=(grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]),
            method="bounded",
            options={"xatol": 1e-13 * upper},
        )
        if best is None or res.fun < best.fun:
            best = res
    sig2 = float(best.x)
    threshold = math.sqrt(M * sig2 * x_bar)
    k = int(np.sum(s > threshold))
    d = (
        s[:k]
        / 2
        * (
            1
            - (L + M) * sig2 / s[:k] ** 2
            + np.sqrt((1 - (L + M) * sig2 / s[:k] ** 2) ** 2 - 4 * L * M * sig2**2 / s[:k] ** 4)
        )
    )
    return {"rank": k, "sigma2": sig2, "values": d, "phi": best.fun, "s": s, "L": L, "M": M}


def reference_evbmf(y: np.ndarray) -> dict:
    """The paper's code path for one matrix, with scipy doing the search."""
    y32 = torch.as_tensor(np.asarray(y, dtype=np.float32))
    s = torch.linalg.svdvals(y32).double().numpy()
    L, M = y32.shape
    alpha = L / M
    tau = TAU * np.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    h = int(np.min([np.ceil(L / (1 + alpha)) - 1, L])) - 1
    upper = np.float32(np.sum(s**2) / (L * M))
    lower = np.float32(max(s[h + 1] ** 2 / (M * x_bar), np.mean(s[h + 1 :] ** 2) / M))
    try:
        res = minimize_scalar(lambda v: _phi(s, L, M, v), bounds=[lower, upper], method="Bounded")
    except ValueError as err:
        return {"rank": 0, "sigma2": None, "error": str(err)}
    sig2 = float(res.x)
    threshold = np.sqrt(M * sig2 * (1 + tau) * (1 + alpha / tau))
    return {"rank": int(np.sum(s > threshold)), "sigma2": sig2, "nfev": res.nfev}


def planted(rows: int, cols: int, rank: int, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """A rank-``rank`` matrix with well-separated singular values plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, max(rank, 1))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, max(rank, 1))))
    sv = np.linspace(2.0, 1.0, rank) * math.sqrt(rows * cols) * noise * 3
    low = (u[:, :rank] * sv) @ v[:, :rank].T
    return low + noise * rng.standard_normal((rows, cols))


# ------------------------------------------------------------------------------------------------
# evbmf: analytic cases


@pytest.mark.parametrize(
    "shape, rank",
    [((40, 90), 3), ((90, 40), 3), ((64, 576), 10), ((576, 64), 10), ((8, 8), 2), ((4, 20000), 2)],
)
def test_planted_rank_is_recovered(shape, rank):
    y = planted(*shape, rank, seed=rank)
    res = evbmf(torch.from_numpy(y))
    assert res.rank == rank
    assert res.transposed == (shape[0] > shape[1])
    assert res.shape == shape
    assert len(res.values) == rank and np.all(np.diff(res.values) <= 0)
    # Shrinkage: kept values are below the raw singular values, above zero.
    assert np.all(res.values < res.singular_values[:rank]) and np.all(res.values > 0)
    # sigma2 estimates the planted noise variance (1e-4).
    assert res.sigma2 == pytest.approx(1e-4, rel=0.25)


@pytest.mark.parametrize("shape", [(40, 90), (64, 576), (128, 128), (3, 147), (20, 5)])
def test_pure_noise_gives_rank_zero(shape):
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    assert evbmf(y).rank == 0
    ref = evbmf(y, reference=True)
    assert ref.rank == 0
    assert ref.failed == (shape[0] > shape[1])  # (20, 5): the reference's bounds error, see below


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 10.0, 1e4])
def test_scaling_leaves_default_rank_unchanged(scale):
    y = planted(60, 300, 7, seed=1)
    base = evbmf(y)
    res = evbmf(y * scale)
    assert res.rank == base.rank == 7
    # Equal up to the search tolerance (rounding of s^2 / upper moves Brent's last steps).
    assert res.sigma2 == pytest.approx(base.sigma2 * scale**2, rel=1e-6)
    np.testing.assert_allclose(res.values, base.values * scale, rtol=1e-6)
    assert res.condition == pytest.approx(base.condition, rel=1e-6)


def test_reference_tolerance_is_absolute_so_small_weights_lose_sigma2_precision():
    # conet.md §1.5: xatol = 1e-5 is absolute; with sigma2 ~ 1e-8 the reference stops after a few
    # golden steps of an interval ~1e-6 wide and sigma2 is off by a large factor, while the
    # default mode is scale-free.
    y = planted(60, 300, 7, seed=1) * 1e-2
    exact = direct_evbmf(y)["sigma2"]
    assert evbmf(y).sigma2 == pytest.approx(exact, rel=1e-6)
    ref = evbmf(y, reference=True)
    assert ref.sigma2 == pytest.approx(reference_evbmf(y)["sigma2"], rel=1e-6)
    assert abs(ref.sigma2 - exact) / exact > 0.05


def test_zero_matrix_has_rank_zero_in_both_modes():
    for reference in (False, True):
        res = evbmf(np.zeros((5, 7)), reference=reference)
        assert (res.rank, res.sigma2, res.condition, res.gain) == (0, 0.0, 0.0, 0.0)
        assert not res.failed


def test_one_row_or_one_column_never_keeps_a_value():
    # L = 1: the bounds coincide at s^2 / M and the threshold sqrt(x_bar) s exceeds s.
    for y in (np.full((1, 50), 3.0), np.full((50, 1), 3.0), np.array([[2.0]])):
        res = evbmf(y)
        assert res.rank == 0 and res.sigma2 > 0


def test_tiny_matrices_match_direct_formulas():
    for y in (
        np.diag([10.0, 0.01]),
        np.array([[5.0, 0.1, 0.0], [0.0, 0.2, 0.1]]),
        planted(3, 9, 1),
    ):
        res, want = evbmf(y), direct_evbmf(y)
        assert res.rank == want["rank"]
        assert res.sigma2 == pytest.approx(want["sigma2"], rel=1e-6)


def test_rows_greater_than_columns_is_the_transposed_problem():
    y = planted(300, 50, 6, seed=4)
    tall, wide = evbmf(y), evbmf(y.T)
    assert tall.transposed and not wide.transposed
    assert tall.rank == wide.rank == 6
    assert tall.sigma2 == pytest.approx(wide.sigma2, rel=1e-9)
    # The channel count stays the rows of the matrix as given.
    assert tall.gain == pytest.approx(wide.gain * 50 / 300, rel=1e-9)


# Table: matrices of varied shape and structure against the brute-force float64 oracle. Ranks
# must agree exactly and sigma2 / shrunk values to the oracle's own precision.
TABLE = [
    ("planted 40x90 r3", lambda: planted(40, 90, 3, seed=11)),
    ("planted 128x1152 r20", lambda: planted(128, 1152, 20, noise=0.05, seed=12)),
    ("planted tall 200x30 r5", lambda: planted(200, 30, 5, seed=13)),
    ("square 64x64 r8", lambda: planted(64, 64, 8, seed=14)),
    ("noise 50x200", lambda: np.random.default_rng(15).standard_normal((50, 200))),
    (
        "decaying spectrum 80x300",
        lambda: (
            (
                np.linalg.qr(np.random.default_rng(16).standard_normal((80, 80)))[0]
                * np.exp(-np.arange(80) / 9.0)
            )
            @ np.linalg.qr(np.random.default_rng(17).standard_normal((300, 80)))[0].T
            + 1e-3 * np.random.default_rng(18).standard_normal((80, 300))
        ),
    ),
    ("wide 6x5000 r2", lambda: planted(6, 5000, 2, seed=19)),
    ("2x3", lambda: np.array([[3.0, 0.2, 0.1], [0.1, 0.15, -0.2]])),
]


@pytest.mark.parametrize("name, make", TABLE, ids=[t[0] for t in TABLE])
def test_default_mode_matches_direct_float64_formulas(name, make):
    y = make()
    res, want = evbmf(torch.from_numpy(y)), direct_evbmf(y)
    assert res.rank == want["rank"], name
    assert res.sigma2 == pytest.approx(want["sigma2"], rel=2e-6)
    np.testing.assert_allclose(res.values, want["values"], rtol=1e-6)
    np.testing.assert_allclose(res.singular_values, want["s"], rtol=1e-7, atol=1e-7 * want["s"][0])
    # The minimiser is global: no worse than the oracle's best point.
    assert _phi(want["s"], want["L"], want["M"], res.sigma2) <= want["phi"] + 1e-9
    if res.rank:
        assert res.condition == pytest.approx(want["values"][0] / want["values"][-1], rel=1e-6)
        n = y.shape[0]
        assert res.gain == pytest.approx(want["values"].sum() / want["values"][0] / n, rel=1e-6)


def test_default_finds_the_global_minimum_where_a_local_search_does_not():
    # A spectrum decaying smoothly into the noise gives Phi several shallow local minima (one per
    # number of kept values); scipy's bounded search from the golden point stops in another one.
    rng = np.random.default_rng(0)
    L, M, r = 127, 191, 64
    y = rng.standard_normal((L, r)) @ rng.standard_normal((r, M)) / 8.0 * rng.uniform(0.2, 2)
    y = (y + 0.1 * rng.standard_normal((L, M))) * 10 ** rng.uniform(-3, 2)
    want = direct_evbmf(y)
    res = evbmf(y)
    assert res.rank == want["rank"]
    s = want["s"]
    local = minimize_scalar(
        lambda v: _phi(s, L, M, v),
        bounds=(_lower(s, L, M), np.sum(s**2) / (L * M)),
        method="bounded",
        options={"xatol": 1e-14},
    )
    assert local.fun > want["phi"] + 1e-3  # a different, worse basin
    assert _phi(s, L, M, res.sigma2) <= want["phi"] + 1e-9


def _lower(s: np.ndarray, L: int, M: int) -> float:
    alpha = L / M
    tau = TAU * math.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    h = math.ceil(L / (1 + alpha)) - 1
    return max(s[h] ** 2 / (M * x_bar), np.mean(s[h:] ** 2) / M)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 60),
    cols=st.integers(1, 60),
    rank=st.integers(0, 8),
    scale=st.floats(1e-4, 1e4),
    seed=st.integers(0, 2**31 - 1),
)
def test_default_rank_is_transpose_and_scale_invariant(rows, cols, rank, scale, seed):
    y = planted(rows, cols, min(rank, rows, cols), seed=seed)
    res = evbmf(y)
    assert 0 <= res.rank <= min(rows, cols)
    assert evbmf(y.T).rank == res.rank
    assert evbmf(y * scale).rank == res.rank
    assert len(res.values) == res.rank
    if res.rank:
        assert res.condition >= 1.0
        assert 0.0 < res.gain <= res.rank / rows + 1e-12


# ------------------------------------------------------------------------------------------------
# evbmf: reference mode


def test_reference_mode_matches_scipy_step_for_step():
    rng = np.random.default_rng(7)
    for trial in range(25):
        L, M = int(rng.integers(4, 120)), int(rng.integers(4, 240))
        y = planted(L, M, int(rng.integers(0, min(L, M) // 2 + 1)), noise=0.03, seed=trial)
        y = (y * 10 ** rng.uniform(-1, 1)).astype(np.float32)
        res, want = evbmf(torch.from_numpy(y), reference=True), reference_evbmf(y)
        assert res.rank == want["rank"], (L, M)
        assert res.failed == (want["sigma2"] is None)
        if want["sigma2"] is not None:
            # Same iterates; only the objective's summation order differs (the search stops at
            # xatol = 1e-5, so a different path would differ by far more than this).
            assert res.sigma2 == pytest.approx(want["sigma2"], rel=1e-7)
        assert not res.transposed


def test_batched_bounded_brent_takes_scipys_iterates():
    from fxconet.metrics import _fminbound

    rng = np.random.default_rng(1)
    n = 300
    c, w, k = rng.uniform(-3, 3, n), rng.uniform(0.1, 5, n), rng.integers(0, 4, n)
    lo = rng.uniform(-5, 0, n)
    hi = lo + rng.uniform(0, 6, n)

    def f(x, c, w, k):
        return np.select(
            [k == 0, k == 1, k == 2],
            [(x - c) ** 2, np.abs(x - c) * w, np.sin(w * x) + 0.1 * x],
            np.cos(3 * x) * np.exp(-x * x * w),
        )

    x, fx, nfev = _fminbound(lambda x, r: f(x, c[r], w[r], k[r]), lo, hi, 1e-5, 500)
    for i in range(n):
        res = minimize_scalar(
            lambda v, i=i: float(f(np.array([v]), c[i : i + 1], w[i : i + 1], k[i : i + 1])[0]),
            bounds=(lo[i], hi[i]),
            method="bounded",
        )
        assert (x[i], nfev[i]) == (res.x, res.nfev)


@pytest.mark.parametrize("shape", [(4, 30, 200), (3, 200, 30), (2, 1, 9)])
def test_gram_paths_give_the_svd_values_on_every_device_branch(shape):
    # The numpy branch runs on the CPU, the torch branch on CUDA; both are checked here on CPU
    # tensors against a float64 SVD, including a non-finite matrix and a strided (unfolding) view.
    from fxconet.metrics import _eig_svals, _gram_torch, _grams_cpu

    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[-1, 0, 0] = float("nan")
    tall = shape[1] > shape[2]
    want = torch.linalg.svdvals(x[:-1]).numpy()
    k = min(shape[1:])
    # As unfoldings arrive: strided views (movedim of a weight stored the other way round).
    views = [m.T.contiguous().movedim(1, 0) for m in x]
    assert torch.equal(views[0], x[0]) and (k == 1 or not views[0].is_contiguous())
    gram_np, ok_np = _grams_cpu(views, k)
    gram_t, ok_t = _gram_torch(x.clone(), tall)
    # _eig_svals takes its torch branch for any device but the CPU; the tensors here are on the
    # CPU, which that branch handles too.
    results = [
        (_eig_svals([gram_np[:1], gram_np[1:]], torch.device("cpu")), ok_np),
        (_eig_svals([gram_t[:1], gram_t[1:]], torch.device("cuda")), ok_t),
    ]
    for s, ok in results:
        assert ok.tolist() == [True] * (shape[0] - 1) + [False]
        np.testing.assert_allclose(s[:-1], want, rtol=1e-9, atol=1e-12 * want.max())
        assert s.shape == (shape[0], k) and np.all(s[-1] == 0)


def test_reference_random_init_convs_have_rank_zero():
    # conet.md §1.5: default-initialised weights give N' = 0 in both unfoldings.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3),
        nn.Conv2d(32, 64, 3),
        nn.Conv2d(64, 64, 1),
        nn.Conv2d(64, 128, 3, stride=2),
        nn.Conv2d(128, 32, 1),
    )
    for reference in (False, True):
        for m in layer_metrics(model, reference=reference):
            assert (m.in_rank, m.out_rank, m.in_condition, m.out_condition) == (0, 0, 0, 0)
            assert (m.in_gain, m.out_gain) == (0.0, 0.0)


@pytest.mark.parametrize(
    "shape, unfolding",
    [((64, 256, 1, 1), "in"), ((32, 1, 3, 3), "out"), ((128, 32, 1, 1), "out")],
)
def test_reference_bounds_error_gives_rank_zero(shape, unfolding):
    # conet.md §1.5: these L > M unfoldings of default-initialised weights make scipy raise
    # "The lower bound exceeds the upper bound."; the reference's try/except reports 0.
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[0], shape[2])
    w = conv.weight.detach()
    y = w.transpose(0, 1).reshape(shape[1], -1) if unfolding == "in" else w.reshape(shape[0], -1)
    assert y.shape[0] > y.shape[1]
    want = reference_evbmf(y.numpy())
    assert "lower bound exceeds the upper bound" in want["error"]
    res = evbmf(y, reference=True)
    assert (res.rank, res.failed, res.condition) == (0, True, 0.0)
    assert math.isnan(res.sigma2)
    # The default mode transposes instead and has no failure.
    fixed = evbmf(y)
    assert fixed.transposed and not fixed.failed and fixed.rank == 0


def test_reference_untransposed_l_greater_than_m_can_differ_from_default():
    # Planted structure in a tall 1x1-conv unfolding: the reference runs the L <= M formulas on it
    # untransposed (no error here) and lands on another sigma2; the default solves the transpose.
    y = planted(64, 16, 4, noise=0.05, seed=1).astype(np.float32)
    ref, fixed = evbmf(y, reference=True), evbmf(y)
    assert not ref.failed and not ref.transposed and fixed.transposed
    assert ref.rank == reference_evbmf(y)["rank"]
    assert fixed.rank == direct_evbmf(y)["rank"] == 4
    assert ref.sigma2 == pytest.approx(2 * fixed.sigma2, rel=0.25)


def test_reference_non_finite_fails_and_default_raises():
    y = planted(10, 30, 2)
    y[3, 4] = np.nan
    res = evbmf(y, reference=True)
    assert (res.rank, res.failed) == (0, True)
    with pytest.raises(MetricsError, match="NaN or inf"):
        evbmf(y)


def test_evbmf_rejects_bad_input():
    with pytest.raises(MetricsError, match="2-D"):
        evbmf(np.zeros(5))
    with pytest.raises(MetricsError, match="2-D"):
        evbmf(np.zeros((0, 3)))
    with pytest.raises(MetricsError, match="real"):
        evbmf(torch.zeros(3, 3, dtype=torch.complex64))
    assert isinstance(MetricsError("x"), FxconetError) and isinstance(MetricsError("x"), ValueError)
    assert evbmf(np.eye(4, dtype=np.int64) * 5).shape == (4, 4)


def test_result_records_validate_fields():
    with pytest.raises(ValueError, match="EVBMFResult.rank=3"):
        EVBMFResult(3, np.ones(3), 1.0, 1.0, np.ones(2), (2, 5))
    with pytest.raises(ValueError, match="EVBMFResult.values"):
        EVBMFResult(1, np.ones(2), 1.0, 1.0, np.ones(2), (2, 5))
    with pytest.raises(ValueError, match="LayerMetrics.in_rank=1.5"):
        LayerMetrics("a", "conv", (1, 1, 1, 1), 1.5, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="LayerMetrics.kind='pool'"):
        LayerMetrics("a", "pool", (1, 1, 1, 1), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="LayerMetrics.out_condition=-1"):
        LayerMetrics("a", "conv", (1, 1, 1, 1), 0.0, 0.0, 0.0, -1.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------
# layer_metrics


def _plant(weight: torch.Tensor, out_dim: int, in_dim: int, rank: int, seed: int) -> None:
    """Give ``weight`` rank ``rank`` in both channel unfoldings (a Tucker core), plus noise 0.01."""
    rng = np.random.default_rng(seed)
    shape = weight.shape
    ranks = {d: min(rank, shape[d]) for d in (out_dim, in_dim)}
    u_out = np.linalg.qr(rng.standard_normal((shape[out_dim], ranks[out_dim])))[0]
    u_in = np.linalg.qr(rng.standard_normal((shape[in_dim], ranks[in_dim])))[0]
    core_shape = [ranks.get(d, n) for d, n in enumerate(shape)]
    core = rng.standard_normal(core_shape)
    low = np.moveaxis(np.tensordot(u_out, np.moveaxis(core, out_dim, 0), axes=1), 0, out_dim)
    low = np.moveaxis(np.tensordot(u_in, np.moveaxis(low, in_dim, 0), axes=1), 0, in_dim)
    # Smallest planted singular value, in either unfolding, 3x the noise edge.
    noise = 0.01
    edge = noise * (math.sqrt(max(shape)) + math.sqrt(weight.numel() / min(shape))) * 3
    smallest = min(
        np.linalg.svd(np.moveaxis(low, d, 0).reshape(shape[d], -1), compute_uv=False)[r - 1]
        for d, r in ranks.items()
    )
    y = low * (edge / smallest) + noise * rng.standard_normal(shape)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(y))


class Zoo(nn.Module):
    """Every layer kind; never called (metrics need no forward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3)
        self.pointwise = nn.Conv2d(32, 48, 1)
        self.grouped = nn.Conv2d(32, 64, 3, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, groups=32)
        self.up = nn.ConvTranspose2d(24, 40, 4, groups=2)
        self.conv1d = nn.Conv1d(8, 12, 5)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(50, 20))


def test_layer_metrics_covers_every_layer_kind_with_the_right_unfoldings():
    model = Zoo()
    # (module, weight dim of output channels, dim of input channels, N_out, N_in)
    spec = {
        "conv": (0, 1, 32, 16),
        "pointwise": (0, 1, 48, 32),
        "grouped": (0, 1, 64, 8),  # as stored: [out, in / groups, k, k]
        "up": (1, 0, 20, 24),  # ConvTranspose stores [in, out / groups, k, k]
        "conv1d": (0, 1, 12, 8),
        "head.1": (0, 1, 20, 50),  # Linear [out, in] as a [out, in, 1, 1] conv
    }
    rank = 3
    for i, (path, (out_dim, in_dim, _, _)) in enumerate(spec.items()):
        _plant(model.get_submodule(path).weight, out_dim, in_dim, rank, seed=i)
    metrics = {m.path: m for m in layer_metrics(model)}
    assert list(metrics) == ["conv", "pointwise", "grouped", "depthwise", "up", "conv1d", "head.1"]
    kinds = {p: m.kind for p, m in metrics.items()}
    assert kinds == {
        "conv": "conv",
        "pointwise": "conv",
        "grouped": "conv",
        "depthwise": "depthwise",
        "up": "conv_transpose",
        "conv1d": "conv",
        "head.1": "linear",
    }
    assert metrics["depthwise"].depthwise and not metrics["conv"].depthwise
    for path, (_, _, n_out, n_in) in spec.items():
        m = metrics[path]
        assert m.shape == tuple(model.get_submodule(path).weight.shape)
        assert m.in_rank == pytest.approx(rank / n_in), path
        assert m.out_rank == pytest.approx(rank / n_out), path
        assert m.mean_rank == pytest.approx((rank / n_in + rank / n_out) / 2)
        assert m.in_condition >= 1 and m.out_condition >= 1
        assert 0 < m.in_gain <= m.in_rank and 0 < m.out_gain <= m.out_rank
    d = metrics["head.1"].to_dict()
    assert json.loads(json.dumps(d))["mean_rank"] == pytest.approx(metrics["head.1"].mean_rank)
    assert "head.1" in metrics_table(list(metrics.values()))


def test_layer_metrics_match_evbmf_of_each_unfolding():
    model = nn.Sequential(nn.Conv2d(8, 24, 3), nn.Conv2d(24, 24, 3), nn.Conv2d(24, 8, 1))
    for i, conv in enumerate(model):
        _plant(conv.weight, 0, 1, 4, seed=i)
    for reference in (False, True):
        for conv, m in zip(model, layer_metrics(model, reference=reference), strict=True):
            w = conv.weight.detach()
            r_in = evbmf(w.transpose(0, 1).reshape(w.shape[1], -1), reference=reference)
            r_out = evbmf(w.reshape(w.shape[0], -1), reference=reference)
            assert m.in_rank == r_in.rank / w.shape[1]
            assert m.out_rank == r_out.rank / w.shape[0]
            # Batched vs single Grams differ in the last bits; d_N' sits near the threshold, where
            # the shrinkage has an infinite slope, so the condition moves by more than that.
            assert m.in_condition == pytest.approx(r_in.condition, rel=1e-4)
            assert m.out_gain == pytest.approx(r_out.gain, rel=1e-6)
            assert (m.in_failed, m.out_failed) == (r_in.failed, r_out.failed)


def test_depthwise_is_flagged_and_its_reference_output_unfolding_fails():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=32, padding=1))
    (m,) = layer_metrics(model, reference=True)
    assert m.kind == "depthwise" and m.depthwise
    assert m.out_failed and m.out_rank == 0  # [32, 1, 3, 3] -> 32 x 9: bounds error
    assert m.in_rank == 0  # 1 x 288 keeps nothing
    (d,) = layer_metrics(model)
    assert not d.out_failed and d.in_rank == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_layer_metrics_upcast_low_precision_and_leave_weights_alone(dtype):
    model = nn.ModuleDict({"a": nn.Conv2d(16, 32, 3), "b": nn.Linear(64, 40)})
    _plant(model["a"].weight, 0, 1, 5, seed=1)
    _plant(model["b"].weight, 0, 1, 6, seed=2)
    want = [(m.in_rank, m.out_rank) for m in layer_metrics(model)]
    model = model.to(dtype)
    before = [p.clone() for p in model.parameters()]
    got = [(m.in_rank, m.out_rank) for m in layer_metrics(model)]
    assert got == want == [(5 / 16, 5 / 32), (6 / 64, 6 / 40)]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.dtype == dtype for p in model.parameters())


def test_layer_metrics_name_the_layer_with_nan_weights():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(MetricsError, match=r"weights of 1 hold NaN or inf"):
        layer_metrics(model)
    ref = layer_metrics(model, reference=True)
    assert ref[1].in_failed and ref[1].out_failed and ref[1].mean_rank == 0


def test_layer_metrics_of_a_model_without_convs_is_empty_and_lazy_modules_are_refused():
    assert layer_metrics(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))) == []
    with pytest.raises(MetricsError, match="lazy module"):
        layer_metrics(nn.Sequential(nn.LazyConv2d(8, 3)))


def test_layer_metrics_batch_many_shapes_like_a_torchvision_model():
    import torchvision

    model = torchvision.models.mobilenet_v3_small()
    metrics = layer_metrics(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [m.path for m in metrics] == convs
    assert sum(m.depthwise for m in metrics) == sum(
        isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()
    )
    assert all(m.in_rank == m.out_rank == 0 for m in metrics if m.kind != "linear")


def test_layer_metrics_are_the_same_on_one_thread_and_on_a_thread_pool():
    # With several torch threads the CPU spectra run chunk-parallel; the values must not change.
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        *[nn.Conv2d(c, 2 * c, k) for c, k in ((3, 3), (6, 1), (12, 3), (24, 1))],
        *[nn.Conv2d(48, 48, 3) for _ in range(5)],
        nn.Linear(48, 10),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) + (p.shape[0] % 3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer_metrics(model)
        torch.set_num_threads(3)
        pool = layer_metrics(model)
    finally:
        torch.set_num_threads(threads)
    assert [m.to_dict() for m in pool] == [m.to_dict() for m in one]
    assert any(m.in_rank > 0 for m in one)


# ------------------------------------------------------------------------------------------------
# rank_slope


def test_rank_slope_uses_first_epoch_and_first_maximum():
    assert rank_slope([0.1, 0.3, 0.5, 0.4]) == pytest.approx(0.2)
    assert rank_slope([0.1, 0.5, 0.2, 0.5]) == pytest.approx(0.4)  # t2 = first maximum
    assert rank_slope([0.5, 0.3, 0.2]) == 0.0  # maximum at t1
    assert rank_slope([0.2]) == 0.0
    assert rank_slope(np.array([0.0, 0.0, 0.3])) == pytest.approx(0.15)


def test_rank_slope_reference_adds_its_epsilon():
    assert rank_slope([0.1, 0.3, 0.5, 0.4], reference=True) == pytest.approx(0.4 / 2.0001)
    assert rank_slope([0.5, 0.3], reference=True) == 0.0
    assert rank_slope([0.2, 0.6], reference=True) == pytest.approx(0.4 / 1.0001)


def test_rank_slope_nan_and_empty():
    assert math.isnan(rank_slope([0.1, float("nan")]))
    with pytest.raises(MetricsError, match="non-empty 1-D"):
        rank_slope([])
    with pytest.raises(MetricsError, match="non-empty 1-D"):
        rank_slope(np.zeros((2, 2)))


# ------------------------------------------------------------------------------------------------
# RankTracker


class Net(nn.Module):
    """stem -> (b | c) -> concat -> d -> depthwise -> head; f's output is split in two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.b = nn.Conv2d(16, 16, 3)
        self.c = nn.Conv2d(16, 12, 1)
        self.d = nn.Conv2d(28, 20, 1)
        self.dw = nn.Conv2d(20, 20, 3, groups=20)
        self.e = nn.Linear(20, 10)
        self.f = nn.Conv2d(16, 24, 1)


def net_graph() -> ChannelGraph:
    """The ChannelGraph fxconet.analyze() would give Net (built by hand)."""
    groups = (
        ChannelGroup(0, 16, producers=("a",), consumers=("b", "c", "f")),
        ChannelGroup(1, 16, producers=("b",), consumers=("d",)),
        ChannelGroup(2, 12, producers=("c",), consumers=("d",)),
        ChannelGroup(3, 20, producers=("d",), consumers=("dw", "e")),
        ChannelGroup(4, 10, frozen=True, reason="model output", producers=("e",)),
        ChannelGroup(5, 8, producers=("f",)),
        ChannelGroup(6, 16, producers=("f",)),
        ChannelGroup(7, 3, frozen=True, reason="model input", consumers=("a",)),
        ChannelGroup(8, 4),
    )
    layers = (
        LayerInfo("a", "conv", (7,), (0,)),
        LayerInfo("b", "conv", (0,), (1,)),
        LayerInfo("c", "conv", (0,), (2,)),
        LayerInfo("d", "conv", (1, 2), (3,)),
        LayerInfo("dw", "depthwise", (3,), (3,)),
        LayerInfo("e", "linear", (3,), (4,)),
        LayerInfo("f", "conv", (0,), (5, 6)),
        LayerInfo("bn", "norm", (3,), (3,)),
    )
    return ChannelGraph(groups=groups, layers=layers, model_name="Net")


def train_epochs(model: Net, ranks: list[int], aggregation: str = "robust") -> RankTracker:
    """Simulate training: before each epoch's update, plant rank ranks[t] in every layer."""
    tracker = RankTracker(model, net_graph(), aggregation=aggregation)
    for t, r in enumerate(ranks):
        for i, mod in enumerate(model.children()):
            _plant(mod.weight, 0, 1, r, seed=10 * t + i)
        tracker.update()
    return tracker


def test_tracker_records_every_epoch_and_layer_slopes():
    model = Net()
    tracker = train_epochs(model, [1, 2, 3, 2])
    assert tracker.epochs == 4
    assert tracker.paths == ("a", "b", "c", "d", "dw", "e", "f")
    np.testing.assert_allclose(tracker.series("b", "in_rank"), np.array([1, 2, 3, 2]) / 16)
    np.testing.assert_allclose(tracker.series("e", "out_rank"), np.array([1, 2, 3, 2]) / 10)
    slopes = tracker.layer_slopes()
    r_bar = tracker.series("b")
    assert slopes["b"] == pytest.approx((r_bar[2] - r_bar[0]) / 2)
    assert "dw" not in tracker.layer_slopes(include_depthwise=False)
    with pytest.raises(MetricsError, match="no tracked layer 'zz'"):
        tracker.series("zz")
    with pytest.raises(MetricsError, match="unknown metric"):
        tracker.series("a", "rank")


def test_tracker_groups_average_producer_out_and_consumer_in_ranks():
    model = Net()
    tracker = train_epochs(model, [1, 3, 2], aggregation="reference")
    series = tracker.group_series()
    s = tracker.series
    # g0: out(a), in(b), in(c), in(f)
    want0 = (s("a", "out_rank") + s("b", "in_rank") + s("c", "in_rank") + s("f", "in_rank")) / 4
    np.testing.assert_allclose(series[0], want0)
    # g1, g2: only their producer; d is fed by a concat of (1, 2) and left out.
    np.testing.assert_allclose(series[1], s("b", "out_rank"))
    np.testing.assert_allclose(series[2], s("c", "out_rank"))
    # g3: out(d), in(e); the depthwise conv is left out.
    np.testing.assert_allclose(series[3], (s("d", "out_rank") + s("e", "in_rank")) / 2)
    # g5, g6: f's output is split in two, so only the fallback term out(f) is left.
    np.testing.assert_allclose(series[5], s("f", "out_rank"))
    np.testing.assert_allclose(series[6], s("f", "out_rank"))
    # g7: the input group is only consumed by a (in_groups == (7,)).
    np.testing.assert_allclose(series[7], s("a", "in_rank"))
    # g8: nothing measures it.
    assert np.isnan(series[8]).all()
    slopes = tracker.group_slopes()
    assert slopes[1] == pytest.approx(rank_slope(series[1]))
    assert slopes[1] == pytest.approx((3 - 1) / 16)
    assert math.isnan(slopes[8])
    conds = tracker.group_conditions()
    last = (s("d", "out_condition")[-1] + s("e", "in_condition")[-1]) / 2
    assert conds[3] == pytest.approx(last)
    assert math.isnan(conds[8])


def test_robust_aggregation_leaves_out_capped_and_degenerate_unfoldings():
    model = Net()
    tracker = train_epochs(model, [1, 3, 2])  # robust, the default
    series, s = tracker.group_series(), tracker.series
    # g0: c is a 1x1 conv 16 -> 12: its input unfolding (16 x 12) has rank <= 12/16: left out
    want0 = (s("a", "out_rank") + s("b", "in_rank") + s("f", "in_rank")) / 3
    np.testing.assert_allclose(series[0], want0)
    # g3: the linear head's input unfolding (20 x 10) is capped at 10/20: only out(d) is left
    np.testing.assert_allclose(series[3], s("d", "out_rank"))
    excluded = tracker.excluded_terms()
    assert excluded[0] == ["c:in"] and excluded[3] == ["e:in"] and excluded[1] == []
    # a term at rank 0 in every epoch of the trial is left out too, unless it is the only one
    with torch.no_grad():
        model.f.weight.zero_()
    zero = RankTracker(model, net_graph())
    for _ in range(2):
        zero.update()
    assert "f:in" in zero.excluded_terms()[0]
    assert zero.excluded_terms()[5] == []  # out(f) is g5's only term: kept
    reference = train_epochs(Net(), [1, 3, 2], aggregation="reference")
    assert reference.excluded_terms()[0] == ["c:in"]  # what robust would leave out
    with pytest.raises(MetricsError, match="aggregation"):
        RankTracker(model, net_graph(), aggregation="mean")


def test_tracker_group_queries_need_a_matching_graph():
    model = Net()
    tracker = RankTracker(model)
    with pytest.raises(MetricsError, match="update"):
        tracker.layer_slopes()
    tracker.update()
    with pytest.raises(MetricsError, match="no channel graph"):
        tracker.group_slopes()
    wrong = ChannelGraph(
        groups=(ChannelGroup(0, 4), ChannelGroup(1, 4)),
        layers=(LayerInfo("missing", "conv", (0,), (1,)),),
    )
    with pytest.raises(MetricsError, match="'missing'"):
        tracker.group_slopes(wrong)
    assert set(tracker.group_slopes(net_graph())) == set(range(9))


def test_tracker_round_trips_through_json_and_resets():
    model = Net()
    tracker = train_epochs(model, [1, 2, 3])
    data = json.loads(json.dumps(tracker.to_dict()))
    again = RankTracker.from_dict(data, model, net_graph())
    assert again.epochs == 3 and again.paths == tracker.paths
    for path in tracker.paths:
        np.testing.assert_array_equal(again.series(path), tracker.series(path))
    np.testing.assert_array_equal(
        list(again.group_slopes().values()), list(tracker.group_slopes().values())
    )
    again.update()
    assert again.epochs == 4
    bad = dict(data, epochs=5)
    with pytest.raises(MetricsError, match="epochs=5"):
        RankTracker.from_dict(bad, model)
    with pytest.raises(MetricsError, match="version"):
        RankTracker.from_dict(dict(data, version=9), model)
    tracker.reset()
    assert tracker.epochs == 0 and tracker.paths == ()
    smaller = nn.Sequential(nn.Conv2d(3, 4, 3))
    tracker.reset(smaller)
    tracker.update()
    assert tracker.paths == ("0",)


def test_tracker_refuses_a_changed_model_within_a_trial():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    tracker = RankTracker(model)
    tracker.update()
    model.append(nn.Conv2d(4, 4, 3))
    with pytest.raises(MetricsError, match="reset"):
        tracker.update()


def test_reference_tracker_repeats_the_previous_value_on_failure():
    # conet.md §1.4: a failed EVBMF takes the previous epoch's value of the same layer, 0 at the
    # first epoch. A 1x1 conv with in > out has a tall input unfolding (64 x 16): planted
    # structure passes the reference's bounds check, default-initialised weights do not.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 16, 1))
    fresh = model[0].weight.detach().clone()
    tracker = RankTracker(model, reference=True)
    first = tracker.update()[0]
    assert first.in_failed and first.in_rank == 0  # epoch 0: 0
    _plant(model[0].weight, 0, 1, 4, seed=3)
    second = tracker.update()[0]
    assert not second.in_failed and second.in_rank > 0
    with torch.no_grad():
        model[0].weight.copy_(fresh)
    third = tracker.update()[0]
    assert third.in_failed
    assert (third.in_rank, third.in_condition, third.in_gain) == (
        second.in_rank,
        second.in_condition,
        second.in_gain,
    )
    np.testing.assert_array_equal(
        tracker.series("0", "in_rank"), [0.0, second.in_rank, second.in_rank]
    )
    assert tracker.layer_slopes()["0"] == pytest.approx(
        (tracker.series("0")[1] - tracker.series("0")[0]) / 1.0001
    )
