"""Benchmark fxconet.metrics against a per-layer EVBMF baseline, and the cost of tracking.

For each torchvision model (random weights, and weights with planted low-rank structure) this
times

* ``layer_metrics(model)`` (default mode: batched Gram eigenvalues in float64, global sigma2),
* ``layer_metrics(model, reference=True)`` (batched float32 SVD values, scipy-identical search),
* a straightforward baseline written the way the paper's code works: one layer and one unfolding
  at a time, a full float32 SVD (U, s, V) in numpy, sigma2 by
  ``scipy.optimize.minimize_scalar(method="bounded")`` with default options, ``try/except -> 0``,

and counts the layers whose two ranks agree with the baseline. It then trains a small CNN on
Fashion-MNIST for one epoch and times ``RankTracker.update()`` against that epoch.

Results go to ``benchmarks/results/metrics.json`` (resolved config + numbers) and a markdown table
to stdout and ``benchmarks/results/metrics.md``.

    python benchmarks/metrics.py                 # full run (a few minutes on 2 cores)
    python benchmarks/metrics.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_large"],
        help="torchvision model names to measure",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        default=["random", "planted"],
        choices=["random", "planted"],
        help="weight settings: default init, or Tucker low-rank structure plus noise",
    )
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads for every timing")
    p.add_argument("--repeats", type=int, default=5, help="fxconet timings: median of this many")
    p.add_argument(
        "--baseline-repeats", type=int, default=3, help="baseline timings: median of this many"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the planted structure and training")
    p.add_argument(
        "--planted-rank",
        type=float,
        nargs=2,
        default=[0.1, 0.5],
        metavar=("LOW", "HIGH"),
        help="planted rank per channel dim, as a fraction drawn uniformly from [LOW, HIGH]",
    )
    p.add_argument(
        "--fmnist-root",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the Fashion-MNIST *-idx?-ubyte.gz files",
    )
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--no-train", action="store_true", help="skip the tracking-overhead epoch")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: mobilenet_v3_large only, 1 repeat, 4096 training images",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=0,
        help="train on the first N images only (0 = the full 60k epoch)",
    )
    p.add_argument(
        "--out", default="benchmarks/results/metrics.json", help="where to write the JSON results"
    )
    p.add_argument(
        "--md", default="benchmarks/results/metrics.md", help="where to write the markdown table"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.baseline_repeats = ["mobilenet_v3_large"], 1, 1
        args.train_images = args.train_images or 4096
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # BLAS pools read these once, at import: set them before numpy / torch load.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from torch import nn  # noqa: E402

from fxconet.metrics import RankTracker, layer_metrics  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Weights


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """(path, module, in-channel dim, out-channel dim) of every conv / Linear, in module order."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out.append((path, m, 0, 1) if m.transposed else (path, m, 1, 0))
        elif isinstance(m, nn.Linear):
            out.append((path, m, 1, 0))
    return out


@torch.no_grad()
def plant(model: nn.Module, low: float, high: float, seed: int) -> None:
    """Replace every weight by a Tucker product (rank fraction in [low, high] per channel dim)
    plus Gaussian noise of the layer's init scale, so the unfoldings have a clear low rank."""
    gen = torch.Generator().manual_seed(seed)
    for _, m, in_dim, out_dim in conv_layers(model):
        w = m.weight
        shape = w.shape
        ranks = {}
        for d in (out_dim, in_dim):
            frac = low + (high - low) * float(torch.rand((), generator=gen))
            ranks[d] = max(1, round(frac * shape[d]))
        core = torch.randn([ranks.get(d, n) for d, n in enumerate(shape)], generator=gen)
        y = core
        for d in (out_dim, in_dim):
            basis, _ = torch.linalg.qr(torch.randn(shape[d], ranks[d], generator=gen))
            y = torch.tensordot(basis, y.movedim(d, 0), dims=1).movedim(0, d)
        noise = float(w.std()) or 1e-2
        fan = w.numel() / shape[out_dim]
        # Typical planted singular values ~4x the noise edge sigma (sqrt(rows) + sqrt(cols)).
        scale = 4 * noise * (math.sqrt(shape[out_dim]) + math.sqrt(fan))
        scale /= math.sqrt(y.numel() / ranks[out_dim])
        w.copy_(y * scale + noise * torch.randn(shape, generator=gen))


