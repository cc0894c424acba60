"""CONet against uniform and static scaling on Fashion-MNIST, sized for 2 CPU cores.

Rows: the baseline (a CIFAR-style ResNet-20 with every channel group at the starting width);
CONet at three rank-slope thresholds; uniform scaling at the parameter count of each CONet
result (the paper's compound-scaling comparison); static scaling (Eq. 4) from the trained
baseline's ranks; and CONet with inherited instead of re-initialised weights between trials
(to choose that default by measurement). Every final model is trained from scratch for the same
number of epochs on the same data and evaluated on the Fashion-MNIST test split. Search uses the
training subset only (validation: a held-out part of it).

Writes benchmarks/results/search.json, search.md and search.png (accuracy against parameters).

Example:
    python benchmarks/search.py                 # the committed results
    python benchmarks/search.py --train-size 2000 --trials 2 --final-epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

import fxconet
from fxconet.cost import count_macs, count_params
from fxconet.data import load_dataset
from fxconet.models import cifar_resnet20
from fxconet.strategies.static import uniform_for_params
from fxconet.train import TrainConfig, evaluate, run_training

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-size", type=int, default=3000, help="training images used (subset)")
    p.add_argument("--width", type=int, default=32, help="starting width of every group")
    p.add_argument("--deltas", type=float, nargs=3, default=[0.02, 0.04, 0.08],
                   help="three CONet rank-slope thresholds")  # fmt: skip
    p.add_argument("--trials", type=int, default=5, help="CONet trials")
    p.add_argument("--epochs-per-trial", type=int, default=3, help="epochs per CONet trial")
    p.add_argument("--final-epochs", type=int, default=6, help="epochs to train every final model")
    p.add_argument("--scale", type=float, default=0.5, help="static scaling factor S of Eq. 4")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the committed run shared the 2 cores with another benchmark)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    full = load_dataset("fashion-mnist", split="train")
    g = torch.Generator().manual_seed(args.seed)
    train = Subset(full, torch.randperm(len(full), generator=g)[: args.train_size].tolist())
    test = load_dataset("fashion-mnist", split="test")
    x = train[0][0].unsqueeze(0)
    base_model = cifar_resnet20(num_classes=10, in_channels=1)
    graph = fxconet.analyze(base_model, x)
    start_widths = {grp.id: args.width for grp in graph.free}
    config = TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    rows: list[dict[str, Any]] = []

    def final(name: str, widths: dict[int, int], search_s: float, **extra: Any) -> dict[str, Any]:
        torch.manual_seed(args.seed)
        model = fxconet.resize(graph, widths, init="reset")
        t0 = time.perf_counter()
        run_training(model, epochs=args.final_epochs, on_epoch_end=lambda e, m: None,
                     data=train, config=config, progress=False)  # fmt: skip
        row = {
            "name": name,
            "test_accuracy": evaluate(model, test).accuracy,
            "params": count_params(model),
            "macs": count_macs(model, x),
            "search_seconds": round(search_s, 1),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "widths": {str(k): v for k, v in sorted(widths.items())},
            **extra,
        }
        rows.append(row)
        print(f"{name:28s} acc {row['test_accuracy']:.4f}  params {row['params']:>9,}  "
              f"MACs {row['macs']:>11,}  search {search_s:7.1f}s", flush=True)  # fmt: skip
        write(args, rows)
        return row

    baseline = final("baseline", start_widths, 0.0)

    def conet(delta: float, reinit: bool) -> tuple[dict[int, int], float, list[dict[str, Any]]]:
        t0 = time.perf_counter()
        result = fxconet.optimize_channels(
            base_model, x, data=train, method="conet", delta=delta, trials=args.trials,
            epochs_per_trial=args.epochs_per_trial, initial_width=args.width, reinit=reinit,
            train_config=config, seed=args.seed, progress=False,
        )  # fmt: skip
        return result.widths, time.perf_counter() - t0, list(result.history)

    for delta in args.deltas:
        widths, seconds, history = conet(delta, reinit=True)
        row = final(f"CONet delta={delta}", widths, seconds, trials_run=len(history))
        phi, uniform = uniform_for_params(graph, row["params"])
        final(f"uniform @ CONet delta={delta}", uniform, 0.0, phi=round(phi, 4))
    widths, seconds, history = conet(args.deltas[1], reinit=False)
    final(f"CONet delta={args.deltas[1]} inherit", widths, seconds, trials_run=len(history))
    # static scaling: ranks of the trained baseline (Eq. 4 averages producers' output ranks)
    t0 = time.perf_counter()
    trained = fxconet.resize(graph, start_widths, init="reset")
    run_training(trained, epochs=args.final_epochs, on_epoch_end=lambda e, m: None,
                 data=train, config=config, progress=False)  # fmt: skip
    static = fxconet.optimize_channels(trained, x, method="static", scale=args.scale)
    final(f"static S={args.scale}", static.widths, time.perf_counter() - t0)
    write(args, rows, baseline)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], baseline: Any = None) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "search.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    lines = [
        "| run | test accuracy | params | MACs | search s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['name']} | {r['test_accuracy']:.4f} | {r['params']:,} | {r['macs']:,} | "
            f"{r['search_seconds']:.0f} |"
            for r in rows
        ),  # fmt: skip
    ]
    (args.out / "search.md").write_text(
        f"Fashion-MNIST, {args.train_size} training images, ResNet-20 starting at width "
        f"{args.width}, {args.trials} trials x {args.epochs_per_trial} epochs, every final model "
        f"trained {args.final_epochs} epochs from scratch; {args.threads} CPU thread(s).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    if baseline is not None:
        plot(rows, args.out / "search.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = {"baseline": "D", "CONet": "o", "uniform": "s", "static": "^"}
    for key, marker in groups.items():
        pts = [(r["params"], r["test_accuracy"]) for r in rows if r["name"].startswith(key)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, marker=marker, label=key)
    ax.set(xscale="log", xlabel="parameters", ylabel="test accuracy",
           title="Fashion-MNIST: accuracy against parameters")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
