"""Every torchvision classification model: fxconet's analysis and rewrite vs Torch-Pruning's.

For each model, one row:

* fxconet: traced, groups, free groups, % of conv parameters free, ``fxconet.analyze`` time,
  ``fxconet.resize`` time (every free group halved, all weights copied), and the three numerical
  checks of :mod:`fxconet.testing` (identity, random resize, zero removal).
* Torch-Pruning (``pip install fxconet[bench]``): ``DependencyGraph().build_dependency`` time, and
  whether pruning 50% of the channels with an L1 magnitude pruner succeeds.

Timing is fair by construction: both tools get the same model instance (``weights=None``, default
1000 classes, eval mode) and the same standard input, batch 1 at 3x224x224 (3x299x299 for
inception_v3), on ``--threads`` CPU threads; each is run once to warm up, then both are run
``--repeats`` times round-robin (one run of each in turn, so a slow spell of a shared machine
hits both alike), and the medians are reported. fxconet analyses on ``meta`` tensors (no real
compute); Torch-Pruning runs a real forward pass with autograd to trace the model.

The numerical checks need real forward passes, so they use the small settings of
``tests/test_zoo.py`` (:func:`fxconet.testing.torchvision_case`: 32x32 inputs unless the model
needs more, ``num_classes=10``, batch 2).

Models run one at a time in a worker process that is restarted if it dies or hangs; each stage
has a time limit (``--stage-timeout``), so a tool that hangs on a model costs that limit and is
recorded as a timeout.

Usage:
    python benchmarks/zoo.py                                 # all 80 models, about 35 min
    python benchmarks/zoo.py --models resnet18 shufflenet_v2_x1_0 --out /tmp/zoo.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from _common import StageTimeout, deadline, error_text, package_version, tp_ignored_layers
from torch import nn

ZOO = torchvision.models.list_models(module=torchvision.models)
HERE = Path(__file__).resolve().parent

# Settings of the timing runs: the standard ImageNet input, shared by both tools.
#: input side (default 224)
TIMING_INPUT_SIZE = {"inception_v3": 299}
TIMING_BATCH = 1

#: the stages of a row, in the order the worker runs them
STAGES = ("build", "analyze", "resize", "tp_build", "tp_prune", "checks")


@dataclass(frozen=True)
class Config:
    """Resolved settings of one benchmark run (written to the JSON)."""

    models: tuple[str, ...]
    repeats: int
    threads: int
    stage_timeout: float
    prune_timeout: float
    skip_prune_above_params: int | None
    skip_checks: bool
    skip_torch_pruning: bool
    seed: int
    out: str
    markdown: str


# --------------------------------------------------------------------------------------------
# Worker side: one model at a time
# --------------------------------------------------------------------------------------------


def build_timing_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model with default arguments (1000 classes, no weights) and the standard input."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None)
    size = TIMING_INPUT_SIZE.get(name, 224)
    return model.eval(), torch.randn(TIMING_BATCH, 3, size, size)


def half_widths(graph: Any) -> dict[int, int]:
    """Every free group at half its width, in multiples of its divisor (at least one)."""
    return {g.id: g.divisor * max(1, round(g.size / g.divisor / 2)) for g in graph.free}


def _tp_prune(tp: Any, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Prune 50% of the channels with Torch-Pruning and run the pruned model.

    The recipe is Torch-Pruning's own for torchvision models
    (``examples/torchvision_models/torchvision_pruning.py``): L1 magnitude importance, the final
    classifier (``nn.Linear`` with 1000 outputs) ignored, ViT widths rounded to the number of
    heads and ``model.hidden_dim`` updated after pruning (torchvision's ViT reads it in
    ``forward``).
    """
    from torchvision.models import VisionTransformer

    with torch.no_grad():
        ref_shape = tuple(model(x).shape)
    before = sum(p.numel() for p in model.parameters())
    ignored = tp_ignored_layers(model)
    round_to = model.encoder.layers[0].num_heads if isinstance(model, VisionTransformer) else None
    start = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=ignored,
        round_to=round_to,
    )
    pruner.step()
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels
    prune_ms = 1e3 * (time.perf_counter() - start)
    with torch.no_grad():
        out_shape = tuple(model(x).shape)
    after = sum(p.numel() for p in model.parameters())
    ok = out_shape == ref_shape
    return {
        "ok": ok,
        "ms": prune_ms,
        "params_before": before,
        "params_after": after,
        "error": None if ok else f"output shape {out_shape} != {ref_shape}",
    }


