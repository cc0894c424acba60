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


def _group_label(report: Mapping[str, Any], gid: int) -> str:
    """``g3 layer1.0.conv1``: a group named by its first producer."""
    for g in report.get("groups") or []:
        if g["id"] == gid and g.get("producers"):
            return f"g{gid} {g['producers'][0]}"
    return f"g{gid}"


def _colors(ax: Any, n: int) -> None:
    """A colour per line: tab20 beyond the default cycle's 10."""
    if n > 10:
        import matplotlib.pyplot as plt

        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(k % 20) for k in range(n)])


def _legend_outside(ax: Any, n: int) -> None:
    ax.legend(fontsize=7 if n > 8 else 8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, ncol=1 if n <= 16 else 2)  # fmt: skip


def plot_history(report: Mapping[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Draw the plots that the report's history supports; returns the files written.

    * ``widths.png``: each channel group's width after every trial (CONet) or epoch (APS),
      ending with the final widths (after the budget's projection);
    * ``ranks.png``: each group's rank across the epochs of every trial (CONet);
    * ``greedy_path.png``: the held-out loss against the MACs after every greedy step;
    * ``accuracy_params.png``: the validation accuracy of every trial against its parameters,
      and the test accuracy of the model as given and of the final model.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter

    out = Path(out)
    history: Sequence[Mapping[str, Any]] = report.get("history") or []
    written: list[Path] = []
    aps = bool(history) and "phase" in history[0]
    step = "epoch" if aps else "trial"
    final_widths = {int(k): v for k, v in (report.get("widths") or {}).items()}
    if history and "widths" in history[0]:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        gids = sorted({int(k) for r in history for k in r["widths"]})
        _colors(ax, len(gids))
        xs = [r["trial"] for r in history]
        for gid in gids:
            ys = [r["widths"].get(str(gid)) for r in history]
            line = ax.plot(xs, ys, marker=".", linewidth=1, label=_group_label(report, gid))
            if gid in final_widths:  # the final model's width (after a budget's projection)
                ax.plot([xs[-1], xs[-1] + 1], [ys[-1], final_widths[gid]], linestyle=":",
                        color=line[0].get_color(), marker="s", markevery=[1])  # fmt: skip
        what = "the likely architecture after each epoch" if aps else "each trial's widths"
        ax.set(xlabel=f"{step} (last point, square: the final model)", ylabel="channels",
               title=f"Width of each channel group: {what}")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend_outside(ax, len(gids))
        written.append(_save(fig, out / "widths.png"))
    if history and history[0].get("group_ranks"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        gids = sorted({int(k) for r in history for k in r["group_ranks"]})
        _colors(ax, len(gids))
        lengths = [len(next(iter(r["group_ranks"].values()), [])) for r in history]
        for gid in gids:
            ranks: list[float | None] = []
            for r in history:
                ranks.extend(r["group_ranks"].get(str(gid), []))
            ax.plot(range(1, len(ranks) + 1), [float("nan") if y is None else y for y in ranks],
                    linewidth=1, label=_group_label(report, gid))  # fmt: skip
        edge = 0
        for e in lengths[:-1]:
            edge += e
            ax.axvline(edge + 0.5, color="grey", linewidth=0.5, linestyle=":")
        ax.set(xlabel="epoch of the search (dotted: a new trial)",
               ylabel="group rank (mean of its terms)",
               title="Is each group's rank still rising? (a rising group expands)")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend_outside(ax, len(gids))
        written.append(_save(fig, out / "ranks.png"))
    if history and "loss_before" in history[0] and report.get("macs_before"):
        written.append(_greedy_path(report, history, out))
    trials = [
        (r["params"], r["val_accuracy"], r["trial"])
        for r in history
        if r.get("val_accuracy") is not None and r.get("params") is not None
    ]
    final, start = report.get("accuracy"), report.get("baseline_accuracy")
    if trials or final is not None:
        if trials:
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
            panels: tuple[Any, ...] = (left, right)
        else:  # a one-shot method: nothing was measured during the search
            fig, right = plt.subplots(figsize=(5.5, 4))
            left, panels = None, (right,)
        if left is not None:
            left.scatter([t[0] for t in trials], [t[1] for t in trials], color="C0", zorder=3)
            for p, a, t in trials:
                left.annotate(str(t), (p, a), textcoords="offset points", xytext=(4, 4),
                              fontsize=7)  # fmt: skip
            left.set(xlabel="parameters", ylabel="validation accuracy",
                     title=f"During the search (numbers: the {step})")  # fmt: skip
        for ax_, (params, acc, name, color, marker) in (
            (right, (report.get("params_before"), start, "model as given", "C2", "D")),
            (right, (report.get("params_after"), final, "final model", "C3", "o")),
        ):
            if acc is not None and params is not None:
                ax_.scatter([params], [acc], color=color, marker=marker, zorder=3, s=50,
                            label=f"{name}: {acc:.4f}")  # fmt: skip
        right.set(xlabel="parameters", ylabel="test accuracy", title="Before and after")
        if final is not None or start is not None:
            right.legend(fontsize=8)
        for ax_ in panels:
            ax_.set_xscale("log")
            ax_.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax_.xaxis.set_major_formatter(EngFormatter())
            ax_.xaxis.set_minor_formatter(NullFormatter())
            ax_.grid(alpha=0.3)
        written.append(_save(fig, out / "accuracy_params.png"))
    return written


def _greedy_path(
    report: Mapping[str, Any], history: Sequence[Mapping[str, Any]], out: Path
) -> Path:
    """``greedy_path.png``: the held-out loss against the MACs along the greedy slimming, with
    the budget, so a user sees what the last steps cost."""
    import matplotlib.pyplot as plt

    before = report["macs_before"]
    xs = [100.0] + [100.0 * r["macs"] / before for r in history]
    ys = [history[0]["loss_before"]] + [r["loss"] for r in history]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(xs, ys, marker=".", linewidth=1, color="C0", label="after each step")
    target = (report.get("budget") or {}).get("targets", {}).get("macs")
    if target:
        ax.axvline(100.0 * target / before, color="C3", linestyle="--", linewidth=1,
                   label=f"budget: {100.0 * target / before:.0f}% of the MACs")  # fmt: skip
    ax.invert_xaxis()
    ax.set(xlabel="MACs (% of the model as given)",
           ylabel="held-out loss (BatchNorm recalibrated)",
           title="Greedy slimming: one group narrower per step")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "greedy_path.png")


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