def convs_only(model: nn.Module) -> nn.Module:
    """The model's convs (depthwise included) in a plain container: the benchmark's layer set.

    ``layer_metrics`` needs no forward pass, so a ``ModuleDict`` of the convs is enough; the
    classifier ``Linear`` (1000 x ~1000, which the paper's code never measures) is left out of
    both sides.
    """
    return nn.ModuleDict(
        {
            path.replace(".", "/"): m
            for path, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd)
        }
    )


# ------------------------------------------------------------------------------------------------
# Baseline: the reference's way, one matrix at a time

TAU = 2.5129


def baseline_rank(y: np.ndarray) -> tuple[int, float]:
    """EVBMF rank and condition of one float32 matrix, as the paper's code computes them."""
    L, M = y.shape
    _, s, _ = np.linalg.svd(y, full_matrices=False)  # U, V computed and thrown away, as there
    s64 = s.astype(np.float64)
    alpha = L / M
    tau = TAU * np.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    h = int(np.min([np.ceil(L / (1 + alpha)) - 1, L])) - 1
    upper = np.float32(np.sum(s64**2) / (L * M))
    lower = np.float32(max(s64[h + 1] ** 2 / (M * x_bar), np.mean(s64[h + 1 :] ** 2) / M))
    k = len(s64)

    def objective(sig2: float) -> float:
        x = s64**2 / (M * sig2)
        big = x > x_bar
        z1, z2 = x[big], x[~big]
        t = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        return float(
            np.sum(z2 - np.log(z2))
            + np.sum(z1 - t)
            + np.sum(np.log((t + 1) / z1))
            + alpha * np.sum(np.log(t / alpha + 1))
            + (L - k) * np.log(sig2)
        )

    sig2 = minimize_scalar(objective, bounds=[lower, upper], method="Bounded").x
    threshold = np.sqrt(M * sig2 * (1 + tau) * (1 + alpha / tau))
    pos = int(np.sum(s64 > threshold))
    if pos == 0:
        return 0, 0.0
    d = (s64[:pos] / 2) * (
        1
        - (L + M) * sig2 / s64[:pos] ** 2
        + np.sqrt((1 - (L + M) * sig2 / s64[:pos] ** 2) ** 2 - 4 * L * M * sig2**2 / s64[:pos] ** 4)
    )
    return pos, float(d[0] / d[-1])


def baseline(model: nn.Module) -> list[tuple[str, float, float]]:
    """(path, in_rank, out_rank) per layer, one SVD at a time; failures -> 0 as in the paper."""
    out = []
    for path, m, in_dim, out_dim in conv_layers(model):
        w = m.weight.detach().cpu().float().numpy()
        ranks = []
        for d in (in_dim, out_dim):
            y = np.moveaxis(w, d, 0).reshape(w.shape[d], -1)
            try:
                ranks.append(baseline_rank(y)[0] / y.shape[0])
            except Exception:  # the reference's try/except: any failure reports 0
                ranks.append(0.0)
        out.append((path, ranks[0], ranks[1]))
    return out


