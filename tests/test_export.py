"""A resized GraphModule can be saved, written as code, exported and run by onnxruntime."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision

import fxconet
from fxconet import export


@pytest.fixture(scope="module")
def resized() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = fxconet.analyze(model, x)
    widths = {g.id: max(1, g.size // 2) for g in graph.free}
    return fxconet.resize(graph, widths).eval(), x


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_torch_save_round_trip_needs_weights_only_false(resized, tmp_path):
    gm, x = resized
    path = export.save(gm, tmp_path / "model.pt")
    loaded = export.load(path)
    torch.testing.assert_close(outputs(loaded, x), outputs(gm, x), rtol=0, atol=0)
    # weights_only=True (torch.load's default since torch 2.6) refuses pickled code
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_code_and_state_dict_rebuild_without_fxconet_or_the_model_class(resized, tmp_path):
    gm, x = resized
    source = export.to_code(gm)
    assert "class FxconetModel" in source and "ResNet" not in source
    assert "import fxconet" not in source and "from fxconet" not in source
    assert "Conv2d(in_channels=3, out_channels=32" in source
    folder = export.save_code(gm, tmp_path / "code")
    assert sorted(p.name for p in folder.iterdir()) == ["README.txt", "model.py", "weights.pt"]
    rebuilt = export.load_code(folder).eval()
    torch.testing.assert_close(outputs(rebuilt, x), outputs(gm, x), rtol=0, atol=0)
    # the weights are a plain state dict
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert state["conv1.weight"].shape == (32, 3, 7, 7)


def test_code_export_of_rewritten_ops(tmp_path):
    """chunk rewritten to split, a literal reshape, a raw parameter and LayerNorm."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cv1 = torch.nn.Conv2d(3, 16, 1)
            self.m = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.norm = torch.nn.LayerNorm(24)
            self.scale = torch.nn.Parameter(torch.ones(24))
            self.fc = torch.nn.Linear(24, 4)

        def forward(self, x):
            a, b = self.cv1(x).chunk(2, 1)
            y = torch.cat([a, b, self.m(b)], 1).reshape(x.shape[0], 24, -1).mean(-1)
            return self.fc(self.norm(y) * self.scale)

    model, x = Net().eval(), torch.randn(2, 3, 5, 5)
    graph = fxconet.analyze(model, x)
    gm = fxconet.resize(graph, {g.id: g.size - 3 for g in graph.free}).eval()
    rebuilt = export.load_code(export.save_code(gm, tmp_path / "net")).eval()
    torch.testing.assert_close(outputs(rebuilt, x), outputs(gm, x), rtol=0, atol=0)


def test_torch_export(resized):
    gm, x = resized
    program = export.export_program(gm, x)
    torch.testing.assert_close(program.module()(x), outputs(gm, x))


