"""Saving and exporting resized models.

Five ways out of fxconet, from the most to the least Python-bound:

* :func:`save_safe` / :func:`load_safe`: data only, for models to share or to load from others:
  ``architecture.json`` (each layer as its class and constructor arguments, the graph as ops and
  arguments) and ``weights.pt`` (``weights_only=True``). Loading builds only ``torch.nn`` and
  torchvision layers and calls only tensor ops unless told to trust more (``allow=``); nothing
  from the files runs. Needs fxconet to load.
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
import functools
import importlib.util
import inspect
import itertools
import json
import keyword
import math
import os
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from fxconet.errors import ExportError, first_line
from fxconet.passes import fx_compat, parametrized
from fxconet.passes.module_copy import evaluating, map_tensors
from fxconet.passes.nodes import get_attr, normalize_inputs
from fxconet.passes.resize_layers import ResizePlan

__all__ = [
    "ExportError",
    "export_onnx",
    "export_program",
    "load",
    "load_code",
    "load_safe",
    "save",
    "save_code",
    "save_safe",
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


def _constructor_kwargs(path: str, m: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild leaf module ``m``, read from its attributes."""
    cls: type = parametrize.type_before_parametrizations(m)
    sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    kwargs: dict[str, Any] = {}
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in ("device", "dtype"):
            continue
        if name in m._parameters or name in m._buffers:
            value: Any = (
                m._parameters.get(name) if name in m._parameters else m._buffers[name]
            ) is not None
        elif name in m.__dict__ or hasattr(cls, name) and not callable(getattr(cls, name)):
            value = getattr(m, name)
        elif p.default is not p.empty:
            continue
        else:
            raise ExportError(
                f"module `{path}` ({cls.__name__}): constructor argument {name!r} is not an "
                "attribute of the module, so it cannot be rebuilt from its attributes"
            )
        if isinstance(value, nn.Module | torch.Tensor):
            raise ExportError(
                f"module `{path}` ({cls.__name__}): argument {name!r} is a {type(value).__name__}"
            )
        kwargs[name] = value
    return kwargs


def _constructor(path: str, m: nn.Module, imports: dict[str, str]) -> str:
    """A constructor call rebuilding leaf module ``m`` from its attributes."""
    cls = parametrize.type_before_parametrizations(m)
    module, qualname = _qualified(cls)
    alias = "_" + qualname.replace(".", "_")
    imports[alias] = f"from {module} import {qualname.split('.')[0]} as {alias}"
    if "." in qualname:
        raise ExportError(f"module `{path}`: nested class {qualname} cannot be imported")
    parts = [
        f"{name}={_literal(value, f'module `{path}` argument {name!r}')}"
        for name, value in _constructor_kwargs(path, m).items()
    ]
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


