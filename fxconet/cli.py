"""The ``fxconet`` command.

``fxconet analyze MODEL`` prints a model's channel groups; ``fxconet optimize MODEL --data NAME``
searches new widths (CONet by default) and prints a before/after table. Bad input ends with a
one-line error and exit status 2, never a traceback.

Every option of every method is a flag, derived from the method's config dataclass (its fields,
their types and the descriptions in its docstring): ``--delta`` is
:attr:`~fxconet.strategies.conet.ConetConfig.delta`, ``--flops-target``
:attr:`~fxconet.strategies.aps.ApsConfig.flops_target`. A flag that several methods share
(``--phi``) goes to the chosen ``--method``; a flag the chosen method does not take is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

_EPILOG = """examples:
  fxconet analyze resnet18
  fxconet optimize cifar_resnet20 --data digits --trials 5 --epochs-per-trial 3 --epochs 5
  fxconet optimize resnet18 --data fashion-mnist --method uniform --phi 0.5 --epochs 3
  fxconet optimize cifar_resnet20 --data digits --method aps --flops-target 0.5
  fxconet optimize mypkg.nets:make_net --data imagefolder --data-dir ./images --out runs/mine
"""

#: defaults of the command that differ from the API's: its models are built untrained, so
#: static scaling first trains a baseline to measure ranks on
_CLI_DEFAULTS: dict[str, dict[str, Any]] = {"static": {"baseline_epochs": 5}}


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


_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9}


def _size_target(text: str) -> float | int:
    """A budget: ``50%`` or ``0.5`` (a fraction of the model's), ``12M``, ``800k`` or
    ``1500000`` (an absolute count)."""
    t = text.strip().lower().replace("_", "")
    try:
        if t.endswith("%"):
            value: float | int = float(t[:-1]) / 100
        elif t[-1:] in _SUFFIX:
            value = int(round(float(t[:-1]) * _SUFFIX[t[-1]]))
        elif re.fullmatch(r"\d+", t):
            value = int(t)
        else:
            value = float(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"expected a fraction (0.5, 50%) or a count (12M, 800k), got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# flags from the methods' config dataclasses


def _alternatives(hint: Any) -> list[Any]:
    """The members of a union type hint (a plain type is a union of one)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)


def _parse(text: str, hint: Any) -> Any:
    """A flag's text as a value of the field's type hint: ``none``, booleans, ints, floats,
    strings, comma-separated sequences (``4,8,16``) and mappings (``0:32,1:64``)."""
    t = text.strip()
    options = _alternatives(hint)
    origins = {typing.get_origin(o) or o for o in options}
    if (type(None) in options or Any in options) and t.lower() in ("none", "null"):
        return None
    if bool in options:
        if t.lower() in ("true", "yes", "1", "on"):
            return True
        if t.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if (Mapping in origins or dict in origins or Any in options) and ":" in t:
        pairs = [part.split(":", 1) for part in t.split(",") if part]
        return {int(k): _parse(v.replace("/", ","), Any) for k, v in pairs}
    if (tuple in origins or list in origins or Any in options) and "," in t:
        return tuple(_number(part) for part in t.split(",") if part)
    if int in options and re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    if float in options or Any in options:
        try:
            return float(t) if float in options and int not in options else _number(t)
        except ValueError:
            if str not in options and Any not in options:
                raise
    if str in options or Any in options:
        return t
    raise ValueError(f"cannot read {text!r} as {hint}")


@dataclasses.dataclass
class _Flag:
    """One derived flag: the option it sets, the methods taking it, and how to read it."""

    option: str
    methods: dict[str, Any]  # method -> type hint of its field
    help: dict[str, str]  # method -> description

    def reader(self, method: str) -> Callable[[str], Any]:
        hint = self.methods[method]
        return lambda text: _parse(text, hint)


def _method_flags() -> dict[str, _Flag]:
    """Every option of every method as a flag (``--delta`` ...), by option name."""
    from fxconet.strategies import METHODS, option_docs

    flags: dict[str, _Flag] = {}
    for name, method in METHODS.items():
        cls = method.config_type
        hints = typing.get_type_hints(cls)
        docs = option_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name == "seed":
                continue
            flag = flags.setdefault(f.name, _Flag(f.name, {}, {}))
            flag.methods[name] = hints[f.name]
            default = _CLI_DEFAULTS.get(name, {}).get(f.name, f.default)
            flag.help[name] = f"{docs.get(f.name, '')} (default {default!r})"
    return flags


