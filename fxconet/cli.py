"""The ``fxconet`` command.

``fxconet analyze MODEL`` prints a model's channel groups; ``fxconet optimize MODEL --data NAME``
searches new widths (CONet by default) and prints a before/after table. Bad input ends with a
one-line error and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

_EPILOG = """examples:
  fxconet analyze resnet18
  fxconet optimize cifar_resnet20 --data digits --trials 5 --epochs-per-trial 3 --epochs 5
  fxconet optimize resnet18 --data fashion-mnist --method uniform --phi 0.5 --epochs 3
  fxconet optimize mypkg.nets:make_net --data imagefolder --data-dir ./images --out runs/mine
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"fxconet: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _delta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fxconet",
        description="Find and optimise the channel widths of a CNN (torch.fx, CONet).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from fxconet import __version__

    parser.add_argument("--version", action="version", version=f"fxconet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_and_data(p: argparse.ArgumentParser, data_required: bool) -> None:
        p.add_argument(
            "model",
            help="torchvision model name, cifar_resnet20/56/34, or package.module:callable",
        )
        p.add_argument(
            "--data",
            required=data_required,
            help="dataset: digits (embedded), fashion-mnist, cifar10, cifar100, imagefolder, fake",
        )
        p.add_argument("--data-dir", type=Path, help="dataset folder (default: the dataset's)")

    analyze = sub.add_parser("analyze", help="print the channel groups of a model")
    model_and_data(analyze, data_required=False)
    analyze.add_argument(
        "--input-size", type=_positive_int, help="input side (default: dataset's, or 224)"
    )
    analyze.add_argument(
        "--classes", type=_positive_int, help="classifier outputs (default: dataset's or 1000)"
    )

    opt = sub.add_parser("optimize", help="search new widths and train the result")
    model_and_data(opt, data_required=True)
    opt.add_argument(
        "--method",
        choices=("conet", "static", "uniform", "aps"),
        default="conet",
        help="conet (Alg. 2), static (Eq. 4 after a baseline training), uniform (x phi) or "
        "aps (affine parameter sharing search)",
    )
    opt.add_argument(
        "--delta", type=_delta, default=0.0075, help="CONet rank-slope threshold (0.0075)"
    )
    opt.add_argument("--trials", type=_positive_int, default=10, help="CONet trials (10)")
    opt.add_argument(
        "--epochs-per-trial", type=_positive_int, default=5, help="epochs per CONet trial (5)"
    )
    opt.add_argument(
        "--epochs",
        type=_non_negative_int,
        default=5,
        help="epochs to train the final model from scratch (5; 0 skips it)",
    )
    opt.add_argument(
        "--initial-width", type=_positive_int, help="start every free group at this width"
    )
    opt.add_argument(
        "--scale", type=_fraction, default=0.5, help="static scaling factor S of Eq. 4 (0.5)"
    )
    opt.add_argument("--phi", type=float, default=0.5, help="uniform scaling factor (0.5)")
    opt.add_argument(
        "--flops-target",
        type=_fraction,
        default=0.5,
        help="APS: target MACs as a fraction of the model's (0.5)",
    )
    opt.add_argument(
        "--sharing",
        choices=("ordinal", "independent", "transitionary"),
        default="transitionary",
        help="APS parameter sharing (transitionary)",
    )
    opt.add_argument("--warmup-epochs", type=_non_negative_int, help="APS supernet warm-up epochs")
    opt.add_argument("--search-epochs", type=_positive_int, help="APS search epochs")
    opt.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (0.1)")
    opt.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (128)")
    opt.add_argument("--max-batches", type=_positive_int, help="cap batches per epoch (demos)")
    opt.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    opt.add_argument(
        "--out", type=Path, help="output folder (default: runs/<model>-<data>-<method>)"
    )
    opt.add_argument("--resume", action="store_true", help="continue a killed search in --out")
    opt.add_argument("--seed", type=int, default=0, help="random seed (0)")
    opt.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _shape_for(args: argparse.Namespace) -> tuple[int, int, int, tuple[int, int]]:
    """(classes, channels, _, (H, W)) for the model from the dataset or the flags."""
    from fxconet.data import dataset_info

    if args.data:
        info = dataset_info(args.data, root=args.data_dir)
        return info.num_classes, info.in_channels, 0, info.image_size
    side = getattr(args, "input_size", None) or (32 if args.model.startswith("cifar_") else 224)
    classes = getattr(args, "classes", None) or (10 if args.model.startswith("cifar_") else 1000)
    return classes, 3, 0, (side, side)


def _analyze(args: argparse.Namespace) -> int:
    import torch

    import fxconet
    from fxconet.models import build_model

    classes, channels, _, size = _shape_for(args)
    if getattr(args, "input_size", None):
        size = (args.input_size, args.input_size)
    if getattr(args, "classes", None):
        classes = args.classes
    model = build_model(args.model, num_classes=classes, in_channels=channels, image_size=size)
    graph = fxconet.analyze(model.eval(), torch.zeros(1, channels, *size))
    print(graph)
    return 0


def _optimize(args: argparse.Namespace) -> int:
    import fxconet
    from fxconet.models import build_model

    classes, channels, _, size = _shape_for(args)
    model = build_model(args.model, num_classes=classes, in_channels=channels, image_size=size)
    out = args.out or Path("runs") / f"{args.model.replace(':', '_')}-{args.data}-{args.method}"
    options: dict[str, Any] = {
        "epochs": args.epochs,
        "out": out,
        "resume": args.resume,
        "seed": args.seed,
        "progress": not args.quiet,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "device": args.device,
        "max_batches_per_epoch": args.max_batches,
        "data_dir": args.data_dir,
        "log": lambda line: print(line, flush=True),
    }
    if args.method == "conet":
        options.update(delta=args.delta, trials=args.trials, epochs_per_trial=args.epochs_per_trial)
        if args.initial_width:
            options["initial_width"] = args.initial_width
    elif args.method == "static":
        options.update(scale=args.scale, baseline_epochs=args.epochs_per_trial)
    elif args.method == "aps":
        options.update(flops_target=args.flops_target, sharing=args.sharing)
        if args.warmup_epochs is not None:
            options["warmup_epochs"] = args.warmup_epochs
        if args.search_epochs is not None:
            options["search_epochs"] = args.search_epochs
    else:
        options.update(phi=args.phi)
    print(f"fxconet: {args.method} on {args.model} with {args.data}; output in {out}", flush=True)
    result = fxconet.optimize_channels(model, data=args.data, method=args.method, **options)
    print()
    print(result.table())
    print(f"\nreport: {result.report_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxconet`` command; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    from fxconet.errors import FxconetError

    try:
        if args.command == "analyze":
            return _analyze(args)
        return _optimize(args)
    except (FxconetError, ValueError, TypeError, FileNotFoundError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fxconet: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxconet: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
