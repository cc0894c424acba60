"""Saving and exporting resized models.

Four ways out of fxconet, from the most to the least Python-bound:

* :func:`save` / :func:`load`: ``torch.save`` of the GraphModule. A GraphModule is pickled as its
  generated code plus modules, so loading needs ``torch.load(path, weights_only=False)``, which
  runs code from the file: only load files you trust. (``weights_only=True``, the default since
  PyTorch 2.6, refuses GraphModules.)
* :func:`to_code` / :func:`save_code` / :func:`load_code`: plain Python source of an
  ``nn.Module`` (constructor calls of ``torch.nn`` layers plus the ``forward`` that fx generated)
  and a state dict that loads with ``weights_only=True``. Rebuilding needs neither fxconet nor the
  original model class.
* :func:`export_program`: ``torch.export.export`` of the resized model.
* :func:`export_onnx`: ONNX through ``torch.onnx.export`` (needs the ``[export]`` extra:
  ``onnx``, ``onnxscript``; ``onnxruntime`` to run it).
"""

from __future__ import annotations

import builtins
import importlib.util
import inspect
import itertools
import math
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from fxconet.errors import ExportError, first_line
from fxconet.passes import fx_compat
from fxconet.passes.module_copy import evaluating, map_tensors
from fxconet.passes.nodes import normalize_inputs

__all__ = [
    "ExportError",
    "export_onnx",
    "export_program",
    "load",
    "load_code",
    "save",
    "save_code",
    "save_program",
    "to_code",
]


