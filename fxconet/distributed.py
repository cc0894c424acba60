"""Running fxconet inside a ``torchrun`` job (or any initialised ``torch.distributed`` group).

Under ``torchrun --nproc_per_node=N -m fxconet optimize ...`` every process runs the same search.
What keeps the ranks together:

* the built-in training loop (:func:`fxconet.train.train`) wraps the model in
  ``DistributedDataParallel`` and shards the data with a ``DistributedSampler`` (each rank
  ``batch_size / N`` examples a step: the global batch stays ``batch_size``), so every rank holds
  the same weights after every step (DDP also broadcasts BatchNorm statistics from rank 0);
* a method's decision (the widths) is made on every rank from those identical weights and then
  broadcast from rank 0 (:func:`broadcast_object`), so the ranks cannot end apart;
* only rank 0 writes checkpoints, the report, plots and the saved model, and only rank 0 shows
  progress; the other ranks wait at a barrier where a folder is prepared, and read the same
  checkpoints on ``--resume`` (one machine, or a shared filesystem).

:func:`init_from_env` starts the process group from torchrun's environment (``gloo`` on the CPU,
``nccl`` with CUDA, one device per local rank). Outside a job every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "all_sum",
    "average_gradients",
    "barrier",
    "broadcast_object",
    "collectives",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_device",
    "map_shards",
    "rank",
    "shard_batch",
    "user_code",
    "world_size",
]

T = TypeVar("T")
U = TypeVar("U")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a job)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 outside a job)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and outside a job): the process that writes files and shows progress."""
    return rank() == 0


#: words of the errors the gloo and NCCL backends raise when a peer is gone (some raise a plain
#: RuntimeError rather than a torch.distributed.DistError)
_PEER_LOST = ("gloo", "nccl", "connection reset", "connection closed", "connection refused",
              "broken pipe")  # fmt: skip


def _peer_lost(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _PEER_LOST)


@contextlib.contextmanager
def collectives(what: str | Callable[[], str]) -> Iterator[None]:
    """Turn a failed collective inside the block into a :class:`~fxconet.errors.DistributedError`
    that says which rank saw it, during what, and where to look (the other ranks' output).

    Without this a rank whose peer died ends in the backend's raw message (gloo: "Read error
    ... Connection reset by peer"). ``what`` may be a function, asked when the error happens
    (e.g. for the epoch and step). Outside a job the block runs as is.

    Example:
        >>> with collectives("the search's training"):
        ...     pass
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except Exception as e:
        if getattr(e, _USER_ERROR, False) or not _peer_lost(e):
            raise
        from fxconet.errors import DistributedError, first_line

        raise DistributedError(
            f"rank {rank()} of {world_size()}: a collective failed during "
            f"{what() if callable(what) else what}; another rank "
            f"probably stopped (its output names the cause) or the network between the ranks "
            f"broke. Backend: {first_line(e)[:300]}"
        ) from e


_USER_ERROR = "_fxconet_raised_by_user_code"


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """Run a caller's callback inside :func:`collectives`: what it raises reaches the caller
    as it is, never relabelled as a lost peer (its text may well say "connection reset").

    Example:
        >>> with user_code():
        ...     pass
    """
    try:
        yield
    except Exception as e:
        try:
            setattr(e, _USER_ERROR, True)
        except AttributeError:  # an exception type with __slots__
            pass
        raise


def barrier() -> None:
    """Wait for every rank (a no-op outside a job)."""
    if is_distributed():
        with collectives("a barrier"):
            dist.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable objects; returned as is outside a job).

    Example:
        >>> broadcast_object({1: 16})   # outside a job
        {1: 16}
    """
    if not is_distributed():
        return value
    box = [value]
    with collectives("a broadcast of rank 0's decision"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def map_shards(
    fn: Callable[[T], U], items: Sequence[T], what: str = "a sharded evaluation"
) -> list[U]:
    """``[fn(x) for x in items]``, split over the ranks: rank ``r`` computes items ``r, r + N,
    ...`` and every rank gets all the results, in order (the values of the rank that computed
    each). ``fn`` must be deterministic enough that it does not matter which rank ran it; its
    results must be picklable. Outside a job it is the plain loop.

    Example:
        >>> map_shards(lambda x: x * x, [1, 2, 3])   # outside a job
        [1, 4, 9]
    """
    if not is_distributed():
        return [fn(x) for x in items]
    me, world = rank(), world_size()
    with user_code():
        mine = [fn(x) for x in items[me::world]]
    parts: list[Any] = [None] * world
    with collectives(what):
        dist.all_gather_object(parts, mine)
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def shard_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's part of a global batch (the ``rank``-th of ``N`` near-equal slices along
    dim 0; every rank must hold the same batch, e.g. from one seeded loader). Outside a job
    the tensors as given.

    Example:
        >>> shard_batch(torch.arange(4))   # outside a job
        (tensor([0, 1, 2, 3]),)
    """
    if not is_distributed():
        return tensors
    r, n = rank(), world_size()
    return tuple(t.tensor_split(n)[r] for t in tensors)


def all_sum(values: Sequence[float], what: str = "a sum over the ranks") -> list[float]:
    """The sums over the ranks of a few numbers (each rank's ``values`` outside a job).

    Example:
        >>> all_sum([3.0, 4.0])   # outside a job
        [3.0, 4.0]
    """
    if not is_distributed():
        return [float(v) for v in values]
    device = local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    with collectives(what):
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def average_gradients(params: Sequence[torch.Tensor], count: int, what: str) -> None:
    """Replace every rank's gradients of ``params`` by their mean over the global batch,
    ``sum_r count_r * grad_r / sum_r count_r`` (``count``: this rank's examples, whose mean loss
    gave its gradients; a missing gradient counts as zero). A no-op outside a job.

    Example:
        >>> average_gradients(model_parameters, count=len(y), what="training")   # after backward
    """
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
    flat = torch.cat([flat * float(count), flat.new_tensor([float(count)])])
    with collectives(what):
        dist.all_reduce(flat)
    total = float(flat[-1])
    flat = flat[:-1] / max(total, 1.0)
    off = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(g).to(g.dtype)
        off += n


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Start the process group when the environment comes from ``torchrun`` (``WORLD_SIZE`` >
    1 and no group yet): ``nccl`` with CUDA, else ``gloo``. Returns True when a job runs.

    A rank that dies makes the others fail at their next collective (at once where its socket
    closes, after ``timeout_s`` seconds at most otherwise) with a
    :class:`~fxconet.errors.DistributedError` naming the rank and the step (see
    :func:`collectives`); torchrun then stops the job instead of waiting forever.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def describe() -> dict[str, Any]:
    """JSON-ready facts about the job for reports (``{"world_size": 1}`` outside one)."""
    if not is_distributed():
        return {"world_size": 1}
    return {"world_size": world_size(), "backend": str(dist.get_backend())}
