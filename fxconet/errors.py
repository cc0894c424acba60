"""Exceptions raised by fxconet.

Every exception derives from :class:`FxconetError` and from the built-in exception a user would
expect to catch (``ValueError`` for bad arguments, ``RuntimeError`` for things that went wrong
while running a model), so ``except ValueError`` keeps working in user code.
"""

from __future__ import annotations

__all__ = [
    "ChannelError",
    "DataError",
    "DistributedError",
    "ExportError",
    "FxconetError",
    "MetricsError",
    "ModelError",
    "SearchError",
    "ShapeError",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "first_line",
]


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class FxconetError(Exception):
    """Base class of every error raised by fxconet."""


class TraceError(FxconetError, RuntimeError):
    """The model could not be traced by ``torch.fx``.

    The message names the module path being traced, the reason, and how to work around it
    (``leaf_modules=`` to keep a module opaque, ``concrete_args=`` to fix a control-flow input).

    Attributes:
        module_path: where tracing failed: the path of the submodule whose code failed, ``""``
            for the traced module's own ``forward``, or ``None`` when the model was refused
            before tracing (parametrized layers, hooks on the root). ``analyze``'s opaque
            fallback reads it.
        reason: the failure alone, without the fix (``None`` for a refusal).
    """

    def __init__(
        self, message: str, *, module_path: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.reason = reason


class ShapeError(FxconetError, RuntimeError):
    """Shape propagation failed at a node (the example inputs do not fit the model)."""


class ChannelError(FxconetError, ValueError):
    """A requested width is invalid: frozen group, unknown id, width < 1 or not a multiple of the
    group's divisor."""


class UnsupportedOpError(FxconetError, TypeError):
    """A channel rule given to :func:`fxconet.register_op` is malformed."""


class VerificationError(FxconetError, RuntimeError):
    """A rewritten graph does not compute the shapes the channel analysis predicted.

    fxconet raises this instead of returning a graph that runs but computes wrong shapes.
    """


class DataError(FxconetError, ValueError):
    """A dataset name, folder or file is missing or malformed."""


class MetricsError(FxconetError, ValueError):
    """A weight, model or channel graph the metrics cannot be computed for."""


class ModelError(FxconetError, ValueError):
    """A model name or ``module:callable`` spec cannot be built; the message lists close matches."""


class SearchError(FxconetError, RuntimeError):
    """A search cannot start or resume (bad checkpoint folder, mismatched model)."""


class DistributedError(FxconetError, RuntimeError):
    """A collective of a ``torch.distributed`` job failed: another rank stopped (its output has
    the cause) or the network between the ranks broke."""


class ExportError(FxconetError, RuntimeError):
    """A model cannot be written in the requested form (the message says which part)."""