def test_onnx_matches_torch(resized, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the [export] extra installs onnxruntime")
    gm, x = resized
    path = export.export_onnx(gm, x, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, outputs(gm, x).numpy(), atol=1e-4, rtol=0)
    # the batch is dynamic by default: other batch sizes run
    x5 = torch.randn(5, *x.shape[1:])
    (got,) = session.run(None, {session.get_inputs()[0].name: x5.numpy()})
    np.testing.assert_allclose(got, outputs(gm, x5).numpy(), atol=1e-4, rtol=0)
    fixed = export.export_onnx(gm, x, tmp_path / "fixed.onnx", dynamic_batch=False)
    session = ort.InferenceSession(str(fixed))
    assert session.get_inputs()[0].shape[0] == len(x)


def test_to_code_rejects_non_graph_modules():
    with pytest.raises(export.ExportError, match="GraphModule"):
        export.to_code(torchvision.models.resnet18())


class Sliced(torch.nn.Module):
    """Channel slices of a concatenation (their resize rewrites keep index functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(3, 8, 1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.c = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.bn(torch.cat([self.a(x), self.b(x)], 1))
        return self.c(y)[:, 1:3] + y[:, 2:4].mean(1, keepdim=True)


def test_save_of_a_sliced_model_keeps_kept_channels_and_not_the_analysis(tmp_path):
    model, x = Sliced().eval(), torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    widths = {g.id: g.size - 1 for g in graph.free if g.size > 1}
    gm = fxconet.resize(graph, widths).eval()
    path = export.save(gm, tmp_path / "model.pt")
    assert not hasattr(gm, "_fxconet_resize_plan")  # nothing left on the user's module
    loaded = export.load(path)
    torch.testing.assert_close(outputs(loaded, x), outputs(gm, x), rtol=0, atol=0)
    kept, again = fxconet.kept_channels(gm), fxconet.kept_channels(loaded)
    assert kept.keys() == again.keys() and all(torch.equal(kept[g], again[g]) for g in kept)
    # the file holds the module, not the analysis (a copy of the model, closures)
    weights = tmp_path / "weights.pt"
    torch.save(gm.state_dict(), weights)
    assert path.stat().st_size < weights.stat().st_size + 16_000
    with pytest.raises(ValueError, match="loaded from a file"):
        loaded.meta["fxconet"].layer_channels("c")


def _refuses_a_wrong_rebuild_and_hooks(monkeypatch, gm, x, folder, save, load_name):
    """``save`` compares outputs, not only names and shapes: a rebuild that computes something
    else (same tensors, same shapes) is refused; hooks are refused instead of dropped."""
    real = getattr(export, load_name)

    def skewed(*args, **kwargs):
        rebuilt = real(*args, **kwargs)
        with torch.no_grad():
            rebuilt.c.bias.add_(1.0)
        return rebuilt

    monkeypatch.setattr(export, load_name, skewed)
    with pytest.raises(export.ExportError, match="does not compute the model's outputs"):
        save(gm, folder / "wrong", example_inputs=x)
    monkeypatch.undo()
    handle = gm.c.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(export.ExportError, match=r"hooks .*`c` \(forward_hooks\)"):
        save(gm, folder / "hooked")
    handle.remove()


def test_save_code_keeps_training_modes_and_checks_outputs(tmp_path, monkeypatch):
    model, x = Sliced(), torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    gm = fxconet.resize(graph, {g.id: g.size - 1 for g in graph.free if g.size > 1})
    gm.eval()
    rebuilt = export.load_code(export.save_code(gm, tmp_path / "eval"))
    assert not any(m.training for m in rebuilt.modules())
    gm.train()
    gm.bn.eval()  # a frozen norm inside a training model
    rebuilt = export.load_code(export.save_code(gm, tmp_path / "mixed"))
    assert rebuilt.training and not rebuilt.bn.training and rebuilt.c.training
    assert gm.training and not gm.bn.training  # the check ran in eval mode and restored them
    _refuses_a_wrong_rebuild_and_hooks(monkeypatch, gm, x, tmp_path, export.save_code, "load_code")


# ---------------------------------------------------------------------------------------------
# the code-free format


def test_safe_save_rebuilds_the_model_from_data_alone(resized, tmp_path):
    gm, x = resized
    folder = export.save_safe(gm, tmp_path / "safe")
    assert sorted(p.name for p in folder.iterdir()) == ["architecture.json", "weights.pt"]
    loaded = export.load_safe(folder)
    torch.testing.assert_close(outputs(loaded, x), outputs(gm, x), rtol=0, atol=0)
    assert not loaded.training
    kept, again = fxconet.kept_channels(gm), fxconet.kept_channels(loaded)
    assert kept.keys() == again.keys() and all(torch.equal(kept[g], again[g]) for g in kept)
    # the weights are tensors only, and the architecture names no code
    torch.load(folder / "weights.pt", weights_only=True)
    arch = json.loads((folder / "architecture.json").read_text())
    conv1 = next(m for m in arch["modules"] if m["path"] == "conv1")
    assert arch["needs"] == [] and conv1["type"] == "torch.nn.modules.conv:Conv2d"
    assert conv1["kwargs"]["dict"]["out_channels"] == 32


def test_safe_save_keeps_modes_frozen_parameters_dtypes_and_checks_outputs(tmp_path, monkeypatch):
    model, x = Sliced(), torch.randn(2, 3, 8, 8)
    graph = fxconet.analyze(model, x)
    gm = fxconet.resize(graph, {g.id: g.size - 1 for g in graph.free if g.size > 1})
    gm.bn.eval()
    gm.a.weight.requires_grad_(False)
    gm.double()
    loaded = export.load_safe(export.save_safe(gm, tmp_path / "m", example_inputs=x.double()))
    assert loaded.training and not loaded.bn.training and loaded.c.training
    assert not loaded.a.weight.requires_grad and loaded.b.weight.requires_grad
    assert loaded.c.weight.dtype == torch.float64 and loaded.bn.running_var.dtype == torch.float64
    gm.float()
    gm.eval()
    _refuses_a_wrong_rebuild_and_hooks(monkeypatch, gm, x, tmp_path, export.save_safe, "load_safe")
    with pytest.raises(export.ExportError, match="GraphModule"):
        export.save_safe(model, tmp_path / "plain")


class Scale(torch.nn.Module):
    """A layer class of the user's own: trusted only when the loader says so."""

    def __init__(self, channels: int, factor: float = 2.0) -> None:
        super().__init__()
        self.channels, self.factor = channels, factor
        self.weight = torch.nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) * self.factor


