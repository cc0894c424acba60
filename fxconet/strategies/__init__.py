"""Width-choosing strategies: static and uniform scaling, CONet, APS.

Every method of :func:`fxconet.optimize_channels` is an entry of :data:`METHODS`: its option
names and a ``run(ctx: SearchContext) -> SearchOutcome`` function in a module imported on first
use. ``optimize_channels`` prepares the data, the channel graph and the training settings, calls
``run``, then resizes (and trains) the final model and writes the report.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxconet.ir import ChannelGraph

__all__ = ["METHODS", "Method", "SearchContext", "SearchOutcome", "get_method"]


@dataclass
class SearchContext:
    """Everything a strategy may use (prepared by ``optimize_channels``).

    Attributes:
        model: the user's model (never modify it).
        graph: its channel graph; widths are keyed by ``graph.groups`` ids.
        example_inputs: inputs for resizing and counting (shapes only).
        train_data: the search's training data (the training split minus ``val_data``), a
            Dataset or DataLoader; None when the user brings a ``train_fn``.
        val_data: held-out part of the training split, or None.
        train_config: settings of the built-in loop (:class:`fxconet.train.TrainConfig`).
        train_fn: the user's training loop, or None (see :mod:`fxconet.train`).
        options: the method's own options (names listed in its :class:`Method` entry).
        out: folder for checkpoints (``trial_*`` files), or None.
        resume: continue from the checkpoints in ``out``.
        seed: the run's seed. progress: show progress bars. log: one-line progress messages.
    """

    model: nn.Module
    graph: ChannelGraph
    example_inputs: Any
    train_data: Any
    val_data: Any
    train_config: Any
    train_fn: Callable[..., Any] | None
    options: Mapping[str, Any]
    out: Path | None
    resume: bool
    seed: int
    progress: bool
    log: Callable[[str], None] | None


@dataclass
class SearchOutcome:
    """What a strategy returns.

    Attributes:
        widths: new width per free group id.
        history: one JSON-ready dict per trial or epoch (goes to ``report.json``).
        extra: more JSON-ready report entries (APS puts its sharing level under ``"phi"``).
        init_state: optional state dict for the final model, used with ``init="search"``
            (e.g. APS weights decoded from its meta-weights).
        config: the resolved method configuration (for the report).
    """

    widths: dict[int, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    init_state: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: its option names and where its ``run`` function lives."""

    name: str
    target: str  # "package.module:function"
    options: frozenset[str]
    needs_data: bool = False

    def run(self, ctx: SearchContext) -> SearchOutcome:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)(ctx)


_CONET = {
    "delta", "mu", "gamma", "phi", "trials", "epochs_per_trial", "min_width", "max_width",
    "round_to", "initial_width", "reinit", "early_stop", "reference_metrics",
}  # fmt: skip
_APS = {
    "flops_target", "sharing", "candidates", "warmup_epochs", "search_epochs", "meta_width",
    "tau", "entropy_coeff", "controller_lr", "flops_penalty", "top_n", "decode_init",
    "search_batches_per_epoch", "init_noise", "cos_every", "baseline_decay", "reward_samples",
    "transition_every",
}  # fmt: skip

METHODS: dict[str, Method] = {
    "conet": Method("conet", "fxconet.strategies.conet:run", frozenset(_CONET), needs_data=True),
    "static": Method(
        "static",
        "fxconet.strategies.static:run",
        frozenset({"scale", "baseline_epochs", "reference_metrics"}),
    ),  # fmt: skip
    "uniform": Method(
        "uniform", "fxconet.strategies.static:run_uniform", frozenset({"phi", "target_params"})
    ),  # fmt: skip
    "aps": Method("aps", "fxconet.strategies.aps:run", frozenset(_APS), needs_data=True),
}


def get_method(name: str) -> Method:
    """The registered method ``name`` (ValueError listing the choices otherwise)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
