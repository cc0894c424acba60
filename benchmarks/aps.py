"""APS-O, APS-I and APS-T against uniform scaling at 50% FLOPs on Fashion-MNIST, on 2 CPU cores.

The network is the CIFAR-style ResNet-20 of :func:`fxconet.models.cifar_resnet20` (1 input
channel, widths 16/32/64, 12 free channel groups). For every seed:

* APS with ordinal, independent and transitionary sharing (``fxconet.optimize_channels(...,
  method="aps")``, candidates 0.25/0.5/0.75/1.0 of each group's width, FLOPs target 50% of
  the network's MACs) searches on a subset of the training images (10% of it held out for the
  rewards); the chosen architecture is then trained from scratch;
* uniform scaling multiplies every width by the factor whose MACs are closest to 50%
  (bisection on :func:`~fxconet.cost.predict_macs`) and trains that model;
* ``full`` trains the unpruned network the same way, for reference.

Every final model trains the same number of epochs with the same settings on the same subset
(search and validation images included) and is evaluated on the 10,000 test images. Each
(seed, method) run stores its result in ``--runs``/<seed>-<method>/result.json and is skipped
when that file exists, so runs for different seeds can go in parallel processes and a killed run
restarts where it stopped (searches resume from their per-epoch checkpoints); every invocation
rewrites the JSON and the table from all results found.

Writes benchmarks/results/aps.json (resolved settings, per-run results with the Phi and
gradient-alignment history, per-method summary) and aps.md (the table).

Example:
    python benchmarks/aps.py                       # the committed results, about 40 min
    python benchmarks/aps.py --train-size 1000 --warmup-epochs 1 --search-epochs 1 \\
        --retrain-epochs 1 --runs /tmp/aps-quick --out /tmp/aps.json --md /tmp/aps.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

import fxconet
from fxconet.cost import predict_macs
from fxconet.data import load_dataset
from fxconet.models import cifar_resnet20
from fxconet.strategies.static import uniform_widths

HERE = Path(__file__).resolve().parent
METHODS = {
    "aps-o": "ordinal",
    "aps-i": "independent",
    "aps-t": "transitionary",
    "uniform": None,
    "full": None,  # the unpruned network, for reference (opt-in)
}
DEFAULT_METHODS = ["aps-o", "aps-i", "aps-t", "uniform", "full"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--train-size",
        type=int,
        default=3000,
        help="training images used, a fixed random subset of the 60,000 (3000)",
    )
    p.add_argument(
        "--test-size", type=int, default=None, help="test images used (default: all 10,000)"
    )
    p.add_argument("--width", type=int, default=16, help="ResNet-20 first-stage width (16)")
    p.add_argument(
        "--flops-target",
        type=float,
        default=0.5,
        help="target MACs as a fraction of the network's (0.5)",
    )
    p.add_argument("--warmup-epochs", type=int, default=4, help="APS warm-up epochs (4)")
    p.add_argument("--search-epochs", type=int, default=8, help="APS search epochs (8)")
    p.add_argument(
        "--tau", type=float, default=None, help="APS-T transition rate (default: fxconet's)"
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=10,
        help="epochs to train every chosen architecture from scratch (10)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="batch size (128)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, cosine schedule (0.1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds to run (0 1)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=DEFAULT_METHODS,
        help="methods to run (all; 'full' trains the unpruned network for reference)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per process (1: on shared, oversubscribed cores one "
        "thread is far faster for these small ops)",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/aps-bench"),
        help="folder for per-run checkpoints and results (runs/aps-bench)",
    )
    p.add_argument(
        "--aggregate-only",
        action="store_true",
        help="run nothing; rewrite the JSON and table from the results in --runs",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results" / "aps.json",
        help="JSON results (benchmarks/results/aps.json)",
    )
    p.add_argument(
        "--md",
        type=Path,
        default=HERE / "results" / "aps.md",
        help="markdown table (benchmarks/results/aps.md)",
    )
    return p.parse_args(argv)


def uniform_for_macs(graph: fxconet.ChannelGraph, target: float) -> tuple[float, dict[int, int]]:
    """The width factor (and widths) whose uniformly scaled MACs are closest to ``target``."""
    best = (math.inf, 1.0, uniform_widths(graph, 1.0))
    lo, hi = math.log(1e-2), math.log(4.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        widths = uniform_widths(graph, math.exp(mid))
        macs = predict_macs(graph, widths)
        if abs(macs - target) < best[0]:
            best = (abs(macs - target), math.exp(mid), widths)
        if macs < target:
            lo = mid
        else:
            hi = mid
    return best[1], best[2]


def run_one(args: argparse.Namespace, seed: int, method: str, train: Any, test: Any) -> dict:
    x = train[0][0].unsqueeze(0)
    model = cifar_resnet20(num_classes=10, in_channels=1, width=args.width)
    common = dict(
        data=train,
        test_data=test,
        epochs=args.retrain_epochs,
        init="reset",
        seed=seed,
        lr=args.lr,
        batch_size=args.batch_size,
        progress=False,
        log=lambda line: print(f"[{seed} {method}] {line}", flush=True),
    )
    folder = args.runs / f"{seed}-{method}"
    started = time.perf_counter()
    if method in ("uniform", "full"):
        graph = fxconet.analyze(model, x)
        phi = 1.0
        if method == "uniform":
            phi, _ = uniform_for_macs(graph, args.flops_target * predict_macs(graph, {}))
        result = fxconet.optimize_channels(model, x, method="uniform", phi=phi, **common)
        extra: dict[str, Any] = {"phi_factor": phi}
    else:
        options = dict(
            sharing=METHODS[method],
            flops_target=args.flops_target,
            warmup_epochs=args.warmup_epochs,
            search_epochs=args.search_epochs,
            out=folder,
            resume=any(folder.glob("trial_*.json")),
        )
        if args.tau is not None:
            options["tau"] = args.tau
        result = fxconet.optimize_channels(model, x, method="aps", **options, **common)
        keep = ("phi", "phi_relative", "phi_bounds", "gradient_cosine", "macs_target",
                "decoded_val_accuracy", "top", "search_seconds")  # fmt: skip
        extra = {k: result.extra.get(k) for k in keep}
        top = result.extra["top"]
        decisions = len(result.history[-1]["widths"])
        extra["top1_mean_prob"] = math.exp(top[0]["log_prob"] / decisions)
        extra["history"] = [
            {k: h[k] for k in ("trial", "phase", "train_loss", "reward", "reward_accuracy",
                               "phi_relative", "gradient_cosine", "macs", "val_accuracy",
                               "seconds")}
            for h in result.history
        ]  # fmt: skip
    total = time.perf_counter() - started
    record = {
        "seed": seed,
        "method": method,
        "widths": {str(k): v for k, v in sorted(result.widths.items())},
        "macs": result.macs_after,
        "macs_fraction": result.macs_after / result.macs_before,
        "params": result.params_after,
        "test_accuracy": result.accuracy,
        "search_seconds": result.seconds if method.startswith("aps") else 0.0,
        "total_seconds": total,
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / "result.json")
    return record


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        accs = [r["test_accuracy"] for r in rs]
        row = {
            "method": method,
            "seeds": [r["seed"] for r in rs],
            "test_accuracy_mean": statistics.fmean(accs),
            "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "macs_fraction_mean": statistics.fmean(r["macs_fraction"] for r in rs),
            "params_mean": statistics.fmean(r["params"] for r in rs),
            "search_seconds_mean": statistics.fmean(r["search_seconds"] for r in rs),
            "total_seconds_mean": statistics.fmean(r["total_seconds"] for r in rs),
        }
        if method.startswith("aps"):
            row["final_phi_relative"] = statistics.fmean(r["phi_relative"][-1] for r in rs)
            cos = [c for r in rs for c in r["gradient_cosine"] if c is not None]
            row["gradient_cosine_mean"] = statistics.fmean(cos) if cos else None
            row["top1_mean_prob"] = statistics.fmean(r["top1_mean_prob"] for r in rs)
            dec = [r["decoded_val_accuracy"] for r in rs if r["decoded_val_accuracy"] is not None]
            row["decoded_val_accuracy_mean"] = statistics.fmean(dec) if dec else None
            likely = [r["history"][-1]["val_accuracy"] for r in rs if r.get("history")]
            likely = [x for x in likely if x is not None]
            row["likely_val_accuracy_mean"] = statistics.fmean(likely) if likely else None
            warm = [
                [h["train_loss"] for h in r["history"] if h["phase"] == "warmup"]
                for r in rs
                if r.get("history")
            ]
            warm = [w for w in warm if w]
            row["warmup_loss_first"] = statistics.fmean(w[0] for w in warm) if warm else None
            row["warmup_loss_last"] = statistics.fmean(w[-1] for w in warm) if warm else None
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], records: list[dict[str, Any]], settings: dict) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [
        "| method | seeds | test acc. % (mean ± std) | per seed | MACs % | params | "
        "final Phi / Phi_ord | mean cos(g, g~) | top-1 prob / decision | warm-up loss "
        "(first -> last epoch) | supernet val acc. %: likeliest arch. / pick | search s "
        "| total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(pct(x["test_accuracy"]) for x in records if x["method"] == r["method"])
        std = "" if r["test_accuracy_std"] is None else f" ± {100 * r['test_accuracy_std']:.2f}"
        aps = r["method"].startswith("aps")
        lines.append(
            f"| {r['method']} | {len(r['seeds'])} | {pct(r['test_accuracy_mean'])}{std} | {per} "
            f"| {100 * r['macs_fraction_mean']:.1f} | {r['params_mean']:,.0f} "
            f"| {r['final_phi_relative']:.3f} | {num(r['gradient_cosine_mean'])}"
            f" | {r['top1_mean_prob']:.2f} | {num(r.get('warmup_loss_first'))} -> "
            f"{num(r.get('warmup_loss_last'))} | {pct(r.get('likely_val_accuracy_mean'))} / "
            f"{pct(r['decoded_val_accuracy_mean'])} "
            f"| {r['search_seconds_mean']:,.0f} | {r['total_seconds_mean']:,.0f} |"
            if aps
            else f"| {r['method']} | {len(r['seeds'])} | {pct(r['test_accuracy_mean'])}{std} "
            f"| {per} | {100 * r['macs_fraction_mean']:.1f} | {r['params_mean']:,.0f} "
            f"| - | - | - | - | - | 0 | {r['total_seconds_mean']:,.0f} |"
        )
    phi = [x for x in records if x["method"] == "aps-t"]
    if phi:
        lines += ["", "Phi / Phi_ordinal of APS-T after each epoch (warm-up, then search):", ""]
    for x in phi:
        values = ", ".join(f"{v:.3f}" for v in x["phi_relative"])
        lines.append(f"- seed {x['seed']}: {values}")
    s = settings
    lines += [
        "",
        f"ResNet-20 (width {s['width']}) on Fashion-MNIST: {s['train_size']} training images "
        f"(10% held out for the rewards during the search), {s['test_size']} test images; "
        f"APS: {s['warmup_epochs']} warm-up + {s['search_epochs']} search epochs, target "
        f"{100 * s['flops_target']:.0f}% MACs; every chosen architecture trained from scratch "
        f"for {s['retrain_epochs']} epochs (SGD lr {s['lr']}, cosine, batch "
        f"{s['batch_size']}); {s['threads']} torch thread(s) per process on a shared 2-core "
        f"machine ({s['platform']}, torch {s['torch']}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    full = load_dataset("fashion-mnist", split="train")
    pick = torch.randperm(len(full), generator=torch.Generator().manual_seed(1234))
    train = Subset(full, pick[: args.train_size].tolist())
    test = load_dataset("fashion-mnist", split="test")
    if args.test_size is not None:
        test = Subset(test, list(range(args.test_size)))
    if not args.aggregate_only:
        for seed in args.seeds:
            for method in args.methods:
                done = args.runs / f"{seed}-{method}" / "result.json"
                if done.is_file():
                    print(f"[{seed} {method}] done earlier: {done}", flush=True)
                    continue
                r = run_one(args, seed, method, train, test)
                print(
                    f"[{seed} {method}] test accuracy {r['test_accuracy']:.4f} at "
                    f"{100 * r['macs_fraction']:.1f}% MACs",
                    flush=True,
                )
    records = []
    for path in sorted(args.runs.glob("*/result.json")):
        records.append(json.loads(path.read_text()))
    records.sort(key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("aggregate_only",)
    }
    settings.update(
        test_size=len(test),
        platform=platform.platform(),
        torch=torch.__version__,
        fxconet=fxconet.__version__,
    )
    rows = summarise(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"settings": settings, "summary": rows, "runs": records}, indent=1)
    )
    args.md.write_text(table(rows, records, settings))
    print(args.md.read_text())


if __name__ == "__main__":
    main()
