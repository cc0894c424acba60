"""fxconet's width searches against the obvious alternatives, at the MACs budget a user names.

The question a user asks: "I have a trained CNN and want it at 50% (or 25%) of its MACs: which
widths should I keep?" Every method answers at the same budget from the same trained network,
and every answer gets the same fine-tuning; the test split is touched only at the end.

For each seed ``s`` (paired: every method of a seed starts from the same trained network):

1. ``full``: the CIFAR-style ResNet-20 of :func:`fxconet.models.cifar_resnet20` (widths
   16/32/64, 1 input channel; ``--widths`` sets other stage widths, e.g. ``48 48 48`` for a
   network whose widths nobody tuned, as CONet's searches start), initialised with seed ``s``
   and trained ``--full-epochs`` epochs (SGD, lr 0.1, cosine, batch 128, weight decay 5e-4) on
   ``--train-size`` Fashion-MNIST training images. This is the starting point of every method
   and the reference row.
2. For every budget (``--budgets``, fractions of the network's MACs) and method:

   * ``uniform``: every free width times the one factor that meets the budget (compound
     scaling, ``method="uniform"``);
   * ``random``: a random factor in [0.25, 1] per channel group, then the global factor that
     meets the budget (the sanity check of any search, ``method="random"``, seed ``s``);
   * ``tp-l2``: Torch-Pruning 1.6.1 magnitude pruning (L2 importance, global ranking, the
     classifier kept), its pruning ratio bisected until the pruned network's MACs meet the
     budget within 2%;
   * ``static``: CONet's Eq. 4 (``scale`` 0.5) from the trained network's output ranks,
     projected onto the budget;
   * ``conet``: CONet's search (Alg. 2 with AdaS, ``--conet-trials`` trials of
     ``--conet-epochs`` epochs from fresh initialisations on 90% of the training images),
     projected onto the budget; the search depends on the seed, not on the budget, so it runs
     once per seed (the second budget resumes its checkpoints);
   * ``greedy``: fxconet's greedy slimming (``method="greedy"``): from the trained network,
     shrink one channel group at a time where the validation loss (after BatchNorm
     recalibration) rises least per MAC saved, until the budget is met; scored on the 10% of
     the training images held out of the search (``greedy-q``: the same with
     ``min_fraction=0.25``, no group below a quarter of its width);
   * ``aps``: APS with transitionary sharing (``--aps-warmup`` warm-up and ``--aps-search``
     search epochs on 90% of the training images, the other 10% for the rewards), aimed at the
     budget (its reward's FLOPs target and its final pick).

   fxconet's methods run through the public API (``optimize_channels(trained, data=...,
   method=..., target_macs=b, init="inherit", epochs=F)``): the kept channels are those with the
   largest L2 norm, and the network is fine-tuned ``--finetune-epochs`` epochs (SGD, lr
   ``--finetune-lr``, cosine); Torch-Pruning's network gets the same fine-tuning.

Every (seed, method, budget) result is a JSON file under ``--runs`` (a killed run restarts
where it stopped; CONet's searches resume from their checkpoints). Every invocation rewrites
``search.json`` (settings, machine, load, every run, the summary), ``search.md`` (the table:
mean, SD, the paired differences to uniform and to Torch-Pruning with their standard errors,
MACs, parameters, search cost; then every paired difference per seed, then the hand-written text
of ``search.notes.md`` when that file exists, so a rerun keeps it) and ``search.png`` (accuracy
against MACs) from all the results found (``--report-only``: only these).

Example:
    python benchmarks/search.py                      # the committed results (~1.5 h, 2 cores)
    python benchmarks/search.py --seeds 0 --train-size 2000 --full-epochs 2 \\
        --finetune-epochs 1 --conet-trials 2 --runs /tmp/s --out /tmp/search.json   # a look
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

import fxconet
from fxconet.cost import count_macs, count_params
from fxconet.data import load_dataset
from fxconet.models import CifarResNet
from fxconet.train import TrainConfig, evaluate, select_device, train

HERE = Path(__file__).resolve().parent
METHODS = ("uniform", "random", "tp-l2", "static", "conet", "aps", "greedy", "greedy-q")
SHAPE = (1, 28, 28)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="paired seeds")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25],
                   help="MACs budgets, fractions of the network's (default: 0.5 0.25)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to run (default: all)")  # fmt: skip
    p.add_argument("--train-size", type=int, default=10_000,
                   help="Fashion-MNIST training images (a fixed subset; 10000)")  # fmt: skip
    p.add_argument("--test-size", type=int, default=10_000, help="test images (default: all)")
    p.add_argument("--full-epochs", type=int, default=10, help="epochs of the full network (10)")
    p.add_argument("--finetune-epochs", type=int, default=5,
                   help="fine-tuning epochs of every pruned network (5)")  # fmt: skip
    p.add_argument("--finetune-lr", type=float, default=0.05, help="fine-tuning lr (0.05)")
    p.add_argument("--conet-trials", type=int, default=6, help="CONet trials (6)")
    p.add_argument("--conet-epochs", type=int, default=3, help="epochs per CONet trial (3)")
    p.add_argument("--aps-warmup", type=int, default=4, help="APS warm-up epochs (4)")
    p.add_argument("--aps-search", type=int, default=8, help="APS search epochs (8)")
    p.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], metavar="W",
                   help="stage widths of the starting ResNet-20 (16 32 64; e.g. 48 48 48 for a "
                   "network whose widths nobody tuned)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA if present)")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-search"),
                   help="per-run results and checkpoints (default: runs/bench-search)")  # fmt: skip
    p.add_argument("--out", type=Path, default=HERE / "results" / "search.json",
                   help="JSON output; the table and plot go beside it (.md, .png)")  # fmt: skip
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the JSON, table and plot from --runs only")  # fmt: skip
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# data and the starting network


def datasets(args: argparse.Namespace) -> tuple[Subset, Subset]:
    train_all = load_dataset("fashion-mnist", split="train")
    test_all = load_dataset("fashion-mnist", split="test")
    order = np.random.default_rng(1234).permutation(len(train_all))[: args.train_size]
    return Subset(train_all, order.tolist()), Subset(test_all, range(args.test_size))


def trained_full(
    args: argparse.Namespace, seed: int, train_data: Subset, test: Subset
) -> nn.Module:
    """The seed's trained full network (cached under --runs)."""
    folder = args.runs / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CifarResNet([3, 3, 3], list(args.widths), in_channels=1)
    state = folder / "full.pt"
    result = folder / "full.json"
    if state.is_file() and result.is_file():
        model.load_state_dict(torch.load(state, weights_only=True))
        return model
    cfg = TrainConfig(epochs=args.full_epochs, seed=seed, device=args.device)
    started = time.perf_counter()
    train(model, train_data, cfg, progress=False)
    seconds = time.perf_counter() - started
    model.cpu()
    acc = evaluate(model, test, device=args.device).accuracy
    model.cpu()
    x = torch.zeros(1, *SHAPE)
    torch.save(model.state_dict(), state)
    _write(result, {
        "seed": seed, "method": "full", "budget": 1.0, "accuracy": acc,
        "macs": count_macs(model, x), "params": count_params(model),
        "train_seconds": seconds, "search_seconds": 0.0, "search_epochs": 0,
    })  # fmt: skip
    print(f"seed {seed} full: {acc:.4f} ({seconds:.0f} s)", flush=True)
    return model


