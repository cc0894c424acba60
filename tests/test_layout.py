"""The package's structure: imports run one way, and every method option is reachable.

* Module-level imports follow the layers errors -> ir -> ops -> passes -> api ->
  cost/metrics/train/... -> strategies -> optimize -> cli, with no cycle.
* Every field of every method's config dataclass is accepted by ``optimize_channels`` and is a
  flag of the ``fxconet optimize`` command that reaches the method with the field's type.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import networkx as nx
import pytest

import fxconet
from fxconet import cli, optimize
from fxconet.strategies import METHODS

ROOT = Path(__file__).resolve().parent.parent

#: the layer of every module (lower layers never import higher ones)
LAYERS = {
    "fxconet.errors": 0,
    "fxconet.distributed": 0,
    "fxconet.ir": 1,
    "fxconet.ops": 2,
    "fxconet.passes": 3,
    "fxconet.api": 4,
    "fxconet.cost": 5,
    "fxconet.metrics": 5,
    "fxconet.train": 5,
    "fxconet.data": 5,
    "fxconet.report": 5,
    "fxconet.models": 5,
    "fxconet.export": 5,
    "fxconet.testing": 5,
    "fxconet.strategies": 6,
    "fxconet.optimize": 7,
    "fxconet.cli": 8,
    "fxconet.__main__": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "fxconet").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    for path in sorted((ROOT / "passes").glob("*.py")):
        name = "fxconet.passes" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def _module_level_imports(path: Path, name: str) -> set[str]:
    """fxconet modules imported at module level (not under TYPE_CHECKING, not in functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nodes = [node] + (list(ast.walk(node)) if isinstance(node, ast.If | ast.Try) else [])
        for n in nodes:
            if isinstance(n, ast.Import):
                found.update(a.name for a in n.names if a.name.startswith("fxconet"))
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - n.level + 1])
                    base = f"{base}.{n.module}" if n.module else base
                if base.startswith("fxconet"):
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in n.names)
    return found


def test_imports_run_one_way_without_cycles():
    modules = _modules()
    assert set(LAYERS) <= {m for m in modules} | {"fxconet.ops", "fxconet.strategies"}
    graph = nx.DiGraph()
    bad = []
    for name, path in modules.items():
        if name in ("fxconet", "fxconet.passes"):
            continue  # the package faces re-export the API
        for target in _module_level_imports(path, name):
            if target not in modules or target in ("fxconet", name):
                continue
            if target.startswith(name + "."):
                continue  # a package importing its own submodules
            graph.add_edge(name, target)
            if _layer(target) > _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {target} ({_layer(target)})")
    assert not bad, bad
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_config_field_is_an_option_and_a_flag(method):
    spec = METHODS[method]
    cls = spec.config_type
    fields = [f for f in dataclasses.fields(cls) if f.name != "seed"]
    assert fields and {f.name for f in fields} == spec.options
    assert spec.options <= optimize.accepted_options(method)
    hints = typing.get_type_hints(cls)
    flags = cli._method_flags()
    _, parser = cli._build_parser(flags)
    for f in fields:
        # the flag reaches the method as the field's value (its default, written as text)
        text = _as_text(f.default)
        argv = ["cifar_resnet20", "--data", "digits", "--method", method]
        args = parser.parse_args([*argv, "--" + f.name.replace("_", "-"), text])
        options = cli._method_options(args, flags, parser)
        value = options[f.name]
        assert value == f.default or (value is None and f.default is None), (f.name, value)
        config = spec.make_config(options)  # the config accepts what the flag gives
        assert getattr(config, f.name) == getattr(cls(), f.name), (f.name, hints[f.name])
    # an option of another method is refused by optimize_channels (before any work)
    other = next(m for m in METHODS if m != method and METHODS[m].options - spec.options)
    stray = sorted(METHODS[other].options - spec.options)[0]
    with pytest.raises(TypeError, match="unknown options"):
        fxconet.optimize_channels(nn_tiny(), torch_zeros(), method=method, **{stray: None})


def _as_text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def nn_tiny():
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


def torch_zeros():
    import torch

    return torch.zeros(1, 1, 8, 8)


def test_a_flag_of_another_method_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["optimize", "cifar_resnet20", "--data", "digits", "--flops-target", "0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--flops-target is an option of --method aps" in err


def test_a_bad_value_names_its_flag_before_any_work(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["optimize", "cifar_resnet20", "--data", "digits", "--epochs-per-trial", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("fxconet: error: --epochs-per-trial:")
    assert len(err.splitlines()) == 1


def test_the_install_lists_every_package():
    """A non-editable install ships exactly the packages pyproject.toml lists: every folder
    with an __init__.py must be among them (fxconet.ops was missing once)."""
    import re

    text = (ROOT / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*)\]$", text, re.M)[1]))
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    mapped = {v: k for k, v in re.findall(r'"([\w.]+)" = "([\w/]+)"', section)}
    found = set()
    for init in (ROOT / "fxconet").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in (ROOT / "passes").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT).as_posix()
        found.add(mapped.get(rel, rel.replace("/", ".")))
    assert found == listed, (found - listed, listed - found)
