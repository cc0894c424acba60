"""Tests of fxconet.train: the training loop, evaluation, hooks and counters."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxconet.cost import count_macs, count_params
from fxconet.data import load_dataset, make_loader
from fxconet.errors import DataError
from fxconet.models import cifar_resnet20
from fxconet.train import (
    EvalResult,
    TrainConfig,
    TrainHistory,
    evaluate,
    run_training,
    seed_everything,
    select_device,
    train,
)


def _tiny_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


class _ConstantLogits(nn.Module):
    """Ignores the input and returns fixed logits; makes evaluate() exactly predictable."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


# ----------------------------------------------------------------------------------- config


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected and select_device("auto").type == expected
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu7'"):
        select_device("gpu7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only machine")
def test_select_device_rejects_missing_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("lr", 0.0),
        ("momentum", 1.0),
        ("weight_decay", -1.0),
        ("schedule", "linear"),
        ("step_size", 0),
        ("gamma", 0.0),
        ("batch_size", 0),
        ("label_smoothing", 1.0),
        ("max_batches_per_epoch", 0),
        ("num_workers", -1),
    ],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}={value!r}"):
        TrainConfig(**{field: value})


def test_train_config_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov=True: needs momentum > 0"):
        TrainConfig(nesterov=True, momentum=0.0)


