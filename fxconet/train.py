"""The small training loop the search strategies use, and the hook for bringing your own.

The strategies train every candidate network the same way: :func:`run_training` either runs the
built-in loop (:func:`train`: SGD with momentum, cross-entropy, a per-epoch learning-rate
schedule) or calls the user's ``train_fn`` (see :data:`TrainFn`). Either way ``on_epoch_end(epoch,
model)`` runs after each epoch's last optimiser step, which is where CONet measures the weights'
ranks (reference ``train_help.py``: after the last step, before the test pass).

Also here: :func:`evaluate`, :func:`select_device` and :func:`seed_everything` (parameters and
MACs are counted in :mod:`fxconet.cost`).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fxconet import distributed
from fxconet.data import as_loader
from fxconet.errors import DataError
from fxconet.passes.module_copy import evaluating

__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "EpochCallback",
    "EvalResult",
    "TrainConfig",
    "TrainFn",
    "TrainHistory",
    "evaluate",
    "recalibrate_norms",
    "run_training",
    "seed_everything",
    "select_device",
    "train",
]

SCHEDULES = ("step", "cosine", "constant", "adas")
PRECISIONS = ("fp32", "bf16", "fp16")

EpochCallback = Callable[[int, nn.Module], None]
"""``on_epoch_end(epoch, model)``: called after each epoch's last optimiser step, epochs from 0."""

TrainFn = Callable[..., Any]
"""A user's training loop: ``train_fn(model, *, epochs: int, on_epoch_end: EpochCallback)``.

The function trains ``model`` in place for ``epochs`` epochs and calls ``on_epoch_end(epoch,
model)`` after each epoch's last optimiser step (``epoch`` counts from 0). Its return value is
passed through :func:`run_training`. Anything that trains a module in place fits: a plain loop, a
Lightning ``Trainer.fit`` with a callback forwarding ``on_train_epoch_end``, or DDP under torchrun,
where ranks other than 0 may skip the callback (the search reads the weights on rank 0). Pass
``model`` itself (not a copy) to DDP or Lightning, so the caller sees the trained weights.
"""


