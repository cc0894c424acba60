"""Under torch.distributed (2 CPU processes, gloo), a search ends with the same widths and the
same final weights on every rank, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# one xdist worker runs them in turn: two gloo jobs at once on 2 cores starve each other
pytestmark = pytest.mark.xdist_group("distributed")


def _join(rank: int, world: int, folder: str) -> None:
    """Start this worker's gloo group (1 torch thread), rendezvous in ``folder`` by world size
    (a test may run a 1-process and a 2-process job in the same folder)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous{world}", rank=rank, world_size=world
    )


def _worker(rank: int, world: int, folder: str, method: str) -> None:
    _join(rank, world, folder)
    try:
        import fxconet
        from fxconet.models import cifar_resnet20

        torch.manual_seed(0)
        options = {"trials": 2, "epochs_per_trial": 2} if method == "conet" else {}
        result = fxconet.optimize_channels(
            cifar_resnet20(in_channels=1),
            data="digits",
            method=method,
            epochs=1,
            max_batches_per_epoch=3,
            batch_size=32,
            progress=False,
            out=Path(folder) / "out",
            **options,
        )
        # the built-in loop itself: each rank sees its own shard, the weights stay equal
        from fxconet.train import TrainConfig, train

        torch.manual_seed(1)
        net = cifar_resnet20(in_channels=1)
        seen: list[torch.Tensor] = []
        net.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        train(net, "digits", TrainConfig(epochs=1, batch_size=32, max_batches_per_epoch=2),
              progress=False)  # fmt: skip
        torch.save(
            {
                "widths": result.widths,
                "state": result.model.state_dict(),
                "seen": seen,
                "probe": net.state_dict(),
            },
            Path(folder) / f"rank{rank}.pt",
        )
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["conet"])
def test_two_ranks_end_with_the_same_widths_and_weights(tmp_path, method):
    mp.spawn(_worker, args=(2, str(tmp_path), method), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["widths"] == b["widths"]
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    # the loop: half of the global batch each, different examples, equal weights after
    assert [x.shape[0] for x in a["seen"]] == [16, 16] == [x.shape[0] for x in b["seen"]]
    assert not torch.equal(a["seen"][0], b["seen"][0])
    assert all(torch.equal(a["probe"][k], b["probe"][k]) for k in a["probe"])
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["widths"] == {str(k): v for k, v in a["widths"].items()}
    assert len(list(out.glob("trial_*.json"))) == len(report["history"]) == 2


def _greedy_worker(rank: int, world: int, folder: str, lazy: bool) -> None:
    _join(rank, world, folder)
    try:
        import warnings

        import fxconet
        from fxconet.models import cifar_resnet20
        from fxconet.strategies import greedy

        calls = []
        scored = greedy.candidate_loss
        greedy.candidate_loss = lambda *a, **k: calls.append(1) or scored(*a, **k)  # count
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained net: its losses still rank the moves
            result = fxconet.optimize_channels(
                cifar_resnet20(in_channels=1),
                data="digits",
                method="greedy",
                target_macs=0.8,
                lazy=lazy,
                calib_batches=1,
                eval_batches=1,
                score_batch_size=64,
                epochs=0,
                progress=False,
                out=Path(folder) / f"out{world}",
            )
        torch.save(
            {"widths": result.widths, "calls": len(calls), "steps": len(result.history)},
            Path(folder) / f"g{world}-{rank}.pt",
        )
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lazy", [False, True])
def test_greedy_scoring_is_split_over_the_ranks(tmp_path, lazy):
    mp.spawn(_greedy_worker, args=(1, str(tmp_path), lazy), nprocs=1, join=True)
    mp.spawn(_greedy_worker, args=(2, str(tmp_path), lazy), nprocs=2, join=True)
    one, a, b = (
        torch.load(tmp_path / f"g{k}.pt", weights_only=True) for k in ("1-0", "2-0", "2-1")
    )
    assert a["widths"] == b["widths"]  # the ranks agree
    assert 0 < a["calls"] < one["calls"] and 0 < b["calls"] < one["calls"]  # each scored a share
    if not lazy:  # every candidate scored at every step: the same search as one process
        assert a["widths"] == one["widths"]
        # the candidates are split; only the starting loss and a step's narrowest fit (when
        # the full step undershoots the budget) are scored on every rank
        assert one["calls"] <= a["calls"] + b["calls"] <= one["calls"] + 1 + one["steps"]
        assert max(a["calls"], b["calls"]) < 0.7 * one["calls"]


def _aps_worker(rank: int, world: int, folder: str) -> None:
    _join(rank, world, folder)
    try:
        import fxconet

        torch.manual_seed(0)
        net = torch.nn.Sequential(  # no BatchNorm: two ranks must equal one process
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
        )  # fmt: skip
        result = fxconet.optimize_channels(
            net,
            data="digits",
            method="aps",
            warmup_epochs=1,
            search_epochs=2,
            max_batches_per_epoch=4,
            batch_size=32,
            reward_samples=2,
            epochs=0,
            init="search",
            progress=False,
            out=Path(folder) / f"aps{world}",
        )
        keys = ("train_loss", "reward", "phi", "widths")
        torch.save(
            {
                "widths": result.widths,
                "history": [[h[k] for k in keys] for h in result.history],
                "state": result.model.state_dict(),
            },
            Path(folder) / f"aps{world}-{rank}.pt",
        )
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def test_aps_under_two_ranks_is_the_one_process_search(tmp_path):
    mp.spawn(_aps_worker, args=(1, str(tmp_path)), nprocs=1, join=True)
    mp.spawn(_aps_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    one, a, b = (
        torch.load(tmp_path / f"aps{k}.pt", weights_only=False) for k in ("1-0", "2-0", "2-1")
    )
    assert a["widths"] == b["widths"] == one["widths"]
    assert a["history"] == b["history"]  # rank 0's numbers everywhere
    for x, y in zip(a["history"], one["history"], strict=True):  # each rank half of each batch
        assert x[3] == y[3]  # the same likely widths every epoch
        for u, v in zip(x[:3], y[:3], strict=True):
            assert u == v or abs(u - v) <= 1e-4 * max(1.0, abs(v))
    for k, t in one["state"].items():  # the decoded weights: the same training, summed apart
        torch.testing.assert_close(a["state"][k], t, rtol=1e-4, atol=1e-5)
        assert torch.equal(a["state"][k], b["state"][k])


def test_map_shards_outside_a_job_is_the_plain_loop():
    from fxconet import distributed

    assert distributed.map_shards(lambda x: x * 10, [3, 1, 2]) == [30, 10, 20]
    x = torch.arange(5)
    (same,) = distributed.shard_batch(x)
    assert same is x and distributed.all_sum([1, 2.5]) == [1.0, 2.5]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p], count=7, what="a test")
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_a_batch_that_does_not_split_over_the_ranks_is_a_clear_error(monkeypatch):
    from fxconet import distributed
    from fxconet.errors import DataError
    from fxconet.train import TrainConfig, _sharded_loader

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(DataError, match="does not split over 2 processes"):
        _sharded_loader("digits", TrainConfig(batch_size=33))


