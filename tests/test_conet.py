"""The CONet search, static and uniform scaling, optimize_channels and the fxconet command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import fxconet
from fxconet.cli import main
from fxconet.errors import SearchError
from fxconet.strategies.conet import ConetConfig, GroupState, decide
from fxconet.strategies.static import static_widths, uniform_for_params, uniform_widths
from fxconet.train import TrainConfig


def state(width: int = 32, **kw) -> dict[int, GroupState]:
    return {0: GroupState(width=width, phi=kw.pop("phi", 0.2), low=16, high=256, step=2, **kw)}


# ---------------------------------------------------------------------------------------------
# the decision rule (Alg. 2 lines 6-14)


@pytest.mark.parametrize(
    ("slope", "kappa", "width", "op", "new"),
    [
        (0.02, 1.0, 32, 1, 38),  # S > delta: expand, 32 * 1.2 = 38.4 -> even 38
        (0.001, 1.0, 32, -1, 26),  # S < delta: shrink, 25.6 -> 26
        (0.02, 11.0, 32, -1, 26),  # ill-conditioned: shrink
        (0.02, 10.0, 32, 1, 38),  # kappa == mu is not > mu (paper; the code uses >=)
        (0.001, 1.0, 16, 1, 20),  # at min width a shrink becomes an expansion (code)
        (0.02, 1.0, 258, -1, 206),  # above max width: always shrink
        (0.0075, 1.0, 32, 1, 38),  # S == delta expands
    ],
)
def test_decision_rule(slope, kappa, width, op, new):
    paper = ConetConfig(delta=0.0075, slope="epoch")  # the code's per-epoch default
    s, actions = decide(state(width), {0: slope}, {0: kappa}, paper)
    assert actions[0] == op and s[0].width == new and s[0].phi == 0.2


def test_oscillation_halves_phi_until_the_group_converges():
    cfg = ConetConfig(delta=0.0075, slope="epoch")
    s = state(64)
    phis, ops = [], []
    for k in range(12):
        slope = 0.02 if k % 2 == 0 else 0.0  # flip every trial
        s, actions = decide(s, {0: slope}, {0: 1.0}, cfg)
        phis.append(s[0].phi)
        ops.append(actions[0])
        if s[0].converged:
            break
    # phi: 0.2 (first), then halved on each flip; freezes on the 6th flip (reference §5)
    assert phis == [0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125]
    assert ops[-1] == 0 and s[0].converged
    frozen, actions = decide(s, {0: 0.5}, {0: 1.0}, cfg)
    assert actions[0] == 0 and frozen[0] == s[0]


def test_unmeasured_group_is_left_alone():
    s, actions = decide(state(), {0: math.nan}, {0: math.nan}, ConetConfig())
    assert actions == {0: 0} and s[0].width == 32 and not s[0].converged


def test_config_validation():
    with pytest.raises(ValueError, match="gamma"):
        ConetConfig(gamma=2.0)
    with pytest.raises(ValueError, match="epochs_per_trial"):
        ConetConfig(epochs_per_trial=1)


# ---------------------------------------------------------------------------------------------
# static and uniform scaling


class Net(nn.Module):
    def __init__(self, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_static_scaling_is_equation_4():
    graph = fxconet.analyze(Net(64), torch.randn(1, 1, 8, 8))
    g = graph.free[0]
    assert static_widths(graph, scale=0.6, ranks={g.id: 0.25})[g.id] == 35  # 64 * 0.55 = 35.2
    assert static_widths(graph, scale=0.0, ranks={g.id: 0.25})[g.id] == 64
    assert static_widths(graph, scale=1.0, ranks={g.id: 0.25})[g.id] == 16
    with pytest.raises(ValueError, match="scale"):
        static_widths(graph, scale=1.5, ranks={})


def test_uniform_scaling_and_matching_parameters():
    graph = fxconet.analyze(Net(16), torch.randn(1, 1, 8, 8))
    assert uniform_widths(graph, 0.5) == {g.id: g.size // 2 for g in graph.free}
    phi, widths = uniform_for_params(graph, 20_000)
    gm = fxconet.resize(graph, widths)
    assert abs(sum(p.numel() for p in gm.parameters()) - 20_000) < 2_000
    assert phi > 1.0


# ---------------------------------------------------------------------------------------------
# the search


SMALL = dict(
    trials=3,
    epochs_per_trial=2,
    max_batches_per_epoch=3,
    batch_size=64,
    progress=False,
    delta=0.03,
)


def test_conet_search_end_to_end(tmp_path):
    lines: list[str] = []
    result = fxconet.optimize_channels(
        Net(), data="digits", out=tmp_path, epochs=1, log=lines.append, **SMALL
    )
    assert result.method == "conet" and len(result.history) == 3
    assert [ln.split(":")[0] for ln in lines] == ["trial 0", "trial 1", "trial 2", "final training"]
    assert lines[-1].startswith("final training: epoch 1/1")
    assert set(result.widths) == {g.id for g in result.graph.free}
    first = result.history[0]
    assert set(first) >= {"widths", "slopes", "conditions", "actions", "phi", "layer_ranks"}
    assert first["val_accuracy"] is not None and first["params"] > 0
    assert result.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.macs_before > 0 and result.macs_after > 0 and 0 <= result.accuracy <= 1
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("widths", "params_before", "params_after", "macs_before", "macs_after", "history"):
        assert key in report
    names = {p.name for p in tmp_path.iterdir()}
    assert {"trial_000.json", "trial_001.json", "trial_002.json"} <= names
    assert {"widths.png", "ranks.png", "accuracy_params.png"} <= names
    # widths moved in the direction of the decisions
    last = result.history[-1]
    for gid, action in last["actions"].items():
        before, after = last["widths"][gid], last["next_widths"][gid]
        assert (after > before) == (action > 0) or after == before


class Kill(Exception):
    pass


@pytest.mark.parametrize("reinit", [True, False])
def test_resume_reproduces_an_uninterrupted_search(tmp_path, reinit):
    options = dict(SMALL, reinit=reinit, trials=4)
    full = fxconet.optimize_channels(Net(), data="digits", out=tmp_path / "full", **options)

    def kill_after_two(line: str) -> None:
        if line.startswith("trial 1:"):
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
    assert [h["widths"] for h in resumed.history] == [h["widths"] for h in full.history]
    # a finished trial's file is never rewritten
    assert json.loads((tmp_path / "cut" / "trial_000.json").read_text())["trial"] == 0


def test_resume_after_a_kill_inside_the_first_trial_starts_over(tmp_path, caplog):
    """A kill between the first trial's tensor file and its JSON leaves no finished trial:
    resume=True starts from the first trial (it used to refuse both ways: "nothing to resume",
    and a fresh run "holds the checkpoints of an earlier search")."""
    options = dict(SMALL, trials=2)
    full = fxconet.optimize_channels(Net(), data="digits", out=tmp_path / "full", **options)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "trial_000.pt").write_bytes(b"tensors of the unfinished trial")
    (cut / "trial_000.json.tmp").write_text('{"trial": 0, "sig')  # half written
    with caplog.at_level("WARNING", logger="fxconet"):
        resumed = fxconet.optimize_channels(Net(), data="digits", out=cut, resume=True, **options)
    assert "holds no finished step" in caplog.text
    assert resumed.widths == full.widths
    assert not list(cut.glob("*.tmp"))


def test_resume_refuses_other_settings(tmp_path):
    fxconet.optimize_channels(Net(), data="digits", out=tmp_path, **dict(SMALL, trials=2))
    with pytest.raises(SearchError, match="another model or search configuration"):
        fxconet.optimize_channels(
            Net(), data="digits", out=tmp_path, resume=True, **dict(SMALL, trials=2, delta=0.5)
        )
    with pytest.raises(SearchError, match="nothing to resume"):
        fxconet.optimize_channels(
            Net(), data="digits", out=tmp_path / "empty", resume=True, **SMALL
        )


@pytest.mark.parametrize(
    "change",
    [{"lr": 0.05}, {"batch_size": 32}, {"momentum": 0.5}, {"data": "other"}],
    ids=["lr", "batch", "momentum", "data"],
)
def test_resume_refuses_other_training_settings_or_data(tmp_path, change):
    """The checkpoints' signature covers the training loop and the data, not only the method."""
    from fxconet.data import load_dataset

    digits = load_dataset("digits")
    options = dict(SMALL, trials=2)
    fxconet.optimize_channels(Net(), data=digits, out=tmp_path, **options)
    data = digits
    if change.get("data"):
        data = torch.utils.data.Subset(digits, range(len(digits) // 2))
    changed = {k: v for k, v in change.items() if k != "data"}
    with pytest.raises(SearchError, match="another model or search configuration"):
        fxconet.optimize_channels(
            Net(), data=data, out=tmp_path, resume=True, **{**options, **changed}
        )
    # the same settings and data resume (the search is finished: nothing reruns)
    again = fxconet.optimize_channels(Net(), data=digits, out=tmp_path, resume=True, **options)
    assert len(again.history) == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text(p.read_text()[:200]), "trial_001.json is damaged"),
        (lambda p: p.write_text('{"state": 1}'), "trial_001.json is not an fxconet checkpoint"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "trial_001.json is damaged"),
        (lambda p: p.with_suffix(".pt").write_bytes(b"PK"), "trial_001.pt is damaged"),
        (lambda p: p.with_suffix(".pt").unlink(), "trial_001.pt is missing"),
    ],
    ids=["truncated", "foreign", "binary", "tensors", "no-tensors"],
)
def test_resume_from_damaged_checkpoints_names_the_file_and_the_fix(tmp_path, damage, message):
    options = dict(SMALL, trials=3, reinit=False)

    def kill_after_two(line: str) -> None:
        if line.startswith("trial 1:"):
            raise Kill

    with pytest.raises(Kill):
        fxconet.optimize_channels(Net(), data="digits", out=tmp_path, log=kill_after_two, **options)
    damage(tmp_path / "trial_001.json")
    with pytest.raises(SearchError, match=message) as info:
        fxconet.optimize_channels(Net(), data="digits", out=tmp_path, resume=True, **options)
    assert str(tmp_path) in str(info.value) and "--overwrite" in str(info.value)
    # the advice works: a fresh start into the same folder runs
    fresh = fxconet.optimize_channels(Net(), data="digits", out=tmp_path, overwrite=True, **options)
    assert len(fresh.history) == 3


