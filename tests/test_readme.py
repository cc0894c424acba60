"""Every Python example of the README runs as written (in order, in one namespace, in a scratch
folder), so the first thing a new user copies works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.slow
def test_the_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for k, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {k}", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"README python block {k} fails: {type(e).__name__}: {e}") from e
    out = capsys.readouterr().out
    assert "32" in out and "budget (macs)" in out
