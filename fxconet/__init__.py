"""fxconet: choose the channel widths of any CNN with torch.fx.

The public API:

* :func:`analyze` -> :class:`ChannelGraph`: the independent channel groups of a model.
* :func:`resize`: re-emit a model with new widths as a verified ``torch.fx.GraphModule``.
* :func:`optimize_channels`: search new widths (CONet, APS, static, uniform) and train them.
* :func:`register_op`: teach the analysis a module type or function of your own.
"""

__version__ = "0.1.0"

from fxconet import ops  # noqa: E402  (the op table must exist before the passes use it)
from fxconet.api import analyze, kept_channels, resize  # noqa: E402
from fxconet.errors import (  # noqa: E402
    ChannelError,
    DataError,
    ExportError,
    FxconetError,
    SearchError,
    ShapeError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from fxconet.ir import ChannelGraph, ChannelGroup, LayerInfo  # noqa: E402
from fxconet.ops import register_op  # noqa: E402
from fxconet.optimize import OptimizeResult, optimize_channels  # noqa: E402

__all__ = [
    "ChannelError",
    "ChannelGraph",
    "ChannelGroup",
    "DataError",
    "ExportError",
    "FxconetError",
    "LayerInfo",
    "OptimizeResult",
    "SearchError",
    "ShapeError",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "__version__",
    "analyze",
    "kept_channels",
    "optimize_channels",
    "ops",
    "register_op",
    "resize",
]

_SUBMODULES = (
    "cost",
    "data",
    "export",
    "metrics",
    "models",
    "passes",
    "report",
    "strategies",
    "testing",
    "train",
)


def __getattr__(name: str):  # lazy submodules: `fxconet.metrics` without importing scipy up front
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"fxconet.{name}")
    raise AttributeError(f"module 'fxconet' has no attribute {name!r}")
