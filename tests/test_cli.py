"""The ``fxconet`` command as a user meets it: the saved model, starting weights, own models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fxconet import export
from fxconet.cli import main
from fxconet.data import load_dataset
from fxconet.models import cifar_resnet20

FAST = ["--epochs", "1", "--max-batches", "2", "--batch-size", "32", "--quiet"]


@pytest.mark.slow
def test_the_saved_model_loads_with_plain_torch_and_matches(tmp_path, capsys):
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--method", "uniform",
         "--target-macs", "50%", "--out", str(tmp_path), *FAST]
    )  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "model.pt2" in out and "torch.export.load" in out
    # a torch-only process: no fxconet import, no pickled code
    script = (
        "import sys, torch\n"
        f"m = torch.export.load({str(tmp_path / 'model.pt2')!r}).module()\n"
        "x = torch.load(sys.argv[1], weights_only=True)\n"
        "torch.save(m(x), sys.argv[2])\n"
        "assert 'fxconet' not in sys.modules\n"
    )
    x = torch.stack([load_dataset("digits", split="test")[i][0] for i in range(5)])
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        cwd=tmp_path,
    )
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    assert y.shape == (5, 10)  # any batch size: the batch dim is dynamic
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["budget"]["within_tolerance"]
    # the code-free save, written by default beside it, computes the same
    assert "load_safe" in out
    safe = export.load_safe(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(safe(x), y, rtol=1e-5, atol=1e-6)


def test_weights_are_the_starting_point(tmp_path, capsys):
    model = cifar_resnet20(num_classes=10, in_channels=1)
    with torch.no_grad():
        model.fc.bias.fill_(3.0)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--method", "uniform", "--phi", "1",
         "--epochs", "0", "--weights", str(tmp_path / "w.pt"), "--save", "none",
         "--out", str(tmp_path / "run"), "--quiet"]
    )  # fmt: skip
    assert status == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["baseline_accuracy"] is not None  # the given weights were evaluated
    bad = cifar_resnet20(num_classes=3, in_channels=1)
    torch.save(bad.state_dict(), tmp_path / "bad.pt")
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--weights", str(tmp_path / "bad.pt"),
         "--out", str(tmp_path / "x"), "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "does not fit the model" in err and len(err.strip().splitlines()) == 1


def test_a_module_callable_in_the_current_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def make_net(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.ReLU(),\n"
        "        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "mynets:make_net", "--data", "digits"]) == 0
    assert "1 free" in capsys.readouterr().out


def test_a_format_that_cannot_hold_the_model_loses_no_other(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise export.ExportError("a layer cannot be written as data")

    monkeypatch.setattr(export, "save_safe", refuse)
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--method", "uniform", "--phi", "1",
         "--epochs", "0", "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 1
    assert "--save safe: a layer cannot be written as data" in captured.err
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "report.json").is_file()
    assert "Traceback" not in captured.err


def test_with_a_budget_and_no_method_the_command_runs_greedy_and_scales_an_untrained_model(
    tmp_path,
):
    status = main(
        ["optimize", "cifar_resnet20", "--data", "digits", "--target-macs", "50%",
         "--eval-batches", "1", "--save", "none", "--out", str(tmp_path), *FAST]
    )  # fmt: skip
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "greedy" and report["greedy"]["fallback"] == "uniform"
    assert report["budget"]["within_tolerance"]
