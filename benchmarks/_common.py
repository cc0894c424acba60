"""What the benchmark scripts share: stage time limits, one-line errors and writing results.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and they
import it as ``_common``.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


class StageTimeout(TimeoutError):
    """A stage ran past its time limit."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`StageTimeout` in the main thread after ``seconds`` (SIGALRM)."""

    def _raise(signum: int, frame: Any) -> None:
        raise StageTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_text(exc: BaseException) -> str:
    """``Type: message`` on one line, cut to a readable length."""
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def package_version(name: str, missing: str = "missing") -> str:
    """The installed version of distribution ``name``, or ``missing``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return missing


def tp_ignored_layers(model: Any) -> list[Any]:
    """The layers Torch-Pruning's torchvision recipe leaves unpruned: the 1000-class head."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]


def write_results(out: Path, result: dict[str, Any], markdown: str) -> None:
    """``result`` as JSON at ``out``, ``markdown`` beside it (``.md``), and the table printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
