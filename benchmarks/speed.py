"""Rewrite and analysis speed against their floors and Torch-Pruning, interleaved in one process.

Three measurements:

* **resize**: ``fxconet.resize(graph, widths)`` with every free group halved, against two floors
  measured on the same model in the same loop, round-robin (one repeat of each in turn, so load
  on a shared machine hits all alike): ``copy.deepcopy(model)`` and an ``index_select`` rebuild
  (every tensor of the model copied once, a changed one by ``index_select`` along its changed
  dims to its new shape: the least work any rewrite that shares no tensor with the input does).
  Also in the loop: ``fxconet.analyze`` and Torch-Pruning's ``DependencyGraph.build_dependency``
  on the same model and input, and Torch-Pruning's rewrite, ``pruner.step()`` of an L1
  magnitude pruner at 50% (the pruner is built on a fresh copy before each step, untimed; the
  zoo benchmark's recipe). Every call starts with cold pages (``malloc_trim``, see
  :func:`interleaved`); resize, deepcopy and the floor run once more *warm*, the allocator as
  the stage before left it, as in a search that resizes in a loop. Medians over ``--repeats``.
* **analysis scaling**: ``fxconet.analyze`` time against the graph size on DenseNet-121/169/201
  and on a synthetic chain of residual blocks (8 ... 512), with ``torch.fx.symbolic_trace`` as
  the reference; the log-log slope of time against fx nodes (1.0 = linear) and against nodes
  plus edges (a DenseNet layer concatenates every earlier feature map of its block: its
  edges grow with the square of the depth, its nodes linearly).
* **APS final pick**: the beam search over the controller after a short APS search of a
  ResNet-20 on the embedded digits (``pick_seconds`` of the search's report), against the
  search it ends and against the Fashion-MNIST search of ``benchmarks/results/aps.json``.

Writes benchmarks/results/speed.json and speed.md. Every model has random weights, eval mode,
batch 1 at 3x224x224. Torch-Pruning is the optional ``bench`` extra; without it (or with
``--skip-torch-pruning``) its columns are left empty.

Usage:
    python benchmarks/speed.py                       # about 10 minutes on 2 cores
    python benchmarks/speed.py --models resnet50 --chain 8 32 --repeats 3 --out /tmp/speed.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from _common import package_version, tp_ignored_layers, write_results
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
    p.add_argument("--skip-torch-pruning", action="store_true", help="fxconet only")
    p.add_argument("--skip-aps", action="store_true", help="leave out the APS pick")
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


def fx_fixed_stages(gm: torch.fx.GraphModule) -> dict[str, Callable[[], Any]]:
    """What emitting ``gm`` costs beyond its tensors, for any rewrite that returns a verified
    GraphModule: a copy of its graph made into a new GraphModule (torch.fx generates and
    compiles the code; the modules are shared, nothing is copied), and the check of its
    shapes on ``meta`` tensors that fxconet runs on every graph it emits."""
    from fxconet.passes.resize_layers import expected_shapes
    from fxconet.passes.verify import verify_channels

    plan = gm.meta["fxconet"]
    example = (plan.solution.example_args, plan.solution.example_kwargs)
    expected = expected_shapes(plan)
    return {
        "graph_module": lambda: torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)),
        "verify": lambda: verify_channels(gm, example, expected=expected),
    }


class Timed(float):
    """Seconds a stage measured itself (its untimed setup left out)."""


def _trim() -> Callable[[], Any]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere): hands freed heap memory back to the OS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


TRIM = _trim()


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, *, trim: bool = True
) -> dict[str, float]:
    """Median seconds of each function, run round-robin after one warm-up each. A function
    that returns a :class:`Timed` is credited with that time instead of its whole call.

    With ``trim``, every call starts from the same allocator state: a garbage collection,
    then freed memory handed back to the OS (:data:`TRIM`), so no stage runs in warm pages
    the one before it freed (a deepcopy timed right after a stage that freed a model's worth
    of memory ran in half the time of one timed after a stage that did not). The scaling
    runs leave it out: paging a small analysis' heap in again would flatten the slopes."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            gc.collect()
            if trim:
                TRIM()
            t0 = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t0
            times[key].append(float(out) if isinstance(out, Timed) else elapsed)
    return {k: statistics.median(v) for k, v in times.items()}


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or None when it is not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return tp


