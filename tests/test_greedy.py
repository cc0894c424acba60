"""Greedy slimming (``method="greedy"``) and BatchNorm recalibration.

The search is checked against planted answers: a group the output does not depend on must be
shrunk to its floor before a group it does depend on loses a channel, the widths must meet the
budget on the built model, and a resumed search must end exactly as an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxconet
from fxconet.cost import Budget, CostModel, count_macs
from fxconet.errors import SearchError
from fxconet.models import cifar_resnet20
from fxconet.strategies.greedy import GreedyConfig, candidate_loss, greedy_search
from fxconet.strategies.loop import Checkpoints
from fxconet.train import recalibrate_norms

X = torch.zeros(1, 1, 8, 8)


class TwoBranch(nn.Module):
    """Two independent branches of 16 channels summed into the logits; the first branch's
    head is scaled by ``weak``, so the output barely depends on it."""

    def __init__(self, weak: float = 1e-3) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_a = nn.Linear(16, 4)
        self.head_b = nn.Linear(16, 4)
        with torch.no_grad():
            self.head_a.weight.mul_(weak)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pool(self.a(x)).flatten(1)
        b = self.pool(self.b(x)).flatten(1)
        return self.head_a(a) + self.head_b(b)


def _batches(model: nn.Module, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs labelled by the model's own (eval-mode) prediction: the full model scores well."""
    g = torch.Generator().manual_seed(seed)
    out = []
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            x = torch.randn(64, 1, 8, 8, generator=g)
            out.append((x, model(x).argmax(1)))
    return out


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    with torch.no_grad():
        model.head_b.weight.mul_(20)  # confident logits: a low loss to start from
    recalibrate_norms(model, [torch.randn(256, 1, 8, 8)])  # statistics of the data's scale
    graph = fxconet.analyze(model, X)
    calib, batches = _batches(model, 2, 1), _batches(model, 2, 2)
    return model, graph, calib, batches


def _groups(graph):
    by_layer = {p: g.id for g in graph.free for p in g.producers}
    return by_layer["a.0"], by_layer["b.0"]


def test_the_group_the_output_ignores_goes_first(planted):
    _model, graph, calib, batches = planted
    cost = CostModel(graph)
    ga, gb = _groups(graph)
    budget = Budget(macs=0.55)
    out = greedy_search(
        graph, cost, budget, GreedyConfig(), calib=calib, batches=batches, progress=False
    )
    shrunk = [h["group"] for h in out.history]
    floor = round(GreedyConfig().min_fraction * 16)
    # branch a shrinks all the way to its floor before branch b loses a channel
    first_b = shrunk.index(gb) if gb in shrunk else len(shrunk)
    assert shrunk[:first_b] == [ga] * first_b
    assert out.widths[ga] == floor
    assert cost.macs(out.widths) <= budget.targets(cost)["macs"]
    # and the recorded losses are the losses of the recorded widths
    assert out.history[-1]["loss"] == pytest.approx(
        candidate_loss(graph, out.widths, calib, batches), rel=1e-5
    )


def test_lazy_and_full_rescoring_agree_here_and_lazy_scores_fewer(planted):
    _model, graph, calib, batches = planted
    cost = CostModel(graph)
    runs = {
        lazy: greedy_search(
            graph,
            cost,
            Budget(macs=0.4),
            GreedyConfig(lazy=lazy),
            calib=calib,
            batches=batches,
            progress=False,
        )
        for lazy in (True, False)
    }
    assert runs[True].widths == runs[False].widths
    evals = {k: v.extra["greedy"]["evaluations"] for k, v in runs.items()}
    assert evals[True] < evals[False]


def _optimize(model, out):
    return fxconet.optimize_channels(
        model,
        data="digits",
        method="greedy",
        target_macs=0.3,
        step=0.25,
        eval_batches=1,
        calib_batches=1,
        score_batch_size=64,
        progress=False,
        out=out,
    )


def test_optimize_channels_meets_the_budget_on_the_built_model(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet20(in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="untrained"):  # random weights: noise to compare
        result = _optimize(model, tmp_path)
    measured = count_macs(result.model, X)
    assert abs(measured / result.macs_before - 0.3) <= 0.02 * 0.3
    assert result.report()["budget"]["within_tolerance"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert result.extra["greedy"]["steps"] == len(result.history) > 0
    assert json.loads(result.report_path.read_text())["method"] == "greedy"


def test_a_killed_search_resumes_to_the_same_widths(planted, tmp_path):
    model, graph, calib, batches = planted
    cost = CostModel(graph)
    budget, config = Budget(macs=0.3), GreedyConfig()

    def search(out, resume=False, overwrite=False):
        ckpt = Checkpoints(out, {"test": 1}, resume=resume, overwrite=overwrite)
        return greedy_search(
            graph, cost, budget, config, calib=calib, batches=batches, progress=False,
            checkpoints=ckpt,
        )  # fmt: skip

    whole = search(tmp_path / "a")
    steps = sorted((tmp_path / "a").glob("trial_*.json"))
    assert len(steps) == len(whole.history) >= 3
    for path in steps[2:]:  # killed after two steps
        path.unlink()
    resumed = search(tmp_path / "a", resume=True)
    assert resumed.widths == whole.widths
    assert [h["group"] for h in resumed.history] == [h["group"] for h in whole.history]
    with pytest.raises(SearchError, match="overwrite"):
        search(tmp_path / "a")  # a fresh search never mixes with the old checkpoints


def test_clear_errors_without_a_budget_or_data():
    model = cifar_resnet20(in_channels=1)
    with pytest.raises(SearchError, match="needs a budget"):
        fxconet.optimize_channels(model, data="digits", method="greedy", progress=False)
    with pytest.raises(SearchError, match="needs training data"):
        fxconet.optimize_channels(model, X, method="greedy", target_macs=0.5)
    with pytest.raises(ValueError, match="step"):
        GreedyConfig(step=1.5)


def test_recalibrate_norms_measures_the_exact_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    net[1].eval()  # a frozen BN stays frozen afterwards
    momentum = net[1].momentum
    xs = [torch.randn(8, 1, 6, 6) for _ in range(3)]
    with torch.no_grad():
        feats = torch.cat([net[0](x) for x in xs])
    assert recalibrate_norms(net, [(x, 0) for x in xs]) == 1
    bn = net[1]
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    # the cumulative average of the per-batch unbiased variances
    per_batch = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats.split(8)])
    assert torch.allclose(bn.running_var, per_batch.mean(0), atol=1e-5)
    assert bn.momentum == momentum and not bn.training and net.training
    assert recalibrate_norms(nn.Linear(2, 2), [torch.randn(3, 2)]) == 0