# ---------------------------------------------------------------------------------------------
# the methods


def run_fxconet(
    args: argparse.Namespace,
    method: str,
    seed: int,
    budget: float,
    model: nn.Module,
    train_data: Subset,
    test: Subset,
) -> dict[str, Any]:
    """One of fxconet's methods through the public API."""
    options: dict[str, Any] = {}
    if method == "conet":
        options = {
            "trials": args.conet_trials,
            "epochs_per_trial": args.conet_epochs,
            "out": args.runs / f"seed{seed}" / "conet-search",
        }
        options["resume"] = any(Path(options["out"]).glob("trial_*.json"))
    elif method == "aps":
        options = {"warmup_epochs": args.aps_warmup, "search_epochs": args.aps_search}
    elif method == "greedy-q":  # no group below a quarter of its width
        options = {"min_fraction": 0.25}
    started = time.perf_counter()
    result = fxconet.optimize_channels(
        model,
        torch.zeros(1, *SHAPE),
        data=train_data,
        test_data=test,
        method=method.partition("-")[0],
        target_macs=budget,
        init="inherit",
        epochs=args.finetune_epochs,
        lr=args.finetune_lr,
        seed=seed,
        device=args.device,
        progress=False,
        **options,
    )
    total = time.perf_counter() - started
    history = list(result.history)
    search_epochs = 0
    search_seconds = result.seconds  # the method's own time (static: measuring the ranks)
    if method == "conet":  # the whole search, also when this budget resumed it
        search_epochs = len(history) * args.conet_epochs
        search_seconds = sum(h.get("seconds", 0.0) for h in history)
    elif method == "aps":
        search_epochs = len(history)
    return {
        "accuracy": result.accuracy,
        "macs": result.macs_after,
        "params": result.params_after,
        "widths": {str(k): v for k, v in result.widths.items()},
        "budget_error": result.report()["budget"]["error"],
        "search_seconds": search_seconds,
        "search_epochs": search_epochs,
        "seconds": total,
    }


