"""One-shot width choices: the paper's static scaling (CONet Sec. 3, Eq. 4) and uniform scaling.

* :func:`static_widths`: ``C_f = C_i * (O + (1 - S) * (1 - O))`` per channel group, where ``O`` is
  the output rank of a trained model's layers averaged over the group (the paper averages the
  ranks of layers sharing an output width, e.g. a ResNet stage) and ``S`` in ``[0, 1]`` is the
  scaling factor (0 keeps the widths, 1 shrinks every group to its rank).
* :func:`uniform_widths`: the compound-scaling baseline the paper compares against: every free
  group times ``phi``. :func:`uniform_for_params` finds the ``phi`` whose model has a given number
  of parameters (to compare methods at equal size).

Widths are rounded to the nearest multiple of each group's divisor (at least one divisor).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxconet.api import resize
from fxconet.cost import predict_params
from fxconet.ir import ChannelGraph, round_width
from fxconet.metrics import LayerMetrics, RankTracker, layer_metrics
from fxconet.strategies import SearchContext, SearchOutcome
from fxconet.train import run_training

__all__ = [
    "RandomConfig",
    "StaticConfig",
    "UniformConfig",
    "random_allocation",
    "group_output_ranks",
    "run",
    "run_uniform",
    "static_widths",
    "uniform_for_params",
    "uniform_widths",
]


def group_output_ranks(
    graph: ChannelGraph, metrics: list[LayerMetrics] | Mapping[str, float]
) -> dict[int, float]:
    """Mean output rank of each group's producers (NaN for groups without a measured producer).

    ``metrics`` is :func:`fxconet.metrics.layer_metrics` output, or a mapping from layer path to
    an output rank (e.g. the maximum over training epochs).
    """
    if isinstance(metrics, Mapping):
        ranks = dict(metrics)
    else:
        ranks = {m.path: m.out_rank for m in metrics if not m.depthwise}
    out: dict[int, float] = {}
    for g in graph.groups:
        values = [ranks[p] for p in g.producers if p in ranks]
        out[g.id] = float(np.mean(values)) if values else float("nan")
    return out


def static_widths(
    graph: ChannelGraph,
    model: nn.Module | None = None,
    *,
    scale: float,
    ranks: Mapping[int, float] | None = None,
    reference: bool = False,
) -> dict[int, int]:
    """Paper Eq. 4 for every free group.

    Args:
        graph: the model's channel graph.
        model: a trained model whose weights give the ranks (not needed with ``ranks``).
        scale: ``S`` in ``[0, 1]``.
        ranks: output rank ``O`` per group id (default: measured on ``model``).
        reference: measure ranks with the reference EVBMF.

    Returns:
        New width per free group; a group without a measured rank keeps its width.

    Example:
        >>> widths = static_widths(graph, trained_model, scale=0.6)
    """
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"scale={scale!r}: must be in [0, 1]")
    if ranks is None:
        if model is None:
            raise ValueError("static_widths needs a trained model or ranks")
        ranks = group_output_ranks(graph, layer_metrics(model, reference=reference))
    divisors = {g.id: g.divisor for g in graph.free}
    return {gid: round_width(a, divisors[gid]) for gid, a in _eq4(graph, scale, ranks).items()}


def _eq4(graph: ChannelGraph, scale: float, ranks: Mapping[int, float]) -> dict[int, float]:
    """Eq. 4 before rounding, per free group (a group without a measured rank keeps its
    width)."""
    out = {}
    for g in graph.free:
        o = ranks.get(g.id, float("nan"))
        out[g.id] = float(g.size) if math.isnan(o) else g.size * (o + (1.0 - scale) * (1.0 - o))
    return out


def uniform_widths(graph: ChannelGraph, phi: float) -> dict[int, int]:
    """Every free group times ``phi`` (compound scaling of the widths only).

    Example:
        >>> uniform_widths(graph, 0.5)   # half of every free width
    """
    if phi <= 0:
        raise ValueError(f"phi={phi!r}: must be > 0")
    return {g.id: round_width(g.size * phi, g.divisor) for g in graph.free}


def uniform_for_params(
    graph: ChannelGraph, target_params: int, *, low: float = 1e-3, high: float = 64.0
) -> tuple[float, dict[int, int]]:
    """The ``phi`` (and widths) whose uniformly scaled model has about ``target_params``
    parameters (bisection on ``phi``; parameter counts come from the IR, no model is built).

    Example:
        >>> phi, widths = uniform_for_params(graph, 100_000)
    """
    if target_params <= 0:
        raise ValueError(f"target_params={target_params!r}: must be > 0")
    best = (math.inf, 1.0, uniform_widths(graph, 1.0))
    lo, hi = math.log(low), math.log(high)
    for _ in range(60):
        mid = (lo + hi) / 2
        widths = uniform_widths(graph, math.exp(mid))
        params = predict_params(graph, widths)
        gap = abs(params - target_params)
        if gap < best[0]:
            best = (gap, math.exp(mid), widths)
        if params < target_params:
            lo = mid
        elif params > target_params:
            hi = mid
        else:
            break
    return best[1], best[2]


@dataclass(frozen=True)
class StaticConfig:
    """Settings of static scaling (CONet Sec. 3, Eq. 4).

    Attributes:
        scale: ``S`` of Eq. 4 in [0, 1]: 0 keeps the widths, 1 shrinks every group to its
            output rank.
        baseline_epochs: with data, first train the model from scratch this many epochs and
            use each layer's maximum output rank over that training (the paper's procedure);
            0 uses the model's own (trained) weights.
        reference_metrics: measure ranks exactly as the paper's code does.
    """

    scale: float = 0.5
    baseline_epochs: int = 0
    reference_metrics: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale <= 1.0:
            raise ValueError(f"StaticConfig.scale={self.scale!r}: must be in [0, 1]")
        if self.baseline_epochs < 0:
            raise ValueError(f"StaticConfig.baseline_epochs={self.baseline_epochs!r}: must be >= 0")


@dataclass(frozen=True)
class UniformConfig:
    """Settings of uniform (compound) scaling.

    Attributes:
        phi: every free width times ``phi`` (> 0); with a budget (``target_macs=``,
            ``target_params=``) the factor that meets it instead.
    """

    phi: float = 0.5

    def __post_init__(self) -> None:
        if not self.phi > 0:
            raise ValueError(f"UniformConfig.phi={self.phi!r}: must be > 0")


@dataclass(frozen=True)
class RandomConfig:
    """Settings of the random allocation (the sanity check every search should beat).

    Attributes:
        low, high: every free group's width times a factor drawn log-uniformly from
            ``[low, high]`` (seeded by the run's seed); with a budget, the allocation is then
            projected onto it like any method's.
        seed: seeds the draw.
    """

    low: float = 0.25
    high: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(
                f"RandomConfig.low={self.low!r}: need 0 < low <= high (high={self.high!r})"
            )


def run(ctx: SearchContext) -> SearchOutcome:
    """``method="static"`` for :func:`fxconet.optimize_channels`: Eq. 4 with ``scale`` from the
    model's own ranks, or, with ``baseline_epochs`` and data, from each layer's maximum output
    rank over a baseline training from scratch (the paper's procedure)."""
    cfg: StaticConfig = ctx.config
    scale, reference, epochs = cfg.scale, cfg.reference_metrics, cfg.baseline_epochs
    config = asdict(cfg)
    if epochs <= 0:
        ranks = group_output_ranks(ctx.graph, layer_metrics(ctx.model, reference=reference))
        measured = [r for r in ranks.values() if not math.isnan(r)]
        if measured and max(measured) == 0.0:
            warnings.warn(
                f"static scaling of {ctx.graph.model_name}: every layer's rank is 0 (untrained "
                "weights?), so Eq. 4 scales every group alike (uniform scaling by 1 - S); pass "
                "a trained model, or baseline_epochs= (--baseline-epochs) with data",
                stacklevel=2,
            )
        return _static_outcome(ctx.graph, scale, ranks, [], config)
    if ctx.train_data is None and ctx.train_fn is None:
        raise ValueError("baseline_epochs > 0 needs data= (or a train_fn) to train the baseline")
    torch.manual_seed(ctx.seed)
    baseline = resize(ctx.graph, {}, init="reset")
    tracker = RankTracker(baseline, ctx.graph, reference=reference)
    run_training(
        baseline,
        epochs=epochs,
        on_epoch_end=lambda epoch, m: None if tracker.update() else None,
        data=ctx.train_data,
        config=ctx.train_config,
        train_fn=ctx.train_fn,
        progress=ctx.progress,
    )
    max_out = {p: float(max(tracker.series(p, "out_rank"))) for p in tracker.paths}
    ranks = group_output_ranks(ctx.graph, max_out)
    history = [
        {"baseline_max_out_rank": max_out, "group_ranks": {str(k): v for k, v in ranks.items()}}
    ]
    return _static_outcome(ctx.graph, scale, ranks, history, config)


def _static_outcome(
    graph: ChannelGraph,
    scale: float,
    ranks: Mapping[int, float],
    history: list[dict[str, Any]],
    config: dict[str, Any],
) -> SearchOutcome:
    allocation = _eq4(graph, scale, ranks)
    return SearchOutcome(
        widths=static_widths(graph, scale=scale, ranks=ranks),
        history=history,
        config=config,
        allocation=allocation,
    )


def run_uniform(ctx: SearchContext) -> SearchOutcome:
    """``method="uniform"``: every free width times ``phi`` (with a budget, the allocation is
    every group's own width, and the budget's factor replaces ``phi``)."""
    cfg: UniformConfig = ctx.config
    phi = float(cfg.phi)
    return SearchOutcome(
        widths=uniform_widths(ctx.graph, phi),
        config={"phi": phi},
        allocation={g.id: float(g.size) for g in ctx.graph.free},
    )


def random_allocation(graph: ChannelGraph, config: RandomConfig) -> dict[int, float]:
    """Every free group's width times a log-uniform factor in ``[low, high]``.

    Example:
        >>> random_allocation(graph, RandomConfig(seed=3))[1]   # between 0.25x and 1x
        11.2...
    """
    rng = np.random.default_rng(config.seed)
    lo, hi = math.log(config.low), math.log(config.high)
    return {g.id: g.size * math.exp(rng.uniform(lo, hi)) for g in graph.free}


def run_random(ctx: SearchContext) -> SearchOutcome:
    """``method="random"``: a random factor per group (see :class:`RandomConfig`)."""
    cfg: RandomConfig = ctx.config
    allocation = random_allocation(ctx.graph, cfg)
    widths = {g.id: round_width(allocation[g.id], g.divisor) for g in ctx.graph.free}
    return SearchOutcome(widths=widths, config=asdict(cfg), allocation=allocation)
