"""The CONet dynamic channel search (paper Sec. 5, Alg. 2), on any model's channel groups.

Each *trial* trains the model at the current widths for a few epochs while a
:class:`~fxconet.metrics.RankTracker` records the EVBMF ranks after every epoch. Per channel
group (not per layer: widths tied by residual sums, concatenations or depthwise convs move
together) the rank slope ``S`` (Eq. 3) and the mean condition ``kappa`` decide the next width:

* expand (``+1``) when ``S >= delta``; shrink (``-1``) when ``S < delta`` or ``kappa > mu``
  (``S`` measured per trial: the per-epoch slope times the epochs of a trial, so one ``delta``
  fits any trial length; ``slope="epoch"`` compares the paper's per-epoch ``S``);
* ``C_new = C * (1 + op * phi)`` (Eq. 5), rounded and clamped to ``[min_width, max_width]``;
* when a group's action flips direction its ``phi`` halves; once ``phi < gamma`` the group has
  converged (action ``0``) and keeps its width; the search stops early when every group has.

Where this follows the paper's official code rather than the paper, or neither (see
``shared/reference/conet.md`` for the code), each choice is documented:

1. Metrics per channel group are the mean of the producers' output ranks and the consumers'
   input ranks (the code's grouping), not the per-layer ``(R3 + R4) / 2`` of Eq. 3.
2. ``t1`` is the first epoch of the trial and ``t2`` the epoch of the highest rank (code); the
   paper's "rank plateau epoch" is not defined further.
3. ``kappa`` is the last epoch's condition (code); the paper says "average MC".
4. The condition test is ``kappa > mu`` (paper), not ``>=`` (code).
5. A group at ``min_width`` that should shrink expands instead, and a group above ``max_width``
   always shrinks (code: this makes bounded groups oscillate until they converge).
6. ``phi`` halves before it is used on a flip, and the convergence test ``phi < gamma`` comes
   before the halving (code; the paper only says "halve until converged").
7. Widths are rounded to a multiple of ``round_to`` (2 by default, like the code's even
   rounding) and of the group's divisor; the paper's Eq. 5 does not round.
8. The search stops when every group has converged (paper); the code always runs every trial.
9. A decision is taken after every trial, the last one included, so the result is the widths
   Alg. 2 instantiates after the last trial (the code discards the last trial's metrics).
10. Bounds are relative to each group's starting width by default (``0.5x .. 8x``), which is
    the code's absolute 16..256 for its starting width of 32; absolute bounds are accepted.
11. The code builds a fresh model each trial (``reinit=True``, the default here); with
    ``reinit=False`` weights are inherited through :func:`fxconet.resize`.
12. Search data is the training split only; a held-out part of it gives validation accuracy
    for the history (the code logs test accuracy).
13. ``delta`` is a threshold on the slope *per trial* (``S`` times ``epochs_per_trial``), so
    the default 0.15 is the code's 0.0075 for its 20-epoch trials and fits any trial length
    (a rank that rises by ``x`` over a trial has about the same per-trial slope in a 5- or a
    20-epoch trial, while its per-epoch slope grows as the trial shortens).
    ``slope="epoch"`` restores the paper's per-epoch threshold (``delta=0.0075`` reproduces
    its code's default).
14. The trials train with AdaS (:class:`fxconet.train.AdaS`, the paper's search optimiser:
    ``beta`` 0.8, initial rate ``search_lr`` 0.03 as its ResNet configuration, momentum 0.9,
    weight decay 5e-4), restarted every trial as the code does; ``optimizer="sgd"`` trains
    them with the run's own settings (``train_config``) instead.
15. The group's rank leaves out unfoldings that cannot show it (``aggregation="robust"``,
    :class:`~fxconet.metrics.RankTracker`): structurally capped ones (a 1x1 shortcut conv's
    wider side, the classifier's input) and ones at rank 0 in every epoch of the trial. The
    code's ResNet groups leave out the stem and the shortcut convs by hand. Measured on one
    5-epoch AdaS trial of ResNet-20 on Fashion-MNIST (``benchmarks/aggregation.py``), averaging
    them in cut the residual stages' per-trial slopes from 0.208, 0.059 and 0.102 to 0.078,
    0.029 and 0.073 (6, 4 and 2 terms left out), below ``delta`` for stage 1, so those groups
    shrank whatever the other terms said. ``aggregation="reference"`` averages every producer
    and consumer term.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxconet.api import analyze, resize
from fxconet.cost import CostModel
from fxconet.errors import SearchError
from fxconet.ir import ChannelGraph, round_width
from fxconet.metrics import AGGREGATIONS, RankTracker
from fxconet.strategies import SearchContext, SearchOutcome
from fxconet.strategies.loop import Checkpoints, Progress, restoring, search_signature
from fxconet.train import TrainConfig, TrainFn, evaluate, run_training

__all__ = [
    "ConetConfig",
    "GroupState",
    "conet_search",
    "decide",
    "initial_state",
    "run",
]


@dataclass(frozen=True)
class ConetConfig:
    """Hyper-parameters of the CONet search (defaults: the paper's official code, with the
    slope measured per trial; see the module docstring).

    Attributes:
        delta: rank-slope threshold ``delta``, per trial: a group expands while its rank
            rises by at least ``delta`` over a trial (0.15 = the code's per-epoch 0.0075 times
            its 20-epoch trials; the paper's table 0.0025 .. 0.025 per epoch is 0.05 .. 0.5).
            Smaller gives larger models.
        slope: ``"trial"`` (the per-epoch slope times ``epochs_per_trial``) or ``"epoch"``
            (the paper's per-epoch slope; use its per-epoch ``delta`` values then).
        mu: condition threshold ``mu``.
        gamma: a group converges once its factor ``phi`` would drop below ``gamma``.
        phi: starting scale factor ``phi_0`` of Eq. 5.
        trials: maximum number of trials (trainings); a decision follows each.
        epochs_per_trial: epochs of each trial.
        min_width, max_width: bounds per group; a float is a factor of the group's starting
            width, an int an absolute number of channels.
        round_to: widths are multiples of ``round_to`` (and of the group's divisor).
        initial_width: start every free group at this width (the paper starts at 32), or per
            group id; ``None`` keeps the model's widths.
        reinit: re-initialise the model every trial (the code) instead of inheriting weights.
        early_stop: stop when every group has converged.
        reference_metrics: measure ranks exactly like the paper's code (see fxconet.metrics).
        optimizer: ``"adas"`` (the paper's search optimiser, per-layer rates from the knowledge
            gain) or ``"sgd"`` (the run's own training settings) for the trials.
        search_lr: AdaS's initial rate (the code's ResNet configuration: 0.03; DARTS: 0.1).
        aggregation: ``"robust"`` (leave capped and degenerate unfoldings out of a group's
            rank) or ``"reference"`` (every producer and consumer term).
        seed: seeds every trial (trial ``t`` uses ``seed + t``): a resumed search reproduces
            an uninterrupted one.
    """

    delta: float = 0.15
    slope: str = "trial"
    mu: float = 10.0
    gamma: float = 0.01
    phi: float = 0.2
    trials: int = 10
    epochs_per_trial: int = 5
    min_width: float | int = 0.5
    max_width: float | int = 8.0
    round_to: int = 2
    initial_width: int | Mapping[int, int] | None = None
    reinit: bool = True
    early_stop: bool = True
    reference_metrics: bool = False
    optimizer: str = "adas"
    search_lr: float = 0.03
    aggregation: str = "robust"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("slope", self.slope in ("trial", "epoch"), "must be 'trial' or 'epoch'"),
            ("optimizer", self.optimizer in ("adas", "sgd"), "must be 'adas' or 'sgd'"),
            ("search_lr", self.search_lr > 0, "must be > 0"),
            ("aggregation", self.aggregation in AGGREGATIONS, f"one of {AGGREGATIONS}"),
            ("delta", math.isfinite(self.delta) and self.delta > 0, "must be a number > 0"),
            ("mu", self.mu > 0, "must be > 0"),
            ("gamma", 0 < self.gamma < 1, "must be in (0, 1)"),
            ("phi", 0 < self.phi < 1, "must be in (0, 1)"),
            ("trials", self.trials >= 1, "must be >= 1"),
            ("epochs_per_trial", self.epochs_per_trial >= 2, "must be >= 2 (a slope needs 2)"),
            ("min_width", self.min_width > 0, "must be > 0"),
            ("max_width", self.max_width > 0, "must be > 0"),
            ("round_to", self.round_to >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"ConetConfig.{name}={getattr(self, name)!r}: {why}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.initial_width, Mapping):
            d["initial_width"] = {str(k): v for k, v in self.initial_width.items()}
        return d


@dataclass(frozen=True)
class GroupState:
    """Search state of one channel group."""

    width: int
    phi: float
    last_op: int = 0  # +1 expand, -1 shrink, 0 none yet / converged
    converged: bool = False
    low: int = 1
    high: int = 1 << 30
    step: int = 1


def _bound(value: float | int, start: int) -> float:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value * start


def initial_state(graph: ChannelGraph, config: ConetConfig) -> dict[int, GroupState]:
    """Starting widths and factors of every free group."""
    state = {}
    for g in graph.free:
        step = math.lcm(g.divisor, config.round_to)
        if isinstance(config.initial_width, Mapping):
            start = int(config.initial_width.get(g.id, g.size))
        elif config.initial_width is not None:
            start = int(config.initial_width)
        else:
            start = g.size
        start = round_width(start, g.divisor)
        low = step * max(1, math.ceil(_bound(config.min_width, start) / step))
        high = max(low, step * math.floor(_bound(config.max_width, start) / step))
        state[g.id] = GroupState(width=start, phi=config.phi, low=low, high=high, step=step)
    return state


def decide(
    state: Mapping[int, GroupState],
    slopes: Mapping[int, float],
    conditions: Mapping[int, float],
    config: ConetConfig,
) -> tuple[dict[int, GroupState], dict[int, int]]:
    """One decision of Alg. 2 (lines 6-14) for every group: the new states and actions.

    A group without a measured slope (NaN: no conv layer measures it) keeps its state.

    Example:
        >>> state = {0: GroupState(width=32, phi=0.2, low=16, high=256, step=2)}
        >>> decide(state, {0: 0.2}, {0: 1.0}, ConetConfig())[0][0].width   # 0.2 >= delta
        38
    """
    new: dict[int, GroupState] = {}
    actions: dict[int, int] = {}
    for gid, s in state.items():
        slope = slopes.get(gid, float("nan"))
        kappa = conditions.get(gid, float("nan"))
        if s.converged or math.isnan(slope):
            new[gid], actions[gid] = s, 0
            continue
        bad = slope < config.delta or (not math.isnan(kappa) and kappa > config.mu)
        op = -1 if (bad and s.width > s.low) or s.width > s.high else 1
        phi = s.phi
        converged = False
        if s.last_op != 0 and op != s.last_op:  # oscillation: halve the factor
            if phi < config.gamma:
                op, converged = 0, True
            phi = phi / 2
        width = s.width
        if op != 0:
            target = s.width * (1.0 + phi * op)
            width = min(max(round_width(target, s.step), s.low), s.high)
        new[gid] = replace(s, width=width, phi=phi, last_op=op, converged=converged)
        actions[gid] = op
    return new, actions


# ---------------------------------------------------------------------------------------------
# the search loop


def _widths(state: Mapping[int, GroupState]) -> dict[int, int]:
    return {gid: s.width for gid, s in state.items()}


def _state_to_json(state: Mapping[int, GroupState]) -> dict[str, Any]:
    return {str(gid): asdict(s) for gid, s in state.items()}


def _state_from_json(data: Mapping[str, Any]) -> dict[int, GroupState]:
    return {int(gid): GroupState(**s) for gid, s in data.items()}


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def conet_search(
    model: nn.Module,
    graph: ChannelGraph,
    example_inputs: Any,
    config: ConetConfig,
    *,
    train_data: Any = None,
    val_data: Any = None,
    train_config: TrainConfig | None = None,
    train_fn: TrainFn | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SearchOutcome:
    """Run Alg. 2 on ``model`` and return the final widths and the per-trial history.

    Args:
        model: the model to search (never modified).
        graph: its channel graph (``fxconet.analyze(model, example_inputs)``).
        example_inputs: inputs for resizing (shapes only).
        config: the search's hyper-parameters.
        train_data: training data for the built-in loop (the search's only data).
        val_data: held-out part of the training data for the validation accuracy of each trial
            (history only; decisions never use it).
        train_config: the built-in loop's settings (``epochs`` is replaced by
            ``config.epochs_per_trial``, ``seed`` by the trial's seed).
        train_fn: a user training loop instead of the built-in one (see ``fxconet.train``).
        out: folder for one ``trial_NNN.json`` checkpoint per trial (plus ``trial_NNN.pt``
            weights when ``reinit=False``); nothing is written when None.
        resume: continue from the last finished trial in ``out``.
        overwrite: a fresh search may replace an earlier search's checkpoints in ``out``.
        progress: progress bars.
        log: receives one line per trial.

    Raises:
        SearchError: ``resume`` without checkpoints, or checkpoints from another model/config.
    """
    if train_data is None and train_fn is None:
        raise SearchError("the CONet search needs training data (data=...) or a train_fn")
    started = time.perf_counter()
    train_config = train_config or TrainConfig()
    checkpoints = Checkpoints(
        Path(out) if out is not None else None,
        search_signature(
            model,
            graph,
            config.to_dict(),
            train_config,
            train_data=train_data,
            val_data=val_data,
            train_fn=train_fn,
        ),
        resume=resume,
        overwrite=overwrite,
    )
    cost = CostModel(graph)
    state = initial_state(graph, config)
    history: list[dict[str, Any]] = []
    first = 0
    trained: nn.Module | None = None
    if checkpoints.resume:
        found = checkpoints.load()
        with restoring(checkpoints.out):
            state = _state_from_json(found.state)
            history = found.records
            first = found.next_step
            if not config.reinit:
                last_widths = {int(k): v for k, v in found.records[-1]["widths"].items()}
                trained = resize(graph, last_widths, init="reset")
                trained.load_state_dict(checkpoints.load_tensors(first - 1))
        if found.done:
            first = config.trials
    bar = Progress("CONet trials", config.trials, initial=first, enabled=progress, log=log)
    for trial in range(first, config.trials):
        widths = _widths(state)
        trial_model = _trial_model(model, graph, example_inputs, widths, trained, config, trial)
        tracker = RankTracker(
            trial_model,
            graph,
            reference=config.reference_metrics,
            aggregation=config.aggregation,
        )

        def on_epoch_end(epoch: int, m: nn.Module, tracker: RankTracker = tracker) -> None:
            tracker.update()

        cfg = replace(train_config, seed=config.seed + trial)
        if config.optimizer == "adas":
            cfg = replace(cfg, schedule="adas", lr=config.search_lr)
        t0 = time.perf_counter()
        train_history = run_training(
            trial_model,
            epochs=config.epochs_per_trial,
            on_epoch_end=on_epoch_end,
            data=train_data,
            config=cfg,
            train_fn=train_fn,
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        if tracker.epochs < 2:
            raise SearchError(
                f"trial {trial}: the training loop reported {tracker.epochs} epoch(s); a rank "
                "slope needs on_epoch_end(epoch, model) after every epoch (at least 2)"
            )
        slopes = tracker.group_slopes(graph)
        if config.slope == "trial":  # the rank's rise over a trial of this length
            slopes = {g: v * config.epochs_per_trial for g, v in slopes.items()}
        conditions = tracker.group_conditions(graph)
        val = evaluate(trial_model, val_data) if val_data is not None else None
        new_state, actions = decide(state, slopes, conditions, config)
        record = {
            "trial": trial,
            "widths": {str(k): v for k, v in widths.items()},
            "params": cost.params(widths),
            "train_loss": _last(train_history, "train_loss"),
            "train_accuracy": _last(train_history, "train_accuracy"),
            "val_accuracy": None if val is None else val.accuracy,
            "seconds": seconds,
            "slopes": {str(k): _finite(v) for k, v in slopes.items() if k in state},
            "slope_unit": config.slope,
            "excluded_terms": {
                str(k): v for k, v in tracker.excluded_terms(graph).items() if k in state and v
            },
            "conditions": {str(k): _finite(v) for k, v in conditions.items() if k in state},
            "group_ranks": {
                str(k): [_finite(x) for x in v]
                for k, v in tracker.group_series(graph).items()
                if k in state
            },
            "actions": {str(k): v for k, v in actions.items()},
            "phi": {str(k): s.phi for k, s in new_state.items()},
            "next_widths": {str(k): s.width for k, s in new_state.items()},
            "layer_ranks": {p: [float(x) for x in tracker.series(p)] for p in tracker.paths},
        }
        history.append(record)
        state = new_state
        done = config.early_stop and all(s.converged for s in state.values())
        checkpoints.save(
            trial,
            record,
            state=_state_to_json(state),
            tensors=None if config.reinit else trial_model.state_dict(),
            done=done,
        )
        acc = "" if val is None else f", val acc {val.accuracy:.3f}"
        moved = sum(1 for a in actions.values() if a != 0)
        bar.log(
            f"trial {trial}: {record['params']:,} params{acc}, "
            f"{moved}/{len(actions)} groups moved, {seconds:.1f}s"
        )
        trained = trial_model if not config.reinit else None
        bar.step()
        if done:
            break
    bar.close()
    return SearchOutcome(
        widths=_widths(state),
        history=history,
        extra={
            "trials_run": len(history),
            "converged": all(s.converged for s in state.values()),
            "search_seconds": time.perf_counter() - started,
        },
        config=config.to_dict(),
    )


def run(ctx: SearchContext) -> SearchOutcome:
    """``method="conet"`` for :func:`fxconet.optimize_channels`."""
    return conet_search(
        ctx.model,
        ctx.graph,
        ctx.example_inputs,
        ctx.config,
        train_data=ctx.train_data,
        val_data=ctx.val_data,
        train_config=ctx.train_config,
        train_fn=ctx.train_fn,
        out=ctx.out,
        resume=ctx.resume,
        overwrite=ctx.overwrite,
        progress=ctx.progress,
        log=ctx.log,
    )


def _last(history: Any, name: str) -> float | None:
    values = getattr(history, name, None)
    return float(values[-1]) if values else None


def _trial_model(
    model: nn.Module,
    graph: ChannelGraph,
    example_inputs: Any,
    widths: dict[int, int],
    trained: nn.Module | None,
    config: ConetConfig,
    trial: int,
) -> nn.Module:
    """The model trained in ``trial``: fresh (``reinit``) or inherited from the last trial."""
    torch.manual_seed(config.seed + trial)
    if trained is None:
        init = "reset" if config.reinit or trial > 0 else "inherit"
        return resize(graph, widths, init=init)
    previous = analyze(trained, example_inputs)
    if [(g.id, g.divisor) for g in previous.groups] != [(g.id, g.divisor) for g in graph.groups]:
        raise SearchError("the trained trial model's channel groups differ from the original's")
    return resize(previous, widths)