def save(gm: nn.Module, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` the whole module; load it with :func:`load` (trusted files only), which
    also restores :func:`fxconet.kept_channels`.

    Example:
        >>> fxconet.export.save(gm, "resized.pt")
        >>> gm2 = fxconet.export.load("resized.pt")
    """
    path = Path(path)
    plan = gm.meta.get("fxconet") if isinstance(gm, torch.fx.GraphModule) else None
    # torch rebuilds a GraphModule with an empty ``meta``; an attribute survives, so the kept
    # channels (the plan pickles as its widths and indices only) ride along and load() puts
    # them back
    if plan is not None:
        setattr(gm, _PLAN_ATTR, plan)
    try:
        torch.save(gm, path)
    finally:
        if plan is not None:
            delattr(gm, _PLAN_ATTR)
    return path


_PLAN_ATTR = "_fxconet_resize_plan"


def load(path: str | os.PathLike[str], *, map_location: Any = None) -> nn.Module:
    """Load a module written by :func:`save`.

    This calls ``torch.load(path, weights_only=False)``: unpickling runs code, so only load files
    you trust. For files from others, the weights-only part of :func:`save_code` (``weights.pt``,
    ``torch.load(weights_only=True)``) is safe, but ``model.py`` is Python that
    :func:`load_code` executes: read it first. ONNX files (:func:`export_onnx`) hold no code.
    """
    model = torch.load(Path(path), map_location=map_location, weights_only=False)
    plan = model.__dict__.pop(_PLAN_ATTR, None) if isinstance(model, nn.Module) else None
    if plan is not None and isinstance(model, torch.fx.GraphModule):
        model.meta["fxconet"] = plan
    return model


# ---------------------------------------------------------------------------------------------
# Python source


def _literal(value: Any, where: str) -> str:
    if value is None or isinstance(value, bool | int | str):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f"float({str(value)!r})"
        return repr(value)
    if isinstance(value, tuple | list):
        inner = ", ".join(_literal(v, where) for v in value)
        if isinstance(value, tuple):
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return f"[{inner}]"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Size):
        return _literal(tuple(value), where)
    raise ExportError(f"{where}: cannot write {type(value).__name__} {value!r} as Python code")


def _qualified(obj: Any) -> tuple[str, str]:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ExportError(f"{obj!r} has no importable name")
    return module, qualname


def _constructor(path: str, m: nn.Module, imports: dict[str, str]) -> str:
    """A constructor call rebuilding leaf module ``m`` from its attributes."""
    cls = type(m)
    module, qualname = _qualified(cls)
    alias = "_" + qualname.replace(".", "_")
    imports[alias] = f"from {module} import {qualname.split('.')[0]} as {alias}"
    if "." in qualname:
        raise ExportError(f"module `{path}`: nested class {qualname} cannot be imported")
    sig = inspect.signature(cls.__init__)
    parts = []
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in ("device", "dtype"):
            continue
        if name in m._parameters or name in m._buffers:
            value: Any = (
                m._parameters.get(name) if name in m._parameters else m._buffers[name]
            ) is not None
        elif name in m.__dict__ or hasattr(type(m), name) and not callable(getattr(type(m), name)):
            value = getattr(m, name)
        elif p.default is not p.empty:
            continue
        else:
            raise ExportError(
                f"module `{path}` ({cls.__name__}): constructor argument {name!r} is not an "
                "attribute of the module, so it cannot be rebuilt from code"
            )
        if isinstance(value, nn.Module | torch.Tensor):
            raise ExportError(
                f"module `{path}` ({cls.__name__}): argument {name!r} is a {type(value).__name__}"
            )
        parts.append(f"{name}={_literal(value, f'module `{path}` argument {name!r}')}")
    return f"{alias}({', '.join(parts)})"


def _import_lines(globals_: dict[str, Any]) -> list[str]:
    lines = []
    for name, obj in sorted(globals_.items()):
        if name in ("inf", "nan"):
            lines.append(f"from math import {name}")
        elif name == "NoneType":
            lines.append("NoneType = type(None)")
        elif isinstance(obj, types.ModuleType):
            lines.append(
                f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}"
            )
        elif getattr(builtins, name, None) is obj:
            continue
        else:
            module, qualname = _qualified(obj)
            if "." in qualname:
                raise ExportError(f"the graph calls {module}.{qualname}, which cannot be imported")
            lines.append(
                f"from {module} import {qualname} as {name}"
                if qualname != name
                else f"from {module} import {name}"
            )
    return lines


def _owned_tensors(gm: nn.Module, leaves: set[str]) -> list[tuple[str, str, torch.Tensor]]:
    """Tensors that no leaf module owns: (owner path, attribute, tensor), incl. fx constants."""
    out = []
    for path, mod in gm.named_modules():
        if path in leaves or any(path.startswith(p + ".") for p in leaves if p):
            continue
        for name, t in mod._parameters.items():
            if t is not None:
                out.append((path, name, t))
        for name, t in mod._buffers.items():
            if t is not None:
                out.append((path, name, t))
        for name, v in mod.__dict__.items():
            if (
                isinstance(v, torch.Tensor)
                and name not in mod._parameters
                and name not in mod._buffers
            ):
                out.append((path, name, v))
    return out


def _leaf_paths(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}


_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def to_code(gm: torch.fx.GraphModule, class_name: str = "FxconetModel") -> str:
    """Python source of an ``nn.Module`` equivalent to ``gm`` (load weights separately).

    The class builds every layer with its constructor (``Conv2d(32, 64, kernel_size=(3, 3),
    ...)``) at the same module paths as ``gm``, so ``gm.state_dict()`` loads into it, and in
    the training mode of each of ``gm``'s modules.

    Raises:
        ExportError: a layer or function cannot be written as importable code, or a module
            has hooks (code cannot hold them; nothing is dropped silently).

    Example:
        >>> print(fxconet.export.to_code(gm))
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise ExportError(f"to_code needs a torch.fx.GraphModule, got {type(gm).__name__}")
    hooked = [
        (path or type(gm).__name__, kind)
        for path, mod in gm.named_modules()
        for kind in _HOOKS
        if getattr(mod, kind, None)
    ]
    if hooked:
        where = ", ".join(f"`{p}` ({k.strip('_')})" for p, k in hooked[:4])
        raise ExportError(
            f"to_code cannot write hooks as code: {where}{' ...' if len(hooked) > 4 else ''}. "
            "Remove them before saving (and register them again after load_code), or save "
            "with save() or save_program()"
        )
    if not class_name.isidentifier():
        raise ExportError(f"class_name {class_name!r} is not a Python identifier")
    python_code = gm.graph.python_code(root_module="self")
    imports: dict[str, str] = {}
    leaves = _leaf_paths(gm)
    body = ["        super().__init__()"]
    made: set[str] = {""}

    def ensure(path: str) -> None:
        if path in made:
            return
        parent, _, name = path.rpartition(".")
        ensure(parent)
        body.append(f"        _at(self, {parent!r}).add_module({name!r}, _nn.Module())")
        made.add(path)

    for path in sorted(leaves, key=lambda p: (p.count("."), p)):
        mod = gm.get_submodule(path)
        parent, _, name = path.rpartition(".")
        ensure(parent)
        if mod is not None and type(mod) is not nn.Module:
            ctor = _constructor(path, mod, imports)
            body.append(f"        _at(self, {parent!r}).add_module({name!r}, {ctor})")
        else:
            ensure(path)
        made.add(path)
    for path, name, t in _owned_tensors(gm, leaves):
        ensure(path)
        shape = _literal(tuple(t.shape), f"tensor `{path}.{name}`")
        empty = f"_torch.empty({shape}, dtype={t.dtype})"
        if isinstance(t, nn.Parameter):
            body.append(
                f"        _at(self, {path!r}).register_parameter({name!r}, "
                f"_nn.Parameter({empty}, requires_grad={t.requires_grad}))"
            )
        else:
            body.append(f"        _at(self, {path!r}).register_buffer({name!r}, {empty})")
    # training flags as given (a frozen ``bn.eval()`` inside a training model included)
    if not gm.training:
        body.append("        self.train(False)")
    for path, mod in gm.named_modules():
        if path and mod.training != gm.training and path in made:
            body.append(f"        _at(self, {path!r}).train({mod.training})")
    header = [
        '"""Generated by fxconet.export.to_code: a resized model as plain PyTorch."""',
        "import torch as _torch",
        "from torch import nn as _nn",
        *_import_lines(python_code.globals),
        *sorted(imports.values()),
        "",
        "",
        "def _at(module, path):",
        "    for name in filter(None, path.split('.')):",
        "        module = getattr(module, name)",
        "    return module",
        "",
        "",
        f"class {class_name}(_nn.Module):",
        "    def __init__(self):",
    ]
    # fx puts `wrap(...)` registrations of wrapped functions before `def forward`; they must
    # run at module level
    src_lines = python_code.src.strip("\n").splitlines()
    wraps, rest = fx_compat.split_wrap_registrations(src_lines)
    forward = "\n".join("    " + ln if ln else ln for ln in rest)
    if wraps:
        at = header.index("def _at(module, path):")
        header[at:at] = ["import torch", *wraps, "", ""]
    return "\n".join([*header, *body, "", forward, ""])


def _state(gm: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(gm.state_dict())
    leaves = _leaf_paths(gm) if isinstance(gm, torch.fx.GraphModule) else set()
    for path, name, t in _owned_tensors(gm, leaves):
        key = f"{path}.{name}" if path else name
        state.setdefault(key, t.detach())
    return state


def save_code(
    gm: torch.fx.GraphModule,
    folder: str | os.PathLike[str],
    *,
    class_name: str = "FxconetModel",
    example_inputs: Any = None,
) -> Path:
    """Write ``model.py`` (from :func:`to_code`) and ``weights.pt`` (a plain state dict) to
    ``folder``, check that they rebuild ``gm`` exactly, and return the folder.

    The check rebuilds the model from the files and compares tensors, training modes and, in
    eval mode, the outputs on ``example_inputs`` (default: random inputs of the shapes a model
    from :func:`fxconet.resize` was analysed with; none for other modules).

    Raises:
        ExportError: the code cannot be written (see :func:`to_code`) or does not rebuild the
            model.

    Example:
        >>> fxconet.export.save_code(gm, "resized/")
        >>> model = fxconet.export.load_code("resized/")    # no fxconet needed: see load_code
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(to_code(gm, class_name))
    torch.save({k: v.detach().cpu() for k, v in _state(gm).items()}, folder / "weights.pt")
    (folder / "README.txt").write_text(
        "Rebuild without fxconet:\n"
        "    import importlib.util, torch\n"
        "    spec = importlib.util.spec_from_file_location('m', 'model.py')\n"
        "    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"    model = m.{class_name}()\n"
        "    model.load_state_dict(torch.load('weights.pt', weights_only=True))\n"
    )
    rebuilt = load_code(folder, class_name=class_name, map_location=_device_of(gm))
    mine, theirs = _state(gm), rebuilt.state_dict()
    if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ExportError(f"the code written to {folder} does not rebuild the same tensors")
    modes = {p: m.training for p, m in gm.named_modules()}
    if {p: m.training for p, m in rebuilt.named_modules()} != modes:
        raise ExportError(f"the code written to {folder} does not rebuild the training modes")
    inputs = _example_inputs(gm) if example_inputs is None else normalize_inputs(example_inputs)
    if inputs is not None:
        args, kwargs = inputs
        with torch.no_grad(), evaluating(gm), evaluating(rebuilt):
            want = gm(*args, **kwargs)
            try:
                got = rebuilt(*args, **kwargs)
            except Exception as e:
                raise ExportError(
                    f"the code written to {folder} fails on the example inputs: "
                    f"{type(e).__name__}: {e}"
                ) from e
        try:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        except AssertionError as e:
            raise ExportError(
                f"the code written to {folder} does not compute the model's outputs "
                f"({first_line(e)})"
            ) from e
    return folder


def _device_of(gm: nn.Module) -> torch.device:
    t = next(itertools.chain(gm.parameters(), gm.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _example_inputs(gm: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Random inputs shaped as the example inputs ``gm`` was analysed with (a model resized
    by fxconet knows them), else None."""
    plan = gm.meta.get("fxconet") if isinstance(gm, torch.fx.GraphModule) else None
    solution = getattr(plan, "solution", None)
    if solution is None:
        return None
    device = _device_of(gm)
    gen = torch.Generator().manual_seed(0)

    def real(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(device)
        return torch.zeros(t.shape, dtype=t.dtype, device=device)  # indices, masks: in range

    args = map_tensors(tuple(solution.example_args), real)
    return args, map_tensors(dict(solution.example_kwargs), real)


def load_code(
    folder: str | os.PathLike[str], *, class_name: str = "FxconetModel", map_location: Any = "cpu"
) -> nn.Module:
    """Import ``model.py`` from ``folder`` and load ``weights.pt`` with ``weights_only=True``."""
    folder = Path(folder)
    source = folder / "model.py"
    if not source.is_file():
        raise ExportError(f"{source} does not exist (write it with save_code)")
    name = f"_fxconet_generated_{abs(hash(str(folder.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    model = getattr(module, class_name)()
    state = torch.load(folder / "weights.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# torch.export and ONNX


def export_program(gm: nn.Module, example_inputs: Any, **kwargs: Any) -> Any:
    """``torch.export.export`` of a (resized) model.

    Example:
        >>> ep = fxconet.export.export_program(gm, torch.randn(1, 3, 224, 224))
    """
    args, kw = normalize_inputs(example_inputs)
    return torch.export.export(gm, args, kwargs=kw or None, **kwargs)


def save_program(
    gm: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
) -> Path:
    """Save a model as a ``torch.export`` program (``.pt2``), in eval mode.

    The file loads with plain PyTorch, without fxconet and without unpickling code:
    ``torch.export.load(path).module()``. With ``dynamic_batch`` the first dim of every tensor
    input may have any size (a model that fixes its batch size is exported for the example's).

    Raises:
        ExportError: ``torch.export`` cannot export the model (the message says why).

    Example:
        >>> fxconet.export.save_program(gm, torch.randn(1, 3, 32, 32), "model.pt2")
        >>> model = torch.export.load("model.pt2").module()       # torch only
    """
    path = Path(path)
    args, kw = normalize_inputs(example_inputs)
    try:
        with evaluating(gm):
            program = None
            if dynamic_batch and not kw:
                batch = torch.export.Dim("batch", min=1)
                shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
                two = _batch_of_two(args)  # torch.export specialises dims of size 1
                try:
                    program = torch.export.export(gm, two, dynamic_shapes=shapes)
                except Exception:  # the model fixes its batch size: export it for the example's
                    program = None
            if program is None:
                program = torch.export.export(gm, args, kwargs=kw or None)
    except Exception as e:
        raise ExportError(f"torch.export cannot export the model: {type(e).__name__}: {e}") from e
    torch.export.save(program, path)
    return path


def export_onnx(
    gm: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    **kwargs: Any,
) -> Path:
    """Export a model to ONNX at ``path`` (``torch.onnx.export`` with the dynamo exporter).

    With ``dynamic_batch`` (and no ``dynamic_shapes``/``dynamic_axes`` of your own) the first
    dim of every tensor input is symbolic, so the file runs on any batch size; a model that
    fixes its batch size is exported for the example's, with a warning. Needs the ``[export]``
    extra (``pip install fxconet[export]``). ``kwargs`` go to ``torch.onnx.export``.

    Example:
        >>> fxconet.export.export_onnx(gm.eval(), torch.randn(1, 3, 224, 224), "resized.onnx")
    """
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {missing}: pip install 'fxconet[export]'")
    args, kw = normalize_inputs(example_inputs)
    path = Path(path)
    kwargs.setdefault("dynamo", True)
    kwargs.setdefault("verbose", False)
    dynamic = (
        dynamic_batch
        and kwargs["dynamo"]
        and not kw
        and "dynamic_shapes" not in kwargs
        and "dynamic_axes" not in kwargs
    )
    if dynamic:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple(
            {0: batch} if isinstance(a, torch.Tensor) and a.dim() else None for a in args
        )
        two = _batch_of_two(args)
        try:
            torch.onnx.export(gm, two, str(path), dynamic_shapes=shapes, **kwargs)
            return path
        except Exception as e:  # the model fixes its batch size
            warnings.warn(
                f"export_onnx: the batch size cannot be dynamic ({type(e).__name__}: "
                f"{first_line(e)[:200]}); exporting for the example's batch size",
                stacklevel=2,
            )
    torch.onnx.export(gm, args, str(path), kwargs=kw or None, **kwargs)
    return path


def _batch_of_two(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with batch-1 tensors doubled (exporters specialise dims of size 1)."""
    return tuple(
        torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() and len(a) == 1 else a
        for a in args
    )
