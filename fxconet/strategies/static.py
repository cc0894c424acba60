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
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fxconet.ir import ChannelGraph
from fxconet.metrics import LayerMetrics, layer_metrics
from fxconet.passes.resize_layers import predict_params
from fxconet.strategies import SearchContext, SearchOutcome

__all__ = [
    "group_output_ranks",
    "round_width",
    "run",
    "run_uniform",
    "static_widths",
    "uniform_for_params",
    "uniform_widths",
]


def round_width(x: float, step: int, *, low: int = 1, high: int | None = None) -> int:
    """Nearest multiple of ``step`` to ``x`` (half to even), clamped to ``[low, high]`` and at
    least ``step``."""
    w = int(round(x / step)) * step
    lo = max(step, int(math.ceil(low / step)) * step)
    w = max(w, lo)
    if high is not None:
        w = min(w, max(lo, (high // step) * step))
    return w


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
    widths = {}
    for g in graph.free:
        o = ranks.get(g.id, float("nan"))
        if math.isnan(o):
            widths[g.id] = g.size
            continue
        widths[g.id] = round_width(g.size * (o + (1.0 - scale) * (1.0 - o)), g.divisor)
    return widths


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


def run(ctx: SearchContext) -> SearchOutcome:
    """``method="static"`` for :func:`fxconet.optimize_channels`: Eq. 4 with ``scale`` (0.5)
    from the model's own ranks, or, with ``baseline_epochs`` and data, from each layer's maximum
    output rank over a baseline training from scratch (the paper's procedure)."""
    from fxconet.api import resize
    from fxconet.metrics import RankTracker
    from fxconet.train import run_training

    scale = float(ctx.options.get("scale", 0.5))
    reference = bool(ctx.options.get("reference_metrics", False))
    epochs = int(ctx.options.get("baseline_epochs", 0))
    config = {"scale": scale, "baseline_epochs": epochs, "reference_metrics": reference}
    if epochs <= 0:
        widths = static_widths(ctx.graph, ctx.model, scale=scale, reference=reference)
        return SearchOutcome(widths=widths, config=config)
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
    widths = static_widths(ctx.graph, scale=scale, ranks=ranks)
    history = [
        {"baseline_max_out_rank": max_out, "group_ranks": {str(k): v for k, v in ranks.items()}}
    ]
    return SearchOutcome(widths=widths, history=history, config=config)


def run_uniform(ctx: SearchContext) -> SearchOutcome:
    """``method="uniform"``: every free width times ``phi`` (0.5), or the ``phi`` giving
    ``target_params`` parameters."""
    if ctx.options.get("target_params") is not None:
        phi, widths = uniform_for_params(ctx.graph, int(ctx.options["target_params"]))
    else:
        phi = float(ctx.options.get("phi", 0.5))
        widths = uniform_widths(ctx.graph, phi)
    return SearchOutcome(widths=widths, config={"phi": phi})
