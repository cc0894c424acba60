"""Property test: random DAG CNNs are analysed and rewritten correctly.

Hypothesis draws networks made of convs (plain, depthwise, grouped), BatchNorm, activations,
residual adds, concatenations, squeeze-excitation, pooling, channel slicing and a flatten ->
Linear head. For every network: the identity resize reproduces the outputs, a random resize of
every free group runs and keeps the output shape, and removing zeroed channels is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxconet
from fxconet import testing


@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[int, ...]
    out: int = 0  # output channels for convs
    groups: int = 1


@dataclass
class Tensor:
    channels: int
    size: int


class RandomNet(nn.Module):
    """Interprets a list of ops; every op reads earlier tensors by index."""

    def __init__(self, ops: list[Op], in_channels: int, shapes: list[Tensor], head_flat: int):
        super().__init__()
        self.ops = ops
        self.layers = nn.ModuleDict()
        for i, op in enumerate(ops):
            cin = shapes[op.inputs[0]].channels
            if op.kind in ("conv", "grouped"):
                self.layers[str(i)] = nn.Sequential(
                    nn.Conv2d(cin, op.out, 3, padding=1, groups=op.groups),
                    nn.BatchNorm2d(op.out),
                    nn.ReLU(),
                )
            elif op.kind == "depthwise":
                self.layers[str(i)] = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
            elif op.kind == "se":
                self.layers[str(i)] = nn.ModuleList(
                    [nn.Conv2d(cin, max(1, cin // 2), 1), nn.Conv2d(max(1, cin // 2), cin, 1)]
                )
            elif op.kind == "project":  # 1x1 conv to match channels before an add
                self.layers[str(i)] = nn.Conv2d(cin, op.out, 1)
        self.head = nn.Linear(head_flat, 3)

    def forward(self, x):
        values = [x]
        for i, op in enumerate(self.ops):
            a = values[op.inputs[0]]
            if op.kind in ("conv", "grouped", "depthwise", "project"):
                y = self.layers[str(i)](a)
            elif op.kind == "se":
                fc1, fc2 = self.layers[str(i)]
                y = a * torch.sigmoid(fc2(F.relu(fc1(F.adaptive_avg_pool2d(a, 1)))))
            elif op.kind == "add":
                y = a + values[op.inputs[1]]
            elif op.kind == "cat":
                y = torch.cat([a, values[op.inputs[1]]], dim=1)
            elif op.kind == "pool":
                y = F.max_pool2d(a, 2)
            elif op.kind == "slice":
                y = a[:, : op.out]
            else:
                raise AssertionError(op.kind)
            values.append(y)
        return self.head(torch.flatten(values[-1], 1))


@st.composite
def networks(draw: st.DrawFn) -> tuple[RandomNet, torch.Tensor]:
    in_channels = draw(st.integers(1, 3))
    size = 4
    shapes = [Tensor(in_channels, size)]
    ops: list[Op] = []
    for _ in range(draw(st.integers(2, 9))):
        cur = len(shapes) - 1
        c, s = shapes[cur].channels, shapes[cur].size
        same = [i for i, t in enumerate(shapes[:-1]) if t.size == s and i > 0]
        kind = draw(
            st.sampled_from(
                ["conv", "conv", "grouped", "depthwise", "se", "add", "cat", "pool", "slice"]
            )
        )
        if kind == "conv" or (kind in ("depthwise", "se", "slice") and cur == 0):
            op = Op("conv", (cur,), out=draw(st.integers(2, 10)))
        elif kind == "grouped":
            g = draw(st.sampled_from([d for d in (2, 3, 4) if c % d == 0] or [1]))
            op = Op("grouped", (cur,), out=g * draw(st.integers(1, 4)), groups=g)
        elif kind in ("depthwise", "se"):
            op = Op(kind, (cur,))
        elif kind == "slice" and c >= 2:
            op = Op("slice", (cur,), out=draw(st.integers(1, c - 1)))
        elif kind in ("add", "cat") and same:
            other = draw(st.sampled_from(same))
            if kind == "add" and shapes[other].channels != c:
                ops.append(Op("project", (other,), out=c))
                shapes.append(Tensor(c, s))
                other = len(shapes) - 1
            op = Op(kind, (cur, other))
        elif kind == "pool" and s >= 2:
            op = Op("pool", (cur,))
        else:
            op = Op("conv", (cur,), out=draw(st.integers(2, 10)))
        ops.append(op)
        a = shapes[op.inputs[0]]
        if op.kind in ("conv", "grouped", "project"):
            shapes.append(Tensor(op.out, a.size))
        elif op.kind == "cat":
            shapes.append(Tensor(a.channels + shapes[op.inputs[1]].channels, a.size))
        elif op.kind == "pool":
            shapes.append(Tensor(a.channels, a.size // 2))
        elif op.kind == "slice":
            shapes.append(Tensor(op.out, a.size))
        else:
            shapes.append(Tensor(a.channels, a.size))
    last = shapes[-1]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = RandomNet(ops, in_channels, shapes, last.channels * last.size * last.size).eval()
    return net, torch.randn(2, in_channels, size, size)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(networks(), st.integers(0, 1000))
def test_random_networks_rewrite_correctly(case, seed):
    net, x = case
    graph = fxconet.analyze(net, x)
    # model inputs and outputs are fixed; everything produced inside is free unless a 1-channel
    # broadcast or an output ties it
    assert all(g.frozen for g in graph.groups if "head" in g.producers)
    for result in testing.check_all(net, x, seed=seed):
        assert result.ok, (result, net.ops)