# ------------------------------------------------------------------------------------------------
# Timing helpers


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def agree(metrics, base) -> dict[str, int]:
    """Layers (and unfoldings) whose ranks equal the baseline's; "tall" = unfoldings with more
    rows (channels) than columns, which the default mode transposes and the reference does not."""
    layers = unfold = tall = tall_agree = wide_agree = 0
    for m, (path, b_in, b_out) in zip(metrics, base, strict=True):
        assert m.path == path, (m.path, path)
        ok_in, ok_out = m.in_rank == b_in, m.out_rank == b_out
        layers += ok_in and ok_out
        unfold += ok_in + ok_out
        in_dim, out_dim = (0, 1) if m.kind == "conv_transpose" else (1, 0)
        size = math.prod(m.shape)
        for rows, ok in ((m.shape[in_dim], ok_in), (m.shape[out_dim], ok_out)):
            if rows * rows > size:  # rows > size / rows columns
                tall += 1
                tall_agree += ok
            else:
                wide_agree += ok
    return {
        "layers": len(base),
        "layers_agree": layers,
        "unfoldings": 2 * len(base),
        "unfoldings_agree": unfold,
        "tall_unfoldings": tall,
        "tall_agree": tall_agree,
        "wide_unfoldings": 2 * len(base) - tall,
        "wide_agree": wide_agree,
    }


# ------------------------------------------------------------------------------------------------
# Tracking overhead