def _add_method_flags(parser: argparse.ArgumentParser, flags: Mapping[str, _Flag]) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in flags.values():
        methods = list(flag.methods)
        title = " and ".join(methods)
        group = groups.get(title)
        if group is None:
            group = groups[title] = parser.add_argument_group(f"options of --method {title}")
        text = " ".join(
            f"[{m}] {flag.help[m]}" if len(methods) > 1 else flag.help[m] for m in methods
        )
        group.add_argument(
            "--" + flag.option.replace("_", "-"),
            dest=f"method__{flag.option}",
            metavar="X",
            default=None,
            help=text.replace("``", "").replace("%", "%%"),
        )


def _method_options(
    args: argparse.Namespace, flags: Mapping[str, _Flag], parser: argparse.ArgumentParser
) -> dict[str, Any]:
    """The chosen method's options from the flags given (read with the field's type)."""
    options = dict(_CLI_DEFAULTS.get(args.method, {}))
    for name, flag in flags.items():
        text = getattr(args, f"method__{name}", None)
        if text is None:
            continue
        dashed = "--" + name.replace("_", "-")
        if args.method not in flag.methods:
            parser.error(
                f"{dashed} is an option of --method {', '.join(flag.methods)}, not {args.method}"
            )
        try:
            options[name] = flag.reader(args.method)(text)
        except ValueError as e:
            parser.error(f"{dashed}: {e}")
    return options


def _check_config(
    method: str, options: Mapping[str, Any], seed: int, parser: argparse.ArgumentParser
) -> None:
    """Build the method's config now, so a bad value fails before any model is built."""
    from fxconet.strategies import get_method

    try:
        get_method(method).make_config(options, seed=seed)
    except (TypeError, ValueError) as e:
        message = str(e).strip().splitlines()[0]
        field = re.match(r"\w+Config\.(\w+)=", message)
        where = f"--{field.group(1).replace('_', '-')}: " if field else ""
        parser.error(where + message)


# ---------------------------------------------------------------------------------------------