def test_safe_load_trusts_user_classes_only_when_allowed(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), Scale(8, 0.5), torch.nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 9, 9)
    graph = fxconet.analyze(model.eval(), x, leaf_modules=[Scale])
    gm = fxconet.resize(graph, {g.id: 5 for g in graph.free}).eval()
    folder = export.save_safe(gm, tmp_path / "m")
    arch = json.loads((folder / "architecture.json").read_text())
    assert arch["needs"] == [f"{__name__}:Scale"]
    with pytest.raises(export.ExportError, match=r"uses test_export:Scale, .* allow=\[Scale\]"):
        export.load_safe(folder)
    loaded = export.load_safe(folder, allow=[Scale])
    torch.testing.assert_close(outputs(loaded, x), outputs(gm, x), rtol=0, atol=0)
    assert loaded.get_submodule("1").factor == 0.5


def _tampered(folder, tmp_path, name, edit):
    arch = json.loads((folder / "architecture.json").read_text())
    edit(arch)
    out = tmp_path / name
    out.mkdir()
    (out / "architecture.json").write_text(json.dumps(arch))
    (out / "weights.pt").write_bytes((folder / "weights.pt").read_bytes())
    return out


def _node(arch, op):
    return next(n for n in arch["nodes"] if n["op"] == op)


def _set(entry, **values):
    entry.update(values)


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [
        ("function", lambda a: _set(_node(a, "call_function"), target="os:system"), "os:system"),
        ("builtin", lambda a: _set(_node(a, "call_function"), target="builtins:eval"), "eval"),
        ("operator", lambda a: _set(_node(a, "call_function"), target="operator:call"), "call"),
        ("torch load", lambda a: _set(_node(a, "call_function"), target="torch:load"), "load"),
        ("layer", lambda a: _set(a["modules"][0], type="subprocess:Popen"), "subprocess"),
        ("method", lambda a: _set(_node(a, "call_method"), target="__reduce__"), "not a tensor"),
        (
            "getattr",
            lambda a: _set(
                _node(a, "call_function"),
                target="builtins:getattr",
                args={"tuple": [{"node": "x"}, "__class__"]},
            ),
            "not a tensor attribute",
        ),
        ("attribute", lambda a: _set(_node(a, "call_module"), target="a.__class__"), "path"),
        ("argument name", lambda a: _set(a["nodes"][0], target="x=print(1)"), "argument name"),
        (
            "keyword",
            lambda a: _set(_node(a, "call_method"), kwargs={"dict": {"x=print(1)": 1}}),
            "keyword argument",
        ),
        ("format", lambda a: _set(a, format="pickle"), "not an fxconet safe save"),
        ("tag", lambda a: _set(_node(a, "call_method"), args={"pickle": "..."}), "malformed"),
    ],
)
def test_safe_load_refuses_what_could_run_code(tmp_path, case, edit, message):
    model, x = Sliced().eval(), torch.randn(2, 3, 8, 8)
    gm = fxconet.resize(fxconet.analyze(model, x), {})
    folder = export.save_safe(gm, tmp_path / "good")
    before = set(sys.modules)
    with pytest.raises(export.ExportError, match=message):
        export.load_safe(_tampered(folder, tmp_path, "bad", edit))
    assert "subprocess" in before or "subprocess" not in sys.modules  # nothing was imported


