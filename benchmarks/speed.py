"""Rewrite and analysis speed against their floors, interleaved in one process.

Two measurements:

* **resize**: ``fxconet.resize(graph, widths)`` with every free group halved, against two floors
  measured on the same model in the same loop, round-robin (one repeat of each in turn, so load
  on a shared machine hits all alike): ``copy.deepcopy(model)`` and an ``index_select`` rebuild
  (every tensor of the model copied once, a changed one by ``index_select`` along its changed
  dims to its new shape: the least work any rewrite that shares no tensor with the input does).
  Medians over ``--repeats``.
* **analysis scaling**: ``fxconet.analyze`` time against the fx node count on DenseNet-121/169/201
  and on a synthetic chain of residual blocks (8 ... 512), with ``torch.fx.symbolic_trace`` as
  the reference; the log-log slope of time against nodes (1.0 = linear).

Writes benchmarks/results/speed.json and speed.md. Every model has random weights, eval mode,
batch 1 at 3x224x224.

Usage:
    python benchmarks/speed.py                       # about 5 minutes on 2 cores
    python benchmarks/speed.py --models resnet50 --chain 8 32 --repeats 3 --out /tmp/speed.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from _common import write_results
from torch import nn

import fxconet

HERE = Path(__file__).resolve().parent
MODELS = (
    "resnet50", "densenet121", "densenet201", "mobilenet_v2", "efficientnet_b0",
    "regnet_y_1_6gf", "vgg11_bn",
)  # fmt: skip
DENSENETS = ("densenet121", "densenet169", "densenet201")
CHAIN = (8, 32, 128, 512)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="resize models")
    p.add_argument("--chain", type=int, nargs="+", default=list(CHAIN), help="chain lengths")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per stage (7)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "speed.json")
    return p.parse_args(argv)


def half(graph: fxconet.ChannelGraph) -> dict[int, int]:
    """Every free group at half its width (a multiple of its divisor, at least one)."""
    return {g.id: max(g.divisor, g.size // 2 // g.divisor * g.divisor) for g in graph.free}


def index_select_floor(model: nn.Module, gm: nn.Module) -> Callable[[], dict[str, torch.Tensor]]:
    """A rebuild that copies every tensor once: changed ones by ``index_select`` to the resized
    model's shapes, the others by ``clone``."""
    old = dict(model.state_dict(keep_vars=True))
    new = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    plans = []
    for key, t in old.items():
        shape = new.get(key, tuple(t.shape))
        dims = [
            (d, torch.arange(n))
            for d, (n, m) in enumerate(zip(shape, t.shape, strict=True))
            if n != m
        ]
        plans.append((key, t.detach(), dims))

    def rebuild() -> dict[str, torch.Tensor]:
        out = {}
        for key, t, dims in plans:
            if not dims:
                out[key] = t.clone()
                continue
            for d, idx in dims:
                t = t.index_select(d, idx)
            out[key] = t
        return out

    return rebuild


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def resize_row(name: str, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    graph = fxconet.analyze(model, x)
    widths = half(graph)
    gm = fxconet.resize(graph, widths)
    med = interleaved(
        {
            "resize": lambda: fxconet.resize(graph, widths),
            "deepcopy": lambda: copy.deepcopy(model),
            "index_select": index_select_floor(model, gm),
        },
        repeats,
    )
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "params": params,
        "free_groups": len(graph.free),
        "seconds": med,
        "vs_deepcopy": med["resize"] / med["deepcopy"],
        "vs_index_select": med["resize"] / med["index_select"],
    }


class Chain(nn.Module):
    """A stem and ``n`` residual conv-BN-ReLU blocks of 16 channels."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            for _ in range(n)
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(nodes)."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / den if den else None


def scaling_rows(chain: list[int], repeats: int) -> list[dict[str, Any]]:
    cases: list[tuple[str, str, nn.Module, torch.Tensor]] = []
    for name in DENSENETS:
        cases.append(("densenet", name, getattr(torchvision.models, name)().eval(), None))
    for n in chain:
        cases.append(("chain", f"chain{n}", Chain(n).eval(), None))
    rows = []
    for family, name, model, _ in cases:
        x = torch.randn(1, 3, 224, 224) if family == "densenet" else torch.randn(1, 3, 32, 32)
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        med = interleaved(
            {
                "analyze": lambda m=model, x=x: fxconet.analyze(m, x),
                "symbolic_trace": lambda m=model: torch.fx.symbolic_trace(m),
            },
            repeats,
        )
        rows.append({"family": family, "model": name, "nodes": nodes, "seconds": med})
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [
        "| model | params | free groups | resize ms | deepcopy ms | index_select floor ms "
        "| resize / deepcopy | resize / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["resize"]:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['free_groups']} "
            f"| {1e3 * s['resize']:.1f} | {1e3 * s['deepcopy']:.1f} "
            f"| {1e3 * s['index_select']:.1f} "
            f"| {r['vs_deepcopy']:.2f}x | {r['vs_index_select']:.2f}x |"
        )
    lines += [
        "",
        "| family | model | fx nodes | analyze ms | symbolic_trace ms | analyze / trace |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["scaling"]:
        s = r["seconds"]
        lines.append(
            f"| {r['family']} | {r['model']} | {r['nodes']} | {1e3 * s['analyze']:.1f} "
            f"| {1e3 * s['symbolic_trace']:.1f} | {s['analyze'] / s['symbolic_trace']:.2f} |"
        )
    lines.append("")
    for family, sl in result["slopes"].items():
        a, t = sl["analyze"], sl["symbolic_trace"]
        lines.append(
            f"- {family}: log-log slope of time against fx nodes, analyze "
            f"{'-' if a is None else f'{a:.2f}'}, symbolic_trace {'-' if t is None else f'{t:.2f}'}"
        )
    env = result["env"]
    lines += [
        "",
        f"Medians of {env['repeats']} interleaved repeats, {env['threads']} torch thread(s), "
        f"{env['machine']}, torch {env['torch']}, load average at start {env['load']}. Every "
        "free group halved; batch 1 at 3x224x224 (chains: 3x32x32); random weights.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    resize = []
    for name in args.models:
        row = resize_row(name, args.repeats)
        print(
            f"{name}: resize {row['vs_deepcopy']:.2f}x deepcopy, "
            f"{row['vs_index_select']:.2f}x floor"
        )
        resize.append(row)
    scaling = scaling_rows(args.chain, args.repeats)
    slopes = {}
    for family in ("densenet", "chain"):
        rows = [r for r in scaling if r["family"] == family]
        slopes[family] = {
            k: slope([(r["nodes"], r["seconds"][k]) for r in rows])
            for k in ("analyze", "symbolic_trace")
        }
    result = {
        "resize": resize,
        "scaling": scaling,
        "slopes": slopes,
        "env": {
            "repeats": args.repeats,
            "threads": args.threads,
            "machine": platform.platform(),
            "torch": torch.__version__,
            "load": None if load is None else round(load, 2),
        },
    }
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