def select_device(device: str | torch.device | None = None) -> torch.device:
    """Pick the device to train on: the one asked for, else CUDA when available (inside a
    torchrun job: this rank's GPU, ``cuda:LOCAL_RANK``), else CPU.

    Args:
        device: ``None`` or ``"auto"`` to choose, otherwise any ``torch.device`` spec.

    Returns:
        The device.

    Raises:
        ValueError: the spec is malformed, or names CUDA on a machine without it.

    Example:
        >>> select_device("cpu")
        device(type='cpu')
    """
    if device is None or device == "auto":
        if distributed.is_distributed():
            return distributed.local_device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: not a device ({e})") from e
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use 'cpu'")
    return chosen


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU).

    Args:
        seed: the seed.

    Example:
        >>> seed_everything(0); a = torch.rand(2)
        >>> seed_everything(0); torch.equal(a, torch.rand(2))
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the built-in training loop.

    The defaults are the papers' (lr 0.1, momentum 0.9, weight decay 5e-4, batch 128: CONet's
    evaluation and APS's CIFAR retraining) with two choices for short runs of small CNNs on a
    CPU: 10 epochs, and a per-epoch cosine schedule, which ends any number of epochs at a small
    rate without tuning a step size. In 5-epoch runs on digits and fake data, lr 0.1 trained
    ResNet-20 and ResNet-56 at least as fast as 0.05 or 0.02.

    Attributes:
        epochs: passes over the training data, >= 1.
        lr: initial learning rate, > 0.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty on every parameter (BN included, as both papers do), >= 0.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        schedule: ``"step"`` (times ``gamma`` every ``step_size`` epochs), ``"cosine"``
            (``lr * (1 + cos(pi * epoch / epochs)) / 2``), ``"constant"``, or ``"adas"``
            (a learning rate per layer from its knowledge gain, :class:`AdaS`; CONet's
            search optimiser).
        step_size: epochs between decays of the step schedule, >= 1.
        gamma: decay factor of the step schedule, in (0, 1].
        adas_beta: AdaS's gain factor ``beta`` in [0, 1) (its paper and CONet's code: 0.8).
        batch_size: batch size when the loop builds the DataLoader itself, >= 1.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        seed: seeds the data order, augmentation and any dropout; the run is reproducible.
        device: where to train; ``None`` picks CUDA when available (see :func:`select_device`).
        max_batches_per_epoch: stop each training epoch after this many batches (``None``:
            all); for quick tests and demos. Validation and test data are still evaluated in
            full.
        num_workers: DataLoader workers when the loop builds the DataLoader itself.
        precision: ``"fp32"``; ``"bf16"`` (autocast to bfloat16, on the CPU or a GPU) or
            ``"fp16"`` (autocast to float16 with a gradient scaler, CUDA only): mixed precision
            for the forward pass and loss, the weights and the optimiser stay float32.
        channels_last: train in the ``channels_last`` memory format (faster convs on recent
            GPUs with mixed precision); the model is returned in it.

    Example:
        >>> TrainConfig(epochs=3, schedule="step", step_size=1).lr
        0.1
    """

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    step_size: int = 25
    gamma: float = 0.5
    adas_beta: float = 0.8
    batch_size: int = 128
    label_smoothing: float = 0.0
    seed: int = 0
    device: str | torch.device | None = None
    max_batches_per_epoch: int | None = None
    num_workers: int = 0
    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("nesterov", not self.nesterov or self.momentum > 0, "needs momentum > 0"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("step_size", self.step_size >= 1, "must be >= 1"),
            ("gamma", 0 < self.gamma <= 1, "must be in (0, 1]"),
            ("adas_beta", 0 <= self.adas_beta < 1, "must be in [0, 1)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            (
                "max_batches_per_epoch",
                self.max_batches_per_epoch is None or self.max_batches_per_epoch >= 1,
                "must be None or >= 1",
            ),
            ("num_workers", self.num_workers >= 0, "must be >= 0"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during ``epoch`` (counting from 0).

        Example:
            >>> TrainConfig(lr=0.1, schedule="step", step_size=2, gamma=0.5).lr_at(3)
            0.05
        """
        return self.lr * self._factor(epoch)

    def sgd(self, params: Any) -> torch.optim.SGD:
        """The SGD optimizer of these settings (lr, momentum, weight decay, Nesterov)."""
        return torch.optim.SGD(
            params,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )

    def _factor(self, epoch: int) -> float:
        """The schedule's factor of ``lr`` in ``epoch`` (AdaS: 1, its rates are per layer)."""
        if self.schedule == "step":
            return self.gamma ** (epoch // self.step_size)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the device as a string).

        Example:
            >>> TrainConfig().to_dict()["schedule"]
            'cosine'
        """
        d = asdict(self)
        d["device"] = None if self.device is None else str(self.device)
        return d


@dataclass(frozen=True)
class TrainHistory:
    """Per-epoch numbers of one :func:`train` run (plain floats; accuracies in [0, 1]).

    Attributes:
        train_loss: mean training loss of each epoch (with label smoothing if configured).
        train_accuracy: training accuracy of each epoch, measured on the fly in train mode.
        lr: learning rate used in each epoch.
        seconds: wall-clock time of each epoch, validation included.
        val_loss: validation loss after each epoch (empty without ``val_data``).
        val_accuracy: validation accuracy after each epoch (empty without ``val_data``).

    Example:
        >>> h = TrainHistory(train_loss=(2.0, 1.5), train_accuracy=(0.2, 0.5), lr=(0.1, 0.05),
        ...                  seconds=(1.0, 1.0))
        >>> h.epochs, h.to_dict()["train_loss"]
        (2, [2.0, 1.5])
    """

    train_loss: tuple[float, ...] = ()
    train_accuracy: tuple[float, ...] = ()
    lr: tuple[float, ...] = ()
    seconds: tuple[float, ...] = ()
    val_loss: tuple[float, ...] = ()
    val_accuracy: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.train_loss)
        for name in ("train_accuracy", "lr", "seconds"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"TrainHistory.{name}={getattr(self, name)!r}: needs {n} values, one per epoch"
                )
        for name in ("val_loss", "val_accuracy"):
            if len(getattr(self, name)) not in (0, n):
                raise ValueError(
                    f"TrainHistory.{name}={getattr(self, name)!r}: needs 0 or {n} values"
                )

    @property
    def epochs(self) -> int:
        """Number of epochs recorded."""
        return len(self.train_loss)

    def to_dict(self) -> dict[str, list[float]]:
        """The history as a JSON-ready dict of lists."""
        return {name: list(values) for name, values in asdict(self).items()}

    def __str__(self) -> str:
        has_val = bool(self.val_accuracy)
        head = "epoch  train_loss  train_acc  " + ("val_loss  val_acc  " if has_val else "")
        rows = [head + "lr        seconds"]
        for e in range(self.epochs):
            row = f"{e:5d}  {self.train_loss[e]:10.4f}  {self.train_accuracy[e]:9.4f}  "
            if has_val:
                row += f"{self.val_loss[e]:8.4f}  {self.val_accuracy[e]:7.4f}  "
            rows.append(row + f"{self.lr[e]:.2e}  {self.seconds[e]:7.2f}")
        return "\n".join(rows)


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and accuracy (in [0, 1]) over ``num_samples`` items.

    Example:
        >>> EvalResult(loss=0.5, accuracy=0.9, num_samples=10).accuracy
        0.9
    """

    loss: float
    accuracy: float
    num_samples: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.accuracy <= 1.0:
            raise ValueError(f"EvalResult.accuracy={self.accuracy!r}: must be in [0, 1]")
        if self.num_samples < 0:
            raise ValueError(f"EvalResult.num_samples={self.num_samples!r}: must be >= 0")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class AdaS:
    """AdaS (Hosseini & Plataniotis, "AdaS: Adaptive Scheduling of Stochastic Gradients",
    2020): a learning rate per layer, driven by how fast the layer's *knowledge gain* grows.

    After every epoch ``e``, for every conv or linear layer ``l`` with mean knowledge gain
    ``G_l(e)`` (the mean of its input and output unfoldings' gains, :mod:`fxconet.metrics`)::

        v_l = lr                      (e = 0)
        v_l = G_l(e) - G_l(e - 1)     (e >= 1)
        R_l = beta * R_l + v_l        (R_l = 0 before the first epoch)
        lr_l = max(R_l, 1e-20)        (the rate of the next epoch)

    so a layer keeps learning while its gain rises and its rate decays by ``beta`` per epoch
    once the gain stalls (this is the published update with ``zeta = 1``, as CONet's code runs
    it: ``beta = 0.8``, momentum 0.9, weight decay 5e-4, initial ``lr`` 0.03 for ResNets).

    A layer's rate also applies to the parameters of the modules registered after it up to the
    next conv or linear layer (its BatchNorm). Deviation from CONet's code: a linear layer
    uses its own gain (the code gives the classifier the last conv layer's output gain).

    Args:
        model: the network (its conv and linear layers in registration order).
        lr: the initial rate of every layer.
        beta: the gain factor.
        min_lr: the smallest rate.

    Example:
        >>> adas = AdaS(model, lr=0.03)
        >>> opt = torch.optim.SGD(adas.param_groups(), lr=0.03, momentum=0.9)
        >>> ...                                   # one epoch of training
        >>> adas.step(opt)                        # per-layer rates for the next epoch
    """

    def __init__(
        self, model: nn.Module, *, lr: float, beta: float = 0.8, min_lr: float = 1e-20
    ) -> None:
        self.model = model
        self.lr = lr
        self.beta = beta
        self.min_lr = min_lr
        self.epoch = 0
        self._groups = _layer_param_groups(model)
        self._velocity: dict[str, float] = {path: 0.0 for path in self._groups}
        self._gain: dict[str, float] = {}

    @property
    def layers(self) -> list[str]:
        """The layers with a rate of their own, in order."""
        return list(self._groups)

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: one per layer (``"layer"`` names it)."""
        return [
            {"params": params, "lr": self.lr, "layer": path}
            for path, params in self._groups.items()
        ]

    def rates(self) -> dict[str, float]:
        """The current rate of every layer."""
        return {p: max(r, self.min_lr) for p, r in self._velocity.items()}

    def step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Measure the gains after an epoch and set every layer's rate for the next one."""
        from fxconet.metrics import layer_metrics  # scipy: loaded on first use

        gains = {m.path: 0.5 * (m.in_gain + m.out_gain) for m in layer_metrics(self.model)}
        for path in self._groups:
            gain = gains.get(path, 0.0)
            v = self.lr if self.epoch == 0 else gain - self._gain.get(path, 0.0)
            self._velocity[path] = self.beta * self._velocity[path] + v
            self._gain[path] = gain
        self.epoch += 1
        rates = self.rates()
        for group in optimizer.param_groups:
            if group.get("layer") in rates:
                group["lr"] = rates[group["layer"]]
        return rates


def _layer_param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by the conv/linear layer that owns them or precedes their module."""
    groups: dict[str, list[nn.Parameter]] = {}
    leading: list[nn.Parameter] = []
    seen: set[int] = set()
    current: str | None = None
    for path, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            current = path or "<root>"
            groups.setdefault(current, [])
        if not own:
            continue
        if current is None:
            leading.extend(own)
        else:
            groups[current].extend(own)
    if not groups:
        return {"<all>": leading}
    first = next(iter(groups))
    groups[first] = leading + groups[first]
    return groups


def train(
    model: nn.Module,
    data: Dataset | DataLoader | str,
    config: TrainConfig | None = None,
    *,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    val_data: Dataset | DataLoader | str | None = None,
) -> TrainHistory:
    """Train ``model`` in place with SGD, cross-entropy and a per-epoch learning-rate schedule.

    The model is moved to the configured device and left there. The run is a function of the
    model's initial state, the data and ``config``: the loader's order comes from
    ``config.seed`` and torch's global RNG (augmentation, dropout) is reseeded from it inside a
    forked RNG state, so the caller's RNG streams are untouched.

    Args:
        model: the network; its output must be ``(N, num_classes)`` logits.
        data: a Dataset (shuffled into batches of ``config.batch_size``), a DataLoader (used as
            is) or a built-in dataset name (its ``"train"`` split, without augmentation).
        config: the settings; ``TrainConfig()`` when ``None``.
        on_epoch_end: ``callback(epoch, model)`` after each epoch's last optimiser step,
            before the scheduler step and validation.
        progress: show a tqdm bar per epoch (hidden when stderr is not a terminal).
        val_data: evaluated after every epoch when given (a name means its ``"test"`` split).

    Returns:
        The per-epoch :class:`TrainHistory`.

    Raises:
        DataError: the data cannot be loaded or yields no batch.
        DistributedError: under torch.distributed, a collective failed (another rank stopped);
            the message names this rank, the epoch and the step.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> cfg = TrainConfig(epochs=2, max_batches_per_epoch=3)
        >>> history = train(net, "digits", cfg, progress=False)
        >>> history.epochs
        2
    """
    config = config or TrainConfig()
    progress = progress and distributed.is_main()  # one bar per job
    sharded = distributed.is_distributed()
    device = distributed.local_device() if sharded and config.device is None else None
    device = device or select_device(config.device)
    sampler = None
    if sharded and not isinstance(data, DataLoader):
        loader, sampler = _sharded_loader(data, config)
    else:
        loader = as_loader(
            data,
            batch_size=config.batch_size,
            shuffle=True,
            seed=config.seed,
            num_workers=config.num_workers,
        )
    val_loader = None
    if val_data is not None:
        val_loader = as_loader(val_data, batch_size=256, split="test", seed=config.seed)
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"TrainConfig.precision='fp16' needs a CUDA device (training on {device}); use "
            "'bf16' on the CPU"
        )
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    net: nn.Module = model
    if sharded:  # every rank steps with the averaged gradient: the weights stay equal
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    adas = AdaS(model, lr=config.lr, beta=config.adas_beta) if config.schedule == "adas" else None
    optimizer = config.sgd(adas.param_groups() if adas is not None else model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config._factor)
    limit = config.max_batches_per_epoch
    try:
        total: int | None = len(loader) if limit is None else min(limit, len(loader))
    except TypeError:  # an iterable-style dataset without __len__
        total = limit
    record: dict[str, list[float]] = {k: [] for k in TrainHistory.__dataclass_fields__}
    at = {"epoch": 0, "step": 0}  # where a failed collective happened (under torchrun)

    def where() -> str:
        return f"training, epoch {at['epoch'] + 1} of {config.epochs}, step {at['step']}"

    with distributed.collectives(where), torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(config.seed)
        for epoch in range(config.epochs):
            at.update(epoch=epoch, step=0)
            start = time.perf_counter()
            record["lr"].append(
                float(np.mean([g["lr"] for g in optimizer.param_groups]))
                if adas is not None
                else optimizer.param_groups[0]["lr"]
            )
            model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            # Sums stay on the device: no host sync per batch unless a progress bar shows them.
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            batches = loader if limit is None else itertools.islice(loader, limit)
            bar = tqdm(
                batches,
                total=total,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                leave=False,
                disable=None if progress else True,
            )
            for x, y in bar:
                at["step"] += 1
                x = x.to(device, non_blocking=True)
                if config.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                with torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ):
                    logits = net(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                if not bar.disable:
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}"
                    )
            bar.close()
            if seen == 0:
                raise DataError("training data yielded no batch (empty dataset or drop_last?)")
            if sharded:  # the epoch's loss and accuracy over every rank's examples
                totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
                totals = torch.cat([totals, torch.tensor([float(seen)], device=device)])
                torch.distributed.all_reduce(totals)
                loss_sum, correct, seen = totals[0], totals[1].long(), int(totals[2])
            if on_epoch_end is not None:
                with distributed.user_code():
                    on_epoch_end(epoch, model)
            if adas is not None:
                adas.step(optimizer)
            else:
                scheduler.step()
            record["train_loss"].append(loss_sum.item() / seen)
            record["train_accuracy"].append(correct.item() / seen)
            if val_loader is not None:
                result = evaluate(model, val_loader, device=device)
                record["val_loss"].append(result.loss)
                record["val_accuracy"].append(result.accuracy)
            record["seconds"].append(time.perf_counter() - start)
    if sharded:  # the last step's BatchNorm statistics are each rank's own: take rank 0's
        with distributed.collectives("the broadcast of BatchNorm statistics"), torch.no_grad():
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
    return TrainHistory(**{k: tuple(v) for k, v in record.items()})


def _sharded_loader(data: Any, config: TrainConfig) -> tuple[DataLoader, Any]:
    """This rank's part of ``data`` under ``torch.distributed``: a DistributedSampler shuffled
    by ``config.seed`` and ``batch_size / world_size`` examples a step (the global batch stays
    ``config.batch_size``)."""
    from torch.utils.data.distributed import DistributedSampler

    from fxconet.data import as_dataset

    dataset = as_dataset(data, split="train") if isinstance(data, str) else data
    world = distributed.world_size()
    if config.batch_size % world:
        raise DataError(
            f"batch_size={config.batch_size} does not split over {world} processes: use a "
            f"multiple of {world} (each process takes batch_size / {world} examples a step)"
        )
    sampler: DistributedSampler[Any] = DistributedSampler(dataset, shuffle=True, seed=config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size // world,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, sampler


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader | str,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    max_batches: int | None = None,
) -> EvalResult:
    """Mean cross-entropy (no label smoothing) and accuracy of ``model`` in eval mode.

    Every submodule's train/eval mode is restored afterwards (a BatchNorm the user froze with
    ``.eval()`` stays in eval mode).

    Args:
        model: the network.
        data: a Dataset, a DataLoader (used as is) or a built-in name (its ``"test"`` split).
        device: where to run; ``None`` keeps the model where it is. An explicit device moves
            the model there (in place).
        batch_size: batch size when a loader is built here.
        max_batches: evaluate only the first batches (``None``: all).

    Returns:
        The :class:`EvalResult`.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> evaluate(net, "digits").num_samples
        359
    """
    loader = as_loader(data, batch_size=batch_size, split="test")
    if device is None:
        device = _model_device(model)
    else:
        device = select_device(device)
        model.to(device)
    loss_sum, correct, seen = 0.0, 0, 0
    with evaluating(model), torch.no_grad():  # each submodule's own flag restored
        for step, (x, y) in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
    if seen == 0:
        return EvalResult(loss=math.nan, accuracy=0.0, num_samples=0)
    return EvalResult(loss=loss_sum / seen, accuracy=correct / seen, num_samples=seen)


def recalibrate_norms(model: nn.Module, batches: Any) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` from ``batches``.

    A network resized with inherited weights keeps each kept channel's old statistics, which no
    longer fit once the layers before it lost channels. This resets them and measures the
    exact average over ``batches`` (an iterable of input tensors, or of ``(input, target)``
    pairs) with every other module in eval mode (dropout off) and no gradients; every
    submodule's train/eval flag and every BatchNorm's momentum are restored afterwards.

    Returns:
        The number of BatchNorm layers recalibrated (0 leaves ``model`` unchanged).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> recalibrate_norms(net, [torch.randn(8, 1, 6, 6)])
        1
    """
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    device = _model_device(model)
    with evaluating(model), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        try:
            for batch in batches:
                x = batch[0] if isinstance(batch, list | tuple) else batch
                model(x.to(device))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
    return len(norms)


