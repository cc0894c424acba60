"""How much the robust group aggregation of CONet's ranks changes the rank slopes.

One CONet trial (a fresh ResNet-20 of :func:`fxconet.models.cifar_resnet20`, 1 input channel,
re-initialised as the search's trials are, trained ``--epochs`` epochs on ``--train-size``
Fashion-MNIST images) with a
:class:`~fxconet.metrics.RankTracker`, once with AdaS (CONet's search optimiser) and once with
SGD + cosine; for every channel group, the per-trial rank slope with the reference aggregation
(every producer's output rank and consumer's input rank) and with the robust one (structurally
capped and all-zero unfoldings left out), and the unfoldings left out.

Writes benchmarks/results/aggregation.json and aggregation.md.

Example:
    python benchmarks/aggregation.py            # the committed results (~2 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

import fxconet
from fxconet.data import load_dataset
from fxconet.metrics import RankTracker
from fxconet.train import TrainConfig, train

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-size", type=int, default=5000, help="training images (5000)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the trial (5)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "aggregation.json",
                   help="JSON output (the table goes beside it, .md)")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", split="train")
    order = np.random.default_rng(123).permutation(len(data))[: args.train_size]
    subset = Subset(data, order.tolist())
    results: dict[str, dict[str, dict[str, object]]] = {}
    for schedule, lr in (("adas", 0.03), ("cosine", 0.1)):
        graph = fxconet.analyze(
            fxconet.models.cifar_resnet20(in_channels=1), torch.zeros(1, 1, 28, 28)
        )
        torch.manual_seed(args.seed)
        model = fxconet.resize(graph, {}, init="reset")  # a trial's model, as the search builds it
        tracker = RankTracker(model, graph)
        cfg = TrainConfig(epochs=args.epochs, schedule=schedule, lr=lr, seed=args.seed)
        train(model, subset, cfg, on_epoch_end=lambda e, m, t=tracker: t.update(), progress=False)
        robust = tracker.group_slopes()
        excluded = tracker.excluded_terms()
        tracker.aggregation = "reference"
        reference = tracker.group_slopes()
        results[schedule] = {
            str(g.id): {
                "producers": list(g.producers),
                "reference": reference[g.id] * args.epochs,
                "robust": robust[g.id] * args.epochs,
                "excluded": excluded[g.id],
            }
            for g in graph.free
        }
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                    "slopes_per_trial": results}, indent=1))  # fmt: skip
    lines = [
        f"ResNet-20, one {args.epochs}-epoch trial on {args.train_size} Fashion-MNIST images, "
        f"seed {args.seed}: per-trial rank slope of every group (the slope per epoch times "
        "the epochs), reference vs robust aggregation.",
        "",
        "| group | first producer | AdaS: reference | AdaS: robust | cosine: reference | "
        "cosine: robust | left out (AdaS) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for gid, row in results["adas"].items():
        cos = results["cosine"][gid]
        lines.append(
            f"| {gid} | {row['producers'][0]} | {row['reference']:.3f} | {row['robust']:.3f} | "
            f"{cos['reference']:.3f} | {cos['robust']:.3f} | {len(row['excluded'])} |"  # type: ignore[arg-type]
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