def fashion_mnist(root: str, limit: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The training split as tensors: fxconet.data if it loads, else the idx files directly."""
    try:
        from fxconet.data import load_dataset

        ds = load_dataset("fashion-mnist", root=root, split="train")
        n = len(ds) if not limit else min(limit, len(ds))
        xs = torch.stack([ds[i][0] for i in range(n)])
        ys = torch.tensor([int(ds[i][1]) for i in range(n)])
        return xs, ys, "fxconet.data.load_dataset"
    except Exception as err:  # the loader is another helper's work; do not depend on it
        print(f"fxconet.data unavailable ({err!r}); reading the idx files", file=sys.stderr)

    def idx(name: str) -> np.ndarray:
        with gzip.open(Path(root) / name) as f:
            data = f.read()
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

    images = idx("train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = idx("train-labels-idx1-ubyte.gz").astype(np.int64)
    if limit:
        images, labels = images[:limit], labels[:limit]
    xs = torch.from_numpy((images - 0.2860) / 0.3530).unsqueeze(1)
    return xs, torch.from_numpy(labels), "idx files (numpy)"


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        nn.MaxPool2d(2),  # 14x14
        *block(32, 64),
        nn.MaxPool2d(2),  # 7x7
        *block(64, 128),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def tracking_overhead(args: argparse.Namespace) -> dict:
    xs, ys, source = fashion_mnist(args.fmnist_root, args.train_images)
    torch.manual_seed(args.seed)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    perm = torch.randperm(len(xs))
    model.train()
    t0 = time.perf_counter()
    total = 0.0
    for start in range(0, len(xs), args.batch_size):
        idx = perm[start : start + args.batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xs[idx]), ys[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    epoch = time.perf_counter() - t0
    out = {
        "data": source,
        "images": len(xs),
        "batch_size": args.batch_size,
        "epoch_s": epoch,
        "train_loss": total / len(xs),
        "layers": len(conv_layers(model)),
    }
    for reference in (False, True):
        tracker = RankTracker(model, reference=reference)
        t, _ = timed(tracker.update, max(args.repeats, 3))
        key = "reference" if reference else "default"
        out[f"update_s_{key}"] = t
        out[f"overhead_pct_{key}"] = 100.0 * t / epoch
        out[f"ranks_{key}"] = {p: float(tracker.series(p)[-1]) for p in tracker.paths}
    return out


# ------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    layer_metrics(torchvision.models.resnet18())  # warm up LAPACK / thread pools
    load_before = os.getloadavg()
    rows = []
    for name in args.models:
        for setting in args.weights:
            full = torchvision.models.get_model(name, weights=None).eval()
            if setting == "planted":
                plant(full, *args.planted_rank, seed=args.seed)
            t_full, _ = timed(lambda m=full: layer_metrics(m), args.repeats)
            model = convs_only(full)
            t_def, fx = timed(lambda m=model: layer_metrics(m), args.repeats)
            t_ref, fx_ref = timed(lambda m=model: layer_metrics(m, reference=True), args.repeats)
            t_base, base = timed(lambda m=model: baseline(m), args.baseline_repeats)
            row = {
                "model": name,
                "weights": setting,
                "layers": len(fx),
                "depthwise": sum(m.depthwise for m in fx),
                "fxconet_s": t_def,
                "fxconet_with_linear_s": t_full,
                "fxconet_reference_s": t_ref,
                "baseline_s": t_base,
                "speedup": t_base / t_def,
                "speedup_reference": t_base / t_ref,
                "agree_reference": agree(fx_ref, base),
                "agree_default": agree(fx, base),
                "mean_rank_default": float(np.mean([m.mean_rank for m in fx])),
                "mean_rank_baseline": float(np.mean([(b[1] + b[2]) / 2 for b in base])),
            }
            rows.append(row)
            print(
                f"{name:20s} {setting:8s} fxconet {t_def:7.3f}s  reference {t_ref:7.3f}s  "
                f"baseline {t_base:7.2f}s  x{row['speedup']:.1f}  agree(ref) "
                f"{row['agree_reference']['layers_agree']}/{len(fx)}",
                file=sys.stderr,
            )
    overhead = None if args.no_train else tracking_overhead(args)
    return {
        "config": {
            **vars(args),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "models": rows,
        "tracking": overhead,
    }


def table(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"## fxconet.metrics vs a per-layer baseline (threads={cfg['torch_threads']}, "
        f"torch {cfg['torch']}, load average before/after {cfg['loadavg_before'][0]:.1f}/"
        f"{cfg['loadavg_after'][0]:.1f})",
        "",
        "Every conv of each model (depthwise included, classifier excluded). Times are medians of "
        f"{cfg['repeats']} runs for fxconet, {cfg.get('baseline_repeats', 1)} for the baseline. "
        "*Agree* counts layers whose input and output ranks both equal the baseline's; *tall* = "
        "unfoldings with more rows than columns, which the default mode transposes and the "
        "paper's code does not; on wide ones the default differs from the paper's code only by "
        "its exact, global sigma2 search.",
        "",
    ]
    if cfg["loadavg_before"][0] > (cfg["cpu_count"] or 1):
        lines += [
            f"The machine ({cfg['cpu_count']} cores) was shared with other jobs during this run "
            "(load average above the core count): both sides slow down alike, but single runs "
            "vary by about 20%. With more threads than free cores, OpenMP/BLAS barriers stall "
            "on descheduled threads (a 64x576 SVD took 0.8 s instead of 1 ms here), so a busy "
            "machine is measured with --threads 1.",
            "",
        ]
    lines += [
        "| model | weights | convs (dw) | fxconet | baseline | speedup | fxconet reference "
        "| speedup | agree: reference mode | agree: default mode | default: wide / tall "
        "unfoldings agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        a, d = r["agree_reference"], r["agree_default"]
        cells = [
            r["model"],
            r["weights"],
            f"{r['layers']} ({r['depthwise']})",
            f"{r['fxconet_s']:.3f} s",
            f"{r['baseline_s']:.2f} s",
            f"**{r['speedup']:.1f}x**",
            f"{r['fxconet_reference_s']:.3f} s",
            f"{r['speedup_reference']:.1f}x",
            f"{a['layers_agree']}/{a['layers']}",
            f"{d['layers_agree']}/{d['layers']}",
            f"{d['wide_agree']}/{d['wide_unfoldings']} / {d['tall_agree']}/{d['tall_unfoldings']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    t = results["tracking"]
    if t:
        lines += [
            "",
            f"Tracking overhead: small CNN ({t['layers']} conv/linear layers) on Fashion-MNIST, "
            f"{t['images']} images, batch {t['batch_size']}: one epoch {t['epoch_s']:.1f} s; "
            f"`RankTracker.update()` {1000 * t['update_s_default']:.1f} ms "
            f"(**{t['overhead_pct_default']:.3f}%** of the epoch), reference mode "
            f"{1000 * t['update_s_reference']:.1f} ms ({t['overhead_pct_reference']:.3f}%). "
            f"Data: {t['data']}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    results = main(ARGS)
    text = table(results)
    print(text)
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(ARGS.md).write_text(text)