def run_training(
    model: nn.Module,
    *,
    epochs: int,
    on_epoch_end: EpochCallback,
    data: Dataset | DataLoader | str | None = None,
    config: TrainConfig | None = None,
    train_fn: TrainFn | None = None,
    progress: bool = True,
) -> Any:
    """The strategies' one call site for training: the user's ``train_fn`` or :func:`train`.

    Args:
        model: trained in place.
        epochs: number of epochs; overrides ``config.epochs``.
        on_epoch_end: ``callback(epoch, model)`` after each epoch's last optimiser step.
        data: training data for the built-in loop (ignored when ``train_fn`` is given).
        config: settings for the built-in loop (ignored when ``train_fn`` is given).
        train_fn: a user loop, see :data:`TrainFn`.
        progress: progress bars of the built-in loop.

    Returns:
        The :class:`TrainHistory` of the built-in loop, or whatever ``train_fn`` returns.

    Raises:
        DataError: neither ``train_fn`` nor ``data`` was given.
        ValueError: ``epochs < 1``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> seen = []
        >>> _ = run_training(net, epochs=2, on_epoch_end=lambda e, m: seen.append(e),
        ...                  data="digits", config=TrainConfig(max_batches_per_epoch=1),
        ...                  progress=False)
        >>> seen
        [0, 1]
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r}: must be >= 1")
    if train_fn is not None:
        return train_fn(model, epochs=epochs, on_epoch_end=on_epoch_end)
    if data is None:
        raise DataError("run_training needs data= for the built-in loop, or a train_fn=")
    config = replace(config or TrainConfig(), epochs=epochs)
    return train(model, data, config, on_epoch_end=on_epoch_end, progress=progress)
