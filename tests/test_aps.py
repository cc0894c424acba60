"""The APS search: supernet, sharing level, projection, controller, decoding, the search loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxconet
from fxconet.cli import main
from fxconet.cost import count_macs, predict_macs
from fxconet.errors import SearchError
from fxconet.strategies.aps import (
    ApsConfig,
    Controller,
    Supernet,
    beam_search,
    candidate_widths,
    decode,
    independent_sharing,
    init_projections,
    ordinal_sharing,
    pick_architecture,
    project_columns,
    sharing_level,
)

X = torch.randn(1, 1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small ops on two oversubscribed cores are far faster on one thread
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Branchy(nn.Module):
    """Concatenated groups, a depthwise conv over them, a grouped conv (divisor 2) and a PReLU
    (a per-channel parameter) inside a residual sum, and flatten -> linear (each channel
    repeated 16 times)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.ba = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False)
        self.bn = nn.BatchNorm2d(14)
        self.pw = nn.Conv2d(14, 16, 1)
        self.gc = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.act = nn.PReLU(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.ba(self.a(x))), self.b(x)], 1)
        y = F.relu(self.bn(self.dw(y)))
        y = self.pw(y)
        y = self.act(self.gc(y)) + y
        return self.fc(torch.flatten(F.avg_pool2d(y, 2), 1))