def _build_parser(
    flags: Mapping[str, _Flag],
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser and its ``optimize`` subparser."""
    from fxconet import __version__
    from fxconet.strategies import METHODS

    parser = _Parser(
        prog="fxconet",
        description="Find and optimise the channel widths of a CNN (torch.fx, CONet, APS).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        choices=tuple(METHODS),
        default=None,
        help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
        + " (default: greedy with --target-macs/--target-params, uniform scaling for an "
        "untrained model; else conet)",
    )
    opt.add_argument(
        "--epochs",
        type=_non_negative_int,
        default=5,
        help="epochs to train the final model from scratch (5; 0 skips it)",
    )
    opt.add_argument(
        "--target-macs",
        type=_size_target,
        help="the final model's MACs: a fraction of the model's (0.5, 50%%) or a count (12M); "
        "the method's widths are projected onto it (default: the method decides)",
    )
    opt.add_argument(
        "--target-params",
        type=_size_target,
        help="the final model's parameters, the same way (default: the method decides)",
    )
    opt.add_argument(
        "--budget-tolerance",
        type=float,
        default=0.02,
        help="how far the final cost may be from the target, as a fraction of it (0.02)",
    )
    opt.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (0.1)")
    opt.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (128)")
    opt.add_argument(
        "--max-batches",
        type=_positive_int,
        help="cap training batches per epoch (demos; validation and test data still run in full)",
    )
    opt.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    opt.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="mixed precision of the training: bf16 (CPU or GPU) or fp16 (CUDA, with a "
        "gradient scaler); default fp32",
    )
    opt.add_argument(
        "--channels-last", action="store_true", help="train in the channels_last memory format"
    )
    opt.add_argument(
        "--out", type=Path, help="output folder (default: runs/<model>-<data>-<method>)"
    )
    opt.add_argument("--resume", action="store_true", help="continue a killed search in --out")
    opt.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out holding an earlier search's checkpoints (deletes them)",
    )
    opt.add_argument("--seed", type=int, default=0, help="random seed (0)")
    opt.add_argument(
        "--weights",
        type=Path,
        help="start from these weights: a state dict saved with torch.save (read with "
        "weights_only=True, so no code runs); the default is a fresh initialisation",
    )
    opt.add_argument(
        "--save",
        choices=("safe", "pt2", "onnx", "none"),
        nargs="+",
        default=["safe", "pt2"],
        help="how to save the final model in --out, one or more of: safe (model/: data only, "
        "loads without running code from the files: fxconet.export.load_safe(path)), pt2 "
        "(torch.export, loads with plain PyTorch: torch.export.load(path).module(); trusted "
        "files only), onnx, none (default: safe pt2)",
    )
    opt.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_method_flags(opt, flags)
    return parser, opt


def _shape_for(args: argparse.Namespace) -> tuple[int, int, tuple[int, int]]:
    """(classes, channels, (H, W)) for the model from the dataset or the flags."""
    from fxconet.data import dataset_info

    if args.data:
        info = dataset_info(args.data, root=args.data_dir)
        return info.num_classes, info.in_channels, info.image_size
    side = getattr(args, "input_size", None) or (32 if args.model.startswith("cifar_") else 224)
    classes = getattr(args, "classes", None) or (10 if args.model.startswith("cifar_") else 1000)
    return classes, 3, (side, side)


def _analyze(args: argparse.Namespace) -> int:
    import torch

    import fxconet
    from fxconet.models import build_model

    classes, channels, size = _shape_for(args)
    if getattr(args, "input_size", None):
        size = (args.input_size, args.input_size)
    if getattr(args, "classes", None):
        classes = args.classes
    model = build_model(args.model, num_classes=classes, in_channels=channels, image_size=size)
    graph = fxconet.analyze(model.eval(), torch.zeros(1, channels, *size))
    print(graph)
    return 0


def _optimize(args: argparse.Namespace, method_options: Mapping[str, Any]) -> int:
    import torch
    from tqdm.auto import tqdm

    import fxconet
    from fxconet import distributed
    from fxconet.models import build_model

    distributed.init_from_env()  # under torchrun: one process per device, rank 0 writes
    main = distributed.is_main()
    classes, channels, size = _shape_for(args)
    torch.manual_seed(args.seed)  # the starting weights, and so the "before" accuracy, repeat
    model = build_model(args.model, num_classes=classes, in_channels=channels, image_size=size)
    if args.weights is not None:
        _load_weights(model, args.weights)
    out = args.out or Path("runs") / f"{args.model.replace(':', '_')}-{args.data}-{args.method}"
    options: dict[str, Any] = {
        "epochs": args.epochs,
        "out": out,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "seed": args.seed,
        "progress": not args.quiet,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "device": args.device,
        "max_batches_per_epoch": args.max_batches,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "data_dir": args.data_dir,
        "target_macs": args.target_macs,
        "target_params": args.target_params,
        "budget_tolerance": args.budget_tolerance,
        "log": tqdm.write,  # above the progress bars
        **method_options,
    }
    if main:
        job = f" ({distributed.world_size()} processes)" if distributed.is_distributed() else ""
        print(
            f"fxconet: {args.method} on {args.model} with {args.data}{job}; output in {out}",
            flush=True,
        )
    result = fxconet.optimize_channels(model, data=args.data, method=args.method, **options)
    if not main:
        return 0
    print()
    print(result.table())
    print(f"\nreport: {result.report_path}")
    saves = [] if "none" in args.save else list(dict.fromkeys(args.save))
    if saves:
        from fxconet import export

        x = torch.zeros(1, channels, *size)
        final = result.model.cpu()
    failed = 0
    for kind in saves:  # each format on its own: one that cannot hold the model loses no other
        try:
            if kind == "safe":
                path = export.save_safe(final, Path(out) / "model", example_inputs=x)
                how = "fxconet.export.load_safe(path); no code in the files runs"
            elif kind == "pt2":
                path = export.save_program(final, x, Path(out) / "model.pt2")
                how = "torch.export.load(path).module(), without fxconet"
            else:
                path = export.export_onnx(final.eval(), x, Path(out) / "model.onnx")
                how = "onnxruntime.InferenceSession(path)"
        except export.ExportError as e:
            failed += 1
            print(f"fxconet: error: --save {kind}: {e}", file=sys.stderr)
            continue
        print(f"model: {path} (load: {how})")
    return 1 if failed else 0


def _load_weights(model: Any, path: Path) -> None:
    """Load a state dict into the model (weights only: nothing in the file runs)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--weights {path}: no such file") from None
    except Exception as e:
        raise ValueError(
            f"--weights {path}: not a state dict readable with weights_only=True ({e})"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    fix = "(build the model with the same --data, so its input channels and classes match)"
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        shapes = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln][:1]
        raise ValueError(f"--weights {path} does not fit the model: {shapes} {fix}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"--weights {path} does not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]} {fix}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxconet`` command; returns the exit status."""
    flags = _method_flags()
    parser, optimize = _build_parser(flags)
    args = parser.parse_args(argv)
    from fxconet.errors import FxconetError, first_line

    method_options: dict[str, Any] = {}
    if args.command == "optimize":
        if args.method is None:
            from fxconet.optimize import default_method, default_method_options

            budget = args.target_macs is not None or args.target_params is not None
            args.method = default_method(has_data=True, has_budget=budget)
            method_options.update(default_method_options(args.method))
        method_options.update(_method_options(args, flags, optimize))
        _check_config(args.method, method_options, args.seed, optimize)
    try:
        if args.command == "analyze":
            return _analyze(args)
        return _optimize(args, method_options)
    except (FxconetError, ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"fxconet: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxconet: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
