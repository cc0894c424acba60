"""Fingerprint what fxconet computes, to show that a refactoring leaves behaviour unchanged.

Two parts, each a canonical JSON value hashed per item:

* ``analysis``: ``fxconet.analyze`` of every torchvision classification model (the zoo settings
  of :func:`fxconet.testing.torchvision_case`): every group (id, size, divisor, frozen, reason,
  producers, consumers, layers, exact), every ``LayerInfo``, the notes and the first 50 tensors
  and edges of the DAG.
* ``search``: a CONet and an APS search on the embedded digits with a fixed seed: the widths and
  every history record, wall-clock fields left out.

Usage::

    python scripts/behaviour_fingerprint.py --write before.json       # on the old code
    python scripts/behaviour_fingerprint.py --compare before.json --write after.json

``--compare`` prints every item whose hash differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxconet
from fxconet import testing

_TIMING_KEYS = {"seconds", "search_seconds"}


def _canon(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 10)
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    return value


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(_canon(value), sort_keys=True).encode()).hexdigest()


def analysis_record(graph: fxconet.ChannelGraph) -> dict[str, Any]:
    """Everything ``analyze`` reports about a model, as plain JSON."""
    return {
        "groups": [
            [
                g.id,
                g.size,
                g.divisor,
                g.frozen,
                g.reason,
                list(g.producers),
                list(g.consumers),
                list(g.layers),
                g.exact,
            ]
            for g in graph.groups
        ],  # fmt: skip
        "layers": [
            [i.path, i.kind, list(i.in_groups), list(i.out_groups), i.params] for i in graph.layers
        ],
        "notes": list(graph.notes),
        "tensors": [
            [t.name, list(t.shape), t.channel_dim, list(t.groups)] for t in graph.tensors[:50]
        ],
        "edges": [[e.src, e.dst, e.op, e.kind] for e in graph.edges[:50]],
    }


def analysis_fingerprints(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        model, x = testing.torchvision_case(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fxconet.analyze(model, x)
        out[name] = _digest(analysis_record(graph))
        print(f"  {name}: {len(graph.groups)} groups", flush=True)
        del model, graph
    return out


def _strip(record: Any) -> Any:
    if isinstance(record, dict):
        return {k: _strip(v) for k, v in record.items() if k not in _TIMING_KEYS}
    if isinstance(record, list):
        return [_strip(v) for v in record]
    return record


def search_records() -> dict[str, Any]:
    """A short CONet and APS search on digits (seed 0), without wall-clock fields."""
    torch.set_num_threads(1)
    common = {"progress": False, "seed": 0, "max_batches_per_epoch": 4, "batch_size": 64}
    out = {}
    model = fxconet.models.cifar_resnet20(in_channels=1)
    conet = fxconet.optimize_channels(
        model, data="digits", method="conet", trials=3, epochs_per_trial=2, delta=0.04, **common
    )
    out["conet"] = {"widths": conet.widths, "history": _strip(list(conet.history))}
    aps = fxconet.optimize_channels(
        model, data="digits", method="aps", warmup_epochs=1, search_epochs=2, **common
    )
    out["aps"] = {
        "widths": aps.widths,
        "history": _strip(list(aps.history)),
        "top": aps.extra.get("top"),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the fingerprints to this JSON file")
    parser.add_argument("--compare", type=Path, help="compare with fingerprints in this file")
    parser.add_argument("--models", nargs="*", help="torchvision models (default: all)")
    parser.add_argument("--skip-search", action="store_true", help="analysis fingerprints only")
    args = parser.parse_args(argv)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "analysis": analysis_fingerprints(names),
    }
    if not args.skip_search:
        records = search_records()
        result["search"] = {k: _digest(v) for k, v in records.items()}
        result["search_records"] = _canon(records)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.write:
        args.write.write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare:
        old = json.loads(args.compare.read_text())
        bad = []
        for part in ("analysis", "search"):
            for key, digest in result.get(part, {}).items():
                if old.get(part, {}).get(key) != digest:
                    bad.append(f"{part}/{key}")
        compared = sum(len(result.get(p, {})) for p in ("analysis", "search"))
        if bad:
            print(f"{len(bad)} of {compared} fingerprints differ: {', '.join(bad)}")
            return 1
        print(f"all {compared} fingerprints identical to {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
