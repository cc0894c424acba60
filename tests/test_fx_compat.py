"""The private torch.fx shortcuts of ``fxconet.passes.fx_compat`` against fx's public paths.

Each test builds a graph both ways and compares them. Where the installed torch fails the
availability self-test, the shortcut is off and both ways are fx's public path (the tests then
check the fallback itself); ``test_the_self_test_covers_every_private_name`` shows which.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from fxconet import testing
from fxconet.passes import fx_compat
from fxconet.passes import trace as T


def test_the_self_test_covers_every_private_name(monkeypatch):
    available = fx_compat.self_test()
    assert (available.graph, available.trace) == (fx_compat.FAST_GRAPH, fx_compat.FAST_TRACE)
    if available.trace:
        assert available.missing == ()
    # a private name that disappears turns the shortcuts off instead of crashing later
    monkeypatch.delattr(torch.fx._symbolic_trace, "_constant_attribute_types", raising=False)
    assert not fx_compat.self_test().trace
    assert "torch.fx._symbolic_trace._constant_attribute_types" in fx_compat.self_test().missing
    monkeypatch.undo()
    monkeypatch.delattr(torch.fx.Graph, "_target_to_str")
    assert fx_compat.self_test()[:2] == (False, False)


def test_every_private_name_read_is_listed():
    """The module reads no private fx member that the self-test does not check."""
    import inspect
    import re

    source = inspect.getsource(fx_compat)
    listed = {n for names in fx_compat.PRIVATE_NAMES.values() for n in names}
    used = set(
        re.findall(r"(?:st|graph|tracer|torch\.fx\._symbolic_trace)\.(_[a-z][a-z_]*)", source)
    )
    used -= {"_graph_namespace"} - listed  # read through the namespace entries
    assert used <= listed | {"_tracer_cls", "_tracer_extras"}, used - listed


def test_the_fallback_traces_when_the_shortcuts_are_off(monkeypatch):
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.setattr(fx_compat, "FAST_GRAPH", False)
    monkeypatch.setattr(fx_compat, "FAST_TRACE", False)
    traced = T.trace_model(model, example_inputs=x)
    reference = torch.fx.symbolic_trace(model)
    assert traced.graph.python_code("self").src == reference.graph.python_code("self").src
    torch.testing.assert_close(traced.graph_module()(x), model(x))


def test_split_wrap_registrations_finds_fx_wrap_lines():
    gm = torch.fx.symbolic_trace(_Wrapped())
    lines = gm.graph.python_code("self").src.splitlines()
    wraps, rest = fx_compat.split_wrap_registrations(lines)
    assert len(wraps) == 1 and "_wrapped_gate" in wraps[0]
    assert all('_wrapped_gate")' not in ln for ln in rest)


@torch.fx.wrap
def _wrapped_gate(x):
    return x * (x > 0)


class _Wrapped(nn.Module):
    def forward(self, x):
        return _wrapped_gate(x) + 1


def test_the_tracer_fast_node_path_builds_the_graph_fx_builds(monkeypatch):
    import torchvision

    model = torchvision.models.mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 64, 64)
    fast = T.trace_model(model, example_inputs=x)  # the shortcut, where fx_compat allows it
    monkeypatch.setattr(fx_compat, "FAST_GRAPH", False)
    slow = T.trace_model(model, example_inputs=x)  # Graph.create_node
    assert str(fast.graph) == str(slow.graph)
    assert fast.graph.python_code("self").src == slow.graph.python_code("self").src
    # the lookup table behind find_nodes is kept too
    leaves = [n.name for n in slow.graph.nodes if n.op == "call_module"]
    assert [n.name for n in fast.graph.find_nodes(op="call_module")] == leaves
    for node in slow.graph.nodes:
        if node.op in ("call_function", "call_method"):
            found = fast.graph.find_nodes(op=node.op, target=node.target)
            assert [n.name for n in found] == [
                n.name for n in slow.graph.find_nodes(op=node.op, target=node.target)
            ]
    gm = fast.graph_module()
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x))


class _TensorAttrNet(nn.Module):
    """A plain tensor attribute (not a buffer), a buffer, a shared submodule and tensors made in
    forward (fx reads buffers as concrete tensors: ``shift`` is an argument, its view a
    constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 8).view(1, 8, 1, 1))
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.ModuleDict({"a": nn.Conv2d(8, 3, 1)})
        self.again = self.head["a"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * self.scale + torch.ones(8).view(1, 8, 1, 1)
        y = self.block(torch.add(y, self.shift) + self.shift.flatten()[:, None, None])
        return self.again(y) + self.head["a"](y)


@pytest.mark.parametrize("case", ["tensor-attrs", "convnext", "vit"])
def test_the_tracer_fast_trace_builds_the_graph_fx_trace_builds(monkeypatch, case):
    """The tracer's own ``trace`` and parameter index give fx's graph (ConvNeXt reads its
    ``layer_scale`` parameters as attributes; ViT its class token and position embedding)."""
    import torchvision

    model: nn.Module
    if case == "tensor-attrs":
        model, x = _TensorAttrNet().eval(), torch.randn(1, 3, 8, 8)
    elif case == "convnext":
        model, x = torchvision.models.convnext_tiny().eval(), torch.randn(1, 3, 64, 64)
    else:
        model = torchvision.models.vit_b_32(image_size=64).eval()
        x = torch.randn(1, 3, 64, 64)
    fast = T.trace_model(model, example_inputs=x)  # the shortcut, where fx_compat allows it
    monkeypatch.setattr(fx_compat, "FAST_TRACE", False)

    def fx_getattr(self, attr, attr_val, cache):  # fx's parameter search, no index
        return (
            attr_val if self._evaluating else torch.fx.Tracer.getattr(self, attr, attr_val, cache)
        )

    monkeypatch.setattr(T._Tracer, "getattr", fx_getattr)
    monkeypatch.setattr(T._Tracer, "_tensor_arg", torch.fx.Tracer.create_arg)
    slow = T.trace_model(model, example_inputs=x)
    assert fast.graph.python_code("self").src == slow.graph.python_code("self").src
    assert [n.meta[T.META_KEY].scope for n in fast.graph.nodes] == [
        n.meta[T.META_KEY].scope for n in slow.graph.nodes
    ]
    # modules by path come from the structural copy
    for path, mod in fast.root.named_modules():
        assert fast.module(path) is mod
    torch.testing.assert_close(fast.graph_module()(x), model(x))
    if case == "tensor-attrs":
        targets = {n.target for n in fast.graph.nodes if n.op == "get_attr"}
        assert "scale" in targets  # found by the on-demand lookup, as fx's eager walk finds it
        assert "shift" in targets  # a buffer as an argument: named from the index
        assert any(str(t).startswith("_tensor_constant") for t in targets)
        result = testing.check_zero_removal(model, x)
        assert result.ok, result
