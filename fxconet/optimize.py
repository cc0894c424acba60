"""``optimize_channels``: search new widths for a model, resize it, train it, report it.

One function for every method of :data:`fxconet.strategies.METHODS`. It prepares the data (the
search sees the training split only; a held-out part gives per-trial validation), analyses the
model, runs the method, resizes to the widths found, trains the result when asked (the test
split is touched only after that), and writes ``report.json`` and plots.

The accepted options are derived, not listed by hand: the common ones below, the built-in
training loop's :class:`~fxconet.train.TrainConfig` fields, and the fields of the method's
config dataclass (:func:`accepted_options`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxconet import data as data_mod
from fxconet import distributed
from fxconet import train as train_mod
from fxconet.api import analyze, resize
from fxconet.cost import Budget, CostModel, Projection, count_params, fit_budget
from fxconet.errors import SearchError
from fxconet.ir import ChannelGraph
from fxconet.passes.composite import composite_of
from fxconet.passes.nodes import META_KEY
from fxconet.report import before_after_table, write_report
from fxconet.strategies import SearchContext, SearchOutcome, get_method
from fxconet.strategies.loop import logger

__all__ = [
    "COMMON_OPTIONS",
    "LOOP_OPTIONS",
    "OptimizeResult",
    "accepted_options",
    "default_method",
    "optimize_channels",
]

#: options of every method, besides :data:`LOOP_OPTIONS`
COMMON_OPTIONS = frozenset(
    {
        "out", "resume", "seed", "progress", "epochs", "init", "train_config", "train_fn",
        "test_data", "val_fraction", "leaf_modules", "concrete_args", "freeze", "opaque", "hooks",
        "data_dir", "augment", "log", "target_macs", "target_params", "budget_tolerance",
        "overwrite", "baseline",
    }
)  # fmt: skip
#: the built-in loop's settings given as options: every :class:`~fxconet.train.TrainConfig`
#: field but ``epochs`` (the method decides) and ``seed`` (the common one)
LOOP_OPTIONS = frozenset(f.name for f in dataclasses.fields(train_mod.TrainConfig)) - {
    "epochs",
    "seed",
}


def default_method(has_data: bool, has_budget: bool) -> str:
    """The method ``optimize_channels`` runs when none is named.

    With a budget and data: ``"greedy"`` (greedy slimming of the trained model, scored on
    held-out data), run so that an untrained model, or data that cannot score the moves (no
    targets), gets uniform scaling instead (``fallback="uniform"``). Measured in
    ``benchmarks/search.py`` (ResNet-20 on Fashion-MNIST pruned from a trained network, then
    fine-tuned; 5 paired seeds): on widths nobody tuned (32 in every stage) greedy beat uniform
    scaling and Torch-Pruning's magnitude pruning by more than twice the standard error at 25%
    and 10% of the MACs; on the hand-tuned 16/32/64 widths it tied with them (within 1.1
    standard errors); no other method did better anywhere. With a
    budget and no data: ``"uniform"``. Without a budget the method decides the size: CONet's
    search with data (the paper), else static scaling from the model's trained weights.

    Example:
        >>> default_method(has_data=True, has_budget=True)
        'greedy'
    """
    if has_budget:
        return "greedy" if has_data else "uniform"
    return "conet" if has_data else "static"


def default_method_options(method: str) -> dict[str, Any]:
    """Options a method gets when :func:`default_method` chose it (the user's own win): the
    default greedy falls back to uniform scaling where it cannot score moves.

    Example:
        >>> default_method_options("greedy")
        {'fallback': 'uniform'}
    """
    return {"fallback": "uniform"} if method == "greedy" else {}


def accepted_options(method: str) -> frozenset[str]:
    """Every option name :func:`optimize_channels` accepts for ``method``.

    Example:
        >>> "delta" in accepted_options("conet"), "delta" in accepted_options("aps")
        (True, False)
    """
    return COMMON_OPTIONS | LOOP_OPTIONS | get_method(method).options


@dataclass(frozen=True, eq=False)
class OptimizeResult:
    """What :func:`optimize_channels` found.

    Attributes:
        model: the resized (and, with ``epochs > 0``, trained) GraphModule.
        widths: the chosen width of every free group, by id.
        graph: the original model's channel graph (ids, producers, frozen reasons).
        method: the method's name (a key of :data:`fxconet.strategies.METHODS`).
        params_before, params_after, macs_before, macs_after: model sizes (MACs of one image).
        history: one dict per search trial (widths, slopes, conditions, ranks, accuracies).
        accuracy: test accuracy of the final model (``None`` without final training or test
            data).
        baseline_accuracy: test accuracy of the model as given (``None`` without test data or
            with ``baseline=False``).
        report_path: ``report.json`` when an output folder was given.
        seconds: wall time of the search.
    """

    model: torch.nn.Module
    widths: dict[int, int]
    graph: ChannelGraph
    method: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    history: tuple[dict[str, Any], ...] = ()
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    report_path: Path | None = None
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The JSON report (as written to ``report.json``)."""
        return {
            "method": self.method,
            "widths": {str(k): v for k, v in sorted(self.widths.items())},
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "accuracy": self.accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "seconds": self.seconds,
            "config": self.config,
            "groups": [
                {
                    "id": g.id,
                    "size": g.size,
                    "divisor": g.divisor,
                    "frozen": g.frozen,
                    "reason": g.reason,
                    "producers": list(g.producers),
                }  # fmt: skip
                for g in self.graph.groups
            ],
            "history": list(self.history),
            **self.extra,
        }

    def table(self) -> str:
        """Before/after table of sizes, accuracy and changed groups."""
        return before_after_table(self.report(), {g.id: g.size for g in self.graph.groups})


def _check_classes(graph: ChannelGraph, data: str, root: Any) -> None:
    """Warn when a classifier's output width is not the dataset's number of classes (a
    1000-class head trained on 10 labels)."""
    try:
        classes = data_mod.dataset_info(data, root=root).num_classes
    except Exception:  # the loader itself reports unusable data
        return
    # the output node (Graph.output_node() is newer than the oldest torch fxconet supports)
    nodes = graph.state.traced.graph.nodes if graph.state is not None else ()
    out = next((n.args[0] for n in reversed(nodes) if n.op == "output"), None)
    value = out.meta.get(META_KEY) if isinstance(out, torch.fx.Node) else None
    shape = getattr(getattr(value, "value", None), "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] != classes:
        effect = (
            f"its {shape[1] - classes} extra outputs are never a correct label"
            if shape[1] > classes
            else f"labels from {shape[1]} on cannot be predicted"
        )
        warnings.warn(
            f"{graph.model_name} outputs {shape[1]} values per example but {data!r} has "
            f"{classes} classes ({effect}): build the model with {classes} outputs",
            stacklevel=3,
        )


def optimize_channels(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    data: Any = None,
    method: str | None = None,
    **options: Any,
) -> OptimizeResult:
    """Choose new channel widths for ``model`` and return the resized model.

    Args:
        model: any traceable ``nn.Module`` (never modified).
        example_inputs: example inputs (shapes only); taken from ``data`` when omitted.
        data: training data: a Dataset, a DataLoader or a built-in name (``"digits"``,
            ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"``, ``"imagefolder"``, ``"fake"``;
            see :mod:`fxconet.data`). The search uses the training split only.
        method: ``"conet"`` (CONet Alg. 2), ``"static"`` (CONet Eq. 4 from the model's trained
            weights), ``"uniform"`` (every width times one factor), ``"random"`` (a random
            factor per group), ``"greedy"`` (greedy slimming of a trained model onto the
            budget, :mod:`fxconet.strategies.greedy`) or ``"aps"`` (affine parameter sharing search,
            :mod:`fxconet.strategies.aps`). Default (:func:`default_method`): ``"greedy"``
            with a budget and data (uniform scaling for an untrained model), ``"uniform"``
            with a budget alone, else ``"conet"`` with data and ``"static"`` without.
        **options: see below.

    Options for every method (:data:`COMMON_OPTIONS`, :data:`LOOP_OPTIONS`):
        epochs (0): train the final model this many epochs and measure its test accuracy.
        init: initialisation of the final model, ``"reset"`` (default when ``epochs > 0``: the
            paper trains the found widths from scratch), ``"inherit"`` (the model's weights,
            largest-norm channels) or ``"search"`` (weights the method provides, e.g. APS's
            meta-weights projected through P/Q).
        out: folder for checkpoints (one ``trial_NNN.json`` per trial), ``report.json`` and
            plots; nothing is written when omitted. resume: continue a killed search in ``out``.
            overwrite: start a fresh search in an ``out`` that holds an earlier search's
            checkpoints (deleting them; without it the search refuses the folder).
        seed (0), progress (True), log (a callable receiving progress lines).
        train_config: a :class:`fxconet.train.TrainConfig`, or its fields (``lr``,
            ``batch_size``, ``schedule``, ``momentum``, ``weight_decay``, ``device``,
            ``max_batches_per_epoch`` ...). train_fn: your own training loop (see
            fxconet.train).
        test_data: data for the final accuracy (default: the named dataset's test split).
        baseline (True): with test data, evaluate the model as given first (the table's
            "before" accuracy; one pass over the test data).
        val_fraction (0.1): held-out part of the training data for per-trial validation.
        data_dir, augment: for named datasets. leaf_modules, concrete_args, freeze, opaque, hooks:
            as for :func:`analyze` (a model analysed as a composite of opaque code and traced
            parts is refused: the methods search and train one traced graph).
        target_macs, target_params: the final model's size: a float is a fraction of the
            model's (``target_macs=0.5``), an int an absolute count. The method's widths are
            projected onto it when they miss it (one global factor by bisection over the cost
            model, then single-group steps; :func:`fxconet.cost.fit_budget`); APS also aims its
            reward and its final pick at the MACs target. budget_tolerance (0.02): how far the
            final cost may be from the target (fraction of the target). Without a target the
            method decides the size (CONet grows or shrinks as the paper does); the report's
            ``size`` entry says how it changed.

    The method's own options are the fields of its config dataclass:
    :class:`~fxconet.strategies.conet.ConetConfig` (delta, mu, gamma, phi, trials,
    epochs_per_trial ...), :class:`~fxconet.strategies.static.StaticConfig` (scale,
    baseline_epochs), :class:`~fxconet.strategies.static.UniformConfig` (phi, target_params) and
    :class:`~fxconet.strategies.aps.ApsConfig` (flops_target, sharing, candidates, warmup_epochs,
    search_epochs, flops_tolerance ...).

    Returns:
        An :class:`OptimizeResult`.

    Example:
        >>> result = fxconet.optimize_channels(fxconet.models.cifar_resnet20(in_channels=1),
        ...                                    data="digits", trials=3, epochs_per_trial=2)
        >>> print(result.table())
    """
    if method is None:
        method = default_method(
            data is not None,
            options.get("target_macs") is not None or options.get("target_params") is not None,
        )
        options = {**default_method_options(method), **options}
    spec = get_method(method)
    allowed = accepted_options(method)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"optimize_channels(method={method!r}) got unknown options {unknown}; valid: "
            f"{', '.join(sorted(allowed))}"
        )
    seed = int(options.get("seed", 0))
    config = spec.make_config(options, seed=seed)  # checks the method's options first
    budget = Budget(
        macs=options.get("target_macs"),
        params=options.get("target_params"),
        tolerance=float(options.get("budget_tolerance", 0.02)),
    )
    progress = bool(options.get("progress", True)) and distributed.is_main()
    epochs = int(options.get("epochs", 0))
    out = Path(options["out"]) if options.get("out") is not None else None
    train_fn = options.get("train_fn")
    train_data = search_data = test_data = val_data = None
    if data is not None:
        root = options.get("data_dir")
        augment = bool(options.get("augment", False))
        train_data = data_mod.as_dataset(data, split="train", augment=augment, root=root)
        if isinstance(data, str):
            test_data = data_mod.as_dataset(data, split="test", augment=False, root=root)
        val_fraction = float(options.get("val_fraction", 0.1))
        search_data = train_data
        if not isinstance(train_data, torch.utils.data.DataLoader) and val_fraction > 0:
            search_data, val_data = data_mod.train_val_split(train_data, val_fraction, seed=seed)
    elif spec.needs_data and train_fn is None:
        raise SearchError(f"method={method!r} needs training data (data=...) or a train_fn")
    if options.get("test_data") is not None:
        test_data = data_mod.as_dataset(options["test_data"], split="test", augment=False)
    if example_inputs is None:
        if train_data is None:
            raise ValueError("optimize_channels needs example_inputs or data")
        example_inputs = _example_from(train_data)
    train_config = options.get("train_config") or train_mod.TrainConfig(
        **{k: options[k] for k in LOOP_OPTIONS if options.get(k) is not None}, seed=seed
    )
    graph = analyze(
        model,
        example_inputs,
        leaf_modules=options.get("leaf_modules", ()),
        concrete_args=options.get("concrete_args"),
        freeze=options.get("freeze", ()),
        opaque=options.get("opaque", "auto"),
        hooks=options.get("hooks", "freeze"),
    )
    composite = composite_of(graph)
    if composite is not None:
        opaque = ", ".join(repr(path) if path else "its forward" for path, _ in composite.opaque)
        raise SearchError(
            f"optimize_channels cannot search {graph.model_name}: code of it cannot be traced "
            f"({opaque}: {composite.opaque[0][1]}), so it was analysed as a composite of the "
            f"traced parts {', '.join(repr(p.path) for p in composite.parts)}, and the methods "
            "search and train one traced graph. Choose widths with fxconet.cost.fit_budget("
            "CostModel(graph), allocation, Budget(...)) and build them with "
            "fxconet.resize(graph, widths), or pass opaque=False to see what stops the trace"
        )
    if isinstance(data, str):
        _check_classes(graph, data, options.get("data_dir"))
    cost = CostModel(graph)
    baseline_accuracy = None
    if test_data is not None and options.get("baseline", True):
        baseline_accuracy = train_mod.evaluate(model, test_data).accuracy
    if budget.active:
        budget.targets(cost)  # checks the targets against the model before any training
    ctx = SearchContext(
        model=model,
        graph=graph,
        example_inputs=example_inputs,
        train_data=search_data,
        val_data=val_data,
        train_config=train_config,
        train_fn=train_fn,
        config=config,
        out=out,
        resume=bool(options.get("resume", False)),
        overwrite=bool(options.get("overwrite", False)),
        seed=seed,
        progress=progress,
        log=options.get("log") if distributed.is_main() else None,
        budget=budget,
        cost=cost,
    )
    started = time.perf_counter()
    outcome = spec.run(ctx)
    if distributed.is_distributed():  # rank 0 decides: the ranks cannot end apart
        outcome = distributed.broadcast_object(outcome)
    seconds = time.perf_counter() - started
    widths, projection = _meet_budget(cost, outcome, budget)
    init = options.get("init") or ("reset" if epochs > 0 else "inherit")
    if init not in ("reset", "inherit", "search"):
        raise ValueError(f"init={init!r}: choose reset, inherit or search")
    torch.manual_seed(seed)
    final = resize(graph, widths, init="reset" if init == "search" else init)
    if init == "search":
        if outcome.init_state is None:
            raise ValueError(f"init='search': method {method!r} provides no weights")
        final.load_state_dict(outcome.init_state)
    accuracy = None
    if epochs > 0:
        if train_data is None and train_fn is None:
            raise ValueError("epochs > 0 needs data= (or a train_fn) to train the final model")
        final_started = time.perf_counter()
        log = options.get("log") if distributed.is_main() else None

        def final_epoch(epoch: int, m: nn.Module) -> None:
            line = (
                f"final training: epoch {epoch + 1}/{epochs} "
                f"({time.perf_counter() - final_started:.0f} s)"
            )
            if distributed.is_main():
                logger.info(line)
            if log is not None:
                log(line)

        train_mod.run_training(
            final,
            epochs=epochs,
            on_epoch_end=final_epoch,
            data=train_data,
            config=train_config,
            train_fn=train_fn,
            progress=progress,
        )
        if test_data is not None:
            accuracy = train_mod.evaluate(final, test_data).accuracy
    extra = dict(outcome.extra)
    extra["size"] = _size_change(cost, widths, count_params(model), count_params(final))
    if budget.active:
        assert projection is not None
        extra["budget"] = {**budget.to_dict(), **projection.to_dict()}
    result = OptimizeResult(
        model=final,
        widths={g.id: widths.get(g.id, g.size) for g in graph.free},
        graph=graph,
        method=method,
        params_before=count_params(model),
        params_after=count_params(final),
        macs_before=cost.macs_before,
        macs_after=cost.macs(widths),
        history=tuple(outcome.history),
        accuracy=accuracy,
        baseline_accuracy=baseline_accuracy,
        seconds=seconds,
        config={
            "method": method,
            "seed": seed,
            "epochs": epochs,
            "init": init,
            "train": train_config.to_dict(),
            "budget": budget.to_dict() if budget.active else None,
            method: outcome.config,
        },
        extra=extra,
    )
    if out is not None:
        path = out / "report.json"
        if distributed.is_main():  # one report per job
            path = write_report(result.report(), out)
        distributed.barrier()
        result = dataclasses.replace(result, report_path=path)
    return result


def _meet_budget(
    cost: CostModel, outcome: SearchOutcome, budget: Budget
) -> tuple[dict[int, int], Projection | None]:
    """The final widths: the method's, or, with a budget they miss, its allocation projected
    onto the budget by :func:`fxconet.cost.fit_budget`."""
    if not budget.active:
        return dict(outcome.widths), None
    allocation = outcome.allocation or {k: float(v) for k, v in outcome.widths.items()}
    params, macs = cost.evaluate(outcome.widths, check=False)
    targets = budget.targets(cost)
    reached = {"macs": macs, "params": params}
    errors = {k: reached[k] / t - 1.0 for k, t in targets.items()}
    binding = max(errors, key=lambda k: errors[k])
    if all(abs(e) <= budget.tolerance for e in errors.values()):
        # the method met the budget itself (APS aims at its MACs target): keep its widths
        own = Projection(
            widths=dict(outcome.widths),
            factor=1.0,
            macs=macs,
            params=params,
            targets=targets,
            binding=binding,
            error=errors[binding],
            within_tolerance=True,
        )
        return dict(outcome.widths), own
    projection = fit_budget(cost, allocation, budget)
    return dict(projection.widths), projection


def _size_change(
    cost: CostModel, widths: dict[int, int], params_before: int, params_after: int
) -> dict[str, float]:
    """How the method changed the model's size (``after / before``)."""
    return {
        "params_ratio": params_after / params_before if params_before else float("nan"),
        "macs_ratio": cost.macs(widths) / cost.macs_before if cost.macs_before else float("nan"),
    }


def _example_from(dataset: Any) -> torch.Tensor:
    if isinstance(dataset, torch.utils.data.DataLoader):
        batch = next(iter(dataset))
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return x[:1]
    sample = dataset[0]
    x = sample[0] if isinstance(sample, list | tuple) else sample
    return x.unsqueeze(0)
