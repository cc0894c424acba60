"""Width-choosing strategies: static and uniform scaling, random, greedy slimming, CONet, APS.

Every method of :func:`fxconet.optimize_channels` is an entry of :data:`METHODS`: a frozen
config dataclass, the single source of the method's options (their names, defaults, checks and
help texts: :func:`fxconet.optimize_channels` and the ``fxconet`` command derive theirs from
it), and a ``run(ctx: SearchContext) -> SearchOutcome`` function, both in a module imported on
first use. ``optimize_channels`` prepares the data, the channel graph and the training settings,
calls ``run``, then resizes (and trains) the final model and writes the report.

The iterative searches share their checkpointed loop (:mod:`fxconet.strategies.loop`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxconet.ir import ChannelGraph

__all__ = [
    "METHODS",
    "Method",
    "SearchContext",
    "SearchOutcome",
    "get_method",
    "option_docs",
]


@dataclass
class SearchContext:
    """Everything a strategy may use (prepared by ``optimize_channels``).

    Attributes:
        model: the user's model (never modify it).
        graph: its channel graph; widths are keyed by ``graph.groups`` ids.
        example_inputs: inputs for resizing and counting (shapes only).
        config: the method's configuration (an instance of its :attr:`Method.config_type`).
        train_data: the search's training data (the training split minus ``val_data``), a
            Dataset or DataLoader; None when the user brings a ``train_fn``.
        val_data: held-out part of the training split, or None.
        train_config: settings of the built-in loop (:class:`fxconet.train.TrainConfig`).
        train_fn: the user's training loop, or None (see :mod:`fxconet.train`).
        out: folder for checkpoints (``trial_*`` files), or None.
        resume: continue from the checkpoints in ``out``. overwrite: a fresh search may replace
            an earlier search's checkpoints in ``out`` (otherwise it refuses the folder).
        seed: the run's seed. progress: show progress bars. log: one-line progress messages.
        budget: the user's target size (:class:`fxconet.cost.Budget`; ``optimize_channels``
            projects the method's widths onto it afterwards, a method may also aim at it).
        cost: the model's :class:`fxconet.cost.CostModel`.
    """

    model: nn.Module
    graph: ChannelGraph
    example_inputs: Any
    config: Any
    train_data: Any = None
    val_data: Any = None
    train_config: Any = None
    train_fn: Callable[..., Any] | None = None
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] | None = None
    budget: Any = None
    cost: Any = None


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
        allocation: the method's widths before rounding, when it has them (a budget projects
            these instead of ``widths``).
    """

    widths: dict[int, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    init_state: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    allocation: dict[int, float] | None = None


def _load(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    """A registered method: its config dataclass and its ``run`` function ("module:name").

    The options of a method are the fields of its config dataclass, except ``seed`` (the run's
    seed, a common option).
    """

    name: str
    target: str
    config: str
    needs_data: bool = False
    summary: str = ""

    @property
    def config_type(self) -> type:
        """The method's frozen config dataclass."""
        cls = _load(self.config)
        assert dataclasses.is_dataclass(cls) and isinstance(cls, type)
        return cls

    @property
    def options(self) -> frozenset[str]:
        """Names of the method's options (its config fields but ``seed``)."""
        return frozenset(f.name for f in dataclasses.fields(self.config_type)) - {"seed"}

    def make_config(self, options: Mapping[str, Any], *, seed: int = 0) -> Any:
        """The config of ``options`` (names of :attr:`options`; others are ignored).

        Raises:
            ValueError: an option value the config refuses (the message names it).
        """
        kwargs = {k: v for k, v in options.items() if k in self.options}
        if "seed" in {f.name for f in dataclasses.fields(self.config_type)}:
            kwargs["seed"] = seed
        return self.config_type(**kwargs)

    def run(self, ctx: SearchContext) -> SearchOutcome:
        """Run the method."""
        outcome: SearchOutcome = _load(self.target)(ctx)
        return outcome


METHODS: dict[str, Method] = {
    "conet": Method(
        "conet",
        "fxconet.strategies.conet:run",
        "fxconet.strategies.conet:ConetConfig",
        needs_data=True,
        summary="CONet Alg. 2: trials of a few epochs, widths follow the rank slopes",
    ),
    "static": Method(
        "static",
        "fxconet.strategies.static:run",
        "fxconet.strategies.static:StaticConfig",
        summary="CONet Eq. 4 from a trained model's ranks",
    ),
    "uniform": Method(
        "uniform",
        "fxconet.strategies.static:run_uniform",
        "fxconet.strategies.static:UniformConfig",
        summary="every free width times one factor (compound scaling)",
    ),
    "random": Method(
        "random",
        "fxconet.strategies.static:run_random",
        "fxconet.strategies.static:RandomConfig",
        summary="a random factor per group (the sanity check of any search)",
    ),
    "greedy": Method(
        "greedy",
        "fxconet.strategies.greedy:run",
        "fxconet.strategies.greedy:GreedyConfig",
        needs_data=True,
        summary="shrink the group that costs the least validation loss per MAC saved, "
        "step by step onto the budget",
    ),
    "aps": Method(
        "aps",
        "fxconet.strategies.aps:run",
        "fxconet.strategies.aps:ApsConfig",
        needs_data=True,
        summary="affine parameter sharing supernet, RL controller, beam search",
    ),
}


def option_docs(config_type: type) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` section of a config's docstring (an
    entry may describe several fields: ``min_width, max_width: ...``).

    Example:
        >>> option_docs(get_method("uniform").config_type)["phi"]
        'every free width times ``phi`` (> 0).'
    """
    doc = inspect.getdoc(config_type) or ""
    if "Attributes:" not in doc:
        return {}
    section = doc.split("Attributes:", 1)[1]
    out: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        entry = re.match(r"^    ([a-z_][a-z0-9_, ]*): (.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for n in names:
                out[n] = entry.group(2).strip()
        elif line.startswith("        ") and names:
            for n in names:
                out[n] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break  # the next section
    return out


def get_method(name: str) -> Method:
    """The registered method ``name`` (ValueError listing the choices otherwise)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