def test_a_fresh_search_refuses_a_used_folder_unless_told_to_overwrite(tmp_path):
    options = dict(SMALL, trials=2)
    (tmp_path / "notes.txt").write_text("the user's own file")
    fxconet.optimize_channels(Net(), data="digits", out=tmp_path, **options)
    with pytest.raises(SearchError, match="holds the checkpoints of an earlier search"):
        fxconet.optimize_channels(Net(), data="digits", out=tmp_path, **dict(options, trials=1))
    fresh = fxconet.optimize_channels(
        Net(), data="digits", out=tmp_path, overwrite=True, **dict(options, trials=1)
    )
    assert len(fresh.history) == 1
    assert sorted(p.name for p in tmp_path.glob("trial_*.json")) == ["trial_000.json"]
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"
    file = tmp_path / "notes.txt"
    with pytest.raises(SearchError, match="is a file"):
        fxconet.optimize_channels(Net(), data="digits", out=file, **options)


def test_user_training_loop_is_called_per_trial():
    calls = []

    def my_loop(model, *, epochs, on_epoch_end):
        calls.append(epochs)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for epoch in range(epochs):
            for _ in range(3):
                x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            on_epoch_end(epoch, model)

    result = fxconet.optimize_channels(
        Net(), torch.randn(1, 1, 8, 8), method="conet", train_fn=my_loop, trials=2,
        epochs_per_trial=2, progress=False,
    )  # fmt: skip
    assert calls == [2, 2] and len(result.history) == 2


