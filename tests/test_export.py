"""A resized GraphModule can be saved, written as code, exported and run by onnxruntime."""

from __future__ import annotations

import pickle

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
    # the default weights_only=True refuses pickled code, as documented
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


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


def test_to_code_rejects_non_graph_modules():
    with pytest.raises(export.ExportError, match="GraphModule"):
        export.to_code(torchvision.models.resnet18())
