"""Type-check fxconet as it is installed: ``fxconet/`` with ``passes/`` as ``fxconet.passes``.

The repository keeps the passes in a top-level ``passes/`` folder that setuptools installs as
``fxconet.passes`` (``package-dir`` in ``pyproject.toml``). mypy cannot follow that mapping from
the source tree, so this script assembles the installed layout in a temporary folder (symbolic
links to the sources), runs mypy there with the project's configuration, and prints mypy's
messages with the repository's paths. It also checks that the passes are seen with their real
types (``reveal_type`` of a pass function is not ``Any``).

Usage: ``python scripts/typecheck.py [extra mypy arguments]``; exits with mypy's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """\
from fxconet.passes.trace import trace_model
from fxconet.passes.solve_channels import solve_channels
reveal_type(trace_model)
reveal_type(solve_channels)
"""


def _assemble(tmp: Path) -> Path:
    """``tmp/fxconet`` mirrors the installed package: every source file linked, ``passes``
    linked in as ``fxconet/passes``."""
    pkg = tmp / "fxconet"
    for src in (ROOT / "fxconet").rglob("*"):
        if "__pycache__" in src.parts or src.is_dir():
            continue
        dst = pkg / src.relative_to(ROOT / "fxconet")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
    os.symlink(ROOT / "passes", pkg / "passes")
    return pkg


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="fxconet-mypy-") as name:
        tmp = Path(name)
        _assemble(tmp)
        (tmp / "probe_types.py").write_text(PROBE)
        cmd = [
            sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
            "--no-incremental", "fxconet", "probe_types.py", *argv,
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        out = proc.stdout.replace("fxconet/passes/", "passes/")
        notes = [ln for ln in out.splitlines() if ln.startswith("probe_types.py")]
        errors = [ln for ln in out.splitlines() if not ln.startswith("probe_types.py")]
        print("\n".join(errors).replace("Found", "mypy found").strip())
        if proc.stderr.strip():
            print(proc.stderr.strip(), file=sys.stderr)
        revealed = [ln for ln in notes if "Revealed type" in ln]
        if len(revealed) != 2 or any('"Any"' in ln for ln in revealed):
            print("the passes are not type-checked: " + "; ".join(notes), file=sys.stderr)
            return 1
        status = proc.returncode
        # the probe's reveal_type notes make mypy exit 1 even without errors
        real = [ln for ln in errors if ": error:" in ln]
        return 1 if real else (0 if status in (0, 1) else status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