def test_static_and_uniform_methods():
    x = torch.randn(1, 1, 8, 8)
    static = fxconet.optimize_channels(Net(), x, scale=1.0)  # no data: ranks of these weights
    assert static.method == "static" and static.params_after <= static.params_before
    uniform = fxconet.optimize_channels(Net(), x, method="uniform", phi=2.0)
    assert uniform.widths == {g.id: 2 * g.size for g in uniform.graph.free}
    with_data = fxconet.optimize_channels(
        Net(), data="digits", method="static", baseline_epochs=2, scale=0.5,
        max_batches_per_epoch=2, progress=False,
    )  # fmt: skip
    assert set(with_data.widths) == {g.id for g in with_data.graph.free}


def test_optimize_rejects_bad_options():
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(TypeError, match="unknown options \\['deltta'\\]"):
        fxconet.optimize_channels(Net(), data="digits", deltta=0.1)
    with pytest.raises(ValueError, match="method"):
        fxconet.optimize_channels(Net(), x, method="magic")
    with pytest.raises(ValueError, match="example_inputs or data"):
        fxconet.optimize_channels(Net())
    with pytest.raises(SearchError, match="training data"):
        fxconet.optimize_channels(Net(), x, method="conet")


# ---------------------------------------------------------------------------------------------
# the command


