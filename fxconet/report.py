"""The search report: ``report.json`` and PNG plots.

* ``widths.png``: the width of every channel group across trials (CONet paper, Fig. 6);
* ``ranks.png``: the mean rank of every layer across the epochs of all trials (Fig. 3);
* ``accuracy_params.png``: validation accuracy of each trial against its parameters, with the
  final model's test accuracy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["before_after_table", "plot_history", "write_report"]


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def write_report(report: Mapping[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write ``report.json`` and the plots into ``out``; returns the JSON path.

    ``report`` must hold ``widths``, ``params_before``, ``params_after``, ``macs_before``,
    ``macs_after`` and ``history`` (a list of per-trial dicts, possibly empty).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    write_json(path, _json_ready(dict(report)))
    plot_history(report, out)
    return path


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically: a killed process never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def plot_history(report: Mapping[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Draw the plots that the report's history supports; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    history: Sequence[Mapping[str, Any]] = report.get("history") or []
    written: list[Path] = []
    if history and "widths" in history[0]:
        fig, ax = plt.subplots(figsize=(7, 4))
        gids = sorted({int(k) for r in history for k in r["widths"]})
        trials = [r["trial"] for r in history] + [history[-1]["trial"] + 1]
        for gid in gids:
            widths = [r["widths"].get(str(gid)) for r in history]
            widths.append((history[-1].get("next_widths") or history[-1]["widths"]).get(str(gid)))
            ax.plot(trials, widths, marker=".", linewidth=1)
        ax.set(xlabel="trial", ylabel="channels", title="Width of each channel group")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "widths.png"))
    if history and history[0].get("layer_ranks"):
        fig, ax = plt.subplots(figsize=(7, 4))
        paths = list(history[0]["layer_ranks"])
        for p in paths:
            ys: list[float] = []
            for r in history:
                ys.extend(r["layer_ranks"].get(p, []))
            ax.plot(range(1, len(ys) + 1), ys, linewidth=0.8)
        epochs = [len(next(iter(r["layer_ranks"].values()), [])) for r in history]
        edge = 0
        for e in epochs[:-1]:
            edge += e
            ax.axvline(edge + 0.5, color="grey", linewidth=0.5, linestyle=":")
        ax.set(xlabel="epoch (dotted: new trial)", ylabel="mean rank (R3 + R4) / 2",
               title="Rank of each layer across epochs")  # fmt: skip
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "ranks.png"))
    points = [
        (r["params"], r["val_accuracy"]) for r in history if r.get("val_accuracy") is not None
    ]
    final = report.get("accuracy")
    if points or final is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", linestyle="-", linewidth=0.8,
                    label="trials (validation)")  # fmt: skip
        if final is not None:
            ax.scatter([report["params_after"]], [final], color="C3", zorder=3,
                       label="final model (test)")  # fmt: skip
        if report.get("baseline_accuracy") is not None:
            ax.scatter([report["params_before"]], [report["baseline_accuracy"]], color="C2",
                       marker="D", zorder=3, label="baseline (test)")  # fmt: skip
        ax.set(xlabel="parameters", ylabel="accuracy", title="Accuracy against parameters")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / "accuracy_params.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def before_after_table(
    report: Mapping[str, Any], group_sizes: Mapping[int, int], *, max_rows: int = 20
) -> str:
    """A plain-text before/after summary: totals, the budget, then a row per changed group
    (named by its first producers; at most ``max_rows``, the rest counted)."""
    rows = [("", "before", "after")]

    def fmt(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.4f}"
        return f"{x:,}"

    rows.append(("parameters", fmt(report["params_before"]), fmt(report["params_after"])))
    rows.append(("MACs", fmt(report["macs_before"]), fmt(report["macs_after"])))
    if report.get("accuracy") is not None or report.get("baseline_accuracy") is not None:
        rows.append(
            ("test accuracy", fmt(report.get("baseline_accuracy")), fmt(report.get("accuracy")))
        )
    budget = report.get("budget")
    if budget:
        binding = budget["binding"]
        target = budget["targets"][binding]
        state = "within" if budget["within_tolerance"] else "OUTSIDE"
        rows.append(
            (
                f"budget ({binding})",
                fmt(target),
                f"{fmt(budget[binding])} ({budget['error']:+.1%}, {state} "
                f"{budget['tolerance']:.0%})",
            )
        )
    widths = {int(k): v for k, v in report["widths"].items()}
    changed = [(g, group_sizes[g], w) for g, w in sorted(widths.items()) if group_sizes.get(g) != w]
    names = {g["id"]: g.get("producers") or [] for g in report.get("groups", [])}
    shown = changed if len(changed) <= max_rows else changed[:max_rows]
    for gid, before, after in shown:
        producers = names.get(gid, [])
        label = f"group {gid}" + (f" ({_abbrev(producers)})" if producers else "")
        rows.append((label, str(before), str(after)))
    if len(shown) < len(changed):
        rows.append((f"{len(changed) - len(shown)} more groups", "changed", "(report.json)"))
    unchanged = len(widths) - len(changed)
    if unchanged:
        rows.append((f"{unchanged} groups", "unchanged", ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    size = report.get("size")
    if size and not budget:
        lines.append(
            f"no budget: the method changed the parameters x{size['params_ratio']:.2f} and the "
            f"MACs x{size['macs_ratio']:.2f} (target_macs= / --target-macs fixes a size)"
        )
    return "\n".join(lines)


def _abbrev(items: Sequence[str], n: int = 2) -> str:
    return ", ".join(items[:n]) + (f", +{len(items) - n}" if len(items) > n else "")
