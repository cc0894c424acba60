"""Budgets: every method's widths meet ``target_macs`` / ``target_params`` within the tolerance,
measured on the model actually built (FlopCounterMode), not only on the cost model."""

from __future__ import annotations

import pytest
import torch

import fxconet
from fxconet.cli import main
from fxconet.cost import Budget, CostModel, count_macs, count_params, fit_budget
from fxconet.errors import ChannelError
from fxconet.models import cifar_resnet20

X = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def graph() -> fxconet.ChannelGraph:
    return fxconet.analyze(cifar_resnet20(in_channels=1), X)


@pytest.mark.parametrize("target", [0.75, 0.5, 0.25, 0.1])
def test_fit_budget_meets_a_macs_fraction_on_the_built_model(graph, target):
    cost = CostModel(graph)
    uniform = {g.id: float(g.size) for g in graph.free}
    p = fit_budget(cost, uniform, Budget(macs=target))
    assert p.within_tolerance and p.binding == "macs"
    built = fxconet.resize(graph, p.widths)
    measured = count_macs(built, X)
    assert measured == p.macs  # the cost model is exact on this CNN
    assert abs(measured / cost.macs_before - target) <= 0.02 * target
    # one global factor: the widths keep the allocation's proportions (up to rounding and the
    # single-group steps of the final refinement)
    ratios = [p.widths[g.id] / g.size for g in graph.free]
    assert max(ratios) - min(ratios) <= 0.35


def test_fit_budget_keeps_the_allocations_shape(graph):
    cost = CostModel(graph)
    late = {g.id: g.size * (2.0 if g.size == 64 else 1.0) for g in graph.free}
    p = fit_budget(cost, late, Budget(macs=0.5))
    q = fit_budget(cost, {g.id: float(g.size) for g in graph.free}, Budget(macs=0.5))
    assert p.within_tolerance and q.within_tolerance
    wide = [g.id for g in graph.free if g.size == 64]
    assert all(p.widths[g] > q.widths[g] for g in wide)  # more of the budget in stage 3
    assert p.params > q.params  # stage 3 carries the parameters