def choices(net: Supernet, n: int, seed: int = 0) -> list[dict[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {g: int(torch.randint(len(net.candidates[g]), (1,), generator=gen)) for g in net.groups}
        for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# candidates


def test_candidates_respect_divisors():
    graph = fxconet.analyze(Branchy(), X)
    fractions = candidate_widths(graph)
    divided = [g for g in graph.free if g.divisor > 1]
    assert divided and all(len(fractions[g.id]) > 1 for g in divided)
    for g in graph.free:
        assert all(w % g.divisor == 0 and w >= g.divisor for w in fractions[g.id])
        assert (
            list(fractions[g.id]) == sorted(set(fractions[g.id])) and max(fractions[g.id]) == g.size
        )
    absolute = candidate_widths(graph, [3, 4, 5, 64])
    for g in graph.free:
        assert all(w % g.divisor == 0 for w in absolute[g.id]) and 64 in absolute[g.id]
    assert candidate_widths(graph, {0: [2, 8]})[0] == (2, 8)
    with pytest.raises(ValueError, match="positive"):
        candidate_widths(graph, [0.5, -1])
    with pytest.raises(ValueError, match="sharing"):
        ApsConfig(sharing="half")
    with pytest.raises(ValueError, match="independent sharing needs room"):
        Supernet(graph, candidate_widths(graph), sharing="independent", meta_width="max")


# ---------------------------------------------------------------------------------------------
# sharing level (Eq. 4, Thm. 3.1) and the projection (Eq. 5)


@pytest.mark.parametrize("sizes", [[1], [2, 3], [4, 8, 12, 16], [1, 1, 5]])
def test_sharing_level_closed_forms(sizes):
    meta = sum(sizes)
    ordinal = init_projections(meta, sizes, "ordinal")
    independent = init_projections(meta, sizes, "independent")
    assert float(sharing_level(ordinal)) == pytest.approx(ordinal_sharing(sizes))
    assert float(sharing_level(independent)) == pytest.approx(independent_sharing(sizes))
    # the pairwise definition, term by term
    pairs = sum(
        float((ordinal[a].T @ ordinal[b]).pow(2).sum())
        for a in range(len(sizes))
        for b in range(a, len(sizes))
    )
    assert float(sharing_level(ordinal)) == pytest.approx(pairs)


@pytest.mark.parametrize("model", [Net, Branchy])
def test_supernet_phi_is_the_closed_form_for_ordinal_and_independent(model):
    graph = fxconet.analyze(model(), X)
    cands = candidate_widths(graph)
    ordinal = Supernet(graph, cands, sharing="ordinal")
    independent = Supernet(graph, cands, sharing="independent")
    bounds = ordinal.phi_bounds()
    assert bounds == independent.phi_bounds() and bounds["ordinal"] > bounds["independent"]
    raw, rel = ordinal.phi()
    assert raw == pytest.approx(bounds["ordinal"]) and rel == pytest.approx(1.0)
    raw, rel = independent.phi()
    assert raw == pytest.approx(bounds["independent"]) and rel < 1.0


def test_projected_gradient_descent_keeps_unit_columns_and_lowers_phi():
    graph = fxconet.analyze(Net(), X)
    net = Supernet(graph, candidate_widths(graph), sharing="transitionary", noise=1e-2)
    before = net.phi()
    fixed = {k: [m.clone() for m in ms] for k, ms in enumerate(net.mats) if net.sets[k].role
             not in ("in", "out")}  # fmt: skip
    for _ in range(30):
        net.pgd_step(2.0)
    after = net.phi()
    assert after[1] < before[1] - 0.05 and after[0] < before[0]
    for k, ms in enumerate(net.mats):
        for m in ms:
            torch.testing.assert_close(m.norm(dim=0), torch.ones(m.shape[1]))
        if k in fixed:
            assert all(torch.equal(a, b) for a, b in zip(ms, fixed[k], strict=True))
    col = project_columns(torch.tensor([[3.0, 0.0], [4.0, 2.0]]))
    torch.testing.assert_close(col, torch.tensor([[0.6, 0.0], [0.8, 1.0]]))


def _side_grad(mats: list[torch.Tensor], a: int) -> torch.Tensor:
    """d/dM_a of sum_{b <= c} ||M_b^T M_c||_F^2 by hand: 2 sum_b M_b M_b^T M_a + 2 M_a M_a^T M_a."""
    m = mats[a]
    return 2 * sum(mb @ mb.T @ m for mb in mats) + 2 * m @ m.T @ m


def _side_value(mats: list[torch.Tensor]) -> float:
    return float(
        sum(
            (mats[b].T @ mats[c]).pow(2).sum()
            for b in range(len(mats))
            for c in range(b, len(mats))
        )
    )


@pytest.mark.parametrize("model", [Net, Branchy])
def test_the_transition_step_is_equation_5_with_the_closed_form_gradient(model):
    """p <- (p - tau grad) / ||p - tau grad|| with the gradient of sum_l Phi_l / Phi_l^ordinal,
    Phi_l = Phi(Q side) * Phi(P side), computed here by hand (no autograd)."""
    graph = fxconet.analyze(model(), X)
    net = Supernet(graph, candidate_widths(graph), sharing="transitionary", noise=5e-2, seed=3)
    before = [[m.clone() for m in ms] for ms in net.mats]
    tau = 0.3
    expected = [[m.clone() for m in ms] for ms in before]
    for q_sets, p_sets in net._layers:
        bound = 1.0
        for sets in (q_sets, p_sets):
            if sets:
                bound *= sum(ordinal_sharing(net.sets[k].sizes) for k in sets)
        side = {
            id(sets): (sum(_side_value(before[k]) for k in sets) if sets else 1.0)
            for sets in (q_sets, p_sets)
        }
        for sets, other in ((q_sets, p_sets), (p_sets, q_sets)):
            for k in sets:
                for a in range(len(before[k])):
                    grad = side[id(other)] / bound * _side_grad(before[k], a)
                    expected[k][a] = project_columns(before[k][a] - tau * grad)
    net.pgd_step(tau)
    learned = [k for k, s in enumerate(net.sets) if s.role in ("in", "out")]
    assert learned
    for k in learned:
        for got, want in zip(net.mats[k], expected[k], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert net.phi()[1] < float(sum(1 for _ in net._layers)) and net.phi()[1] < 1.0


# ---------------------------------------------------------------------------------------------
# the controller's policy gradient on a bandit


def test_reinforce_with_the_flops_reward_moves_to_the_better_arm_and_meets_the_target():
    """Four decisions of four widths; accuracy grows with the total width (diminishing
    returns), MACs are the total width. With the soft penalty the best reward lies at the 50%
    target; REINFORCE (4 samples, leave-one-out baseline) must find it."""
    from fxconet.strategies.aps import flops_reward, reinforce_step

    torch.manual_seed(0)
    widths = [1, 2, 3, 4]
    full = 4 * max(widths)
    target = 0.5 * full
    penalty = (0.1, -0.5)

    def reward_of(actions):
        macs = sum(widths[a] for a in actions)
        accuracy = 1 - math.exp(-macs / 4)
        return flops_reward(accuracy, macs, target, penalty), macs

    grid = [reward_of([a, b, c, d]) for a in range(4) for b in range(4) for c in range(4)
            for d in range(4)]  # fmt: skip
    best_reward, best_macs = max(grid)
    assert best_macs == target  # the penalty puts the optimum at the target
    controller = Controller([4, 4, 4, 4])
    opt = torch.optim.Adam(controller.parameters(), lr=0.02, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(1)
    baseline = None
    first = [reward_of(controller.sample(lambda p: 1.0, generator=gen)[0])[0] for _ in range(64)]
    for _ in range(300):
        samples = []
        for _ in range(4):
            actions, logp, ent = controller.sample(lambda p: 1.0, generator=gen)
            samples.append((logp, ent, reward_of(actions)[0]))
        baseline = reinforce_step(opt, samples, baseline, entropy_coeff=1e-3, baseline_decay=0.99)
    greedy, _, _ = controller.sample(lambda p: 1.0, greedy=True)
    reward, macs = reward_of(greedy)
    assert abs(macs - target) <= 1  # one width step of the target
    assert reward >= 0.98 * best_reward
    last = [reward_of(controller.sample(lambda p: 1.0, generator=gen)[0])[0] for _ in range(64)]
    # the policy moved, not only its argmax: samples are now near the best, the first were not
    assert sum(last) / 64 >= 0.99 * best_reward > sum(first) / 64 + 0.02


def test_reinforce_step_uses_leave_one_out_baselines():
    """With rewards r_k the loss is -sum_k logp_k (r_k - mean of the others) / K: the gradient
    on each sample's log-probability is exactly that advantage."""
    from fxconet.strategies.aps import reinforce_step

    logps = [torch.zeros((), requires_grad=True) for _ in range(3)]
    ents = [torch.zeros(()) for _ in range(3)]
    rewards = [0.1, 0.4, 0.7]
    params = [torch.nn.Parameter(torch.zeros(()))]
    opt = torch.optim.SGD(params, lr=0.0)

    samples = [(lp + params[0] * 0, e, r) for lp, e, r in zip(logps, ents, rewards, strict=True)]
    new_baseline = reinforce_step(opt, samples, None, entropy_coeff=0.0, baseline_decay=0.9)
    for lp, r, others in zip(logps, rewards, ([0.4, 0.7], [0.1, 0.7], [0.1, 0.4]), strict=True):
        assert float(lp.grad) == pytest.approx(-(r - sum(others) / 2) / 3)
    assert new_baseline == pytest.approx(0.4)  # started at the first mean reward
    one = [(torch.zeros((), requires_grad=True), torch.zeros(()), 0.9)]
    reinforce_step(opt, one, 0.5, entropy_coeff=0.0, baseline_decay=0.9)
    assert float(one[0][0].grad) == pytest.approx(-(0.9 - 0.5))  # the moving average


# ---------------------------------------------------------------------------------------------
# the supernet against plain networks


@pytest.mark.parametrize("model", [Net, Branchy])
@pytest.mark.parametrize("sharing", ["ordinal", "independent", "transitionary"])
def test_supernet_forward_equals_a_plain_network_with_the_effective_weights(model, sharing):
    graph = fxconet.analyze(model(), X)
    net = Supernet(graph, candidate_widths(graph), sharing=sharing, noise=0.05, seed=1)
    if sharing == "transitionary":
        for _ in range(3):
            net.pgd_step(5.0)  # P/Q far from any selection
    x = torch.randn(6, 1, 8, 8)
    for choice in choices(net, 3):
        widths = net.widths(choice)
        net.train()
        net(choice, torch.randn(16, 1, 8, 8))  # fills this choice's BatchNorm statistics
        plain = fxconet.resize(graph, widths, init="reset")
        plain.load_state_dict(net.effective(choice, live_stats=False))
        net.eval()
        torch.testing.assert_close(net(choice, x), plain.eval()(x), rtol=1e-5, atol=1e-5)
        net.train()
        torch.testing.assert_close(net(choice, x, update_stats=False), plain.train()(x))


def test_skeletons_are_shared_when_the_forward_code_is_the_same():
    graph = fxconet.analyze(Net(), X)
    net = Supernet(graph, candidate_widths(graph), sharing="ordinal")
    a, b = {g: 0 for g in net.groups}, {g: 3 for g in net.groups}
    assert net.skeleton(a) is net.skeleton(b)  # channel counts are read from the weights
    graph = fxconet.analyze(Branchy(), X)
    net = Supernet(graph, candidate_widths(graph), sharing="ordinal")
    a, b = {g: 0 for g in net.groups}, {g: 3 for g in net.groups}
    dw_a, dw_b = net.skeleton(a).get_submodule("dw"), net.skeleton(b).get_submodule("dw")
    assert (dw_a.groups, dw_b.groups) == (4, 14)  # a depthwise conv's groups follow the width


def test_candidate_kernel_is_equation_2():
    graph = fxconet.analyze(Net(), X)
    net = Supernet(graph, candidate_widths(graph), sharing="transitionary", noise=0.1)
    choice = {g: 1 for g in net.groups}
    meta = dict(net.meta.named_parameters())["c2.weight"]  # [C_out, C_in, 3, 3]
    p = net.mats[net._set_index[("c2", "out", 1)]][1]
    q = net.mats[net._set_index[("c2", "in", 0)]][1]
    expected = torch.einsum("oihw,ox,iy->xyhw", meta, p, q)
    torch.testing.assert_close(net.effective(choice)["c2.weight"], expected)
    # BatchNorm has no affine (reference): weight 1, bias 0 at the candidate's width
    eff = net.effective(choice)
    assert torch.equal(eff["b2.weight"], torch.ones(16)) and not eff["b2.bias"].any()
    # P/Q get no task gradient, the meta-weight does
    loss = net(choice, torch.randn(4, 1, 8, 8)).sum()
    loss.backward()
    assert meta.grad is not None and p.grad is None and not p.requires_grad


# ---------------------------------------------------------------------------------------------
# controller, beam search, decoding


def test_controller_samples_only_valid_widths():
    graph = fxconet.analyze(Branchy(), X)
    cands = candidate_widths(graph, [2, 3, 4, 8, 16])
    net = Supernet(graph, cands, sharing="ordinal")
    ctrl = Controller([len(cands[g]) for g in net.decisions])
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        actions, logp, entropy = ctrl.sample(lambda prefix: 1.0, generator=gen)
        widths = net.widths(dict(zip(net.decisions, actions, strict=True)))
        for g in graph.free:
            assert widths[g.id] in cands[g.id] and widths[g.id] % g.divisor == 0
        assert logp.item() <= 0 and entropy.item() > 0
        seen.add(tuple(actions))
    assert len(seen) > 10  # it explores


def test_beam_search_finds_the_most_likely_architectures():
    ctrl = Controller([3, 4, 2])
    with torch.no_grad():
        ctrl.head.bias.copy_(torch.tensor([0.0, 3.0, 0.0, 1.0]))  # favour candidate 1
    top = beam_search(ctrl, lambda prefix: 1.0, top_n=5)
    greedy, _, _ = ctrl.sample(lambda prefix: 1.0, greedy=True)
    assert top[0][0] == greedy == [1, 1, 1]
    assert len({tuple(a) for a, _ in top}) == 5
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    for actions, _ in top:
        assert all(0 <= a < n for a, n in zip(actions, ctrl.choices, strict=True))


def test_final_pick_is_closest_to_the_target_or_the_most_likely_within_the_tolerance():
    torch.manual_seed(0)
    ctrl = Controller([4] * 6)
    with torch.no_grad():
        ctrl.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 4.0]))  # the policy wants the largest
    cost = sum  # "MACs" = sum of candidate indices (grows with every index), 18 at the top

    top, pick = pick_architecture(ctrl, lambda p: 1.0, cost, 6.0, top_n=8)
    assert len(top) == 8 and min(cost(a) for a, _ in top) >= 15  # all far from the target
    assert cost(top[pick][0]) == min(cost(a) for a, _ in top)  # paper: the closest of the top-8

    top, pick = pick_architecture(ctrl, lambda p: 1.0, cost, 6.0, top_n=8, tolerance=1.0)
    assert len(top) == 8 and all(abs(cost(a) - 6.0) <= 1.0 for a, _ in top)
    assert pick == 0 and top[0][1] == max(lp for _, lp in top)
    # exhaustive check over all 4^6 architectures: the constrained search is exact
    every = beam_search(ctrl, lambda p: 1.0, top_n=4**6)
    assert len(every) == 4**6
    feasible = sorted((lp for a, lp in every if abs(cost(a) - 6.0) <= 1.0), reverse=True)
    assert [lp for _, lp in top] == pytest.approx(feasible[:8], rel=1e-6)

    near, pick = pick_architecture(ctrl, lambda p: 1.0, cost, 17.5, top_n=8, tolerance=1.0)
    assert cost(near[pick][0]) in (17, 18)  # within the tolerance already: the paper's rule
    none, pick = pick_architecture(ctrl, lambda p: 1.0, cost, 40.0, top_n=8, tolerance=1.0)
    assert cost(none[pick][0]) == 18  # nothing within reach: the closest


def test_decode_matches_the_sampled_architectures_flops():
    graph = fxconet.analyze(Branchy(), X)
    net = Supernet(graph, candidate_widths(graph), sharing="independent")
    for choice in choices(net, 4, seed=3):
        widths = net.widths(choice)
        gm = decode(net, choice)
        assert count_macs(gm, X) == predict_macs(graph, widths)
        for g in graph.free:
            assert fxconet.kept_channels(gm)[g.id].numel() == widths[g.id]


# ---------------------------------------------------------------------------------------------
# the search


SMALL = dict(
    method="aps",
    warmup_epochs=1,
    search_epochs=2,
    max_batches_per_epoch=3,
    batch_size=32,
    progress=False,
    cos_every=2,
    reward_samples=2,
)


def test_aps_end_to_end_report(tmp_path):
    lines: list[str] = []
    result = fxconet.optimize_channels(
        Net(), data="digits", out=tmp_path, epochs=1, init="search", log=lines.append, **SMALL
    )
    assert result.method == "aps" and len(result.history) == 3
    # one line per search epoch, then one per epoch of the final training
    assert [line.split(" ")[0] for line in lines] == ["epoch", "epoch", "epoch", "final"]
    assert lines[-1].startswith("final training: epoch 1/1")
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("phi", "macs_before", "macs_after", "phi_relative", "top", "history"):
        assert key in report
    assert len(report["phi"]) == 3 and all(p > 0 for p in report["phi"])
    assert report["macs_before"] == predict_macs(result.graph, {})
    assert report["macs_after"] == result.macs_after == report["chosen_macs"]
    assert report["macs_after"] == predict_macs(result.graph, result.widths)
    cands = report["candidates"]
    assert all(result.widths[int(g)] in c for g, c in cands.items())
    target = report["macs_target"]
    closest = min(abs(t["macs"] - target) for t in report["top"])
    within = abs(result.macs_after - target) <= 0.05 * report["macs_before"]
    assert abs(result.macs_after - target) == closest or within
    assert [h["phase"] for h in result.history] == ["warmup", "search", "search"]
    assert any(c is not None and -1 <= c <= 1 for c in report["gradient_cosine"])
    assert 0 <= result.accuracy <= 1 and report["decoded_val_accuracy"] is not None
    names = {p.name for p in tmp_path.iterdir()}
    assert {"trial_000.json", "trial_002.json", "trial_002.pt", "widths.png"} <= names


class Kill(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_search(tmp_path):
    options = dict(SMALL, sharing="transitionary", tau=3.0)
    full = fxconet.optimize_channels(Net(), data="digits", out=tmp_path / "full", **options)

    def kill_after_two(line: str) -> None:
        if line.startswith("epoch 1"):
            raise Kill

    with pytest.raises(Kill):
        fxconet.optimize_channels(
            Net(), data="digits", out=tmp_path / "cut", log=kill_after_two, **options
        )
    written = sorted(p.name for p in (tmp_path / "cut").glob("trial_*.json"))
    assert written == ["trial_000.json", "trial_001.json"]
    resumed = fxconet.optimize_channels(
        Net(), data="digits", out=tmp_path / "cut", resume=True, **options
    )
    assert resumed.widths == full.widths
    for a, b in zip(resumed.history, full.history, strict=True):
        for key in ("train_loss", "reward", "phi", "widths", "gradient_cosine"):
            assert a[key] == b[key] or math.isclose(a[key], b[key], rel_tol=1e-6), key
    assert resumed.extra["top"] == full.extra["top"]
    # the final pick's settings may change on resume (the search is done: only the pick reruns)
    repicked = fxconet.optimize_channels(
        Net(), data="digits", out=tmp_path / "cut", resume=True, **dict(options, top_n=2)
    )
    # no epoch reran, and the new pick is one of its (at most 2) top architectures, most likely
    # first (not necessarily the full run's top 2: a beam search of width 2 is approximate)
    assert [h["reward"] for h in repicked.history] == [h["reward"] for h in resumed.history]
    top = repicked.extra["top"]
    assert 1 <= len(top) <= 2 and [t["log_prob"] for t in top] == sorted(
        (t["log_prob"] for t in top), reverse=True
    )
    assert {str(g): w for g, w in repicked.widths.items()} in [t["widths"] for t in top]
    # the pick is checkpointed: a resume with the same pick settings reads pick.json back
    pick = json.loads((tmp_path / "cut" / "pick.json").read_text())
    assert pick["payload"]["settings"]["top_n"] == 2
    smallest = [0] * len(pick["payload"]["top"][0][0])  # as if the pick had been the smallest
    planted = dict(pick, payload={**pick["payload"], "top": [[smallest, -1.0]], "pick": 0})
    (tmp_path / "cut" / "pick.json").write_text(json.dumps(planted))
    reread = fxconet.optimize_channels(
        Net(), data="digits", out=tmp_path / "cut", resume=True, **dict(options, top_n=2)
    )
    candidates = {int(g): c for g, c in repicked.extra["candidates"].items()}
    assert reread.widths == {g: c[0] for g, c in candidates.items()}
    with pytest.raises(SearchError, match="another model or search configuration"):
        fxconet.optimize_channels(
            Net(), data="digits", out=tmp_path / "cut", resume=True, **dict(options, tau=1.0)
        )


def test_cli_optimize_with_aps(tmp_path, capsys):
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--method", "aps", "--flops-target",
         "0.4", "--sharing", "independent", "--warmup-epochs", "1", "--search-epochs", "1",
         "--epochs", "1", "--max-batches", "2", "--batch-size", "32", "--out", str(tmp_path),
         "--quiet"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "MACs" in out and "test accuracy" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "aps" and report["config"]["aps"]["sharing"] == "independent"
    assert report["macs_target"] == pytest.approx(0.4 * report["macs_before"])
    assert len(report["phi"]) == 2 and report["macs_after"] < report["macs_before"]