def test_safe_load_errors_name_the_file(tmp_path):
    with pytest.raises(export.ExportError, match="architecture.json does not exist"):
        export.load_safe(tmp_path)
    (tmp_path / "architecture.json").write_text("{")
    with pytest.raises(export.ExportError, match="architecture.json is not readable JSON"):
        export.load_safe(tmp_path)


class _Doubled(torch.nn.Module):
    """A parametrization of the user's own: its computation is code, so no file holds it."""

    def forward(self, w):
        return 2 * w


def _normed_net() -> torch.nn.Module:
    p = torch.nn.utils.parametrizations
    return torch.nn.Sequential(
        p.weight_norm(torch.nn.Conv2d(3, 8, 3, padding=1)),
        torch.nn.ReLU(),
        p.spectral_norm(torch.nn.Conv2d(8, 6, 3, padding=1)),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        p.weight_norm(torch.nn.Conv2d(6, 4, 1), dim=None),
    )


@pytest.mark.parametrize("save", ["save_code", "save_safe"])
def test_weight_norm_and_spectral_norm_layers_save_as_code_and_data(tmp_path, save):
    """A resized net with weight_norm'd and spectral-normed convs rebuilds from each file
    format with its parametrizations (the same tensors, outputs exactly equal); a
    parametrization of the user's own is refused with the module's path."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="`5`"):  # weight_norm over the whole tensor: frozen
        graph = fxconet.analyze(_normed_net().eval(), x)
    gm = fxconet.resize(graph, {g.id: g.size - 2 for g in graph.free}).eval()
    assert gm.get_submodule("0").out_channels == 8 - 2
    folder = getattr(export, save)(gm, tmp_path / save)
    loaded = (export.load_code if save == "save_code" else export.load_safe)(folder).eval()
    p = torch.nn.utils.parametrize
    assert p.is_parametrized(loaded.get_submodule("0"), "weight")
    assert type(loaded.get_submodule("2").parametrizations.weight[0]).__name__ == "_SpectralNorm"
    assert p.type_before_parametrizations(loaded.get_submodule("5")) is torch.nn.Conv2d
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    torch.testing.assert_close(outputs(loaded, x), outputs(gm, x), rtol=0, atol=0)
    # the legacy-key hook weight_norm registers comes back with it
    state = {k: v for k, v in gm.state_dict().items() if not k.startswith("0.parametrizations")}
    state["0.weight_g"] = gm.get_submodule("0").parametrizations.weight.original0
    state["0.weight_v"] = gm.get_submodule("0").parametrizations.weight.original1
    loaded.load_state_dict(state)  # strict: refused unless the hook renames the keys
    torch.testing.assert_close(outputs(loaded, x), outputs(gm, x), rtol=0, atol=0)

    custom = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    p.register_parametrization(custom[0], "weight", _Doubled())
    with pytest.warns(UserWarning, match="parametrized"):
        gm2 = fxconet.resize(fxconet.analyze(custom.eval(), x), {})
    with pytest.raises(export.ExportError, match=r"module `0` \(Conv2d\).*\['_Doubled'\]"):
        getattr(export, save)(gm2, tmp_path / "custom")