def test_parameter_and_absolute_targets(graph):
    cost = CostModel(graph)
    uniform = {g.id: float(g.size) for g in graph.free}
    p = fit_budget(cost, uniform, Budget(params=100_000))
    assert p.binding == "params" and abs(p.params / 100_000 - 1) <= 0.02
    built = fxconet.resize(graph, p.widths)
    assert count_params(built) == p.params
    m = fit_budget(cost, uniform, Budget(macs=cost.macs_before // 3))
    assert abs(m.macs / (cost.macs_before // 3) - 1) <= 0.02
    # both targets: the tighter one binds, the other is met from below
    both = fit_budget(cost, uniform, Budget(macs=0.9, params=0.3))
    assert both.binding == "params" and both.macs < 0.9 * cost.macs_before


def test_impossible_or_malformed_budgets_are_clear_errors(graph):
    cost = CostModel(graph)
    uniform = {g.id: float(g.size) for g in graph.free}
    with pytest.raises(ChannelError, match="below the smallest model"):
        fit_budget(cost, uniform, Budget(macs=10))
    with pytest.raises(ValueError, match="target_macs"):
        Budget(macs=-0.5)
    with pytest.raises(ValueError, match="target_params"):
        Budget(params=True)
    with pytest.raises(ChannelError, match="names no target"):
        fit_budget(cost, uniform, Budget())


@pytest.mark.parametrize("method", ["uniform", "random", "static"])
def test_optimize_channels_meets_the_budget_for_every_one_shot_method(method):
    model = cifar_resnet20(in_channels=1)
    result = fxconet.optimize_channels(
        model, X, method=method, target_macs=0.5, progress=False, seed=1
    )
    measured = count_macs(result.model, X)
    assert measured == result.macs_after
    assert abs(measured / result.macs_before - 0.5) <= 0.02 * 0.5
    report = result.report()
    assert report["budget"]["within_tolerance"] and report["budget"]["targets"]["macs"] > 0
    assert "budget (macs)" in result.table()


def test_random_allocations_differ_by_seed_and_meet_the_same_budget():
    model = cifar_resnet20(in_channels=1)
    a, b = (
        fxconet.optimize_channels(model, X, method="random", target_macs=0.4, seed=s)
        for s in (0, 1)
    )
    assert a.widths != b.widths
    for r in (a, b):
        assert abs(r.macs_after / r.macs_before - 0.4) <= 0.02 * 0.4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["conet", "aps"])
def test_optimize_channels_meets_the_budget_for_the_searches(method, tmp_path):
    options = {
        "conet": {"trials": 2, "epochs_per_trial": 2},
        "aps": {"warmup_epochs": 1, "search_epochs": 1},
    }[method]
    result = fxconet.optimize_channels(
        cifar_resnet20(in_channels=1),
        data="digits",
        method=method,
        target_macs=0.25,
        max_batches_per_epoch=2,
        batch_size=32,
        progress=False,
        out=tmp_path,
        **options,
    )
    measured = count_macs(result.model, X)
    assert abs(measured / result.macs_before - 0.25) <= 0.02 * 0.25
    assert result.report()["budget"]["within_tolerance"]


def test_without_a_budget_the_report_says_how_the_size_changed():
    result = fxconet.optimize_channels(cifar_resnet20(in_channels=1), X, method="uniform", phi=2)
    size = result.report()["size"]
    assert size["macs_ratio"] == pytest.approx(result.macs_after / result.macs_before)
    assert size["params_ratio"] > 3  # twice the widths: about four times the parameters
    assert "no budget: the method changed the parameters x" in result.table()


def test_cli_target_macs(tmp_path, capsys):
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--method", "uniform",
         "--target-macs", "30%", "--epochs", "0", "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "budget (macs)" in out and "within 2%" in out
    with pytest.raises(SystemExit):
        main(["optimize", "cifar_resnet20", "--data", "digits", "--target-macs", "lots"])
    assert "--target-macs" in capsys.readouterr().err


def test_with_a_budget_and_no_method_the_default_is_uniform_scaling_without_data():
    from fxconet.optimize import default_method

    result = fxconet.optimize_channels(cifar_resnet20(in_channels=1), X, target_macs=0.5)
    assert result.method == "uniform"
    assert default_method(has_data=True, has_budget=True) == "greedy"
    assert default_method(has_data=True, has_budget=False) == "conet"
    assert default_method(has_data=False, has_budget=False) == "static"


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )  # fmt: skip


def test_with_a_budget_and_data_the_default_is_greedy_and_uniform_for_an_untrained_model():
    untrained = _small_net()
    options = dict(data="digits", target_macs=0.5, progress=False, eval_batches=1)
    result = fxconet.optimize_channels(untrained, **options)
    assert result.method == "greedy" and result.history == ()  # no move scored
    assert result.extra["greedy"]["fallback"] == "uniform"
    uniform = fxconet.optimize_channels(untrained, method="uniform", data="digits", target_macs=0.5)
    assert result.widths == uniform.widths
    # trained (a few epochs on the digits): the default searches
    from fxconet.train import TrainConfig, train

    trained = _small_net()
    train(trained, "digits", TrainConfig(epochs=3, batch_size=32, lr=0.05), progress=False)
    searched = fxconet.optimize_channels(trained, **options)
    assert searched.method == "greedy" and len(searched.history) > 0
    assert abs(searched.macs_after / searched.macs_before - 0.5) <= 0.02
    with pytest.warns(UserWarning, match="about that of guessing"):  # asked for: it searches
        asked = fxconet.optimize_channels(untrained, method="greedy", **options)
    assert len(asked.history) > 0


def test_the_default_greedy_scales_uniformly_when_the_data_cannot_score_moves():
    from torch.utils.data import DataLoader, TensorDataset

    images = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8)), batch_size=16)  # no targets
    seen = []

    def train_fn(model, epochs):
        seen.append(epochs)

    with pytest.warns(UserWarning, match="cannot score moves"):
        result = fxconet.optimize_channels(
            _small_net(), data=images, train_fn=train_fn, target_macs=0.5, progress=False
        )
    assert result.method == "greedy" and result.extra["greedy"]["fallback"] == "uniform"
    with pytest.raises(fxconet.errors.SearchError, match=r"\(input, target\) batches"):
        fxconet.optimize_channels(_small_net(), data=images, method="greedy", target_macs=0.5)