def run_model(name: str, config: Config, report: Callable[[dict[str, Any]], None]) -> None:
    """Benchmark one model; ``report(row)`` is called after every stage with the row so far."""
    import fxconet
    from fxconet import testing

    tp = None
    if not config.skip_torch_pruning:
        import torch_pruning as tp

    torch.set_num_threads(config.threads)
    row: dict[str, Any] = {"model": name, "stage": "build"}
    report(row)

    def stage(key: str) -> None:
        row["stage"] = key
        report(row)

    # --- the 224 model, shared by both tools' timings -----------------------------------------
    model, x = build_timing_model(name)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["timing_input"] = list(x.shape)

    # analyze and Torch-Pruning's build, timed round-robin (one run of each in turn, after one
    # warm-up each) so that a slow spell of the shared machine hits both tools alike
    graph = None
    fns: dict[str, Callable[[], Any]] = {"fx": lambda: fxconet.analyze(model, x)}
    if tp is not None:
        fns["tp"] = lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x)
    runs: dict[str, list[float]] = {}
    failed: dict[str, Exception] = {}
    for key, fn in fns.items():
        stage("analyze" if key == "fx" else "tp_build")
        try:
            with deadline(config.stage_timeout):
                result = fn()
            runs[key] = []
            if key == "fx":
                graph = result
            del result
        except Exception as exc:
            failed[key] = exc
        gc.collect()
    stage("timing")
    for _ in range(config.repeats):
        for key in list(runs):
            try:
                with deadline(config.stage_timeout):
                    gc.collect()
                    start = time.perf_counter()
                    fns[key]()
                    runs[key].append(1e3 * (time.perf_counter() - start))
            except Exception as exc:
                failed[key] = exc
                del runs[key]
    gc.collect()
    if "fx" in runs and graph is not None:
        total, free = graph.conv_params()
        row["fx"] = {
            "traced": True,
            "ok": True,
            "analyze_ms": statistics.median(runs["fx"]),
            "analyze_runs_ms": runs["fx"],
            "groups": len(graph.groups),
            "free": len(graph.free),
            "conv_params": total,
            "free_conv_params": free,
            "pct_free": 100.0 * free / total if total else 0.0,
        }
    else:
        exc = failed["fx"]
        # a timeout leaves it unknown whether tracing itself would have succeeded
        traced = None if isinstance(exc, StageTimeout) else not isinstance(exc, fxconet.TraceError)
        row["fx"] = {"traced": traced, "ok": False, "error": error_text(exc)}
        graph = None
    if tp is not None:
        if "tp" in runs:
            row["tp"] = {
                "build_ok": True,
                "build_ms": statistics.median(runs["tp"]),
                "build_runs_ms": runs["tp"],
            }
        else:
            row["tp"] = {"build_ok": False, "build_error": error_text(failed["tp"])}

    stage("resize")
    if graph is not None:
        try:
            with deadline(config.stage_timeout):
                widths = half_widths(graph)
                gc.collect()
                start = time.perf_counter()
                gm = fxconet.resize(graph, widths)
                row["fx"]["resize_ms"] = 1e3 * (time.perf_counter() - start)
            row["fx"]["resize_params"] = sum(p.numel() for p in gm.parameters())
            del gm
        except Exception as exc:
            row["fx"]["resize_error"] = error_text(exc)
        del graph
        gc.collect()

    if tp is not None:
        stage("tp_prune")
        limit = config.skip_prune_above_params
        if limit is not None and row["params"] > limit:
            row["tp"]["prune"] = {"ok": None, "error": f"skipped: more than {limit} params"}
        else:
            try:
                with deadline(config.prune_timeout):
                    row["tp"]["prune"] = _tp_prune(tp, model, x)
            except Exception as exc:
                row["tp"]["prune"] = {"ok": False, "error": error_text(exc)}
    del model, x
    gc.collect()

    # --- the numerical checks, at the small settings of the test suite -----------------------
    stage("checks")
    if not config.skip_checks:
        checks: dict[str, Any] = {}
        row["checks"] = checks
        model, x = testing.torchvision_case(name)
        graph = None
        try:
            with deadline(config.stage_timeout):
                graph = fxconet.analyze(model, x)
        except Exception as exc:
            for key in ("identity", "random", "zero_removal"):
                checks[key] = {"ok": False, "error": f"analyze: {error_text(exc)}"}
        if graph is not None:
            high = 1.0 if name in testing.TORCHVISION_GIANTS else 2.0
            runs: dict[str, Callable[[], Any]] = {
                "identity": lambda: testing.check_identity(model, x, graph=graph),
                "random": lambda: testing.check_random_resize(
                    model, x, seed=config.seed, high=high, graph=graph
                ),
                # inplace: converts the model to float64 itself, so it runs last
                "zero_removal": lambda: testing.check_zero_removal(
                    model, x, seed=config.seed, inplace=True
                ),
            }
            for key, run in runs.items():
                if key == "zero_removal":
                    graph = None
                    gc.collect()
                try:
                    with deadline(config.stage_timeout):
                        result = run()
                    checks[key] = {"ok": bool(result.ok), "max_diff": result.max_diff}
                    if result.note:
                        checks[key]["note"] = result.note
                except Exception as exc:
                    checks[key] = {"ok": False, "error": error_text(exc)}
                report(row)
        del model, x, graph
        gc.collect()
    row["stage"] = "done"
    report(row)


