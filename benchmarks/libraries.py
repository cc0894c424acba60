"""Models of other libraries, as given: fxconet's analysis and rewrite next to Torch-Pruning's.

The models are :data:`fxconet.testing.LIBRARY_CASES` (ultralytics YOLO, segmentation_models_pytorch,
MONAI, timm; random weights, eval mode, small inputs; ``pip install fxconet[zoo,bench]``). For each,
one row with the columns of ``benchmarks/zoo.py``:

* fxconet: analysed as given (no options), groups, free groups, % of conv parameters free,
  ``analyze`` and ``resize`` (every free group halved) times, and the three numerical checks of
  :mod:`fxconet.testing` (identity, random resize, zero removal); on failure, the error's first
  line.
* Torch-Pruning: ``DependencyGraph().build_dependency`` time, and whether pruning 50% of the
  channels (L1 magnitude, the model's output layers ignored) gives a model whose outputs keep
  their shapes.

Both tools get the same model instance and input, one after the other; times are medians of
``--repeats`` after one warm-up, on ``--threads`` CPU threads. Torch-Pruning's build runs a real
forward pass, cheap at these small inputs; fxconet's analysis costs the same at any input size
(``benchmarks/zoo.py`` times both at 224x224). Every stage has a time limit
(``--stage-timeout``).

Usage:
    python benchmarks/libraries.py                 # all cases, a few minutes
    python benchmarks/libraries.py --models yolov8n monai-unet --out /tmp/libraries.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import deadline, error_text, package_version, write_results
from torch import nn

import fxconet
from fxconet import testing

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(testing.LIBRARY_CASES))
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--stage-timeout", type=float, default=300.0, help="seconds per stage (300)")
    p.add_argument("--skip-torch-pruning", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results" / "libraries.json")
    return p.parse_args(argv)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def outputs_of(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return testing.flat_tensors(model(x))


def output_layers(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The convs and linears nearest to each model output (what a pruner must leave alone for
    the outputs to keep their channels): found by walking the autograd graph back from the
    outputs through channel-preserving ops (upsampling, activations ...) to the first conv or
    matmul, whose weight names the layer."""
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    layers: dict[int, nn.Module] = {}
    with torch.enable_grad():
        outs = [o for o in testing.flat_tensors(model(x)) if o.requires_grad]
    seen: set[int] = set()
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        name = type(fn).__name__
        if any(k in name for k in ("Convolution", "Addmm", "MmBackward", "Linear")):
            for nxt, _ in fn.next_functions:
                var = getattr(nxt, "variable", None)
                if var is not None and id(var) in owner:
                    layers[id(owner[id(var)])] = owner[id(var)]
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return list(layers.values())


def fxconet_row(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {}
    with deadline(args.stage_timeout):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fxconet.analyze(model, x)
            row["analyze_ms"] = 1e3 * median_time(lambda: fxconet.analyze(model, x), args.repeats)
    total, free = graph.conv_params()
    row.update(
        groups=len(graph.groups),
        free_groups=len(graph.free),
        conv_free=free / total if total else None,
    )
    widths = {g.id: g.divisor * max(1, round(g.size / g.divisor / 2)) for g in graph.free}
    with deadline(args.stage_timeout):
        row["resize_ms"] = 1e3 * median_time(lambda: fxconet.resize(graph, widths), args.repeats)
    with deadline(args.stage_timeout), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checks = testing.check_all(model, x)
    row["checks"] = {c.name: c.ok for c in checks}
    return row


def torch_pruning_row(
    model: nn.Module, x: torch.Tensor, args: argparse.Namespace, row: dict[str, Any]
) -> None:
    """Torch-Pruning's build time and 50% prune into ``row`` (``row["stage"]`` says where it
    was when it raises)."""
    import torch_pruning as tp

    row["stage"] = "build"
    with deadline(args.stage_timeout):
        row["build_ms"] = 1e3 * median_time(
            lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x), args.repeats
        )
    row["stage"] = "prune"
    pruned = copy.deepcopy(model)
    ref = [tuple(t.shape) for t in outputs_of(pruned, x)]
    with deadline(args.stage_timeout):
        pruner = tp.pruner.BasePruner(
            pruned,
            example_inputs=x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=output_layers(pruned, x),
        )
        pruner.step()
        got = [tuple(t.shape) for t in outputs_of(pruned, x)]
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    row["prune_ok"] = got == ref and after < before
    row["params_kept"] = after / before
    if got != ref:
        row["prune_error"] = f"output shapes {got} != {ref}"
    del row["stage"]


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "library": testing.LIBRARY_CASES[name][0]}
    try:
        model, x = testing.library_case(name)
    except Exception as e:
        row["error"] = error_text(e)
        return row
    row["params"] = sum(p.numel() for p in model.parameters())
    try:
        row["fxconet"] = fxconet_row(model, x, args)
    except Exception as e:
        row["fxconet"] = {"error": error_text(e)}
    if not args.skip_torch_pruning:
        tpr: dict[str, Any] = {}
        row["torch_pruning"] = tpr
        try:
            torch_pruning_row(model, x, args, tpr)
        except Exception as e:
            tpr["error"] = f"{tpr.pop('stage', '')}: {error_text(e)}"
    return row