def test_outside_a_job_the_helpers_change_nothing():
    from fxconet import distributed

    assert not distributed.is_distributed() and distributed.is_main()
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.broadcast_object({1: 16}) == {1: 16}
    assert distributed.init_from_env() is False  # no torchrun environment here


def _dying_worker(rank: int, folder: str) -> None:
    """Rank 1 dies (a hard exit, no cleanup) in its third training step; rank 0 records what
    it ends with."""
    _join(rank, 2, folder)
    from fxconet.models import cifar_resnet20
    from fxconet.train import TrainConfig, train

    net = cifar_resnet20(in_channels=1)
    calls = [0]

    def die(module, args):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            os._exit(3)

    net.register_forward_pre_hook(die)
    try:
        train(net, "digits", TrainConfig(epochs=1, batch_size=32, max_batches_per_epoch=20),
              progress=False)  # fmt: skip
        outcome = "finished"
    except Exception as e:  # what the surviving rank's user sees
        outcome = f"{type(e).__name__}: {e}"
    Path(folder, f"outcome{rank}.txt").write_text(outcome)


def test_a_rank_that_dies_ends_the_others_with_a_clear_error(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dying_worker, args=(r, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)  # a guard against a hang, not a speed target
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert alive == [False, False], "a rank still waits for its dead peer"
    assert procs[1].exitcode == 3
    outcome = (tmp_path / "outcome0.txt").read_text()
    assert outcome.startswith("DistributedError: rank 0 of 2: a collective failed during "
                              "training, epoch 1 of 1, step 3")  # fmt: skip
    assert "another rank probably stopped" in outcome


def _plain_net() -> torch.nn.Module:
    """No BatchNorm (whose statistics are per rank): two ranks must equal one process."""
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )  # fmt: skip