def tp_stages(tp: Any, model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Torch-Pruning's graph build, and its 50% L1 prune step on a fresh copy (timed alone)."""

    def step() -> Timed:
        work = copy.deepcopy(model)
        pruner = tp.pruner.BasePruner(
            work,
            example_inputs=x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=tp_ignored_layers(work),
        )
        t0 = time.perf_counter()
        pruner.step()
        return Timed(time.perf_counter() - t0)

    return {
        "tp_build": lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x),
        "tp_step": step,
    }


def resize_row(name: str, repeats: int, tp: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    graph = fxconet.analyze(model, x)
    widths = half(graph)
    gm = fxconet.resize(graph, widths)
    stages: dict[str, Callable[[], Any]] = {
        "resize": lambda: fxconet.resize(graph, widths),
        "deepcopy": lambda: copy.deepcopy(model),
        "index_select": index_select_floor(model, gm),
        "analyze": lambda: fxconet.analyze(model, x),
        **fx_fixed_stages(gm),
    }
    if tp is not None:
        stages.update(tp_stages(tp, model, x))
    med = interleaved(stages, repeats)
    # the same three again without trimming: the allocator as the stage before left it (what
    # a search that resizes in a loop sees; a deepcopy then reuses the pages resize freed)
    warm = interleaved(
        {k: stages[k] for k in ("resize", "deepcopy", "index_select")}, repeats, trim=False
    )
    params = sum(p.numel() for p in model.parameters())
    # the least a verified fx rewrite can take: the weights copied once, the GraphModule built,
    # its shapes checked
    fx_floor = med["index_select"] + med["graph_module"] + med["verify"]
    return {
        "model": name,
        "params": params,
        "free_groups": len(graph.free),
        "seconds": med,
        "seconds_warm": warm,
        "vs_deepcopy": med["resize"] / med["deepcopy"],
        "vs_index_select": med["resize"] / med["index_select"],
        "fx_floor": fx_floor,
        "vs_fx_floor": med["resize"] / fx_floor,
        "vs_deepcopy_warm": warm["resize"] / warm["deepcopy"],
        "vs_index_select_warm": warm["resize"] / warm["index_select"],
        "tp_build_over_analyze": med["tp_build"] / med["analyze"] if tp is not None else None,
        "tp_step_over_resize": med["tp_step"] / med["resize"] if tp is not None else None,
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
    cases: list[tuple[str, str, nn.Module]] = []
    for name in DENSENETS:
        cases.append(("densenet", name, getattr(torchvision.models, name)().eval()))
    for n in chain:
        cases.append(("chain", f"chain{n}", Chain(n).eval()))
    rows = []
    for family, name, model in cases:
        x = torch.randn(1, 3, 224, 224) if family == "densenet" else torch.randn(1, 3, 32, 32)
        nodes = list(torch.fx.symbolic_trace(model).graph.nodes)
        edges = sum(len(n.all_input_nodes) for n in nodes)
        med = interleaved(
            {
                "analyze": lambda m=model, x=x: fxconet.analyze(m, x),
                "symbolic_trace": lambda m=model: torch.fx.symbolic_trace(m),
            },
            repeats,
            trim=False,
        )
        rows.append(
            {"family": family, "model": name, "nodes": len(nodes), "edges": edges, "seconds": med}
        )
    return rows


def aps_pick(reference: Path) -> dict[str, Any]:
    """The APS final pick's time after a short search of a ResNet-20 on the digits, against
    that search and against the search recorded in ``reference`` (benchmarks/aps.py's JSON)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxconet.optimize_channels(
            fxconet.models.cifar_resnet20(in_channels=1),
            data="digits",
            method="aps",
            target_macs=0.5,
            warmup_epochs=1,
            search_epochs=2,
            batch_size=64,
            progress=False,
            seed=0,
        )
    pick, search = result.extra["pick_seconds"], result.extra["search_seconds"]
    row: dict[str, Any] = {
        "pick_seconds": pick,
        "search_seconds": search,
        "fraction": pick / search,
    }
    try:
        runs = json.loads(reference.read_text())["runs"]
        seconds = [r["search_seconds"] for r in runs if str(r.get("method")).startswith("aps")]
    except (OSError, KeyError, ValueError):
        seconds = []
    if seconds:
        ref = statistics.median(seconds)
        row.update(reference=str(reference.name), reference_search_seconds=ref)
        row["reference_fraction"] = pick / ref
    return row


def _ms(s: dict[str, float], key: str) -> str:
    return f"{1e3 * s[key]:.1f}" if key in s else "-"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(result: dict[str, Any]) -> str:
    lines = [
        "| model | params | free groups | resize ms | deepcopy ms | index_select floor ms "
        "| resize / deepcopy | resize / floor | warm: resize / deepcopy | warm: resize / floor "
        "| TP prune step ms | TP step / resize | analyze ms | TP build ms | TP build / analyze |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["resize"]:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['free_groups']} "
            f"| {_ms(s, 'resize')} | {_ms(s, 'deepcopy')} | {_ms(s, 'index_select')} "
            f"| {_x(r['vs_deepcopy'])} | {_x(r['vs_index_select'])} "
            f"| {_x(r.get('vs_deepcopy_warm'))} | {_x(r.get('vs_index_select_warm'))} "
            f"| {_ms(s, 'tp_step')} | {_x(r.get('tp_step_over_resize'))} "
            f"| {_ms(s, 'analyze')} | {_ms(s, 'tp_build')} | {_x(r.get('tp_build_over_analyze'))} |"
        )
    lines += [
        "",
        "What a rewrite that returns a verified GraphModule pays beyond copying the weights "
        "(the same loop, cold): a GraphModule built from a copy of the resized graph "
        "(torch.fx's code generation and compile), and the check of its shapes on meta "
        "tensors. *fx floor* = index_select floor + both; *3x budget left* = three times the "
        "index_select floor minus both (the time left for everything else).",
        "",
        "| model | index_select floor ms | GraphModule build ms | meta verify ms "
        "| fx floor ms | resize / fx floor | 3x budget left ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["resize"]:
        s = r["seconds"]
        if "graph_module" not in s:
            continue
        left = 3 * s["index_select"] - s["graph_module"] - s["verify"]
        lines.append(
            f"| {r['model']} | {_ms(s, 'index_select')} | {_ms(s, 'graph_module')} "
            f"| {_ms(s, 'verify')} | {1e3 * r['fx_floor']:.1f} | {_x(r['vs_fx_floor'])} "
            f"| {1e3 * left:.1f} |"
        )
    summary = result.get("summary", {})
    if summary.get("tp_build_over_analyze") is not None:
        lines += [
            "",
            f"- Ratio of medians over these models: Torch-Pruning's build / analyze "
            f"{summary['tp_build_over_analyze']:.2f}x, Torch-Pruning's prune step / resize "
            f"{summary['tp_step_over_resize']:.2f}x (the whole torchvision zoo: "
            "benchmarks/results/zoo_timing.md).",
        ]
    lines += [
        "",
        "| family | model | fx nodes | edges | analyze ms | symbolic_trace ms | analyze / trace |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["scaling"]:
        s = r["seconds"]
        lines.append(
            f"| {r['family']} | {r['model']} | {r['nodes']} | {r['edges']} "
            f"| {1e3 * s['analyze']:.1f} | {1e3 * s['symbolic_trace']:.1f} "
            f"| {s['analyze'] / s['symbolic_trace']:.2f} |"
        )
    lines.append("")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for family, sl in result["slopes"].items():
        lines.append(
            f"- {family}: log-log slope of time against fx nodes: analyze "
            f"{fmt(sl['analyze'])}, symbolic_trace {fmt(sl['symbolic_trace'])}; against nodes "
            f"+ edges: analyze {fmt(sl['analyze_vs_size'])}, symbolic_trace "
            f"{fmt(sl['symbolic_trace_vs_size'])}"
        )
    aps = result.get("aps_pick")
    if aps:
        ref = ""
        if "reference_fraction" in aps:
            ref = (
                f"; {100 * aps['reference_fraction']:.2f}% of the median APS search in "
                f"{aps['reference']} ({aps['reference_search_seconds']:.0f} s)"
            )
        lines += [
            "",
            f"- APS final pick (ResNet-20, digits, 1 warm-up + 2 search epochs, 50% MACs): "
            f"{aps['pick_seconds']:.2f} s, {100 * aps['fraction']:.1f}% of its "
            f"{aps['search_seconds']:.1f} s search{ref}.",
        ]
    env = result["env"]
    lines += [
        "",
        f"Medians of {env['repeats']} interleaved repeats, each call after a garbage "
        "collection; the resize table's also after malloc_trim (every stage starts with cold "
        "pages), except its *warm* columns (resize, deepcopy and the floor again, the "
        f"allocator as the stage before left it). {env['threads']} torch thread(s), "
        f"{env['machine']}, torch {env['torch']}, torch-pruning {env['torch_pruning']}, load "
        f"average at start {env['load']}. Every free group halved (Torch-Pruning: 50% of the "
        "channels, L1 magnitude, the 1000-class head kept); batch 1 at 3x224x224 (chains: "
        "3x32x32); random weights.",
    ]
    return "\n".join(lines) + "\n"


def _ratio_of_medians(rows: list[dict[str, Any]], num: str, den: str) -> float | None:
    pairs = [(r["seconds"][num], r["seconds"][den]) for r in rows if num in r["seconds"]]
    if not pairs:
        return None
    return statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    tp = None if args.skip_torch_pruning else torch_pruning()
    resize = []
    for name in args.models:
        row = resize_row(name, args.repeats, tp)
        print(
            f"{name}: resize {row['vs_deepcopy']:.2f}x deepcopy, "
            f"{row['vs_index_select']:.2f}x floor (warm {row['vs_deepcopy_warm']:.2f}x, "
            f"{row['vs_index_select_warm']:.2f}x), TP build / analyze "
            f"{_x(row['tp_build_over_analyze'])}",
            flush=True,
        )
        resize.append(row)
    scaling = scaling_rows(args.chain, args.repeats)
    slopes = {}
    for family in ("densenet", "chain"):
        rows = [r for r in scaling if r["family"] == family]
        slopes[family] = {}
        for k in ("analyze", "symbolic_trace"):
            slopes[family][k] = slope([(r["nodes"], r["seconds"][k]) for r in rows])
            slopes[family][f"{k}_vs_size"] = slope(
                [(r["nodes"] + r["edges"], r["seconds"][k]) for r in rows]
            )
    result: dict[str, Any] = {
        "resize": resize,
        "summary": {
            "tp_build_over_analyze": _ratio_of_medians(resize, "tp_build", "analyze"),
            "tp_step_over_resize": _ratio_of_medians(resize, "tp_step", "resize"),
        },
        "scaling": scaling,
        "slopes": slopes,
        "env": {
            "repeats": args.repeats,
            "threads": args.threads,
            "machine": platform.platform(),
            "torch": torch.__version__,
            "torch_pruning": package_version("torch-pruning") if tp is not None else "not run",
            "load": None if load is None else round(load, 2),
        },
    }
    if not args.skip_aps:
        result["aps_pick"] = aps_pick(HERE / "results" / "aps.json")
        print(f"APS pick: {result['aps_pick']}", flush=True)
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