def fx_ok(row: dict[str, Any]) -> bool:
    fx = row.get("fxconet", {})
    return "error" not in fx and all(fx.get("checks", {}).values()) and bool(fx.get("checks"))


def table(result: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [
        "| model | library | params | groups (free) | conv params free | analyze ms "
        "| resize ms | checks | TP build ms | TP prune 50% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fx, tpr = r.get("fxconet", {}), r.get("torch_pruning", {})
        if "error" in fx or "error" in r:
            fx_cells = f"error: {fx.get('error', r.get('error'))[:90]} | - | - | - | -"
        else:
            checks = (
                "pass"
                if fx_ok(r)
                else "FAIL " + ",".join(k for k, v in fx["checks"].items() if not v)
            )
            cf = "-" if fx["conv_free"] is None else f"{100 * fx['conv_free']:.0f}%"
            fx_cells = (
                f"{fx['groups']} ({fx['free_groups']}) | {cf} "
                f"| {ms(fx['analyze_ms'])} | {ms(fx['resize_ms'])} | {checks}"
            )
        if "error" in tpr:
            tp_cells = f"{ms(tpr.get('build_ms'))} | error in {tpr['error'][:80]}"
        elif tpr:
            kept = f"ok, {100 * tpr['params_kept']:.0f}% params" if tpr["prune_ok"] else "FAIL"
            tp_cells = f"{ms(tpr['build_ms'])} | {kept}"
        else:
            tp_cells = "- | -"
        lines.append(
            f"| {r['model']} | {r['library']} | {r.get('params', 0) / 1e6:.2f}M | {fx_cells} "
            f"| {tp_cells} |"
        )
    s = result["summary"]
    env = result["env"]
    lines += [
        "",
        f"fxconet passes as given (analysis and the three checks): {s['fxconet_pass']} of "
        f"{s['models']}; Torch-Pruning prunes 50% with output shapes kept: {s['tp_pass']} of "
        f"{s['models']}. Median analyze / Torch-Pruning build: {s['analyze_vs_tp_build']}.",
        "",
        f"Medians of {env['repeats']} repeats after a warm-up, {env['threads']} torch thread(s), "
        f"{env['machine']}, torch {env['torch']}, Torch-Pruning {env['torch_pruning']}, "
        f"{env['libraries']}. Random weights, eval mode, batch 1 (3x64x64; MONAI 1x32x32).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        row = run(name, args)
        rows.append(row)
        fx = row.get("fxconet", {})
        state = "ok" if fx_ok(row) else fx.get("error", "check failed")
        print(f"{name}: fxconet {state}; torch-pruning {row.get('torch_pruning')}", flush=True)
        row["seconds"] = time.perf_counter() - t0
    ratios = [
        r["fxconet"]["analyze_ms"] / r["torch_pruning"]["build_ms"]
        for r in rows
        if "analyze_ms" in r.get("fxconet", {}) and "build_ms" in r.get("torch_pruning", {})
    ]
    summary = {
        "models": len(rows),
        "fxconet_pass": sum(fx_ok(r) for r in rows),
        "tp_pass": sum(bool(r.get("torch_pruning", {}).get("prune_ok")) for r in rows),
        "analyze_vs_tp_build": f"{statistics.median(ratios):.2f}x" if ratios else "-",
    }
    libs = ("ultralytics", "segmentation_models_pytorch", "monai", "timm")
    result = {
        "rows": rows,
        "summary": summary,
        "env": {
            "repeats": args.repeats,
            "threads": args.threads,
            "machine": platform.platform(),
            "torch": torch.__version__,
            "torch_pruning": package_version("torch-pruning"),
            "libraries": ", ".join(f"{n} {package_version(n.replace('_', '-'))}" for n in libs),
        },
    }
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