_CONFIG = {"epochs": 2, "batch_size": 32, "max_batches_per_epoch": 5, "lr": 0.05, "seed": 0}


def _plain_worker(rank: int, world: int, folder: str) -> None:
    _join(rank, world, folder)
    try:
        from fxconet.train import TrainConfig, train

        net = _plain_net()
        train(net, "digits", TrainConfig(**_CONFIG), progress=False)
        torch.save(net.state_dict(), Path(folder) / f"plain{rank}.pt")
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_with_the_same_global_batches(tmp_path):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from fxconet.data import as_dataset
    from fxconet.train import TrainConfig, train

    mp.spawn(_plain_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"plain{r}.pt", weights_only=True) for r in (0, 1)]
    # one process, fed each step the union of the two ranks' batches (batch_size / 2 each)
    dataset = as_dataset("digits", split="train")
    steps = []
    for epoch in range(_CONFIG["epochs"]):
        shards = []
        for r in (0, 1):
            sampler = DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        half = _CONFIG["batch_size"] // 2
        for k in range(_CONFIG["max_batches_per_epoch"]):
            steps.append(
                shards[0][k * half : (k + 1) * half] + shards[1][k * half : (k + 1) * half]
            )

    class Epochs:
        """The global batches, epoch by epoch (train() takes max_batches_per_epoch of each)."""

        def __init__(self) -> None:
            self.epoch = 0

        def __iter__(self):
            n = _CONFIG["max_batches_per_epoch"]
            start, self.epoch = self.epoch * n, self.epoch + 1
            return iter(steps[start : start + n])

        def __len__(self) -> int:
            return _CONFIG["max_batches_per_epoch"]

    net = _plain_net()
    train(net, DataLoader(dataset, batch_sampler=Epochs()), TrainConfig(**_CONFIG), progress=False)
    single = net.state_dict()
    start = _plain_net().state_dict()
    assert not torch.allclose(single["4.weight"], start["4.weight"])  # it trained
    for key in single:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-6)


def _callback_worker(rank: int, folder: str) -> None:
    _join(rank, 2, folder)
    from fxconet.train import TrainConfig, train

    def callback(epoch, model):
        raise RuntimeError("my callback: connection reset by the metrics server")

    try:
        train(_plain_net(), "digits", TrainConfig(epochs=1, batch_size=32,
              max_batches_per_epoch=2), on_epoch_end=callback, progress=False)  # fmt: skip
        outcome = "finished"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    dist.barrier()  # both ranks raised in their callback: no rank leaves while a peer talks
    dist.destroy_process_group()
    Path(folder, f"callback{rank}.txt").write_text(outcome)


def test_a_callbacks_own_error_is_not_relabelled_as_a_lost_peer(tmp_path):
    mp.spawn(_callback_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in (0, 1):
        outcome = (tmp_path / f"callback{rank}.txt").read_text()
        assert outcome == "RuntimeError: my callback: connection reset by the metrics server"
