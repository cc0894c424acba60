"""Searches on more processes: the same search on 1 and on N gloo processes, timed.

Each run is ``fxconet.optimize_channels`` inside a ``torch.distributed`` job of ``N`` CPU
processes (gloo, 1 torch thread each), search only (``epochs=0``), on ``--data`` (Fashion-MNIST;
the 8x8 digits are too small a workload for the ranks' messages to pay off):

* ``greedy``: greedy slimming of a CIFAR-style ResNet-20 trained here first (2 epochs of 100
  batches; the same trained weights for every run) to 50% of its MACs, ``lazy=False`` (every
  candidate scored at every step: N ranks must end with the one-process widths) and the
  default lazy search;
* ``aps``: the APS search (transitionary sharing, 1 warm-up + 2 search epochs of 12 batches of
  256) of the same ResNet-20 at 50% of its MACs. Its BatchNorm statistics are per rank's slice
  (as under DDP), so N ranks need not end with one process's widths.

It reports the wall time of each search, the speedup over one process and whether every rank
ended with the same widths as one process. On a machine with ``N`` idle cores (or ``N`` GPUs
with ``--device cuda``, nccl) the speedup is what sharding buys; on a shared machine it is a lower
bound (the load is recorded).

Usage:
    python benchmarks/distributed.py                      # 1 and 2 processes, a few minutes
    python benchmarks/distributed.py --procs 1 2 4 --methods greedy
    python benchmarks/distributed.py --device cuda --procs 1 2    # a machine with 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import write_results

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (1 2)")
    p.add_argument("--methods", nargs="+", default=["greedy", "greedy-lazy", "aps"])
    p.add_argument("--repeats", type=int, default=1, help="runs per setting (the fastest counts)")
    p.add_argument("--data", default="fashion-mnist", help="built-in dataset (fashion-mnist)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo, a process a core) or cuda (nccl, a process a GPU)")  # fmt: skip
    p.add_argument("--out", type=Path, default=HERE / "results" / "distributed.json")
    return p.parse_args(argv)


def _options(method: str) -> dict[str, Any]:
    if method.startswith("greedy"):
        return {"method": "greedy", "lazy": method == "greedy-lazy", "target_macs": 0.5}
    return {"method": "aps", "warmup_epochs": 1, "search_epochs": 2, "target_macs": 0.5,
            "max_batches_per_epoch": 12, "batch_size": 256}  # fmt: skip


def _worker(
    rank: int, world: int, folder: str, method: str, weights: str, data: str, device: str
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if device == "cuda":  # as torchrun would: rank r on GPU r
        os.environ["LOCAL_RANK"] = str(rank)
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
    )
    try:
        import fxconet
        from fxconet.models import cifar_resnet20

        model = cifar_resnet20(in_channels=1)
        model.load_state_dict(torch.load(weights, weights_only=True))
        dist.barrier()
        started = time.perf_counter()
        options = {"batch_size": 128, "device": device, **_options(method)}
        result = fxconet.optimize_channels(model, data=data, epochs=0, progress=False, **options)
        dist.barrier()
        seconds = time.perf_counter() - started
        Path(folder, f"rank{rank}.json").write_text(
            json.dumps({"widths": result.widths, "seconds": seconds})
        )
    finally:
        dist.destroy_process_group()


def _trained(path: Path, data: str) -> None:
    from fxconet.models import cifar_resnet20
    from fxconet.train import TrainConfig, train

    torch.manual_seed(0)
    model = cifar_resnet20(in_channels=1)
    config = TrainConfig(epochs=2, batch_size=128, max_batches_per_epoch=100)
    train(model, data, config, progress=False)
    torch.save(model.state_dict(), path)


def run(method: str, procs: int, weights: Path, data: str, device: str) -> dict[str, Any]:
    """One search on ``procs`` processes: its time and every rank's widths."""
    with tempfile.TemporaryDirectory() as folder:
        spec = (procs, folder, method, str(weights), data, device)
        mp.spawn(_worker, args=spec, nprocs=procs, join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(procs)]
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "widths": ranks[0]["widths"],
        "ranks_agree": all(r["widths"] == ranks[0]["widths"] for r in ranks),
        "load": list(os.getloadavg()),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | processes | search s | speedup | ranks agree | widths as 1 process |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['procs']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | "
            f"{'yes' if r['ranks_agree'] else 'NO'} | {'yes' if r['same_widths'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "resnet20.pt"
        _trained(weights, args.data)
        rows = []
        for method in args.methods:
            one = None
            for procs in args.procs:
                runs = [
                    run(method, procs, weights, args.data, args.device) for _ in range(args.repeats)
                ]
                best = min(runs, key=lambda r: r["seconds"])
                if one is None:
                    one = best
                rows.append({
                    "method": method, "procs": procs, **best,
                    "speedup": one["seconds"] / best["seconds"],
                    "same_widths": best["widths"] == one["widths"],
                })  # fmt: skip
                print(f"{method} on {procs}: {best['seconds']:.1f} s", flush=True)
    meta = {
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads_per_process": 1,
    }
    md = (
        table(rows) + f"\n\nResNet-20 (16/32/64, 1 input channel) on {args.data}, search only, "
        f"{'nccl, one GPU' if args.device == 'cuda' else 'gloo on the CPU, 1 torch thread'} per "
        f"process, {meta['machine']}, torch {meta['torch']}; the "
        f"fastest of {args.repeats} run(s). `greedy`: lazy=False (the same search on any number of "
        "processes); `greedy-lazy`: the default lazy search (N ranks re-score N stale candidates "
        "at once, so its widths may differ from one process's); `aps`: 1 warm-up + 2 search "
        "epochs of 12 batches of 256 (per-rank BatchNorm statistics: its widths may differ from "
        "one process's). Load averages per run are in the JSON.\n"
    )
    write_results(args.out, {"meta": meta, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