def test_schedules():
    step = TrainConfig(epochs=6, lr=0.1, schedule="step", step_size=2, gamma=0.5)
    assert [step.lr_at(e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    cosine = TrainConfig(epochs=4, lr=0.1, schedule="cosine")
    assert [cosine.lr_at(e) for e in range(4)] == pytest.approx(
        [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    )
    assert TrainConfig(lr=0.3, schedule="constant").lr_at(99) == 0.3
    assert TrainConfig(device=torch.device("cpu")).to_dict()["device"] == "cpu"


# ----------------------------------------------------------------------------------- train


def test_train_decreases_loss_on_digits():
    seed_everything(0)
    # Keeps the 8x8 layout (no global pool): learns digits within a few epochs on a CPU.
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    before = evaluate(model, "digits").loss
    history = train(model, "digits", TrainConfig(epochs=3, lr=0.1), progress=False)
    assert history.epochs == 3
    assert history.train_loss[-1] < 0.6 * history.train_loss[0]
    assert history.train_accuracy[-1] > 0.8
    after = evaluate(model, "digits")
    assert after.loss < before / 2 and after.accuracy > 0.8 and after.num_samples == 359


def test_fake_data_is_learnable():
    seed_everything(0)
    model = _tiny_cnn(in_channels=3)
    options = {"image_size": 16, "train_size": 256}
    config = TrainConfig(epochs=3, batch_size=32, schedule="constant", lr=0.05)
    history = train(model, load_dataset("fake", **options), config, progress=False)
    assert history.train_loss[-1] < history.train_loss[0]
    test = load_dataset("fake", split="test", **options)
    assert evaluate(model, test).accuracy > 0.5  # chance: 0.1


def test_on_epoch_end_runs_once_per_epoch_after_the_last_step():
    model = _tiny_cnn()
    calls = []

    def on_epoch_end(epoch: int, m: nn.Module) -> None:
        # The callback sees this epoch's weights: the optimiser has stepped, grads are present.
        calls.append((epoch, m is model, m.training, m[0].weight.grad is not None))

    train(
        model,
        "digits",
        TrainConfig(epochs=3, max_batches_per_epoch=2),
        on_epoch_end=on_epoch_end,
        progress=False,
    )
    assert calls == [(0, True, True, True), (1, True, True, True), (2, True, True, True)]


def test_train_is_deterministic_under_a_seed():
    def run(seed: int) -> tuple[TrainHistory, torch.Tensor]:
        seed_everything(123)  # identical initial weights each time
        model = _tiny_cnn()
        config = TrainConfig(epochs=2, max_batches_per_epoch=4, seed=seed)
        data = load_dataset("digits", augment=True)
        return train(model, data, config, progress=False), model[0].weight.detach().clone()

    (h1, w1), (h2, w2), (h3, w3) = run(0), run(0), run(1)
    assert h1.train_loss == h2.train_loss and torch.equal(w1, w2)
    assert h1.train_loss != h3.train_loss and not torch.equal(w1, w3)


def test_train_leaves_the_callers_rng_alone():
    model = _tiny_cnn()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(model, "digits", TrainConfig(epochs=1, max_batches_per_epoch=1), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_train_records_lr_and_validation():
    model = _tiny_cnn()
    config = TrainConfig(epochs=3, lr=0.2, schedule="step", step_size=1, gamma=0.5)
    config = TrainConfig(**{**config.__dict__, "max_batches_per_epoch": 2})
    history = train(model, "digits", config, val_data="digits", progress=False)
    assert history.lr == pytest.approx((0.2, 0.1, 0.05))
    assert len(history.val_accuracy) == 3 and all(0 <= a <= 1 for a in history.val_accuracy)
    d = history.to_dict()
    assert set(d) == {"train_loss", "train_accuracy", "lr", "seconds", "val_loss", "val_accuracy"}
    assert all(isinstance(v, float) for values in d.values() for v in values)
    assert "val_acc" in str(history)


def test_max_batches_per_epoch_limits_the_steps():
    model = _tiny_cnn()
    batches = []
    model[0].register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    loader = make_loader(load_dataset("digits"), batch_size=10, shuffle=True, seed=0)
    train(model, loader, TrainConfig(epochs=2, max_batches_per_epoch=3), progress=False)
    assert batches == [10] * 6  # the DataLoader's own batch size wins over config.batch_size


def test_train_on_empty_data_raises():
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="TensorDataset is empty"):
        train(_tiny_cnn(), empty, TrainConfig(epochs=1), progress=False)
    loader = make_loader(
        TensorDataset(torch.zeros(3, 1, 8, 8), torch.zeros(3).long()),
        batch_size=4,
        shuffle=False,
        seed=0,
        drop_last=True,
    )
    with pytest.raises(DataError, match="no batch"):
        train(_tiny_cnn(), loader, TrainConfig(epochs=1), progress=False)


def test_train_history_validates_lengths():
    with pytest.raises(ValueError, match=r"TrainHistory\.lr=\(\): needs 1 values"):
        TrainHistory(train_loss=(1.0,), train_accuracy=(0.5,), lr=(), seconds=(1.0,))


# ----------------------------------------------------------------------------------- evaluate


def test_evaluate_is_exact_on_constant_logits():
    test = load_dataset("digits", split="test")
    zeros = _ConstantLogits(torch.zeros(10))
    result = evaluate(zeros, test)
    # Uniform logits: loss ln(10); argmax picks class 0, so accuracy is the share of zeros.
    assert result.loss == pytest.approx(math.log(10))
    assert result.accuracy == pytest.approx(float((test.targets == 0).float().mean()))
    assert result.num_samples == 359
    partial = evaluate(zeros, test, batch_size=100, max_batches=2)
    assert partial.num_samples == 200


def test_evaluate_restores_the_mode():
    model = _tiny_cnn()
    model.train()
    evaluate(model, "digits", max_batches=1)
    assert model.training
    model.eval()
    evaluate(model, "digits", max_batches=1, device="cpu")
    assert not model.training
    with pytest.raises(ValueError, match=r"EvalResult\.accuracy=2"):
        EvalResult(loss=0.0, accuracy=2, num_samples=1)


# ----------------------------------------------------------------------------------- hooks


def test_run_training_dispatches_to_the_user_loop():
    model = _tiny_cnn()
    seen = []

    def train_fn(m: nn.Module, *, epochs: int, on_epoch_end) -> str:
        assert m is model
        for epoch in range(epochs):
            on_epoch_end(epoch, m)
        return "done"

    out = run_training(
        model, epochs=3, on_epoch_end=lambda e, m: seen.append(e), train_fn=train_fn, data="x"
    )
    assert out == "done" and seen == [0, 1, 2]


def test_run_training_uses_the_builtin_loop():
    seen = []
    history = run_training(
        _tiny_cnn(),
        epochs=2,
        on_epoch_end=lambda e, m: seen.append(e),
        data="digits",
        config=TrainConfig(epochs=9, max_batches_per_epoch=1),
        progress=False,
    )
    assert isinstance(history, TrainHistory) and history.epochs == 2 and seen == [0, 1]
    with pytest.raises(DataError, match="needs data="):
        run_training(_tiny_cnn(), epochs=1, on_epoch_end=lambda e, m: None)
    with pytest.raises(ValueError, match="epochs=0"):
        run_training(_tiny_cnn(), epochs=0, on_epoch_end=lambda e, m: None, data="digits")


# ----------------------------------------------------------------------------------- counters


def test_count_params():
    assert count_params(nn.Conv2d(3, 8, 3)) == 8 * 3 * 9 + 8
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, shared)) == 20  # counted once


def test_count_macs_on_known_layers():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 8 * 8 * 3 * 3 * 3
    strided = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)
    # (N, C_out, H_out, W_out) = (2, 6, 5, 5); each output sums (4 / 2) * 3 * 3 products.
    assert count_macs(strided, torch.randn(2, 4, 10, 10)) == 2 * 6 * 5 * 5 * 2 * 9
    assert count_macs(nn.Linear(10, 7), torch.randn(3, 10)) == 3 * 10 * 7
    net = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    assert count_macs(net, (torch.randn(1, 3, 8, 8),)) == 13824 + 5120
    assert net.training  # mode restored


