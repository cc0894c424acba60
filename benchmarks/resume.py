"""Kill a CONet and an APS search at random points, resume them, and check that the result is
the uninterrupted run's; then resume with a changed setting or other data, which must refuse.

Each search runs in a child process (``python benchmarks/resume.py --child ...``). A kill is
either a SIGKILL from the parent after a random delay, or a kill *mid-write*: the child cuts
the k-th checkpoint file it writes to half its bytes and SIGKILLs itself before the file is
moved into place (what a power cut leaves). Every attempt after a kill resumes the same folder;
when one finishes, its widths, history and accuracy are compared with the uninterrupted run's
(exact, floats to 1e-6).

    python benchmarks/resume.py --kills 10 --out benchmarks/results/resume.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

SETTINGS: dict[str, dict[str, Any]] = {
    "conet": {"method": "conet", "trials": 3, "epochs_per_trial": 2},
    "aps": {"method": "aps", "target_macs": 0.5, "warmup_epochs": 1, "search_epochs": 2},
}
COMMON = {"epochs": 1, "max_batches_per_epoch": 4, "batch_size": 32, "seed": 0}
#: resumes that must refuse: (what changed, the child's extra arguments)
CHANGES = [
    ("lr", ["--lr", "0.2"]),
    ("batch size", ["--batch-size", "16"]),
    ("data", ["--data-subset", "600"]),
]


# ---------------------------------------------------------------------------------------------
# the child: one search


def _kill_on_write(k: int) -> None:
    """SIGKILL this process at its ``k``-th ``os.replace``, the file half written."""
    real, calls = os.replace, [0]

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == k:
            data = Path(src).read_bytes()
            Path(src).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)

    os.replace = replace  # type: ignore[assignment]


def child(args: argparse.Namespace) -> int:
    import torch

    import fxconet
    from fxconet.data import load_dataset
    from fxconet.errors import SearchError
    from fxconet.models import cifar_resnet20

    if args.kill_at_write:
        _kill_on_write(args.kill_at_write)
    torch.set_num_threads(1)
    data: Any = "digits"
    if args.data_subset:
        data = torch.utils.data.Subset(load_dataset("digits"), range(args.data_subset))
    options = {**SETTINGS[args.child], **COMMON}
    if args.lr is not None:
        options["lr"] = args.lr
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    try:
        result = fxconet.optimize_channels(
            cifar_resnet20(in_channels=1),
            data=data,
            out=args.folder,
            resume=args.resume,
            progress=False,
            **options,
        )
    except SearchError as e:
        Path(args.result).write_text(json.dumps({"refused": str(e)}))
        return 3
    history = [
        {k: v for k, v in h.items() if isinstance(v, int | float) and k != "seconds"}
        for h in result.history
    ]
    Path(args.result).write_text(
        json.dumps({
            "widths": {str(g): w for g, w in result.widths.items()},
            "history": history,
            "accuracy": result.accuracy,
        })
    )  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------
# the parent


def _run(method: str, folder: Path, result: Path, extra: list[str], kill_after: float | None,
         resume: bool) -> tuple[int, float]:  # fmt: skip
    cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder),
           "--result", str(result), *extra, *(["--resume"] if resume else [])]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, 3, -signal.SIGKILL):
        raise RuntimeError(f"{method} child failed ({proc.returncode}): {err[-2000:]}")
    return proc.returncode, time.perf_counter() - started


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["widths"] != b["widths"] or len(a["history"]) != len(b["history"]):
        return False
    for x, y in zip(a["history"], b["history"], strict=True):
        if x.keys() != y.keys():
            return False
        for k in x:
            if not math.isclose(x[k], y[k], rel_tol=1e-6, abs_tol=1e-9):
                return False
    return math.isclose(a["accuracy"], b["accuracy"], rel_tol=1e-6)


def method_run(method: str, kills: int, work: Path, rng: random.Random) -> dict[str, Any]:
    ref_dir = work / f"{method}-reference"
    rc, seconds = _run(method, ref_dir, work / f"{method}-reference.json", [], None, False)
    reference = json.loads((work / f"{method}-reference.json").read_text())
    print(f"{method}: uninterrupted run {seconds:.1f} s, widths {reference['widths']}", flush=True)
    events: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    done = 0
    while done < kills:
        folder = work / f"{method}-run{len(runs)}"
        attempts = 0
        while True:
            resume = attempts > 0  # as a user would after a kill: --resume
            if done < kills and attempts < 4:
                if rng.random() < 0.4:
                    k = rng.randint(1, 8)
                    extra, delay, how = ["--kill-at-write", str(k)], None, f"mid-write #{k}"
                else:
                    delay = rng.uniform(0.3, 1.0) * seconds
                    extra, how = [], f"SIGKILL at {delay:.1f} s"
            else:
                extra, delay, how = [], None, "to the end"
            out = work / f"{method}-run{len(runs)}.json"
            rc, _ = _run(method, folder, out, extra, delay, resume)
            attempts += 1
            if rc == 3:
                raise RuntimeError(
                    f"{method}: resuming {folder} after {events[-1]['kill']} was refused: "
                    f"{json.loads(out.read_text())['refused']}"
                )
            if rc == 0:
                if how != "to the end":
                    events.append({"run": len(runs), "kill": how, "killed": False})
                break
            done += 1
            events.append({"run": len(runs), "kill": how, "killed": True})
        got = json.loads(out.read_text())
        same = _same(got, reference)
        runs.append({"run": len(runs), "attempts": attempts, "identical": same})
        print(f"{method}: run {len(runs) - 1}: {attempts} attempts, identical: {same}", flush=True)
    refusals = []
    for what, extra in CHANGES:
        out = work / f"{method}-changed.json"
        rc, _ = _run(method, ref_dir, out, extra, None, True)
        answer = json.loads(out.read_text())
        refused = rc == 3 and "refused" in answer
        refusals.append({"changed": what, "refused": refused, "message": answer.get("refused")})
        print(f"{method}: resume with another {what}: refused {refused}", flush=True)
    return {
        "reference_seconds": seconds,
        "kills": done,
        "mid_write_kills": sum(e["killed"] and e["kill"].startswith("mid") for e in events),
        "runs": runs,
        "events": events,
        "refusals": refusals,
        "all_identical": all(r["identical"] for r in runs),
        "all_refused": all(r["refused"] for r in refusals),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kill-at-write", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-subset", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=sorted(SETTINGS), choices=sorted(SETTINGS))
    parser.add_argument("--kills", type=int, default=10, help="kills per method (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points (0)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-resume"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/resume.json"))
    args = parser.parse_args()
    if args.child:
        return child(args)
    rng = random.Random(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0]
    results = {m: method_run(m, args.kills, args.work / time.strftime("%H%M%S"), rng)
               for m in args.methods}  # fmt: skip
    lines = [
        "# Kill and resume",
        "",
        f"{started}; fxconet {_common.package_version('fxconet')}; load {load:.2f} at the start. "
        "Each search is killed at random points (a SIGKILL after a random delay, or mid-write: "
        "the k-th checkpoint file cut to half and the process killed before the file is moved "
        "into place) and resumed until it finishes; its widths, history and accuracy are "
        "compared with an uninterrupted run's. Then a finished folder is resumed with a "
        "changed setting or other data, which must be refused.",
        "",
        "| method | kills | mid-write | runs | identical | changed settings refused |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        refused = ", ".join(f"{x['changed']}: {'yes' if x['refused'] else 'NO'}"
                            for x in r["refusals"])  # fmt: skip
        lines.append(
            f"| {m} | {r['kills']} | {r['mid_write_kills']} | {len(r['runs'])} | "
            f"{sum(x['identical'] for x in r['runs'])}/{len(r['runs'])} | {refused} |"
        )
    _common.write_results(args.out, results, "\n".join(lines) + "\n")
    ok = all(r["all_identical"] and r["all_refused"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
