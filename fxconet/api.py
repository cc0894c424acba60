"""The public entry points: thin wrappers that run the passes in order."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxconet.errors import ChannelError
from fxconet.ir import ChannelGraph
from fxconet.passes.label_edges import label_edges
from fxconet.passes.probe import probe_channels
from fxconet.passes.resize_layers import ResizePlan, resize_layers
from fxconet.passes.solve_channels import solve_channels
from fxconet.passes.trace import normalize_inputs, propagate_shapes, trace_model

__all__ = ["OptimizeResult", "analyze", "kept_channels", "optimize_channels", "resize"]


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, tuple | list):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the passes run.

    Tracing allocates tens of thousands of small objects. Whenever that trips a collection of
    the oldest generation, Python walks every tracked object of the process (torch alone
    brings ~350k), which costs up to 250 ms, more than a whole analysis. Reference counting
    still frees acyclic garbage at once; cycles wait for the first collection after the pause.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def analyze(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    freeze: Iterable[type | str] = (),
    probe: bool | str = "auto",
) -> ChannelGraph:
    """Find the independent channel groups of ``model``.

    Traces a structural copy of the model (the model itself is never modified), propagates
    shapes on the ``meta`` device (no real compute), labels every op conv / non-conv and solves
    the channel constraints. Python's cyclic garbage collector is paused meanwhile.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.
        example_inputs: a tensor, a tuple of inputs, or a dict of keyword inputs (only their
            shapes and dtypes are used).
        leaf_modules: module types or paths to keep opaque while tracing (their channels are
            frozen unless a rule is registered with :func:`fxconet.register_op`).
        concrete_args: passed to ``torch.fx`` to fix control-flow inputs.
        freeze: module paths or types whose input and output widths must not change.
        probe: confirm dynamic reshapes with a perturbed resize on ``meta`` tensors: ``"auto"``
            (when the graph computes sizes at run time), True or False.

    Returns:
        The :class:`~fxconet.ir.ChannelGraph`; ``print`` it for a table of groups.

    Raises:
        TraceError: the model cannot be traced (names the module path and the fix).
        ShapeError: the example inputs do not fit the model (names the node).

    Example:
        >>> graph = fxconet.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> [g.size for g in graph.free][:3]
        [64, 64, 64]
    """
    with _gc_paused():
        traced = trace_model(
            model,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
            example_inputs=example_inputs,
        )
        args, kwargs = normalize_inputs(example_inputs)
        propagate_shapes(traced, args, kwargs)
        graph, solution = solve_channels(traced, freeze=tuple(freeze), name=type(model).__name__)
        solution.example_args = _to_meta(args)
        solution.example_kwargs = _to_meta(kwargs)
        label_edges(solution)
        if probe is True or (probe == "auto" and solution.needs_probe):
            graph = probe_channels(graph)
    for note in graph.notes:
        warnings.warn(f"fxconet.analyze({graph.model_name}): {note}", stacklevel=2)
    return graph


def resize(
    model: nn.Module | ChannelGraph,
    widths: Mapping[int, int],
    example_inputs: Any = None,
    *,
    init: str = "inherit",
    leaf_modules: Iterable[type | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    freeze: Iterable[type | str] = (),
) -> torch.fx.GraphModule:
    """Re-emit ``model`` with new channel widths, as a runnable ``torch.fx.GraphModule``.

    Every layer a changed group touches is resized consistently (convs of any kind, linears,
    norms with their running statistics, biases, flatten -> linear, literal sizes in
    ``view``/``reshape``/``split``). The result shares no tensor with ``model`` and is verified
    on ``meta`` tensors before it is returned.

    Args:
        model: the model, or the :class:`~fxconet.ir.ChannelGraph` from :func:`analyze`.
        widths: group id -> new width, for any subset of the free groups (the others keep
            their size). Ids are those of ``analyze(model, ...)`` with the same options.
        example_inputs: required when ``model`` is a module.
        init: ``"inherit"`` (keep the largest-norm channels; new channels preserve the
            function, see :mod:`fxconet.passes.resize_layers`) or ``"reset"`` (fresh default
            initialisation of every layer).
        leaf_modules, concrete_args, freeze: as for :func:`analyze`.

    Returns:
        The resized GraphModule. ``gm.meta["fxconet"]`` holds the
        :class:`~fxconet.passes.resize_layers.ResizePlan` with the kept channel indices
        (see :func:`kept_channels`).

    Raises:
        ChannelError: a width for an unknown, frozen group, below 1 or not a multiple of the
            group's divisor (the message names the group and its layers).

    Example:
        >>> gm = fxconet.resize(torchvision.models.resnet18(), {1: 32}, torch.randn(1, 3, 64, 64))
        >>> gm.layer1[0].conv1.out_channels
        32
    """
    if isinstance(model, ChannelGraph):
        graph = model
    else:
        if example_inputs is None:
            raise ChannelError("resize(model, widths, example_inputs): example_inputs is required")
        graph = analyze(
            model,
            example_inputs,
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
            freeze=freeze,
        )
    with _gc_paused():
        gm, _ = resize_layers(graph, widths, init=init)
    return gm


def kept_channels(gm: torch.fx.GraphModule) -> dict[int, torch.Tensor]:
    """For each group of a resized GraphModule, the original channel index of every new
    channel (``-1`` for channels added by growing).

    Example:
        >>> gm = fxconet.resize(model, {1: 32}, x)
        >>> fxconet.kept_channels(gm)[1]   # 32 original indices
    """
    plan = gm.meta.get("fxconet") if hasattr(gm, "meta") else None
    if not isinstance(plan, ResizePlan):
        raise ValueError("this GraphModule was not produced by fxconet.resize")
    return dict(plan.index)


# ---------------------------------------------------------------------------------------------
# optimize_channels

_COMMON = {
    "out", "resume", "seed", "progress", "epochs", "init", "train_config", "train_fn",
    "test_data", "val_fraction", "leaf_modules", "concrete_args", "freeze", "lr", "batch_size",
    "device", "max_batches_per_epoch", "schedule", "weight_decay", "momentum", "data_dir",
    "augment", "log",
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class OptimizeResult:
    """What :func:`optimize_channels` found.

    Attributes:
        model: the resized (and, with ``epochs > 0``, trained) GraphModule.
        widths: the chosen width of every free group, by id.
        graph: the original model's channel graph (ids, producers, frozen reasons).
        method: ``"conet"``, ``"static"``, ``"uniform"`` or ``"aps"``.
        params_before, params_after, macs_before, macs_after: model sizes (MACs of one image).
        history: one dict per search trial (widths, slopes, conditions, ranks, accuracies).
        accuracy: test accuracy of the final model (``None`` without final training or test
            data); ``baseline_accuracy`` is left to the caller (see the benchmarks).
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
        from fxconet.report import before_after_table

        return before_after_table(self.report(), {g.id: g.size for g in self.graph.groups})


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
        method: ``"conet"`` (default with data; CONet Alg. 2), ``"static"`` (default without;
            CONet Eq. 4 from the model's trained weights), ``"uniform"`` (every width times
            ``phi``) or ``"aps"`` (affine parameter sharing search, :mod:`fxconet.strategies.aps`).
        **options: see below.

    Options for every method:
        epochs (0): train the final model this many epochs and measure its test accuracy.
        init: initialisation of the final model, ``"reset"`` (default when ``epochs > 0``: the
            paper trains the found widths from scratch), ``"inherit"`` (the model's weights,
            largest-norm channels) or ``"search"`` (weights the method provides, e.g. APS's
            meta-weights projected through P/Q).
        out: folder for checkpoints (one ``trial_NNN.json`` per trial), ``report.json`` and
            plots; nothing is written when omitted. resume: continue a killed search in ``out``.
        seed (0), progress (True), log (a callable receiving progress lines).
        train_config: a :class:`fxconet.train.TrainConfig`, or its fields ``lr``,
            ``batch_size``, ``schedule``, ``momentum``, ``weight_decay``, ``device``,
            ``max_batches_per_epoch``. train_fn: your own training loop (see fxconet.train).
        test_data: data for the final accuracy (default: the named dataset's test split).
        val_fraction (0.1): held-out part of the training data for per-trial validation.
        data_dir, augment: for named datasets. leaf_modules, concrete_args, freeze: as for
            :func:`analyze`.

    CONet options: delta, mu, gamma, phi, trials, epochs_per_trial, min_width, max_width,
    round_to, initial_width, reinit, early_stop, reference_metrics (see
    :class:`fxconet.strategies.conet.ConetConfig`). Static: scale (``S`` of Eq. 4, default 0.5),
    baseline_epochs (with data: train first and use each layer's maximum output rank).
    Uniform: phi, or target_params (the phi giving that many parameters). APS: flops_target,
    sharing, candidates, warmup_epochs, search_epochs and more (see
    :mod:`fxconet.strategies.aps`).

    Returns:
        An :class:`OptimizeResult`.

    Example:
        >>> result = fxconet.optimize_channels(fxconet.models.cifar_resnet20(in_channels=1),
        ...                                    data="digits", trials=3, epochs_per_trial=2)
        >>> print(result.table())
    """
    from fxconet import data as data_mod
    from fxconet import train as train_mod
    from fxconet.strategies import SearchContext, get_method

    method = method or ("conet" if data is not None else "static")
    spec = get_method(method)
    allowed = _COMMON | spec.options
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"optimize_channels(method={method!r}) got unknown options {unknown}; valid: "
            f"{', '.join(sorted(allowed))}"
        )
    seed = int(options.get("seed", 0))
    progress = bool(options.get("progress", True))
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
        from fxconet.strategies.conet import SearchError

        raise SearchError(f"method={method!r} needs training data (data=...) or a train_fn")
    if options.get("test_data") is not None:
        test_data = data_mod.as_dataset(options["test_data"], split="test", augment=False)
    if example_inputs is None:
        if train_data is None:
            raise ValueError("optimize_channels needs example_inputs or data")
        example_inputs = _example_from(train_data)
    loop_options = ("lr", "batch_size", "device", "max_batches_per_epoch", "schedule",
                    "weight_decay", "momentum")  # fmt: skip
    train_config = options.get("train_config") or train_mod.TrainConfig(
        **{k: options[k] for k in loop_options if options.get(k) is not None}, seed=seed
    )
    graph = analyze(
        model,
        example_inputs,
        leaf_modules=options.get("leaf_modules", ()),
        concrete_args=options.get("concrete_args"),
        freeze=options.get("freeze", ()),
    )
    ctx = SearchContext(
        model=model,
        graph=graph,
        example_inputs=example_inputs,
        train_data=search_data,
        val_data=val_data,
        train_config=train_config,
        train_fn=train_fn,
        options={k: v for k, v in options.items() if k in spec.options},
        out=out,
        resume=bool(options.get("resume", False)),
        seed=seed,
        progress=progress,
        log=options.get("log"),
    )
    started = time.perf_counter()
    outcome = spec.run(ctx)
    seconds = time.perf_counter() - started
    widths = outcome.widths
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
        train_mod.run_training(
            final,
            epochs=epochs,
            on_epoch_end=lambda epoch, m: None,
            data=train_data,
            config=train_config,
            train_fn=train_fn,
            progress=progress,
        )
        if test_data is not None:
            accuracy = train_mod.evaluate(final, test_data).accuracy
    one = _first_input(example_inputs)
    result = OptimizeResult(
        model=final,
        widths={g.id: widths.get(g.id, g.size) for g in graph.free},
        graph=graph,
        method=method,
        params_before=train_mod.count_params(model),
        params_after=train_mod.count_params(final),
        macs_before=train_mod.count_macs(model, one),
        macs_after=train_mod.count_macs(final, one),
        history=tuple(outcome.history),
        accuracy=accuracy,
        seconds=seconds,
        config={
            "method": method,
            "seed": seed,
            "epochs": epochs,
            "init": init,
            "train": train_config.to_dict(),
            method: outcome.config,
        },
        extra=dict(outcome.extra),
    )
    if out is not None:
        from fxconet.report import write_report

        path = write_report(result.report(), out)
        result = dataclasses.replace(result, report_path=path)
    return result


def _example_from(dataset: Any) -> torch.Tensor:
    if isinstance(dataset, torch.utils.data.DataLoader):
        batch = next(iter(dataset))
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return x[:1]
    sample = dataset[0]
    x = sample[0] if isinstance(sample, list | tuple) else sample
    return x.unsqueeze(0)


def _first_input(example_inputs: Any) -> Any:
    """Batch-of-one inputs for counting MACs per image."""
    args, _ = normalize_inputs(example_inputs)
    return tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
