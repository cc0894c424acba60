"""The op table: how every module type and function treats channels.

One rule per single op, keyed by module type, function or tensor-method name (never by chains of
ops). A rule is a function ``rule(ctx) -> outputs`` over a
:class:`fxconet.passes.solve_channels.RuleContext`: it reads the per-dim layouts of its inputs,
relates them (``ctx.tie``), creates new widths (``ctx.produce``), freezes what it cannot handle
(``ctx.freeze``/``ctx.opaque``) and returns the per-dim layouts of its output. Rules for modules
with parameters also give an ``update`` function that sets the module's attributes
(``in_channels``, ``num_features`` ...) once its parameters have been resized.

Users extend the table with :func:`register_op`. A rule for a module with per-channel
parameters ties them to the channels and says how to update the module once resized::

    class ChannelScale(nn.Module):            # y = x * weight[None, :, None, None]
        def __init__(self, channels):
            super().__init__()
            self.channels = channels
            self.weight = nn.Parameter(torch.ones(channels))

    def channel_scale(ctx):
        dims = ctx.dims(ctx.arg(0))           # one layout per dim of the input
        ctx.tie(ctx.param("weight")[0], dims[1])
        ctx.layer("norm").notes["layouts"] = (dims[1],)
        return dims                           # the output has the input's channels

    def update(module, size_of, notes):
        module.channels = size_of(notes["layouts"][0])

    fxconet.register_op(ChannelScale, channel_scale, update=update)
    graph = fxconet.analyze(model, x, leaf_modules=[ChannelScale])

The table is a package by op family, each rule registered where it is defined:

* :mod:`~fxconet.ops.registry`: the table, :func:`register_op`, :func:`lookup`, :func:`scoped`;
* :mod:`~fxconet.ops.layout`: layouts (:class:`~fxconet.ops.layout.Block`) and shared helpers;
* :mod:`~fxconet.ops.elementwise`: activations, dropout, casts, arithmetic, softmax;
* :mod:`~fxconet.ops.layers`: convolutions, linear layers, embeddings (the width choosers);
* :mod:`~fxconet.ops.norms`: batch/layer/group norm, PReLU;
* :mod:`~fxconet.ops.spatial`: pooling, resampling, pixel shuffle, padding;
* :mod:`~fxconet.ops.indexing`: cat, stack, split, unbind, ``x[...]``;
* :mod:`~fxconet.ops.shapes`: view/reshape/flatten, permute/transpose, squeeze, expand, repeat;
* :mod:`~fxconet.ops.reductions`: reductions and size queries.

A target has one rule: registering another raises unless ``replace=True``; :func:`scoped`
undoes the registrations made inside it.
"""

from __future__ import annotations

from fxconet.ops import (  # noqa: F401  (each family registers its rules on import)
    elementwise,
    indexing,
    layers,
    norms,
    reductions,
    shapes,
    spatial,
)
from fxconet.ops.elementwise import elementwise as elementwise_rule
from fxconet.ops.elementwise import same, softmax
from fxconet.ops.registry import OpRule, lookup, register_op, registered_ops, scoped

__all__ = [
    "OpRule",
    "elementwise_rule",
    "lookup",
    "register_op",
    "registered_ops",
    "same",
    "scoped",
    "softmax",
]