def parametrizations_of(path: str, m: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``weight_norm`` / ``spectral_norm`` parametrizations of leaf module ``m`` as data,
    by parametrized tensor name (``{}`` for a plain module), to register again after building
    the layer (:func:`apply_parametrizations`).

    Raises:
        ExportError: another parametrization (its computation is code, not data), or more than
            one on a tensor.
    """
    if not parametrized.is_parametrized(m):
        return {}
    out: dict[str, dict[str, Any]] = {}
    cls = parametrize.type_before_parametrizations(m)
    for name, plist in m.parametrizations.items():  # type: ignore[union-attr, operator]
        kinds = [type(q).__name__ for q in plist]
        p = plist[0]
        attrs: dict[str, Any] = p.__dict__  # the settings (isinstance below narrows p)
        if len(plist) == 1 and isinstance(p, parametrized.WEIGHT_NORM):
            out[name] = {"kind": "weight_norm", "dim": int(attrs["dim"])}
        elif len(plist) == 1 and isinstance(p, parametrized.SPECTRAL_NORM):
            out[name] = {
                "kind": "spectral_norm",
                "n_power_iterations": int(attrs["n_power_iterations"]),
                "eps": float(attrs["eps"]),
                "dim": int(attrs["dim"]),
            }
        else:
            raise ExportError(
                f"module `{path}` ({cls.__name__}): the parametrizations {kinds} of `{name}` "
                "cannot be written as code or data (one weight_norm or spectral_norm can); "
                "save with save() or save_program()"
            )
    return out


def apply_parametrizations(m: nn.Module, spec: dict[str, dict[str, Any]], where: str) -> None:
    """Register on ``m`` the parametrizations :func:`parametrizations_of` described (their
    tensors take the shapes of ``m``'s; load the state dict afterwards for their values)."""
    for name, p in spec.items():
        kind = p.get("kind") if isinstance(p, dict) else None
        if kind == "weight_norm":
            parametrizations.weight_norm(m, name, dim=int(p["dim"]))
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(
                m,
                name,
                n_power_iterations=int(p["n_power_iterations"]),
                eps=float(p["eps"]),
                dim=int(p["dim"]),
            )
        else:
            raise ExportError(f"{where}: unknown parametrization {p!r} of `{name}`")


def _parametrization_call(path: str, name: str, p: dict[str, Any]) -> str:
    """The line of generated code that registers one parametrization of module ``path``."""
    where = f"module `{path}` parametrization of {name!r}"
    args = [f"_at(self, {path!r})", repr(name)] + [
        f"{k}={_literal(v, where)}" for k, v in p.items() if k != "kind"
    ]
    return f"        _P.{p['kind']}({', '.join(args)})"


def _registered_by_parametrization(mod: nn.Module, kind: str, hook: Any) -> bool:
    """Whether ``hook`` is the one ``parametrizations.weight_norm`` registers on the module it
    parametrizes (it renames the keys of a legacy ``weight_g``/``weight_v`` state dict):
    registering the parametrization again after loading registers it again."""
    fn = getattr(hook, "hook", hook)  # nn.Module wraps the hooks it stores
    return (
        kind == "_load_state_dict_pre_hooks"
        and getattr(fn, "__module__", None) == parametrizations.__name__
        and getattr(fn, "__name__", None) == "_weight_norm_compat_hook"
        and parametrized.is_parametrized(mod)
    )


_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _refuse_hooks(gm: nn.Module, what: str) -> None:
    """Raise if any module of ``gm`` has hooks (a file of code or data cannot hold them)."""
    hooked = [
        (path or type(gm).__name__, kind)
        for path, mod in gm.named_modules()
        for kind in _HOOKS
        if any(
            not _registered_by_parametrization(mod, kind, h)
            for h in (getattr(mod, kind, None) or {}).values()
        )
    ]
    if hooked:
        where = ", ".join(f"`{p}` ({k.strip('_')})" for p, k in hooked[:4])
        raise ExportError(
            f"{what}: {where}{' ...' if len(hooked) > 4 else ''}. "
            "Remove them before saving (and register them again after loading), or save "
            "with save() or save_program()"
        )


def to_code(gm: torch.fx.GraphModule, class_name: str = "FxconetModel") -> str:
    """Python source of an ``nn.Module`` equivalent to ``gm`` (load weights separately).

    The class builds every layer with its constructor (``Conv2d(32, 64, kernel_size=(3, 3),
    ...)``) at the same module paths as ``gm``, so ``gm.state_dict()`` loads into it, and in
    the training mode of each of ``gm``'s modules.

    A layer whose weight is parametrized by ``torch.nn.utils.parametrizations.weight_norm`` or
    ``spectral_norm`` is built plain and the parametrization registered again, so the state dict
    keys (``parametrizations.weight.original0`` ...) are the same.

    Raises:
        ExportError: a layer or function cannot be written as importable code, a module has
            hooks (code cannot hold them; nothing is dropped silently), or a parametrization
            other than one ``weight_norm`` or ``spectral_norm`` per tensor.

    Example:
        >>> print(fxconet.export.to_code(gm))
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise ExportError(f"to_code needs a torch.fx.GraphModule, got {type(gm).__name__}")
    _refuse_hooks(gm, "to_code cannot write hooks as code")
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
            for tensor, p in parametrizations_of(path, mod).items():
                imports["_P"] = "from torch.nn.utils import parametrizations as _P"
                body.append(_parametrization_call(path, tensor, p))
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
    _check_rebuild(gm, rebuilt, f"the code written to {folder}", example_inputs)
    return folder


def _check_rebuild(gm: nn.Module, rebuilt: nn.Module, what: str, example_inputs: Any) -> None:
    """Raise unless ``rebuilt`` has ``gm``'s tensors and training modes and, in eval mode, its
    outputs on ``example_inputs`` (default: random inputs shaped as ``gm``'s analysis inputs)."""
    mine = _state(gm)
    theirs = _state(rebuilt) if isinstance(rebuilt, torch.fx.GraphModule) else rebuilt.state_dict()
    if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ExportError(f"{what} does not rebuild the same tensors")
    modes = {p: m.training for p, m in gm.named_modules()}
    if {p: m.training for p, m in rebuilt.named_modules()} != modes:
        raise ExportError(f"{what} does not rebuild the training modes")
    inputs = _example_inputs(gm) if example_inputs is None else normalize_inputs(example_inputs)
    if inputs is None:
        return
    args, kwargs = inputs
    with torch.no_grad(), evaluating(gm), evaluating(rebuilt):
        want = gm(*args, **kwargs)
        try:
            got = rebuilt(*args, **kwargs)
        except Exception as e:
            raise ExportError(f"{what} fails on the example inputs: {type(e).__name__}: {e}") from e
    try:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    except AssertionError as e:
        raise ExportError(f"{what} does not compute the model's outputs ({first_line(e)})") from e


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
# the code-free format: a declarative architecture (JSON) plus weights


SAFE_FORMAT = "fxconet.safe"
SAFE_VERSION = 1
_ARCH, _WEIGHTS = "architecture.json", "weights.pt"
_PATH_PART = re.compile(r"[A-Za-z0-9_]+")
_OPERATORS = (
    "abs add and_ concat contains eq floordiv ge getitem gt iadd iand ifloordiv imod imul index "
    "inv invert ior ipow irshift ilshift is_ is_not isub itruediv ixor le lshift lt matmul mod mul "
    "ne neg not_ or_ pos pow rshift setitem sub truediv truth xor"
).split()
_BUILTINS = "abs bool float getattr int len list max min range round slice sum tuple".split()


def _public_callables(namespace: Any, names: Any) -> dict[str, Any]:
    return {
        n: getattr(namespace, n)
        for n in names
        if not n.startswith("_") and callable(getattr(namespace, n, None))
    }


_TRUSTED: dict[str, dict[str, Any]] = {}


def _trusted() -> dict[str, dict[str, Any]]:
    """The functions a safe file may call, by namespace: tensor ops, ``torch.nn.functional``,
    ``operator``, ``math`` and a few builtins. Nothing that reads or writes files or imports."""
    if not _TRUSTED:
        import operator

        torch_ops = _public_callables(torch, dir(torch._C._VariableFunctions))
        torch_ops.update(_public_callables(torch, torch.functional.__all__))
        for name in list(torch_ops):
            if "file" in name or "load" in name or "save" in name:
                del torch_ops[name]
        torch_ops["_assert"] = torch._assert  # fx's rewrite of ``assert``
        fn = nn.functional
        _TRUSTED.update({
            "torch": torch_ops,
            "torch.nn.functional": {
                n: f for n, f in _public_callables(fn, dir(fn)).items()
                if getattr(f, "__module__", "").startswith(("torch.nn.functional", "torch._C"))
            },
            "torch._C._nn": _public_callables(torch._C._nn, dir(torch._C._nn)),
            "torch.special": _public_callables(torch.special, dir(torch.special)),
            "torch.linalg": _public_callables(torch.linalg, dir(torch.linalg)),
            "torch.fft": _public_callables(torch.fft, dir(torch.fft)),
            "operator": {n: getattr(operator, n) for n in _OPERATORS if hasattr(operator, n)},
            "math": _public_callables(math, dir(math)),
            "builtins": {n: getattr(builtins, n) for n in _BUILTINS},
        })  # fmt: skip
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision.ops

            ops = torchvision.ops
            _TRUSTED["torchvision.ops"] = {
                n: f
                for n, f in _public_callables(ops, ops.__all__).items()
                if not isinstance(f, type)
            }
    return _TRUSTED


@functools.cache
def _tensor_names() -> frozenset[str]:
    """Public attribute and method names of tensors: the only ones a safe file may use."""
    return frozenset(n for n in dir(torch.Tensor) if not n.startswith("_"))


def _trusted_module_class(cls: type) -> bool:
    """``torch.nn`` layers and torchvision's ops layers: constructors that only build tensors."""
    module = getattr(cls, "__module__", "")
    return issubclass(cls, nn.Module) and (
        module.startswith("torch.nn.modules.") or module.startswith("torchvision.ops.")
    )


_TRUSTED_NAMES: dict[int, str] = {}


def _name_of(obj: Any) -> str:
    """``namespace:name`` of a trusted function, else ``module:qualname`` (needs ``allow=``)."""
    if not _TRUSTED_NAMES:  # the first namespace that holds a function names it
        for namespace, table in _trusted().items():
            for name, f in table.items():
                _TRUSTED_NAMES.setdefault(id(f), f"{namespace}:{name}")
    found = _TRUSTED_NAMES.get(id(obj))
    if found is not None:
        return found
    module, qualname = _qualified(obj)
    return f"{module}:{qualname}"


def _allowed_names(allow: Any) -> dict[str, Any]:
    out = {}
    for obj in allow:
        module, qualname = _qualified(obj)
        out[f"{module}:{qualname}"] = obj
    return out


def _encode(value: Any, where: str) -> Any:
    """A node argument as JSON: nodes, tuples, slices, dtypes ... tagged, literals as they are."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, torch.Size):
        return {"size": [_encode(v, where) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ExportError(f"{where}: a dict with keys that are not strings cannot be saved")
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    for kind, cls in (
        ("dtype", torch.dtype),
        ("memory_format", torch.memory_format),
        ("layout", torch.layout),
    ):
        if isinstance(value, cls):
            return {kind: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise ExportError(f"{where}: cannot save a {type(value).__name__} ({value!r}) as data")


def _decode(value: Any, nodes: dict[str, torch.fx.Node], where: str) -> Any:
    """Inverse of :func:`_encode`; refuses anything else (nothing is looked up by name but
    earlier nodes, dtypes, memory formats and layouts)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes, where) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise ExportError(f"{where}: malformed argument {value!r}")
    ((kind, v),) = value.items()
    if kind == "node":
        if v not in nodes:
            raise ExportError(f"{where}: refers to node {v!r}, which does not come before it")
        return nodes[v]
    if kind in ("tuple", "size", "slice") and isinstance(v, list):
        items = [_decode(x, nodes, where) for x in v]
        if kind == "slice":
            if len(items) != 3:
                raise ExportError(f"{where}: malformed slice {v!r}")
            return slice(*items)
        return torch.Size(items) if kind == "size" else tuple(items)
    if kind == "dict" and isinstance(v, dict):
        return {str(k): _decode(x, nodes, where) for k, x in v.items()}
    if kind == "float" and v in ("inf", "-inf", "nan"):
        return float(v)
    if kind == "ellipsis":
        return Ellipsis
    if kind == "device" and isinstance(v, str):
        return torch.device(v)
    if kind in ("dtype", "memory_format", "layout") and isinstance(v, str):
        cls = {"dtype": torch.dtype, "memory_format": torch.memory_format}.get(kind, torch.layout)
        found = getattr(torch, v, None) if v.isidentifier() else None
        if isinstance(found, cls):
            return found
    raise ExportError(f"{where}: malformed argument {value!r}")


def _module_path(path: Any, where: str) -> str:
    """``path`` if it is a dotted path of plain attribute names (no ``__dunder__`` part)."""
    if not isinstance(path, str) or not all(
        _PATH_PART.fullmatch(p) and not (p.startswith("__") and p.endswith("__"))
        for p in path.split(".")
    ):
        raise ExportError(f"{where}: {path!r} is not a module path")
    return path


def save_safe(gm: nn.Module, folder: str | os.PathLike[str], *, example_inputs: Any = None) -> Path:
    """Write ``gm`` as data only: ``architecture.json`` (its layers as constructor arguments,
    its graph as ops and arguments) and ``weights.pt`` (tensors for ``weights_only=True``).

    :func:`load_safe` rebuilds the model without running anything from the files, so this is
    the format to share or to load from others. The rebuild is checked before returning, as
    :func:`save_code` checks its own: same tensors, training modes and outputs (on
    ``example_inputs``, default random inputs of the analysed shapes), and
    :func:`fxconet.kept_channels` still works after loading.

    Raises:
        ExportError: something in the model cannot be written as data (hooks, a layer whose
            constructor arguments are not its attributes, an argument that is an object, a
            parametrization other than ``weight_norm`` and ``spectral_norm``, which are written
            as their arguments), or the files do not rebuild the model.

    Example:
        >>> fxconet.export.save_safe(gm, "resized/")
        >>> gm2 = fxconet.export.load_safe("resized/")
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise ExportError(f"save_safe needs a torch.fx.GraphModule, got {type(gm).__name__}")
    _refuse_hooks(gm, "save_safe cannot write hooks as data")
    leaves = _leaf_paths(gm)
    needs: dict[str, Any] = {}  # functions and classes outside the trusted ones
    modules = []
    for path in sorted(leaves, key=lambda p: (p.count("."), p)):
        mod = gm.get_submodule(path)
        cls = parametrize.type_before_parametrizations(mod)
        entry: dict[str, Any] = {"path": path, "training": mod.training}
        if cls is not nn.Module:
            name = ":".join(_qualified(cls))
            if not _trusted_module_class(cls):
                needs[name] = cls
            kwargs = _constructor_kwargs(path, mod)
            where = f"module `{path}` ({cls.__name__})"
            entry.update(type=name, kwargs=_encode(kwargs, where))
            spec = parametrizations_of(path, mod)
            if spec:
                entry["parametrizations"] = spec
        modules.append(entry)
    containers = [
        {"path": path, "training": mod.training}
        for path, mod in gm.named_modules()
        if path and path not in leaves and not any(path.startswith(p + ".") for p in leaves)
    ]
    tensors = []
    for path, name, t in _owned_tensors(gm, leaves):
        owner = gm.get_submodule(path)
        kind = (
            "parameter"
            if name in owner._parameters
            else "buffer"
            if name in owner._buffers and name not in owner._non_persistent_buffers_set
            else "attribute"
        )
        tensors.append({
            "path": path, "name": name, "kind": kind, "requires_grad": t.requires_grad,
        })  # fmt: skip
    nodes = []
    methods = _tensor_names()
    for node in gm.graph.nodes:
        where = f"node `{node.name}` ({node.op} {node.target})"
        target: Any = node.target
        if node.op == "call_function":
            target = _name_of(node.target)
            if target.partition(":")[0] not in _trusted():
                needs[target] = node.target
        elif node.op == "call_method" and node.target not in methods:
            raise ExportError(
                f"{where}: only tensor methods can be saved as data; save with save_program()"
            )
        nodes.append({
            "name": node.name, "op": node.op, "target": target,
            "args": _encode(node.args, where), "kwargs": _encode(node.kwargs, where),
        })  # fmt: skip
    plan = gm.meta.get("fxconet")
    kept = None
    if plan is not None and getattr(plan, "index", None) is not None:
        kept = {
            "widths": {str(g): w for g, w in plan.widths.items()},
            "index": {str(g): t.tolist() for g, t in plan.index.items()},
        }
    architecture = {
        "format": SAFE_FORMAT,
        "version": SAFE_VERSION,
        "torch": torch.__version__,
        "name": type(gm).__name__,
        "training": gm.training,
        "modules": modules,
        "containers": containers,
        "tensors": tensors,
        "nodes": nodes,
        "frozen": [k for k, p in gm.named_parameters() if not p.requires_grad],
        "needs": sorted(needs),
        "kept_channels": kept,
    }
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; save_safe writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _ARCH).write_text(json.dumps(architecture, indent=1))
    torch.save({k: v.detach().cpu() for k, v in _state(gm).items()}, folder / _WEIGHTS)
    rebuilt = load_safe(folder, allow=needs.values(), map_location=_device_of(gm))
    _check_rebuild(gm, rebuilt, f"the files written to {folder}", example_inputs)
    return folder


def load_safe(
    folder: str | os.PathLike[str], *, allow: Any = (), map_location: Any = "cpu"
) -> torch.fx.GraphModule:
    """Rebuild a model written by :func:`save_safe`, without running code from the files.

    ``architecture.json`` is read as data: layers are built only from ``torch.nn``'s and
    torchvision's layer classes, ops only from tensor methods, ``torch``'s tensor functions,
    ``torch.nn.functional``, ``operator`` and ``math``, and ``weights.pt`` is read with
    ``torch.load(weights_only=True)``. A model that uses your own layer classes or functions
    names them in the file's ``needs``; pass those objects in ``allow`` to trust them.

    Raises:
        ExportError: the folder is not a safe save, names something it may not use (the
            message names the node or module and what to pass in ``allow``), or is malformed.

    Example:
        >>> gm = fxconet.export.load_safe("resized/")
        >>> gm = fxconet.export.load_safe("yolo/", allow=[MyConv])   # a class of your own
    """
    folder = Path(folder)
    arch_path = folder / _ARCH
    try:
        arch = json.loads(arch_path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{arch_path} does not exist (write it with save_safe)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{arch_path} is not readable JSON ({e})") from e
    if not isinstance(arch, dict) or arch.get("format") != SAFE_FORMAT:
        raise ExportError(f"{arch_path} is not an fxconet safe save (no format {SAFE_FORMAT!r})")
    if arch.get("version") != SAFE_VERSION:
        raise ExportError(
            f"{arch_path}: format version {arch.get('version')!r}; this fxconet reads "
            f"{SAFE_VERSION}"
        )
    allowed = _allowed_names(allow)
    trusted = _trusted()
    try:
        return _rebuild_safe(folder, arch, allowed, trusted, map_location)
    except ExportError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{arch_path} is malformed ({type(e).__name__}: {e})") from e


def _rebuild_safe(
    folder: Path,
    arch: dict[str, Any],
    allowed: dict[str, Any],
    trusted: dict[str, dict[str, Any]],
    map_location: Any,
) -> torch.fx.GraphModule:
    arch_path = folder / _ARCH

    def untrusted(name: str, where: str) -> ExportError:
        return ExportError(
            f"{arch_path}: {where} uses {name}, which load_safe does not trust by default; "
            "if you trust this file, pass the object itself: "
            f"load_safe(..., allow=[{name.split(':')[-1]}])"
        )

    root = nn.Module()

    def parent_of(path: str) -> tuple[nn.Module, str]:
        parent, _, name = path.rpartition(".")
        mod = root
        for part in filter(None, parent.split(".")):
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        return mod, name

    for entry in arch["modules"]:
        path = _module_path(entry["path"], "a module")
        where = f"module `{path}`"
        if "type" not in entry:
            module = nn.Module()
        else:
            name = entry["type"]
            module_name, _, qualname = str(name).partition(":")
            cls = allowed.get(name)
            if cls is None:
                cls = _trusted_class(module_name, qualname)
            if cls is None:
                raise untrusted(name, where)
            kwargs = _decode(entry["kwargs"], {}, where)
            if not isinstance(kwargs, dict):
                raise ExportError(f"{arch_path}: {where}: malformed arguments")
            try:
                module = cls(**kwargs)
            except Exception as e:
                raise ExportError(
                    f"{arch_path}: {where}: {cls.__name__}(**{kwargs}) fails: {e}"
                ) from e
            spec = entry.get("parametrizations") or {}
            if not isinstance(spec, dict):
                raise ExportError(f"{arch_path}: {where}: malformed parametrizations")
            apply_parametrizations(module, spec, f"{arch_path}: {where}")
        parent, name = parent_of(path)
        parent.add_module(name, module)
    for entry in arch["containers"]:
        parent, name = parent_of(_module_path(entry["path"], "a module"))
        if name not in parent._modules:
            parent.add_module(name, nn.Module())
    weights = folder / _WEIGHTS
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ExportError(f"{weights} does not exist (write it with save_safe)") from None
    except Exception as e:
        raise ExportError(f"{weights} is not readable with weights_only=True ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{weights} is not a dict of tensors")
    for entry in arch["tensors"]:
        path = _module_path(entry["path"], "a tensor") if entry["path"] else ""
        name = _module_path(entry["name"], "a tensor")
        key = f"{path}.{name}" if path else name
        if key not in state:
            raise ExportError(f"{weights} has no tensor {key!r}, which {arch_path} names")
        owner = root.get_submodule(path) if path else root
        t = state[key]
        if entry["kind"] == "parameter":
            owner.register_parameter(name, nn.Parameter(t, requires_grad=entry["requires_grad"]))
        elif entry["kind"] == "buffer":
            owner.register_buffer(name, t)
        else:
            setattr(owner, name, t)
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    methods = _tensor_names()
    for entry in arch["nodes"]:
        op, target, label = entry["op"], entry["target"], entry["name"]
        where = f"node `{label}` ({op} {target})"
        args = _decode(entry["args"], nodes, where)
        kwargs = _decode(entry["kwargs"], nodes, where)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ExportError(f"{arch_path}: {where}: malformed arguments")
        if not all(k.isidentifier() and not keyword.iskeyword(k) for k in kwargs):
            raise ExportError(f"{arch_path}: {where}: a keyword argument is not a name")
        if op == "placeholder":
            if not str(target).lstrip("*").isidentifier() or keyword.iskeyword(target):
                raise ExportError(f"{arch_path}: {where}: not an argument name")
            node = graph.placeholder(
                target, default_value=args[0] if args else inspect.Parameter.empty
            )
        elif op == "output":
            node = graph.output(args[0])
        elif op in ("call_module", "get_attr"):
            path = _module_path(target, where)
            try:
                found = root.get_submodule(path) if op == "call_module" else get_attr(root, path)
            except AttributeError:
                raise ExportError(f"{arch_path}: {where}: the model has no {path!r}") from None
            if not isinstance(found, nn.Module | torch.Tensor):
                raise ExportError(f"{arch_path}: {where}: {path!r} is not a layer or tensor")
            node = graph.create_node(op, path, args, kwargs)
        elif op == "call_method":
            if target not in methods:
                raise ExportError(f"{arch_path}: {where}: {target!r} is not a tensor method")
            node = graph.call_method(target, args, kwargs)
        elif op == "call_function":
            namespace, _, name = str(target).partition(":")
            fn = trusted.get(namespace, {}).get(name) if target not in allowed else allowed[target]
            if fn is None:
                raise untrusted(str(target), where)
            if fn is getattr and not (len(args) == 2 and args[1] in methods):
                raise ExportError(
                    f"{arch_path}: {where}: getattr of {args[1:]!r}, not a tensor attribute"
                )
            node = graph.call_function(fn, args, kwargs)
        else:
            raise ExportError(f"{arch_path}: {where}: unknown op {op!r}")
        nodes[label] = node
    graph.lint()
    gm = torch.fx.GraphModule(root, graph, class_name="FxconetModel")
    gm.train(bool(arch["training"]))
    for entry in [*arch["modules"], *arch["containers"]]:
        gm.get_submodule(entry["path"]).train(bool(entry["training"]))
    persistent = set(gm.state_dict())
    missing = persistent - set(state)
    if missing:
        raise ExportError(f"{weights} lacks {sorted(missing)[:4]}")
    gm.load_state_dict({k: state[k] for k in persistent}, strict=True, assign=True)
    frozen = set(arch["frozen"])
    for key, p in gm.named_parameters():
        p.requires_grad_(key not in frozen)
    kept = arch.get("kept_channels")
    if kept:
        plan = ResizePlan.__new__(ResizePlan)  # as a pickled plan loads: no analysis
        plan.__setstate__({
            "widths": {int(g): int(w) for g, w in kept["widths"].items()},
            "index": {int(g): torch.tensor(v, dtype=torch.long) for g, v in kept["index"].items()},
            "base": {}, "solution": None,
        })  # fmt: skip
        gm.meta["fxconet"] = plan
    return gm


def _trusted_class(module_name: str, qualname: str) -> type | None:
    """A ``torch.nn`` or torchvision layer class by its module and name, without importing
    anything that is not imported already (no module named by a file is imported)."""
    module = sys.modules.get(module_name)
    if module is None or "." in qualname or not qualname.isidentifier():
        return None
    cls = module.__dict__.get(qualname)
    return cls if isinstance(cls, type) and _trusted_module_class(cls) else None


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
