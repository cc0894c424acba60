"""Greedy slimming of a trained network onto a budget, scored by validation loss.

Start from the model's own widths and weights. At every step, each free channel group that can
still shrink is a *candidate*: the network with that group ``step`` narrower (a fraction of its
starting width, at least one divisor), built by :func:`fxconet.resize` with inherited weights
(each layer keeps its channels of largest L2 norm), its BatchNorm statistics re-estimated on a
few training batches (:func:`fxconet.train.recalibrate_norms`), and scored by its mean
cross-entropy on held-out batches. The candidate that adds the least loss per MAC (or parameter)
saved is taken, and the search repeats until the widths meet every target of the budget.

This is the greedy width search of AutoSlim (Yu and Huang, 2019) without its slimmable
training, scored on the trained network itself after BatchNorm recalibration (adaptive BN, as
EagleEye, Li et al. 2020, measured it to rank pruned candidates far better than inherited
statistics do). Neither CONet nor APS paper describes it: it is fxconet's answer to "this
trained network, at that budget", and ``benchmarks/search.py`` measures it against the papers'
methods and the baselines.

Cost: one candidate costs a resize and a forward pass over ``calib_batches + eval_batches``
batches. With ``lazy=True`` (the default) the search re-scores only the best candidates of the
previous step until the best one is fresh (lazy greedy): a group's loss increase changes little
when another group shrinks, so a step needs a few evaluations instead of one per group;
``lazy=False`` re-scores every candidate at every step. Under torchrun the candidates of a step
are split over the ranks (:func:`fxconet.distributed.map_shards`); the lazy search then
re-scores the N best stale candidates at once.

Each step is checkpointed in ``out`` (one ``trial_NNN.json``), so a killed search resumes.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxconet import distributed
from fxconet.api import resize
from fxconet.cost import Budget, CostModel
from fxconet.data import as_loader
from fxconet.errors import SearchError, first_line
from fxconet.ir import ChannelGraph, round_width
from fxconet.passes.module_copy import evaluating
from fxconet.strategies import SearchContext, SearchOutcome
from fxconet.strategies.loop import Checkpoints, Progress, restoring, search_signature
from fxconet.train import TrainConfig, recalibrate_norms, select_device

__all__ = ["GreedyConfig", "candidate_loss", "greedy_search", "run"]


@dataclass(frozen=True)
class GreedyConfig:
    """Settings of the greedy slimming (``method="greedy"``; it needs a budget and data).

    Attributes:
        step: a move shrinks one group by this fraction of its starting width (rounded to its
            divisor, at least one divisor), in (0, 1).
        min_fraction: no group shrinks below this fraction of its starting width (at least
            one divisor), in (0, 1]. The default 0.25 keeps a residual stream from becoming a
            bottleneck of one or two channels, which the held-out loss before fine-tuning does
            not see: with 1/16, 3 of 5 seeds of ``benchmarks/search.py`` at 10% of the MACs
            ended 1.4-2.1 pp below uniform scaling (an earlier run, noted in
            ``benchmarks/results/search_greedy.md``).
        calib_batches: training batches that re-estimate each candidate's BatchNorm statistics
            (0 keeps the inherited statistics).
        eval_batches: held-out batches that score each candidate (>= 1; the validation split,
            or training batches after the calibration ones when there is none).
        score_batch_size: batch size of those batches.
        lazy: re-score only the best candidates of the previous step until the best one is
            fresh (lazy greedy); False re-scores every candidate at every step.
        fallback: what to do when the moves cannot be scored: the model's held-out loss is
            about that of guessing (an untrained model), the data has no targets, or the loss
            cannot be computed on them. ``"none"``: an untrained model is searched anyway with
            a warning, the others raise. ``"uniform"``: no move is made, so the budget scales
            every group by one factor (uniform scaling), with a note in the report (what
            ``optimize_channels`` does when it chose greedy itself).
        seed: seeds which batches are drawn.
    """

    step: float = 0.125
    min_fraction: float = 0.25
    calib_batches: int = 2
    eval_batches: int = 4
    score_batch_size: int = 256
    lazy: bool = True
    fallback: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.step < 1:
            raise ValueError(f"GreedyConfig.step={self.step!r}: must be in (0, 1)")
        if not 0 < self.min_fraction <= 1:
            raise ValueError(f"GreedyConfig.min_fraction={self.min_fraction!r}: must be in (0, 1]")
        if self.calib_batches < 0:
            raise ValueError(f"GreedyConfig.calib_batches={self.calib_batches!r}: must be >= 0")
        if self.eval_batches < 1:
            raise ValueError(f"GreedyConfig.eval_batches={self.eval_batches!r}: must be >= 1")
        if self.fallback not in ("none", "uniform"):
            raise ValueError(f"GreedyConfig.fallback={self.fallback!r}: choose 'none' or 'uniform'")
        if self.score_batch_size < 1:
            raise ValueError(
                f"GreedyConfig.score_batch_size={self.score_batch_size!r}: must be >= 1"
            )


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def candidate_loss(
    graph: ChannelGraph,
    widths: Mapping[int, int],
    calib: Batches,
    batches: Batches,
    device: torch.device | None = None,
) -> float:
    """Mean cross-entropy over ``batches`` of the analysed model resized to ``widths``
    (inherited weights), after its BatchNorm statistics are re-estimated on ``calib``.

    Example:
        >>> candidate_loss(graph, {1: 8}, calib=[(x, y)], batches=[(x, y)])
        0.41...
    """
    net = resize(graph, widths, init="inherit")
    if device is not None:
        net.to(device)
    if calib:
        recalibrate_norms(net, calib)
    total, seen = 0.0, 0
    with evaluating(net), torch.no_grad():
        for x, y in batches:
            total += float(F.cross_entropy(net(x), y, reduction="sum"))
            seen += int(y.shape[0])
    return total / max(seen, 1)


def _draw(data: Any, count: int, skip: int, config: GreedyConfig, device: torch.device) -> Batches:
    """``count`` batches of ``data`` after the first ``skip`` (a seeded shuffle)."""
    if count == 0:
        return []
    loader = as_loader(data, batch_size=config.score_batch_size, shuffle=True, seed=config.seed)
    out: Batches = []
    for i, batch in enumerate(loader):
        if i < skip:
            continue
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise SearchError("method='greedy' needs (input, target) batches to score candidates")
        out.append((batch[0].to(device), batch[1].to(device)))
        if len(out) == count:
            break
    if not out:
        raise SearchError(
            f"method='greedy': the data has fewer than {skip + 1} batches of "
            f"{config.score_batch_size}"
        )
    return out


def _weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameter and buffer values (the search depends on them)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                h.update(
                    f"{name}:{float(t.double().sum()):.10e}:{float(t.abs().sum()):.10e}".encode()
                )
    return h.hexdigest()[:16]


class _Search:
    """The state of one greedy search (widths, cached loss increases, steps taken)."""

    def __init__(self, graph: ChannelGraph, cost: CostModel, budget: Budget, config: GreedyConfig):
        self.graph, self.cost, self.config = graph, cost, config
        self.targets = budget.targets(cost)
        self.before = {"macs": cost.macs_before, "params": cost.params_before}
        self.step_of = {
            g.id: max(g.divisor, round_width(config.step * g.size, g.divisor)) for g in graph.free
        }
        self.floor = {
            g.id: max(g.divisor, round_width(config.min_fraction * g.size, g.divisor))
            for g in graph.free
        }
        self.widths = {g.id: g.size for g in graph.free}
        self.divisor = {g.id: g.divisor for g in graph.free}
        self.tolerance = budget.tolerance
        self.cache: dict[int, tuple[float, int]] = {}  # group -> (loss increase, version)
        self.version = 0
        self.loss = math.nan
        self.evaluations = 0

    def costs(self, widths: Mapping[int, int]) -> dict[str, int]:
        params, macs = self.cost.evaluate(widths, check=False)
        return {"macs": macs, "params": params}

    def excess(self) -> tuple[str, float]:
        """The binding target and its ``cost / target - 1`` (<= 0: every target met)."""
        c = self.costs(self.widths)
        key = max(self.targets, key=lambda k: c[k] / self.targets[k])
        return key, c[key] / self.targets[key] - 1.0

    def excess_of(self, widths: Mapping[int, int]) -> float:
        """The largest ``cost / target - 1`` of ``widths`` over the targets."""
        c = self.costs(widths)
        return max(c[k] / t - 1.0 for k, t in self.targets.items())

    def candidate(self, gid: int) -> dict[int, int] | None:
        width = max(self.floor[gid], self.widths[gid] - self.step_of[gid])
        if width >= self.widths[gid]:
            return None
        return {**self.widths, gid: width}

    def last_move(self, gid: int, move: dict[int, int]) -> dict[int, int]:
        """``move``, or, when it takes the binding cost below every target by more than the
        tolerance, the widest width of ``gid`` between the move's and the current one that
        meets every target (the budget is met without overshooting)."""
        if self.excess_of(move) >= -self.tolerance:
            return move
        d = self.divisor[gid]
        for width in range(move[gid] + d, self.widths[gid], d)[::-1]:
            trial = {**move, gid: width}
            if self.excess_of(trial) <= 0:
                return trial
        return move

    def saving(self, widths: Mapping[int, int], key: str) -> float:
        """The binding cost a candidate saves, as a fraction of the model's."""
        return (self.costs(self.widths)[key] - self.costs(widths)[key]) / self.before[key]

    def state(self) -> dict[str, Any]:
        return {
            "widths": {str(k): v for k, v in self.widths.items()},
            "cache": {str(k): [d, v] for k, (d, v) in self.cache.items()},
            "version": self.version,
            "loss": self.loss,
            "evaluations": self.evaluations,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.widths = {int(k): int(v) for k, v in state["widths"].items()}
        self.cache = {int(k): (float(d), int(v)) for k, (d, v) in state["cache"].items()}
        self.version = int(state["version"])
        self.loss = float(state["loss"])
        self.evaluations = int(state["evaluations"])


def _no_move(
    graph: ChannelGraph, config: GreedyConfig, log: Any, why: str, start_loss: float | None = None
) -> SearchOutcome:
    """The outcome of ``fallback="uniform"``: the starting widths, which the budget scales
    uniformly, and a note saying why no move was scored."""
    note = (
        f"greedy slimming of {graph.model_name}: {why}, so no move was scored: the budget "
        "scales every group alike (uniform scaling). Pass a trained model and (input, target) "
        "data for the search"
    )
    warnings.warn(note, stacklevel=3)
    if log is not None:
        log(note)
    widths = {g.id: g.size for g in graph.free}
    return SearchOutcome(
        widths=widths,
        extra={"greedy": {"start_loss": start_loss, "fallback": "uniform", "note": note}},
        config=asdict(config),
        allocation={k: float(v) for k, v in widths.items()},
    )


def greedy_search(
    graph: ChannelGraph,
    cost: CostModel,
    budget: Budget,
    config: GreedyConfig,
    *,
    calib: Batches,
    batches: Batches,
    device: torch.device | None = None,
    checkpoints: Checkpoints | None = None,
    progress: bool = True,
    log: Any = None,
) -> SearchOutcome:
    """Shrink the analysed model's groups one step at a time onto ``budget`` (module docstring).

    Args:
        graph: the trained model's channel graph (its weights are inherited).
        cost: the graph's cost model.
        budget: the targets to meet (at least one).
        config: the search's settings.
        calib: BatchNorm calibration batches ``(input, target)``.
        batches: scoring batches ``(input, target)``.
        device: where candidates run (``None``: where the model is).
        checkpoints: where steps are saved and resumed from (``None``: nowhere).
        progress: show a progress bar. log: receives one line per step.

    Returns:
        The widths at the first step that meets every target (``allocation`` the same), one
        history record per step.

    Raises:
        SearchError: the budget names no target.
    """
    if not budget.active:
        raise SearchError(
            "method='greedy' needs a budget: pass target_macs= or target_params= "
            "(--target-macs / --target-params)"
        )
    search = _Search(graph, cost, budget, config)
    history: list[dict[str, Any]] = []
    first = 0
    if checkpoints is not None and checkpoints.resume:
        resumed = checkpoints.load()
        with restoring(checkpoints.out):
            search.restore(resumed.state)
        history, first = list(resumed.records), resumed.next_step

    def score(widths: Mapping[int, int]) -> float:
        search.evaluations += 1
        return candidate_loss(graph, widths, calib, batches, device)

    def rescore(gids: list[int], moves: Mapping[int, dict[int, int]]) -> None:
        """Score the moves of ``gids`` (under torchrun split over the ranks, each scoring its
        share; every rank gets every loss) and cache their loss increases."""
        losses = distributed.map_shards(
            lambda gid: candidate_loss(graph, moves[gid], calib, batches, device),
            gids,
            "greedy's scoring of candidates",
        )
        search.evaluations += len(gids)
        for gid, loss in zip(gids, losses, strict=True):
            search.cache[gid] = (loss - search.loss, search.version)

    if math.isnan(search.loss):
        try:
            search.loss = score(search.widths)
        except Exception as e:
            if config.fallback != "uniform":
                raise
            return _no_move(
                graph,
                config,
                log,
                f"its loss cannot be computed on the data ({first_line(e)[:200]})",
            )
    classes = 1 + max(int(y.max()) for _, y in batches)
    untrained = classes > 1 and search.loss > 0.9 * math.log(classes)
    if untrained and config.fallback == "uniform":
        why = (
            f"its held-out loss {search.loss:.3f} is about that of guessing among {classes} "
            f"classes ({math.log(classes):.3f}) (untrained weights?)"
        )
        return _no_move(graph, config, log, why, start_loss=search.loss)
    if untrained:
        warnings.warn(
            f"greedy slimming of {graph.model_name}: its held-out loss {search.loss:.3f} is about "
            f"that of guessing among {classes} classes ({math.log(classes):.3f}), so the losses "
            "the search compares are noise (untrained weights?); pass a trained model, or use "
            "method='uniform' for an untrained one",
            stacklevel=2,
        )
    start_loss = history[0]["loss_before"] if history else search.loss
    bound = sum(math.ceil((g.size - search.floor[g.id]) / search.step_of[g.id]) for g in graph.free)
    step = first
    with Progress("greedy steps", bound, initial=first, enabled=progress, log=log) as bar:
        while True:
            key, excess = search.excess()
            if excess <= 0:
                break
            moves = {gid: w for gid in search.widths if (w := search.candidate(gid)) is not None}
            if not moves:
                bar.log(
                    f"greedy: every group is at its floor and {key} is still {excess:+.1%} over "
                    "its target; the budget projection scales the rest"
                )
                break

            saved = {gid: search.saving(w, key) for gid, w in moves.items()}

            def ratio(gid: int, saved: dict[int, float] = saved) -> float:
                """Loss increase per unit of binding cost saved (lower is better)."""
                return search.cache[gid][0] / saved[gid] if saved[gid] > 0 else math.inf

            rescore([gid for gid in moves if gid not in search.cache], moves)
            if config.lazy:  # re-score the best until the best is fresh (N at once on N ranks)
                while True:
                    order = sorted(moves, key=ratio)
                    best = order[0]
                    if search.cache[best][1] == search.version:
                        break
                    stale = [g for g in order if search.cache[g][1] != search.version]
                    rescore(stale[: distributed.world_size()], moves)
            else:
                rescore([g for g in moves if search.cache[g][1] != search.version], moves)
                best = min(moves, key=ratio)
            increase = search.cache.pop(best)[0]
            loss_before = search.loss
            last = search.last_move(best, moves[best])
            if last != moves[best]:  # the full step would undershoot: the narrowest fit
                increase = score(last) - loss_before
            search.widths = last
            search.loss = loss_before + increase
            search.version += 1
            c = search.costs(search.widths)
            record = {
                "step": step,
                "group": best,
                "width": search.widths[best],
                "loss_before": loss_before,
                "loss": search.loss,
                "macs": c["macs"],
                "params": c["params"],
                "evaluations": search.evaluations,
            }
            history.append(record)
            bar.log(
                f"greedy step {step}: group {best} -> {search.widths[best]} channels, "
                f"val loss {search.loss:.4f}, MACs {c['macs'] / search.before['macs']:.1%} "
                f"({search.evaluations} evaluations)"
            )
            bar.step()
            key, excess = search.excess()
            if checkpoints is not None:
                checkpoints.save(step, record, state=search.state(), done=excess <= 0)
            step += 1
    widths = dict(search.widths)
    return SearchOutcome(
        widths=widths,
        history=history,
        extra={
            "greedy": {
                "start_loss": start_loss,
                "final_loss": search.loss,
                "evaluations": search.evaluations,
                "steps": len(history),
            }
        },
        config=asdict(config),
        allocation={k: float(v) for k, v in widths.items()},
    )


def run(ctx: SearchContext) -> SearchOutcome:
    """``method="greedy"`` for :func:`fxconet.optimize_channels`."""
    config: GreedyConfig = ctx.config
    budget: Budget = ctx.budget
    if budget is None or not budget.active:
        raise SearchError(
            "method='greedy' needs a budget: pass target_macs= or target_params= "
            "(--target-macs / --target-params)"
        )
    if ctx.train_data is None:
        raise SearchError(
            "method='greedy' scores candidates on data: pass data= (a train_fn alone is not enough)"
        )
    train_config: TrainConfig = ctx.train_config or TrainConfig()
    device = select_device(train_config.device)
    try:
        calib = _draw(ctx.train_data, config.calib_batches, 0, config, device)
        if ctx.val_data is not None:
            batches = _draw(ctx.val_data, config.eval_batches, 0, config, device)
        else:
            batches = _draw(
                ctx.train_data, config.eval_batches, config.calib_batches, config, device
            )
    except SearchError as e:
        if config.fallback != "uniform":
            raise
        return _no_move(
            ctx.graph, config, ctx.log, f"the data cannot score moves ({first_line(e)[:200]})"
        )
    settings = {
        **asdict(config),
        "targets": budget.targets(ctx.cost),
        "weights": _weights_fingerprint(ctx.model),
    }
    checkpoints = Checkpoints(
        ctx.out,
        search_signature(
            ctx.model,
            ctx.graph,
            settings,
            train_config,
            train_data=ctx.train_data,
            val_data=ctx.val_data,
        ),
        resume=ctx.resume,
        overwrite=ctx.overwrite,
    )
    return greedy_search(
        ctx.graph,
        ctx.cost,
        budget,
        config,
        calib=calib,
        batches=batches,
        device=device,
        checkpoints=checkpoints,
        progress=ctx.progress,
        log=ctx.log,
    )