def test_cli_optimize_and_analyze(tmp_path, capsys):
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--trials", "2", "--epochs-per-trial",
         "2", "--epochs", "1", "--max-batches", "2", "--out", str(tmp_path), "--quiet",
         "--delta", "0.05"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "parameters" in out and "MACs" in out and "test accuracy" in out
    assert (tmp_path / "report.json").is_file()
    assert main(["analyze", "cifar_resnet20", "--data", "digits"]) == 0
    assert "12 free" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["optimize", "no_such_net", "--data", "digits"], "unknown model 'no_such_net'"),
        (["optimize", "cifar_resnet20", "--data", "nope"], "unknown dataset 'nope'"),
        (["optimize", "cifar_resnet20", "--data", "fashion-mnist", "--data-dir", "/no/where"],
         "/no/where"),
        (["optimize", "cifar_resnet20", "--data", "digits", "--delta", "-1"], "--delta"),
        (["optimize", "cifar_resnet20", "--data", "digits", "--resume", "--out", "/tmp/fx-none"],
         "nothing to resume"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_nonzero(argv, message, capsys):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse errors
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_train_config_is_forwarded():
    seen = []
    result = fxconet.optimize_channels(
        Net(), data="digits", method="uniform", phi=1.0, epochs=1,
        train_config=TrainConfig(max_batches_per_epoch=1, batch_size=8, lr=0.01),
        log=seen.append, progress=False,
    )  # fmt: skip
    assert result.accuracy is not None and result.config["train"]["lr"] == 0.01


class RawConvNet(nn.Module):
    """A conv through F.conv2d on a raw parameter: its ranks are tracked like a module's."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 1, 3, 3) * 0.3)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(nn.functional.conv2d(x, self.weight, padding=1))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def test_search_tracks_raw_parameter_convs():
    result = fxconet.optimize_channels(RawConvNet(), data="digits", **dict(SMALL, trials=2))
    first = result.history[0]
    assert "weight" in first["layer_ranks"]
    gid = next(g.id for g in result.graph.free if g.producers == ("weight",))
    assert first["slopes"][str(gid)] is not None


# ---------------------------------------------------------------------------------------------
# the whole chain on planted rank curves: ranks -> group slopes -> decisions -> widths


class _TwoGroups(nn.Module):
    """a -> b -> head: group 0 is a's output (= b's input), group 1 is b's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(h.mean((2, 3)))


def _plant_ranks(weight: torch.Tensor, r_out: int, r_in: int, seed: int) -> None:
    """A conv weight whose output unfolding has rank ``r_out`` and input unfolding ``r_in``
    (a Tucker core far above the noise), as EVBMF measures them."""
    g = torch.Generator().manual_seed(seed)
    out, inp, kh, kw = weight.shape
    u = torch.linalg.qr(torch.randn(out, r_out, generator=g))[0]
    v = torch.linalg.qr(torch.randn(inp, r_in, generator=g))[0]
    core = torch.randn(r_out, r_in, kh, kw, generator=g) * 10.0
    low = torch.einsum("oi,ijhw,kj->okhw", u, core, v)
    with torch.no_grad():
        weight.copy_(low + 1e-3 * torch.randn(weight.shape, generator=g))


def test_a_search_on_planted_rank_curves_ends_with_the_rules_widths():
    """Group 0's rank rises by 1/4 of its width per epoch (slope 0.25 per epoch, 0.75 per
    3-epoch trial >= delta = 0.15: expand); group 1's stays at half (slope 0: shrink)."""
    x = torch.zeros(1, 1, 8, 8)
    model = _TwoGroups()
    graph = fxconet.analyze(model, x)
    assert [g.producers for g in graph.free] == [("a",), ("b",)]

    def train_fn(m, *, epochs, on_epoch_end):
        a_width, b_width = m.b.in_channels, m.b.out_channels
        for e in range(epochs):
            r_in = round(a_width * (e + 1) / 4)  # 1/4, 2/4, 3/4 of the width
            _plant_ranks(m.b.weight, r_out=b_width // 2, r_in=r_in, seed=e)
            on_epoch_end(e, m)

    result = fxconet.optimize_channels(
        model, x, method="conet", train_fn=train_fn, trials=4, epochs_per_trial=3, progress=False
    )
    record = result.history[0]
    assert record["slopes"]["0"] == pytest.approx(0.75, abs=0.02)  # (3/4 - 1/4) / 2 * 3
    assert record["slopes"]["1"] == pytest.approx(0.0, abs=0.02)
    # Eq. 5 by hand (phi 0.2, even rounding, bounds 0.5x..8x = 8..128):
    # group 0 expands every trial: 16 -> 19.2 -> 20 -> 24 -> 28.8 -> 28 -> 33.6 -> 34
    # group 1 shrinks: 16 -> 12.8 -> 12 -> 9.6 -> 10 -> 8 (the floor); at the floor a shrink
    # turns into an expansion (the code), a flip: phi halves to 0.1 and 8 * 1.1 = 8.8 -> 8
    assert [h["next_widths"]["0"] for h in result.history] == [20, 24, 28, 34]
    assert [h["next_widths"]["1"] for h in result.history] == [12, 10, 8, 8]
    assert result.widths == {0: 34, 1: 8}
    assert result.history[-1]["phi"]["1"] == pytest.approx(0.1)