def tp_prune(model: nn.Module, target: float, x: torch.Tensor) -> tuple[nn.Module, float]:
    """Torch-Pruning's global L2 magnitude pruning at the ratio that meets ``target`` (MACs
    fraction) within 2%: bisection on the pruning ratio, each try on a fresh copy."""
    import torch_pruning as tp

    before = count_macs(model, x)
    lo, hi = 0.0, 0.95
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(30):
        ratio = (lo + hi) / 2
        pruned = copy.deepcopy(model).eval()
        pruner = tp.pruner.BasePruner(
            pruned,
            example_inputs=x,
            importance=tp.importance.MagnitudeImportance(p=2),
            global_pruning=True,
            pruning_ratio=ratio,
            ignored_layers=[pruned.fc],
        )
        pruner.step()
        frac = count_macs(pruned, x) / before
        if best is None or abs(frac - target) < abs(best[0] - target):
            best = (frac, pruned, ratio)
        if abs(frac / target - 1) <= 0.02:
            break
        if frac > target:
            lo = ratio
        else:
            hi = ratio
    assert best is not None
    return best[1], best[2]


def run_tp(
    args: argparse.Namespace,
    seed: int,
    budget: float,
    model: nn.Module,
    train_data: Subset,
    test: Subset,
) -> dict[str, Any]:
    x = torch.zeros(1, *SHAPE)
    started = time.perf_counter()
    pruned, ratio = tp_prune(model, budget, x)
    prune_seconds = time.perf_counter() - started
    cfg = TrainConfig(
        epochs=args.finetune_epochs, lr=args.finetune_lr, seed=seed, device=args.device
    )
    train(pruned, train_data, cfg, progress=False)
    pruned.cpu()
    acc = evaluate(pruned, test, device=args.device).accuracy
    pruned.cpu()
    return {
        "accuracy": acc,
        "macs": count_macs(pruned, x),
        "params": count_params(pruned),
        "pruning_ratio": ratio,
        "budget_error": count_macs(pruned, x) / (budget * count_macs(model, x)) - 1,
        "search_seconds": prune_seconds,
        "search_epochs": 0,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# the report


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def collect(runs: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(runs.glob("seed*/*.json")):
        data = json.loads(path.read_text())
        if "method" in data and "accuracy" in data:
            rows.append(data)
    return rows


BASELINES = ("uniform", "tp-l2")  # every row's paired difference is reported against these


def _paired(mine: list[dict[str, Any]], base: dict[tuple[int, float], float]) -> dict[str, Any]:
    """The per-seed differences (pp) of ``mine`` to a baseline's runs of the same seed and
    budget, their mean, standard error and t."""
    seeds, diffs = [], []
    for r in mine:
        key = (r["seed"], r["budget"])
        if key in base:
            seeds.append(r["seed"])
            diffs.append(100 * (r["accuracy"] - base[key]))
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else None
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    return {
        "seeds": seeds,
        "per_seed": diffs,
        "mean": mean,
        "se": se,
        "t": mean / se if mean is not None and se else None,
    }


def summarise(rows: list[dict[str, Any]], macs_full: int) -> list[dict[str, Any]]:
    """Per (method, budget): mean, SD, and the paired differences to each baseline (mean, SE,
    t; ``diff_to_uniform``/``diff_se``/``t`` repeat the one to uniform)."""
    out = []
    keys = sorted({(r["method"], r["budget"]) for r in rows}, key=lambda k: (-k[1], k[0]))
    bases = {
        b: {(r["seed"], r["budget"]): r["accuracy"] for r in rows if r["method"] == b}
        for b in BASELINES
    }
    for method, budget in keys:
        mine = sorted((r for r in rows if (r["method"], r["budget"]) == (method, budget)),
                      key=lambda r: r["seed"])  # fmt: skip
        accs = [100 * r["accuracy"] for r in mine]
        diffs = {  # a baseline only against the ones listed before it (tp-l2 - uniform, once)
            b: _paired(mine, bases[b])
            for b in BASELINES[: BASELINES.index(method) if method in BASELINES else None]
            if method != "full"
        }
        vs_uniform = diffs.get("uniform", {})
        out.append({
            "method": method,
            "budget": budget,
            "seeds": [r["seed"] for r in mine],
            "accuracy_mean": statistics.mean(accs),
            "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,
            "per_seed": accs,
            "diff_to_uniform": vs_uniform.get("mean"),
            "diff_se": vs_uniform.get("se"),
            "t": vs_uniform.get("t"),
            "diff_to": diffs,
            "macs_pct": 100 * statistics.mean(r["macs"] for r in mine) / macs_full,
            "params": statistics.mean(r["params"] for r in mine),
            "search_seconds": statistics.mean(r.get("search_seconds", 0.0) for r in mine),
            "search_epochs": statistics.mean(r.get("search_epochs", 0) for r in mine),
        })  # fmt: skip
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _diff_cell(d: dict[str, Any] | None) -> str:
    if not d or d["mean"] is None:
        return "- | -"
    return f"{d['mean']:+.2f} ± {_fmt(d['se'], '.2f')} | {_fmt(d['t'], '.1f')}"


def table(summary: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The markdown table of the summary: one row per (method, budget)."""
    head = (
        "| method | budget | seeds | test acc. % (mean ± SD) | Δ vs uniform (pp, ± SE) | t | "
        "Δ vs tp-l2 (pp, ± SE) | t | MACs % | params | search epochs | search s |"
    )
    lines = [head, "|" + "---|" * 12]
    for s in summary:
        diffs = s.get("diff_to", {})
        lines.append(
            f"| {s['method']} | {s['budget']:.0%} | {len(s['seeds'])} | "
            f"{s['accuracy_mean']:.2f} ± {_fmt(s['accuracy_sd'], '.2f')} | "
            f"{_diff_cell(diffs.get('uniform'))} | {_diff_cell(diffs.get('tp-l2'))} | "
            f"{s['macs_pct']:.1f} | {s['params']:,.0f} | "
            f"{s['search_epochs']:.0f} | {s['search_seconds']:.0f} |"
        )
    return "\n".join(lines)


def paired_lines(summary: list[dict[str, Any]]) -> str:
    """Every row's per-seed paired differences to each baseline, as a markdown list."""
    lines = []
    for s in summary:
        for base, d in s.get("diff_to", {}).items():
            if d["per_seed"]:
                per = ", ".join(f"{x:+.2f}" for x in d["per_seed"])
                seeds = ",".join(map(str, d["seeds"]))
                lines.append(
                    f"- {s['method']} - {base} at {s['budget']:.0%} (seeds {seeds}): {per}"
                )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, widths: str = "16/32/64") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = sorted({s["method"] for s in summary} - {"full"})
    full = [s for s in summary if s["method"] == "full"]
    for k, method in enumerate(methods):
        pts = sorted((s for s in summary if s["method"] == method), key=lambda s: s["macs_pct"])
        offset = (k - len(methods) / 2) * 0.35  # side by side at each budget
        ax.errorbar(
            [s["macs_pct"] + offset for s in pts],
            [s["accuracy_mean"] for s in pts],
            yerr=[s["accuracy_sd"] or 0 for s in pts],
            marker="o",
            capsize=3,
            linewidth=1,
            label=method,
        )
    if full:
        ax.errorbar([100], [full[0]["accuracy_mean"]], yerr=[full[0]["accuracy_sd"] or 0],
                    marker="D", color="black", capsize=3, label="full network")  # fmt: skip
    ax.set(xlabel="MACs (% of the full network)",
           ylabel="test accuracy % (mean ± SD over seeds)",
           title=f"ResNet-20 ({widths}), Fashion-MNIST: pruned to a MACs budget, "
                 "fine-tuned")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def known_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs under ``--runs``, plus those recorded in an earlier ``--out`` JSON that the
    runs folder no longer holds (a lost or moved folder does not drop committed results)."""
    rows = {(r["seed"], r["method"], r["budget"]): r for r in collect(args.runs)}
    if args.out.is_file():
        for r in json.loads(args.out.read_text()).get("runs", []):
            rows.setdefault((r["seed"], r["method"], r["budget"]), r)
    return sorted(rows.values(), key=lambda r: (r["seed"], -r["budget"], r["method"]))


def report(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    rows = known_rows(args)
    if not rows:
        return
    macs_full = next(r["macs"] for r in rows if r["method"] == "full")
    summary = summarise(rows, macs_full)
    md = args.out.with_suffix(".md")
    _write(args.out, {"settings": settings, "summary": summary, "runs": rows})
    widths = "/".join(map(str, settings.get("widths", [16, 32, 64])))
    head = (
        f"ResNet-20 ({widths}) on Fashion-MNIST: {settings['train_size']} training images, "
        f"{settings['test_size']} test images; full network {settings['full_epochs']} epochs "
        f"from scratch; every pruned network fine-tuned {settings['finetune_epochs']} epochs "
        f"(lr {settings['finetune_lr']}, cosine) from the seed's trained full network; CONet "
        f"{settings['conet_trials']} x {settings['conet_epochs']} epochs; "
        f"{settings['threads']} torch threads on {settings['machine']}."
    )
    notes = args.out.with_suffix(".notes.md")  # hand-written text, kept across reruns
    body = [
        head,
        table(summary, settings),
        "Paired differences per seed (pp):",
        paired_lines(summary),
    ]
    if notes.is_file():
        body.append(notes.read_text().strip())
    md.write_text("\n\n".join(body) + "\n")
    plot(summary, args.out.with_suffix(".png"), widths)
    print(table(summary, settings))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    settings = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "load_at_start": list(os.getloadavg()),
    }
    if args.report_only:
        if args.out.is_file():  # the settings the results were run with, not this call's
            settings = json.loads(args.out.read_text()).get("settings", settings)
        report(args, settings)
        return 0
    train_data, test = datasets(args)
    for seed in args.seeds:
        model = trained_full(args, seed, train_data, test)
        for budget in args.budgets:
            for method in args.methods:
                path = args.runs / f"seed{seed}" / f"{method}-{budget:g}.json"
                if path.is_file():
                    continue
                started = time.perf_counter()
                if method == "tp-l2":
                    row = run_tp(args, seed, budget, model, train_data, test)
                else:
                    row = run_fxconet(args, method, seed, budget, model, train_data, test)
                row.update(seed=seed, method=method, budget=budget, load=list(os.getloadavg()))
                _write(path, row)
                print(
                    f"seed {seed} {method} {budget:.0%}: {row['accuracy']:.4f}, "
                    f"{row['macs'] / count_macs(model, torch.zeros(1, *SHAPE)):.3f} MACs "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
        report(args, settings)
    report(args, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
