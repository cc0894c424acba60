"""The cost model: parameters and multiply-accumulates of a model at any widths.

fxconet counts one thing as MACs, everywhere (search budgets, rewards, reports, benchmarks):
for every call of a convolution (plain, grouped, depthwise, transposed) or linear layer, its
weight's size times the number of positions it is applied at, per example. Element-wise work
(bias adds, normalisation, activations, residual adds, pooling) is not counted, as papers report
MACs. :class:`CostModel` computes it from the channel graph alone (no model is built), so
searches can price thousands of width choices.

:func:`count_macs` measures a concrete module instead, with
``torch.utils.flop_counter.FlopCounterMode``; on CNNs it equals the cost model (tested), and it
also counts matrix products outside layers (attention), which the cost model leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fxconet.ir import ChannelGraph
from fxconet.passes.view import SolutionView

__all__ = ["CostModel", "count_macs", "count_params", "predict_macs", "predict_params"]


class CostModel:
    """Parameters and MACs (per example) of a model's channel graph at any widths.

    Results are memoised by widths, so a search may ask for the same architecture often.

    Args:
        graph: the model's channel graph (:func:`fxconet.analyze`).

    Example:
        >>> cost = CostModel(fxconet.analyze(model, torch.randn(1, 3, 32, 32)))
        >>> cost.macs({}) == cost.macs_before
        True
        >>> cost.macs({1: 16}) < cost.macs_before
        True
    """

    def __init__(self, graph: ChannelGraph) -> None:
        self.graph = graph
        self._view = SolutionView(graph)
        self._terms = self._view.cost_terms()
        self._memo: dict[tuple[tuple[int, int], ...], tuple[int, int]] = {}
        self.params_before, self.macs_before = self._both({})

    def _both(self, widths: Mapping[int, int]) -> tuple[int, int]:
        key = tuple(sorted((int(k), int(v)) for k, v in widths.items()))
        hit = self._memo.get(key)
        if hit is None:
            size_of = self._view.sizer(widths)
            params = self._terms.fixed_params + sum(
                math.prod(size_of(layout) for layout in dims) for dims in self._terms.params
            )
            macs = sum(
                positions * math.prod(size_of(layout) for layout in dims)
                for positions, dims in self._terms.macs
            )
            hit = self._memo[key] = (int(params), int(macs))
        return hit

    def params(self, widths: Mapping[int, int]) -> int:
        """Parameters after resizing to ``widths`` (group id -> width; others unchanged)."""
        return self._both(widths)[0]

    def macs(self, widths: Mapping[int, int]) -> int:
        """MACs per example after resizing to ``widths``."""
        return self._both(widths)[1]


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
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        for m, mode in modes:
            m.training = mode
    return counter.get_total_flops() // 2
