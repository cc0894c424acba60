"""The checkpointed search skeleton shared by the iterative strategies (CONet, APS).

A search is a sequence of *steps* (CONet: trials; APS: epochs). After each step it writes a
checkpoint, so a killed search resumes where it stopped and ends exactly as an uninterrupted one:

* :class:`Checkpoints`: the output folder, one ``trial_NNN.json`` per step (the step's record,
  the strategy's state and the search's *signature*) plus optional ``trial_NNN.pt`` tensors;
  resuming refuses checkpoints written with another signature.
* :class:`Progress`: a progress bar over the steps and one log line per step, sent to the
  ``log`` callable (if any) and to the ``fxconet`` logger, written above the bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fxconet import distributed
from fxconet.errors import SearchError, first_line
from fxconet.report import write_json

__all__ = ["Checkpoints", "Progress", "Resumed", "logger", "search_signature"]

#: the library's logger: ``logging.getLogger("fxconet")``
logger = logging.getLogger("fxconet")


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint folder holds: every step's record and the last step's checkpoint.

    Attributes:
        records: the ``record`` of every finished step, in order.
        last: the last step's whole checkpoint (``step``, ``signature``, ``record``, ``state``,
            ``done``).
        next_step: the first step still to run.
    """

    records: list[dict[str, Any]]
    last: dict[str, Any]
    next_step: int

    @property
    def state(self) -> Any:
        """The strategy's state saved with the last step."""
        return self.last.get("state")

    @property
    def done(self) -> bool:
        """The search ended with the last step (e.g. every group converged)."""
        return bool(self.last.get("done"))