def _serve(conn: Any, config: Config) -> None:
    """Worker loop: receive a model name, send back the row after every stage."""
    warnings.simplefilter("ignore")
    while True:
        name = conn.recv()
        if name is None:
            return

        def report(row: dict[str, Any]) -> None:
            conn.send(copy.deepcopy(row))

        try:
            run_model(name, config, report)
        except BaseException as exc:
            conn.send({"model": name, "stage": "crashed", "worker_error": error_text(exc)})
            traceback.print_exc()


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


class _Worker:
    """A spawned worker process, restarted when it dies or hangs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc: Any = None
        self.conn: Any = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.config), daemon=True)
        self.proc.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.proc = None

    def run(self, name: str) -> dict[str, Any]:
        """The row of ``name``; a stage cut short by a crash or hang is recorded as such."""
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send(name)
        # every stage has its own SIGALRM limit; this backstop catches hangs in C code
        backstop = self.config.stage_timeout * (len(STAGES) + 2) + self.config.prune_timeout
        deadline = time.monotonic() + backstop
        row: dict[str, Any] = {"model": name, "stage": "build"}
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(min(left, 5.0)):
                if left > 0 and self.proc.is_alive():
                    continue
                why = (
                    f"worker killed after {backstop:.0f} s"
                    if self.proc.is_alive()
                    else f"worker died (exit code {self.proc.exitcode})"
                )
                row["worker_error"] = f"{why} during stage {row.get('stage')}"
                self.proc.kill()
                self.proc.join()
                self.proc = None
                return row
            try:
                row = self.conn.recv()
            except EOFError:
                continue
            if row.get("stage") in ("done", "crashed"):
                return row


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fx_status(row: dict[str, Any]) -> bool | None:
    """fxconet on one model: True when analyze at 224, resize and the three checks passed,
    False when one of them failed, None when analyze and resize passed but the checks did not
    run (``--skip-checks``)."""
    fx = row.get("fx", {})
    if not fx.get("ok") or "resize_error" in fx:
        return False
    checks = row.get("checks")
    if checks is None:
        return None
    return all(checks.get(k, {}).get("ok") for k in ("identity", "random", "zero_removal"))


def tp_status(row: dict[str, Any]) -> bool | None:
    """Torch-Pruning on one model: True when build_dependency ran and pruning 50% kept the
    output shape, False when either failed, None when it did not run or its prune was skipped
    (``--skip-prune-above-params``)."""
    tp = row.get("tp")
    if not tp:
        return None
    if not tp.get("build_ok"):
        return False
    return tp.get("prune", {}).get("ok")


def _tp_checked(rows: list[dict[str, Any]]) -> int:
    """The models whose Torch-Pruning result is known (a failed build or a prune that ran);
    0 when no prune ran at all (the summary then says so instead of counting)."""
    if not any(r.get("tp", {}).get("prune", {}).get("ok") is not None for r in rows):
        return 0
    return sum(tp_status(r) is not None for r in rows)


def summarize(rows: list[dict[str, Any]], config: Config, wall_s: float) -> dict[str, Any]:
    """The summary block: medians over the models both tools timed, successes, failures."""
    both = [r for r in rows if r.get("fx", {}).get("ok") and r.get("tp", {}).get("build_ok")]
    fx_med = _median([r["fx"]["analyze_ms"] for r in both])
    tp_med = _median([r["tp"]["build_ms"] for r in both])
    ratio = tp_med / fx_med if fx_med and tp_med else None
    per_model = [r["tp"]["build_ms"] / r["fx"]["analyze_ms"] for r in both]
    tp_ran = not config.skip_torch_pruning
    return {
        "models": len(rows),
        "models_timed_by_both": len(both),
        "fx_median_analyze_ms": fx_med,
        "tp_median_build_ms": tp_med,
        "median_ratio_tp_over_fx": ratio,
        "median_of_per_model_ratios": _median(per_model),
        "slowest_ratio_model": (
            min(both, key=lambda r: r["tp"]["build_ms"] / r["fx"]["analyze_ms"])["model"]
            if both
            else None
        ),
        "fx_median_analyze_ms_all_models": _median(
            [r["fx"]["analyze_ms"] for r in rows if r.get("fx", {}).get("ok")]
        ),
        "target_5x_met": (ratio >= 5.0) if ratio is not None else None,
        "fx_successes": sum(fx_status(r) is True for r in rows),
        "fx_checked": sum(fx_status(r) is not None for r in rows),
        "tp_successes": sum(tp_status(r) is True for r in rows) if tp_ran else None,
        # the models whose prune ran or whose build failed; none when no prune ran at all
        "tp_checked": _tp_checked(rows) if tp_ran else None,
        "tp_fails_fx_succeeds": [
            r["model"] for r in rows if fx_status(r) is True and tp_status(r) is False
        ]
        if tp_ran
        else None,
        "fx_fails": [r["model"] for r in rows if fx_status(r) is False],
        "tp_build_fails": [r["model"] for r in rows if r.get("tp") and not r["tp"].get("build_ok")]
        if tp_ran
        else None,
        "fx_fails_tp_succeeds": [
            r["model"] for r in rows if tp_status(r) is True and fx_status(r) is False
        ]
        if tp_ran
        else None,
        "tp_prune_skipped": [
            r["model"]
            for r in rows
            if str(r.get("tp", {}).get("prune", {}).get("error", "")).startswith("skipped")
        ],
        "wall_s": wall_s,
    }


def _mark(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    return "ok" if check.get("ok") else "FAIL"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _success_line(what: str, ok: int | None, checked: int | None, total: int, why: str) -> str:
    """One summary line: successes among the models checked, and why the others were not."""
    if ok is None or checked is None:
        return f"- {what}: not run."
    if checked == 0:
        return f"- {what}: not checked in this run ({why})."
    line = f"- {what} on **{ok}/{checked}** models"
    return line + (f"; {total - checked} not checked ({why})." if checked < total else ".")


def _tp_build_line(s: dict[str, Any]) -> list[str]:
    fails = s.get("tp_build_fails")
    if fails is None:
        return []
    return [f"- Torch-Pruning's build_dependency fails: {', '.join(fails) or 'none'}."]


def render_markdown(result: dict[str, Any]) -> str:
    """Summary on top, then one row per model, then every failure message."""
    s, config, rows = result["summary"], result["config"], result["rows"]
    target = {True: "**met**", False: "**not met**", None: "not measured"}[s["target_5x_met"]]
    lines = [
        "# fxconet vs Torch-Pruning on the torchvision zoo",
        "",
        f"torch {result['env']['torch']}, torchvision {result['env']['torchvision']}, "
        f"torch-pruning {result['env']['torch_pruning']}, fxconet {result['env']['fxconet']}; "
        f"{config['threads']} CPU threads ({result['env']['machine']}). "
        f"Timings: batch 1, 3x224x224 (299 for inception_v3), default 1000 classes, eval mode, "
        f"the same model instance for both tools; median of {config['repeats']} runs after one "
        f"warm-up, the two tools' runs taken in turn. Checks: the small settings of "
        f"tests/test_zoo.py.",
        "",
        "## Summary",
        "",
        f"- Median analyze time over the {s['models_timed_by_both']} models both tools "
        f"analysed: fxconet **{_fmt(s['fx_median_analyze_ms'], 1)} ms**, Torch-Pruning "
        f"`build_dependency` **{_fmt(s['tp_median_build_ms'], 1)} ms**: ratio "
        f"**{_fmt(s['median_ratio_tp_over_fx'], 2)}x** (median of per-model ratios "
        f"{_fmt(s['median_of_per_model_ratios'], 2)}x; lowest on {s['slowest_ratio_model']}). "
        f"The 5x target is {target}.",
        _success_line(
            "fxconet succeeds (analyze + identity + random + zero-removal)",
            s["fx_successes"],
            s.get("fx_checked", s["models"]),
            s["models"],
            "--skip-checks",
        ),
        _success_line(
            "Torch-Pruning (build + prune 50% + forward)",
            s["tp_successes"],
            s.get("tp_checked", s["models"]),
            s["models"],
            "its prune was skipped: size limit, below",
        ),
        f"- Torch-Pruning fails, fxconet succeeds: "
        f"{', '.join(s['tp_fails_fx_succeeds'] or []) or 'none'}.",
        f"- fxconet fails: {', '.join(s['fx_fails']) or 'none'}.",
        *_tp_build_line(s),
        f"- fxconet fails where Torch-Pruning succeeds: "
        f"{', '.join(s['fx_fails_tp_succeeds'] or []) or 'none'}.",
    ]
    if s["tp_prune_skipped"]:
        lines.append(
            f"- Torch-Pruning pruning skipped (size limit): {', '.join(s['tp_prune_skipped'])}."
        )
    lines += [f"- Full benchmark wall time: {s['wall_s'] / 60:.1f} min.", ""]
    lines += [
        "## Per model",
        "",
        "| model | traced | groups | free | % conv params free | analyze ms | resize ms "
        "| identity | random | zero-removal | TP build ms | TP prune 50% |",
        "|---|---|--:|--:|--:|--:|--:|---|---|---|--:|---|",
    ]
    failures = []
    for r in rows:
        fx, tp, checks = r.get("fx", {}), r.get("tp", {}), r.get("checks") or {}
        prune = tp.get("prune")
        if prune is None:
            prune_cell = "-"
        elif prune.get("ok") is None:
            prune_cell = "skipped"
        else:
            prune_cell = "ok" if prune["ok"] else "FAIL"
        tp_build = _fmt(tp.get("build_ms"), 0) if tp.get("build_ok") else ("FAIL" if tp else "-")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    {True: "yes", False: "no"}.get(fx.get("traced"), "-"),
                    _fmt(fx.get("groups")),
                    _fmt(fx.get("free")),
                    _fmt(fx.get("pct_free"), 1),
                    _fmt(fx.get("analyze_ms"), 1),
                    _fmt(fx.get("resize_ms"), 0) if "resize_error" not in fx else "FAIL",
                    _mark(checks.get("identity")),
                    _mark(checks.get("random")),
                    _mark(checks.get("zero_removal")),
                    tp_build,
                    prune_cell,
                ]
            )
            + " |"
        )
        for where, msg in (
            ("worker", r.get("worker_error")),
            ("fxconet analyze", fx.get("error")),
            ("fxconet resize", fx.get("resize_error")),
            *((f"check {k}", c.get("error")) for k, c in checks.items()),
            *(
                (f"check {k}", f"max diff {c.get('max_diff')}")
                for k, c in checks.items()
                if c.get("ok") is False and not c.get("error")
            ),
            ("TP build_dependency", tp.get("build_error")),
            (
                "TP prune 50%",
                (prune or {}).get("error") if prune and prune.get("ok") is False else None,
            ),
        ):
            if msg:
                failures.append(f"- {r['model']}, {where}: `{msg}`")
    lines += ["", "## Failures", ""] + (failures or ["none"])
    return "\n".join(lines) + "\n"


def _env() -> dict[str, str]:
    import fxconet

    tp_version = package_version("torch-pruning", "not installed")
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": tp_version,
        "fxconet": fxconet.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores",
    }


def _load() -> list[float]:
    """1, 5 and 15 minute load averages: other processes on the machine skew the timings."""
    return [round(v, 2) for v in os.getloadavg()]


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=ZOO,
        metavar="NAME",
        help=f"torchvision model names to run (default: every classification model, {len(ZOO)})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs of analyze / build_dependency (in turn) after one warm-up; the median is "
        "reported (default: 5: single runs on a shared 2-core machine vary by up to 2x)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads for every model (default: 2)"
    )
    parser.add_argument(
        "--stage-timeout",
        type=float,
        default=600.0,
        help="seconds one stage (analyze timings, resize, build_dependency timings, one check) "
        "may take before it is recorded as a timeout (default: 600)",
    )
    parser.add_argument(
        "--prune-timeout",
        type=float,
        default=120.0,
        help="seconds Torch-Pruning's 50%% prune may take before it is recorded as a timeout: "
        "1.6.1 hangs while grouping Swin and MaxViT, and its slowest successful prune "
        "(regnet_y_128gf) takes about 30 s on 2 cores (default: 120)",
    )
    parser.add_argument(
        "--skip-prune-above-params",
        type=int,
        default=None,
        help="skip Torch-Pruning's 50%% prune on models with more parameters than this "
        "(default: prune every model; build_dependency is always timed)",
    )
    parser.add_argument(
        "--skip-checks",
        action="store_true",
        help="skip fxconet's three numerical checks (timings only; the summary then counts "
        "only analyze and resize failures)",
    )
    parser.add_argument(
        "--skip-torch-pruning",
        action="store_true",
        help="run fxconet only (Torch-Pruning is the optional 'bench' extra)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the checks (default: 0)")
    parser.add_argument(
        "--rerender",
        metavar="JSON",
        help="run nothing: recompute the summary and markdown (next to it) of a result JSON",
    )
    parser.add_argument(
        "--out",
        default=str(HERE / "results" / "zoo.json"),
        help="JSON output: config, environment, summary and rows "
        "(default: benchmarks/results/zoo.json)",
    )
    parser.add_argument(
        "--markdown",
        default=None,
        help="markdown table output (default: the --out path with .md)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(ZOO))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {ZOO}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return Config(
        models=tuple(args.models),
        repeats=args.repeats,
        threads=args.threads,
        stage_timeout=args.stage_timeout,
        prune_timeout=args.prune_timeout,
        skip_prune_above_params=args.skip_prune_above_params,
        skip_checks=args.skip_checks,
        skip_torch_pruning=args.skip_torch_pruning,
        seed=args.seed,
        out=args.out,
        markdown=args.markdown or str(Path(args.out).with_suffix(".md")),
    )


_STATUS = {True: "ok", False: "FAIL", None: "unchecked"}


def rerender(path: str) -> dict[str, Any]:
    """Recompute the summary and markdown of a result JSON written earlier (after a change of
    the report; nothing is run again, the rows and the wall time are kept as recorded)."""
    result = json.loads(Path(path).read_text())
    config = Config(**{**result["config"], "models": tuple(result["config"]["models"])})
    result["summary"] = summarize(result["rows"], config, result["summary"]["wall_s"])
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    Path(path).with_suffix(".md").write_text(render_markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--rerender", metavar="JSON")
    known, _ = pre.parse_known_args(argv)
    if known.rerender:
        return rerender(known.rerender)
    config = parse_args(argv)
    if not config.skip_torch_pruning:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            sys.exit(
                "torch-pruning is not installed: pip install 'fxconet[bench]' "
                "or pass --skip-torch-pruning"
            )
    start = time.perf_counter()
    load_start = _load()
    worker = _Worker(config)
    rows = []
    try:
        for i, name in enumerate(config.models, 1):
            t0 = time.perf_counter()
            row = worker.run(name)
            row["wall_s"] = time.perf_counter() - t0
            row["load_avg"] = _load()
            if row.get("stage") == "done":
                del row["stage"]
            rows.append(row)
            fx, tp = row.get("fx", {}), row.get("tp", {})
            print(
                f"[{i}/{len(config.models)}] {name}: fx {_fmt(fx.get('analyze_ms'), 1)} ms "
                f"({_STATUS[fx_status(row)]}), tp {_fmt(tp.get('build_ms'), 1)} ms "
                f"({_STATUS[tp_status(row)]}), {row['wall_s']:.0f} s",
                flush=True,
            )
    finally:
        worker.stop()
    result = {
        "config": asdict(config),
        "env": {**_env(), "load_avg_start": load_start, "load_avg_end": _load()},
        "summary": summarize(rows, config, time.perf_counter() - start),
        "rows": rows,
    }
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).write_text(json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    Path(config.markdown).write_text(markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