def test_count_macs_on_a_graph_module():
    net = _tiny_cnn()
    gm = torch.fx.symbolic_trace(net)
    x = torch.randn(1, 1, 8, 8)
    expected = 16 * 64 * 9 + 32 * 16 * 16 * 9 + 32 * 10
    assert count_macs(net, x) == count_macs(gm, x) == expected
    assert count_params(gm) == count_params(net)


def test_seed_everything():
    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ---------------------------------------------------------------------------------------------
# AdaS


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def test_adas_follows_the_published_update(monkeypatch):
    """lr_l(e+1) = max(beta * R + dG, min) with R the running rate, dG the gain's rise (lr at
    e = 0); a layer's BatchNorm shares its rate."""
    import fxconet.metrics as M
    from fxconet.train import AdaS

    model = _ConvBN()
    gains = {  # mean gain of each layer after epochs 0, 1, 2, 3
        "conv": [0.10, 0.30, 0.35, 0.35],
        "conv2": [0.05, 0.05, 0.20, 0.00],
        "fc": [0.00, 0.50, 0.50, 0.50],
    }
    epoch = {"e": 0}

    def planted(m, reference=False):
        e = epoch["e"]
        return [
            M.LayerMetrics(
                path=p, kind="linear" if p == "fc" else "conv", shape=(4, 4, 3, 3),
                in_rank=0.0, out_rank=0.0, in_condition=0.0, out_condition=0.0,
                in_gain=g[e], out_gain=g[e],
            )
            for p, g in gains.items()
        ]  # fmt: skip

    monkeypatch.setattr(M, "layer_metrics", planted)
    adas = AdaS(model, lr=0.03, beta=0.8)
    groups = adas.param_groups()
    assert [g["layer"] for g in groups] == ["conv", "conv2", "fc"]
    first = {id(p) for p in groups[0]["params"]}
    assert {id(model.bn.weight), id(model.bn.bias), id(model.conv.weight)} <= first
    opt = torch.optim.SGD(groups, lr=0.03)
    expected = {p: 0.0 for p in gains}
    previous: dict[str, float] = {}
    for e in range(4):
        epoch["e"] = e
        previous = dict(adas.rates())
        rates = adas.step(opt)
        for p, g in gains.items():
            v = 0.03 if e == 0 else g[e] - g[e - 1]
            expected[p] = 0.8 * expected[p] + v
            assert rates[p] == pytest.approx(max(expected[p], 1e-20)), (p, e)
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(rates[group["layer"]])
    # a layer whose gain stalls decays by beta per epoch; one whose gain fell stops at min_lr
    assert rates["conv"] == pytest.approx(0.8 * previous["conv"])
    assert rates["conv2"] == 1e-20


def test_training_with_the_adas_schedule_records_per_layer_rates():
    model = _ConvBN()
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
    history = train(
        model, data, TrainConfig(epochs=3, schedule="adas", lr=0.05, batch_size=16), progress=False
    )
    assert history.lr[0] == pytest.approx(0.05) and history.epochs == 3
    assert all(math.isfinite(v) for v in history.train_loss)


def test_evaluate_and_count_macs_keep_every_submodules_mode():
    from fxconet.cost import count_macs

    model = _ConvBN()
    model.train()
    model.bn.eval()  # the user froze this BatchNorm
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    evaluate(model, data)
    count_macs(model, torch.randn(1, 1, 8, 8))
    assert model.training and model.conv.training and not model.bn.training


def test_mixed_precision_and_channels_last_train_and_fp16_needs_cuda():
    torch.manual_seed(0)
    net = cifar_resnet20(in_channels=1)
    cfg = TrainConfig(epochs=1, max_batches_per_epoch=3, batch_size=32, precision="bf16",
                      channels_last=True)  # fmt: skip
    history = train(net, "digits", cfg, progress=False)
    assert math.isfinite(history.train_loss[0])
    conv = net.conv1.weight
    assert conv.dtype == torch.float32  # the weights stay float32
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            train(net, "digits", TrainConfig(epochs=1, precision="fp16", device="cpu"),
                  progress=False)  # fmt: skip