@dataclass
class Checkpoints:
    """The checkpoints of one search in ``out`` (nothing is written when ``out`` is None).

    Args:
        out: the output folder (created on first use).
        signature: everything that must be equal for a checkpoint to be resumed (model, groups,
            method and training settings, a fingerprint of the data), as JSON-ready values.
        keep_tensors: ``"all"`` keeps every step's ``.pt`` file; ``"last"`` only the newest
            (enough to resume; the JSON files keep the whole history).
        resume: the search will resume from ``out`` (see :meth:`load`).
        overwrite: a fresh search (not ``resume``) may delete the checkpoints of an earlier
            search in ``out`` (only the files a search writes); without it, a fresh search
            refuses a folder that holds checkpoints, so two runs are never mixed.

    Example:
        >>> ckpt = Checkpoints(Path("runs/x"), {"model": "Net"})
        >>> ckpt.save(0, {"loss": 1.0}, state={"width": 32})
        >>> ckpt.load().next_step
        1
    """

    out: Path | None
    signature: Mapping[str, Any]
    keep_tensors: str = "all"
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.keep_tensors not in ("all", "last"):
            raise ValueError(f"keep_tensors={self.keep_tensors!r}: 'all' or 'last'")
        if self.out is None:
            return
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise SearchError(f"--out {self.out} is a file; give a folder for the checkpoints")
        self.out.mkdir(parents=True, exist_ok=True)
        written = self.written()
        if self.resume and written and all(_leftover_of_first_step(p) for p in written):
            # killed before the first step's JSON confirmed it: nothing finished to resume, and
            # the files are this search's own partial writes
            logger.warning(
                "%s holds no finished step (only %s, left by a kill during the first step): "
                "starting from the first step",
                self.out,
                ", ".join(p.name for p in written),
            )
            if distributed.is_main():
                for path in written:
                    path.unlink()
            self.resume, written = False, []
        if written and not self.resume:
            if not self.overwrite:
                raise SearchError(
                    f"{self.out} holds the checkpoints of an earlier search ({written[0].name} "
                    f"and {len(written) - 1} more); continue it with resume=True (--resume), "
                    "start over with overwrite=True (--overwrite), or use another folder"
                )
            if distributed.is_main():  # under torchrun every rank decided the same above
                for path in written:
                    path.unlink()
        distributed.barrier()  # no rank reads the folder before rank 0 prepared it

    def written(self) -> list[Path]:
        """The files in ``out`` that a search writes (checkpoints and its final stages)."""
        if self.out is None:
            return []
        names = ("trial_*.json", "trial_*.pt", "trial_*.tmp", "pick.json")
        return sorted({p for pattern in names for p in self.out.glob(pattern)})

    def json_path(self, step: int) -> Path:
        """The checkpoint file of ``step``."""
        assert self.out is not None
        return self.out / f"trial_{step:03d}.json"

    def tensor_path(self, step: int) -> Path:
        """The tensor file of ``step``."""
        return self.json_path(step).with_suffix(".pt")

    def load(self) -> Resumed:
        """The checkpoints in ``out``, checked against the signature.

        Raises:
            SearchError: no checkpoint, or the last one was written for another signature.
        """
        files = sorted(self.out.glob("trial_*.json")) if self.out is not None else []
        if not files:
            raise SearchError(f"nothing to resume: no trial_*.json in {self.out}")
        found = [_read_checkpoint(f) for f in files]
        last = found[-1]
        if last.get("signature") != _json_ready(self.signature):
            raise SearchError(
                f"{files[-1]} was written for another model or search configuration; "
                "use a new --out folder or the same settings"
            )
        for i, (path, data) in enumerate(zip(files, found, strict=True)):
            if data["trial"] != i:
                raise SearchError(
                    f"cannot resume from {self.out}: {path.name} is trial {data['trial']}, "
                    f"expected trial {i} (a checkpoint is missing or was renamed); "
                    f"{_FRESH_START}"
                )
        records = [data["record"] for data in found]
        return Resumed(records=records, last=last, next_step=len(found))

    def load_tensors(self, step: int) -> Any:
        """The tensors saved with ``step`` (``torch.load(weights_only=True)``).

        Raises:
            SearchError: the file is missing.
        """
        path = self.tensor_path(step)
        if not path.is_file():
            raise SearchError(f"cannot resume: {path} is missing; {_FRESH_START}")
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # truncated or foreign files fail in torch's own ways
            raise SearchError(
                f"cannot resume: {path} is damaged ({type(e).__name__}: {first_line(e)[:200]}); "
                f"{_FRESH_START}"
            ) from e

    def save(
        self,
        step: int,
        record: Mapping[str, Any],
        *,
        state: Any = None,
        tensors: Any = None,
        done: bool = False,
    ) -> None:
        """Write the checkpoint of ``step``: its tensors first (atomically), then the JSON that
        makes the step count as finished."""
        if self.out is None or not distributed.is_main():
            return
        if tensors is not None:
            path = self.tensor_path(step)
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.save(tensors, tmp)
            os.replace(tmp, path)
        payload: dict[str, Any] = {"trial": step, "signature": _json_ready(self.signature)}
        if state is not None:
            payload["state"] = state
        payload["record"] = record
        payload["done"] = done
        write_json(self.json_path(step), payload)
        if self.keep_tensors == "last" and step > 0:
            previous = self.tensor_path(step - 1)
            if previous.is_file():
                previous.unlink()

    def save_final(self, name: str, payload: Mapping[str, Any]) -> None:
        """Write the result of a search's last stage (``name.json``: APS's final pick), so a
        resumed search that reaches it again reads it instead of recomputing it."""
        if self.out is None or not distributed.is_main():
            return
        write_json(
            self.out / f"{name}.json",
            {"signature": _json_ready(self.signature), "payload": _json_ready(payload)},
        )

    def load_final(self, name: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """The payload of :meth:`save_final` when it was written by this search with the same
        ``settings`` (under the payload's ``"settings"``), else None."""
        if self.out is None:
            return None
        path = self.out / f"{name}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: compute it again
        payload = data.get("payload") or {}
        if data.get("signature") != _json_ready(self.signature):
            return None
        if payload.get("settings") != _json_ready(settings):
            return None
        return dict(payload)


@contextlib.contextmanager
def restoring(out: Path | None) -> Iterator[None]:
    """Turn a failure while restoring a search's state from ``out`` into a SearchError that
    names the folder and the fix (the files passed the signature check but hold other data)."""
    try:
        yield
    except SearchError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise SearchError(
            f"cannot resume from {out}: its checkpoints do not hold this search's state "
            f"({type(e).__name__}: {e}); {_FRESH_START}"
        ) from e


def _leftover_of_first_step(path: Path) -> bool:
    """A file the first step writes before its JSON: its tensors or a half-written file."""
    return path.name == "trial_000.pt" or path.name.endswith(".tmp")


_FRESH_START = "start the search afresh with --overwrite (overwrite=True) or in a new --out folder"


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """One ``trial_NNN.json``, checked for the fields a resume reads."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SearchError(f"cannot resume: {path} is damaged ({e}); {_FRESH_START}") from e
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("trial"), int)
        or not isinstance(data.get("record"), dict)
        or "signature" not in data
    ):
        raise SearchError(
            f"cannot resume: {path} is not an fxconet checkpoint (it lacks the trial, record "
            f"or signature field); {_FRESH_START}"
        )
    return data


def search_signature(
    model: Any,
    graph: Any,
    config: Mapping[str, Any],
    train_config: Any,
    *,
    train_data: Any = None,
    val_data: Any = None,
    train_fn: Any = None,
) -> dict[str, Any]:
    """What a search's result depends on, for its checkpoints: the model's class and channel
    groups, the method's settings, the training settings (the device and worker count aside),
    fingerprints of the training and validation data, and the user's training loop by name."""
    from fxconet.data import data_fingerprint

    train = {
        k: v
        for k, v in train_config.to_dict().items()
        if k not in ("device", "epochs", "num_workers")
    }
    return {
        "model": type(model).__name__,
        "groups": [[g.id, g.size, g.divisor, g.frozen] for g in graph.groups],
        "config": dict(config),
        "train": train,
        "data": {"train": data_fingerprint(train_data), "val": data_fingerprint(val_data)},
        "train_fn": None if train_fn is None else getattr(train_fn, "__qualname__", "callable"),
    }


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


class Progress:
    """A progress bar over a search's steps and its log lines.

    Args:
        desc: the bar's label.
        total: number of steps (None: not known in advance).
        initial: steps already done (resumed).
        enabled: show the bar.
        log: also receives every log line (the CLI prints them).
        unit: the bar's unit.
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        initial: int = 0,
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
        unit: str = "trial",
    ) -> None:
        main = distributed.is_main()  # under torchrun only rank 0 shows progress
        self._bar = tqdm(
            total=total, initial=initial, desc=desc, disable=not (enabled and main), unit=unit
        )
        self._log = log if main else None

    def log(self, line: str) -> None:
        """One line about the search: to ``log``, and to the ``fxconet`` logger (rank 0)."""
        if not distributed.is_main():
            return
        logger.info(line)
        if self._log is not None:
            self._log(line)

    def step(self) -> None:
        """One more step done."""
        self._bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
