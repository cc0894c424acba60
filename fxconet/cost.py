"""The cost model: parameters and multiply-accumulates of a model at any widths, and budgets.

fxconet counts one thing as MACs, everywhere (search budgets, rewards, reports, benchmarks):
for every call of a convolution (plain, grouped, depthwise, transposed) or linear layer, its
weight's size times the number of positions it is applied at, per example. Element-wise work
(bias adds, normalisation, activations, residual adds, pooling) is not counted, as papers report
MACs. :class:`CostModel` computes it from the channel graph alone (no model is built): every
tensor dim's size is a linear form in the groups' widths, so a model's parameters and MACs are
sums of products of those forms, evaluated in a few microseconds for any widths.

:class:`Budget` and :func:`fit_budget` project a method's allocation (a width per group, in any
scale) onto a target: one global factor ``f``, found by bisection over the cost model, scales
every free group (``round(f * a_g)`` to a multiple of the group's divisor); a greedy pass then
moves single groups by one divisor step while that brings the cost closer to the target. The
result is within ``tolerance`` of the target whenever the divisors allow it.

:func:`count_macs` measures a concrete module instead, with
``torch.utils.flop_counter.FlopCounterMode``; on CNNs it equals the cost model (tested), and it
also counts matrix products outside layers (attention), which the cost model leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fxconet.errors import ChannelError
from fxconet.ir import ChannelGraph, check_widths, round_width
from fxconet.ops.layout import Layout
from fxconet.passes.module_copy import evaluating
from fxconet.passes.view import SolutionView

__all__ = [
    "Budget",
    "CostModel",
    "Projection",
    "count_macs",
    "count_params",
    "fit_budget",
    "predict_macs",
    "predict_params",
]


class _Products:
    """``sum_t weight_t * prod_{d in t} (c_d + A_d . n)`` over terms of dims (linear forms)."""

    def __init__(
        self,
        view: SolutionView,
        terms: Sequence[tuple[int, Sequence[Layout]]],
        n_groups: int,
        forms: dict[Layout, tuple[int, dict[int, int]]],
        offset: int = 0,
    ) -> None:
        rows: list[np.ndarray] = []
        consts: list[int] = []
        starts: list[int] = []
        weights: list[int] = []
        self.constant = 0
        for weight, dims in terms:
            if not dims:  # a scalar parameter
                self.constant += weight
                continue
            starts.append(len(rows))
            weights.append(weight)
            for layout in dims:
                form = forms.get(layout)
                if form is None:
                    form = forms[layout] = view.size_form(layout)
                const, coef = form
                row = np.zeros(n_groups, dtype=np.int64)
                for g, k in coef.items():
                    row[g + offset] = k  # a composite's part: its ids start at ``offset``
                rows.append(row)
                consts.append(const)
        self.a = np.stack(rows) if rows else np.zeros((0, n_groups), dtype=np.int64)
        self.c = np.asarray(consts, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.weights = np.asarray(weights, dtype=np.int64)

    def __call__(self, slots: np.ndarray) -> int:
        if not len(self.weights):
            return self.constant
        sizes = self.c + self.a @ slots
        return int(self.constant + np.multiply.reduceat(sizes, self.starts) @ self.weights)


_MEMO_SIZE = 100_000  # architectures remembered per cost model


class CostModel:
    """Parameters and MACs (per example) of a model's channel graph at any widths.

    Args:
        graph: the model's channel graph (:func:`fxconet.analyze`).

    Attributes:
        params_before, macs_before: the model's own parameters and MACs.

    A composite analysis (a model whose ``forward`` :func:`fxconet.analyze` kept opaque) is
    counted part by part: every parameter of the model counts, but MACs only of layers inside
    the analysed parts (the opaque code around them is not traced, so its calls are unknown).

    Example:
        >>> cost = CostModel(fxconet.analyze(model, torch.randn(1, 3, 32, 32)))
        >>> cost.macs({}) == cost.macs_before
        True
        >>> cost.macs({1: 16}) < cost.macs_before
        True
    """

    def __init__(self, graph: ChannelGraph) -> None:
        self.graph = graph
        n = len(graph.groups)
        view = SolutionView(graph)
        self._params: list[_Products] = []
        self._macs: list[_Products] = []
        for offset, part in view.parts():  # one part, or a composite's traced parts
            terms = part.cost_terms()
            forms: dict[Layout, tuple[int, dict[int, int]]] = {}
            params = [(1, dims) for dims in terms.params]
            self._params.append(_Products(part, params, n, forms, offset))
            self._macs.append(_Products(part, list(terms.macs), n, forms, offset))
        self._fixed = view.fixed_params()
        self._unit = np.asarray([g.divisor for g in graph.groups], dtype=np.int64)
        self._sizes = np.asarray([g.size for g in graph.groups], dtype=np.int64)
        self._memo: dict[tuple[tuple[int, int], ...], tuple[int, int]] = {}
        base = self._sizes // self._unit
        self.params_before, self.macs_before = self._count(base)

    def _slots(self, widths: Mapping[int, int], check: bool) -> np.ndarray:
        if check:
            check_widths(self.graph, widths)
        w = self._sizes.copy()
        for g, v in widths.items():
            w[int(g)] = int(v)
        return w // self._unit

    def _both(self, widths: Mapping[int, int], check: bool = True) -> tuple[int, int]:
        key = tuple(sorted((int(k), int(v)) for k, v in widths.items()))
        hit = self._memo.get(key)
        if hit is None:
            hit = self.evaluate(widths, check=check)
            if len(self._memo) < _MEMO_SIZE:
                self._memo[key] = hit
        return hit

    def evaluate(self, widths: Mapping[int, int], *, check: bool = True) -> tuple[int, int]:
        """``(parameters, MACs)`` of ``widths``, computed afresh (not memoised)."""
        return self._count(self._slots(widths, check))

    def _count(self, slots: np.ndarray) -> tuple[int, int]:
        params = self._fixed + sum(p(slots) for p in self._params)
        return params, sum(m(slots) for m in self._macs)

    def params(self, widths: Mapping[int, int], *, check: bool = True) -> int:
        """Parameters after resizing to ``widths`` (group id -> width; others unchanged).

        ``check=False`` skips validating the widths (a search's inner loop)."""
        return self._both(widths, check)[0]

    def macs(self, widths: Mapping[int, int], *, check: bool = True) -> int:
        """MACs per example after resizing to ``widths``."""
        return self._both(widths, check)[1]


def predict_params(graph: ChannelGraph, widths: Mapping[int, int]) -> int:
    """Parameters of the model after resizing to ``widths``, computed from the IR alone.

    Example:
        >>> predict_params(graph, {})   # the model's own parameter count
    """
    return CostModel(graph).params(widths)


def predict_macs(graph: ChannelGraph, widths: Mapping[int, int]) -> int:
    """MACs of one example after resizing to ``widths``, computed from the IR alone.

    Example:
        >>> predict_macs(graph, {})   # the model's own MACs per image
    """
    return CostModel(graph).macs(widths)


# ---------------------------------------------------------------------------------------------
# budgets


@dataclass(frozen=True)
class Budget:
    """A target size for the final model.

    Attributes:
        macs: MACs per example: a float is a fraction of the model's (``0.5``), an int an
            absolute count; None for no MACs target.
        params: parameters, the same way.
        tolerance: the final cost may differ from the target by this fraction of the target.
    """

    macs: float | int | None = None
    params: float | int | None = None
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        for name in ("macs", "params"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(
                    f"target_{name}={value!r}: a fraction of the model's (float > 0) or an "
                    "absolute count (int > 0)"
                )
        if not 0 < self.tolerance < 1:
            raise ValueError(f"budget tolerance={self.tolerance!r}: must be in (0, 1)")

    @property
    def active(self) -> bool:
        """True when the budget names a target."""
        return self.macs is not None or self.params is not None

    def targets(self, cost: CostModel) -> dict[str, int]:
        """The absolute targets (``"macs"``, ``"params"``) for a model's cost model."""
        out = {}
        for name, before in (("macs", cost.macs_before), ("params", cost.params_before)):
            value = getattr(self, name)
            if value is None:
                continue
            out[name] = int(value) if isinstance(value, int) else int(round(value * before))
        return out

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready settings."""
        return {"macs": self.macs, "params": self.params, "tolerance": self.tolerance}


@dataclass(frozen=True)
class Projection:
    """An allocation projected onto a budget by :func:`fit_budget`.

    Attributes:
        widths: the width of every free group.
        factor: the global factor ``f`` (before the greedy single-group steps).
        macs, params: the cost of ``widths``.
        targets: the absolute targets (``"macs"``, ``"params"``).
        binding: the target the widths were fitted to.
        error: ``cost / target - 1`` of the binding target.
        within_tolerance: ``|error| <= tolerance``.
    """

    widths: dict[int, int]
    factor: float
    macs: int
    params: int
    targets: dict[str, int]
    binding: str
    error: float
    within_tolerance: bool

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (widths keyed by strings)."""
        return {
            "widths": {str(k): v for k, v in sorted(self.widths.items())},
            "factor": self.factor,
            "macs": self.macs,
            "params": self.params,
            "targets": dict(self.targets),
            "binding": self.binding,
            "error": self.error,
            "within_tolerance": self.within_tolerance,
        }


def fit_budget(
    cost: CostModel,
    allocation: Mapping[int, float],
    budget: Budget,
    *,
    max_factor: float = 64.0,
) -> Projection:
    """Project ``allocation`` (a positive width per free group, any scale; groups left out keep
    their width's share) onto ``budget`` (see the module docstring).

    With both a MACs and a parameter target, the widths meet the tighter one (the other is then
    below its target).

    Raises:
        ChannelError: the budget names no target, the graph has no free group, or a target is
            below the smallest model the divisors allow.

    Example:
        >>> cost = CostModel(graph)
        >>> p = fit_budget(cost, {g.id: g.size for g in graph.free}, Budget(macs=0.5))
        >>> abs(p.macs / cost.macs_before - 0.5) <= 0.02 * 0.5
        True
    """
    graph = cost.graph
    targets = budget.targets(cost)
    if not targets:
        raise ChannelError("fit_budget: the budget names no target (macs= or params=)")
    free = graph.free
    if not free:
        raise ChannelError(f"{graph.model_name} has no free channel group to fit to a budget")
    alloc = {}
    for g in free:
        a = float(allocation.get(g.id, g.size))
        if not math.isfinite(a) or a <= 0:
            raise ChannelError(f"allocation for group {g.id} must be > 0, got {a!r}")
        alloc[g.id] = a
    divisor = {g.id: g.divisor for g in free}

    def widths_at(f: float) -> dict[int, int]:
        return {g: round_width(f * a, divisor[g]) for g, a in alloc.items()}

    def costs(widths: Mapping[int, int]) -> dict[str, int]:
        p, m = cost.evaluate(widths, check=False)
        return {"macs": m, "params": p}

    def excess(widths: Mapping[int, int]) -> float:
        """The largest ``cost / target - 1`` over the targets (<= 0: within every target)."""
        c = costs(widths)
        return max(c[k] / t - 1.0 for k, t in targets.items())

    smallest = {g: divisor[g] for g in alloc}
    if excess(smallest) > budget.tolerance:
        c = costs(smallest)
        raise ChannelError(
            f"budget {targets} is below the smallest model of {graph.model_name} at these "
            f"groups ({c['macs']:,} MACs, {c['params']:,} parameters with every free group at "
            "its divisor)"
        )
    lo, hi = 1.0, 1.0
    while excess(widths_at(lo)) > 0 and lo > 1e-6:
        lo /= 2
    while excess(widths_at(hi)) <= 0 and hi < max_factor:
        hi *= 2
    for _ in range(60):  # log-space bisection: excess(lo) <= 0 < excess(hi)
        mid = math.sqrt(lo * hi)
        if excess(widths_at(mid)) <= 0:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    below, above = widths_at(lo), widths_at(hi)
    best = below if abs(excess(below)) <= abs(excess(above)) else above
    factor = lo if best is below else hi
    best = _refine(best, alloc, divisor, factor, excess, budget.tolerance)
    binding = max(targets, key=lambda k: costs(best)[k] / targets[k])
    c = costs(best)
    error = c[binding] / targets[binding] - 1.0
    return Projection(
        widths=best,
        factor=factor,
        macs=c["macs"],
        params=c["params"],
        targets=targets,
        binding=binding,
        error=error,
        within_tolerance=abs(error) <= budget.tolerance,
    )


def _refine(
    widths: dict[int, int],
    alloc: Mapping[int, float],
    divisor: Mapping[int, int],
    factor: float,
    excess: Callable[[Mapping[int, int]], float],
    tolerance: float,
) -> dict[int, int]:
    """Greedy single-group steps of one divisor while the cost is outside the tolerance and a
    step brings it closer to the target (ties: the step that keeps the group nearest its share
    ``factor * alloc``)."""
    current = dict(widths)
    gap = abs(excess(current))
    for _ in range(4 * len(current) + 64):
        if gap <= tolerance:
            break
        best: tuple[float, float, int, int] | None = None
        for g, w in current.items():
            for step in (-divisor[g], divisor[g]):
                new = w + step
                if new < divisor[g]:
                    continue
                trial = {**current, g: new}
                value = abs(excess(trial))
                drift = abs(new / (factor * alloc[g]) - 1.0)
                if value < gap - 1e-12 and (best is None or (value, drift) < best[:2]):
                    best = (value, drift, g, new)
        if best is None:
            break
        gap, _, g, new = best
        current[g] = new
    return current


# ---------------------------------------------------------------------------------------------
# measuring a concrete module


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers excluded).

    Example:
        >>> count_params(nn.Conv2d(3, 8, 3))
        224
    """
    return sum(p.numel() for p in model.parameters())


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def count_macs(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> int:
    """Multiply-accumulates of one forward pass of a concrete module, whole batch included.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which reports 2 FLOPs per
    MAC for convolutions (transposed too), linear layers and matrix products (``mm``,
    ``addmm``, ``bmm``, ``baddbmm``, attention); the result is its total divided by 2. Runs in
    eval mode under ``no_grad``; every submodule's mode is restored. Works on any module,
    ``torch.fx.GraphModule`` included.

    Args:
        model: the network.
        example_inputs: one tensor or a sequence of positional inputs; moved to the model's
            device. Use batch size 1 for per-image MACs.

    Returns:
        The MAC count.

    Example:
        >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 8, 8))  # 8*8*8 * 3*3*3
        13824
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    device = _model_device(model)
    inputs = tuple(x.to(device) if isinstance(x, Tensor) else x for x in inputs)
    counter = FlopCounterMode(display=False)
    with evaluating(model), torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops() // 2
