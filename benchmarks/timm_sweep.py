"""timm beyond the test list: one small model of every architecture family, as given.

The check a new user would make on models nobody on the project wrote: for each model, built by
``timm.create_model(name, num_classes=10)`` with random weights in eval mode, ``fxconet.analyze``
with no options and the three checks of :mod:`fxconet.testing` (resizing to the same widths is
the identity, a random resize runs and keeps the output shapes, removing zeroed channels leaves
the output unchanged), the model left untouched. The input is the smallest of 64, 96 and 128
pixels the model runs at, else its configured size. Each model runs in its own process with a
time limit, and every result is appended to a JSON-lines file, so a killed sweep resumes.

Usage:
    python benchmarks/timm_sweep.py                     # ~100 models, 30-40 min on one core
    python benchmarks/timm_sweep.py --models resnet18d levit_128s --out /tmp/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: one small variant per timm family (CNNs first, then hybrids and vision transformers with convs)
MODELS = """
    bat_resnext26ts botnet26t_256 cs3darknet_s cspresnet50 darknet17 dla34 dla46x_c dpn48b
    ecaresnet26t ecaresnetlight ese_vovnet19b_dw fbnetc_100 fbnetv3_b gcresnet33ts gernet_s
    ghostnet_050 ghostnetv2_100 hardcorenas_a hgnet_tiny hgnetv2_b0 hrnet_w18_small
    inception_next_atto lambda_resnet26rpt_256 lcnet_035 mixnet_s mnasnet_050
    mobilenetv1_100 mobilenetv3_small_050 mobileone_s0 mobilevit_xxs mobilevitv2_050
    nf_resnet26 regnetx_002 regnety_002 regnetz_005 repghostnet_050 repvgg_a0 repvit_m0_9
    res2net50_14w_8s resnest14d resnet10t resnet18d resnet26t resnet32ts resnetaa34d
    resnetblur18 resnetrs50 resnetv2_18 rexnet_100 rexnetr_100 sebotnet33ts_256 sedarknet21
    sehalonet33ts selecsls42b semnasnet_050 seresnet18 skresnet18 spnasnet_100 starnet_s1
    tinynet_e visformer_tiny vovnet39a efficientvit_b0 efficientformer_l1 edgenext_xx_small
    fastvit_t8 convnextv2_atto poolformerv2_s12 pvt_v2_b0 levit_128s efficientvim_m1
    shvit_s1 swiftformer_xs tiny_vit_5m_224 lowformer_b0 mambaout_femto rdnet_tiny
    efficientnetv2_rw_t gc_efficientnetv2_rw_t tf_efficientnet_b0 resmlp_12_224
    coatnet_nano_rw_224 maxxvit_rmlp_nano_rw_256 halonet26t densenetblur121d tresnet_m
    xception41 dm_nfnet_f0 cs3edgenet_x csatv2 cspnext_s mobilenetv4_conv_small
    mobilenetv5_300m_enc ghostnetv3_050 fasternet_t0 nextvit_small convmixer_768_32
    mobilenet_edgetpu_v2_xs test_byobnet test_efficientnet test_convnext
""".split()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model (300)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "timm_sweep.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model
    return p.parse_args(argv)


def check_one(name: str) -> dict[str, Any]:
    """Analyse and check one model (in the child process)."""
    import timm
    import torch

    import fxconet
    from fxconet.testing import check_all

    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, pretrained=False).eval()
    row["params"] = sum(p.numel() for p in model.parameters())
    shape = None
    for s in (64, 96, 128, None):
        candidate = (1, 3, s, s) if s else (1, *model.pretrained_cfg["input_size"])
        try:
            with torch.no_grad():
                model(torch.randn(candidate))
        except Exception:
            continue
        shape = candidate
        break
    if shape is None:
        row["status"] = "skipped: the model does not run on its own"
        return row
    row["input"] = list(shape[1:])
    x = torch.randn(shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = fxconet.analyze(model, x)
        row["analyze_ms"] = 1e3 * (time.perf_counter() - started)
        row["groups"], row["free"] = len(graph.groups), len(graph.free)
        results = check_all(model, x)
    row["checks"] = {r.name: r.ok for r in results}
    untouched = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    row["untouched"] = untouched
    failed = [r.name for r in results if not r.ok] + ([] if untouched else ["untouched"])
    row["status"] = "pass" if not failed else "fail: " + ", ".join(failed)
    return row


def run_one(name: str, timeout: float) -> dict[str, Any]:
    """One model in a child process (a crash or a hang costs only that model)."""
    cmd = [sys.executable, __file__, "--one", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT ") :])
    tail = " ".join(done.stderr.strip().splitlines()[-1:])[:300]
    return {"model": name, "status": f"error: {tail}"}


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table and summary of the rows."""
    lines = [
        "| model | params | input | groups (free) | analyze ms | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        groups = f"{r['groups']} ({r['free']})" if "groups" in r else "-"
        size = "x".join(map(str, r.get("input", []))) or "-"
        ms = f"{r['analyze_ms']:.0f}" if "analyze_ms" in r else "-"
        params = f"{r['params'] / 1e6:.2f}M" if "params" in r else "-"
        lines.append(f"| {r['model']} | {params} | {size} | {groups} | {ms} | {r['status']} |")
    passed = sum(r["status"] == "pass" for r in rows)
    lines += [
        "",
        f"{passed} of {len(rows)} models pass as given (analysis, the three checks, "
        "the model untouched).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        try:
            row = check_one(args.one)
        except Exception as e:  # the error's first line, as a user would see it
            row = {"model": args.one, "status": f"error: {type(e).__name__}: {str(e)[:300]}"}
        print("RESULT " + json.dumps(row))
        return 0
    partial = args.out.with_suffix(".jsonl")
    done = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            done[row["model"]] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        if name in done:
            continue
        row = run_one(name, args.timeout)
        done[name] = row
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row['status']}", flush=True)
    rows = [done[n] for n in args.models if n in done]
    import timm
    import torch

    meta = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_at_end": list(os.getloadavg()),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = table(rows) + (
        f"\n\ntorch {meta['torch']}, timm {meta['timm']}, 1 thread per model, random weights, "
        "eval mode, batch 1.\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
