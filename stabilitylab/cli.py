"""Command-line interface: parses options, calls the library, turns errors into one line.

Exit status 0 on success, 2 for a user error (bad option, missing run directory, unusable
data), 1 for a run that failed while training, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stabilitylab.config import DATASETS, METHODS, MODELS, PRECISIONS, RunConfig, available_presets
from stabilitylab.errors import StabilityLabError, TrainingError

log = logging.getLogger("stabilitylab")

EXIT_USAGE = 2
EXIT_FAILED = 1


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: the problem and where to look."""

    commands: dict[str, Parser]

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """Parse a float option, rejecting values such as 1e400 that overflow to infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Option:
    """One ``run`` option that overrides the configuration field of the same name."""

    field: str
    help: str
    type: Any = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    flag: bool = False
    repeat: bool = False  # the option may be given several times; the values form a tuple
    name: str | None = None  # the flag, when it is not the field name with dashes

    @property
    def flag_name(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")


RUN_OPTIONS = (
    Option(
        "dataset",
        "training data: the bundled scikit-learn digits, or an ImageNet-style folder",
        choices=DATASETS,
    ),
    Option(
        "data_dir",
        "folder of the dataset; for imagefolder it holds train/ and val/ class folders",
        metavar="DIR",
    ),
    Option("method", "self-supervised method", choices=METHODS),
    Option(
        "model",
        "ViT size: vit_micro (64 wide, 4 blocks, for 16 px digits) or the recipe's "
        "vit_tiny, vit_small, vit_base at patch 16 and 224 px",
        choices=tuple(MODELS),
    ),
    Option(
        "img_size",
        "input image side in pixels; must be a multiple of the patch size (default: the model's)",
        type=int,
        metavar="PX",
    ),
    Option("patch_size", "patch side in pixels (default: the model's)", type=int, metavar="PX"),
    Option(
        "freeze_patch_embed",
        "keep the patch projection (weight and bias) at its random "
        "initialisation: the study's stabilising trick",
        flag=True,
    ),
    Option("epochs", "passes over the training split", type=int, metavar="N"),
    Option(
        "batch_size",
        "images per optimiser step over all processes; instability grows "
        "with it (the study's ViT-B shows dips at 4096)",
        type=int,
        metavar="N",
    ),
    Option(
        "lr",
        "base learning rate per 256 images; the peak lr is lr x batch / 256. The "
        "recipe uses 1.5e-4 and sees dips at 1.5e-4 with batch 4096",
        type=finite_float,
        metavar="LR",
    ),
    Option(
        "weight_decay", "AdamW decoupled weight decay coefficient", type=finite_float, metavar="WD"
    ),
    Option(
        "warmup_epochs",
        "epochs of linear lr warmup from 0 before the cosine decay to 0 (fractions allowed)",
        type=finite_float,
        metavar="E",
    ),
    Option(
        "momentum",
        "momentum-encoder EMA coefficient at step 0; it rises to 1 along a cosine",
        type=finite_float,
        metavar="M",
    ),
    Option(
        "temperature",
        "contrastive softmax temperature tau; the loss is scaled by 2 tau",
        type=finite_float,
        metavar="TAU",
    ),
    Option(
        "proj_hidden_dim", "hidden width of the projector and predictor MLPs", type=int, metavar="N"
    ),
    Option("proj_dim", "output width of the projector and predictor", type=int, metavar="N"),
    Option(
        "crop_min_scale",
        "smallest random-resized-crop area as a fraction of the image",
        type=finite_float,
        metavar="S",
    ),
    Option(
        "seed",
        "seed of model initialisation, data order and augmentation; both arms "
        "with one seed start from identical weights",
        type=int,
        metavar="N",
    ),
    Option(
        "eval_every",
        "optimiser steps between kNN evaluations; evaluate several times "
        "per epoch or dips can hide between evaluations",
        type=int,
        metavar="STEPS",
    ),
    Option("knn_k", "neighbours voting in the weighted kNN monitor", type=int, metavar="K"),
    Option(
        "knn_temperature",
        "temperature of the kNN vote weights exp(sim / T)",
        type=finite_float,
        metavar="T",
    ),
    Option(
        "knn_max_bank",
        "at most this many training images in the kNN feature bank "
        "(a fixed random subset beyond it)",
        type=int,
        metavar="N",
    ),
    Option(
        "knn_max_query",
        "at most this many validation images evaluated by the kNN monitor",
        type=int,
        metavar="N",
    ),
    Option(
        "flush_every",
        "optimiser steps kept in memory before they are written; a killed run loses at most these",
        type=int,
        metavar="STEPS",
    ),
    Option(
        "checkpoint_every",
        "optimiser steps between checkpoints (one is also written at the end)",
        type=int,
        metavar="STEPS",
    ),
    Option("device", "auto (CUDA when available), cpu, cuda or cuda:N", metavar="DEVICE"),
    Option(
        "precision",
        "fp32, bf16 autocast (CPU or CUDA) or fp16 autocast with gradient scaling (CUDA only)",
        choices=PRECISIONS,
    ),
    Option(
        "workers",
        "data-loading worker processes; 0 loads in the training process",
        type=int,
        metavar="N",
    ),
    Option(
        "inject_spikes",
        "plant a fault for validating the detectors: multiply the gradient of layer group "
        "LAYER (patch_embed, blocks.00, ..., projector) by FACTOR at optimiser step STEP, "
        "counted from 0; repeatable",
        metavar="STEP:LAYER:FACTOR",
        repeat=True,
        name="--inject-spike",
    ),
    Option(
        "lr_spikes",
        "plant a fault: multiply the learning rate of optimiser step STEP by FACTOR; repeatable",
        metavar="STEP:FACTOR",
        repeat=True,
        name="--lr-spike",
    ),
)


def _default_text(option: Option) -> str:
    value = getattr(_digits_defaults(), option.field)
    if option.flag or value is None:
        return ""
    return f" (digits preset: {value})"


def _digits_defaults() -> RunConfig:
    from stabilitylab.config import load_preset

    return RunConfig(**load_preset("digits"))


def _add_run_parser(subparsers: argparse._SubParsersAction) -> Parser:
    parser = subparsers.add_parser(
        "run",
        help="train one self-supervised run and record its stability signals",
        description="Train one self-supervised ViT run and record, at every optimiser step, "
        "the loss, lr, momentum and per-layer gradient norms, weight norms and "
        "update-to-weight ratios, plus a kNN monitor on the validation split. Options "
        "override the preset's values.",
    )
    parser.add_argument(
        "--out", required=True, metavar="RUN_DIR", help="new run directory to write"
    )
    parser.add_argument(
        "--preset",
        default="digits",
        choices=available_presets(),
        help="configuration to start from, a TOML file shipped with stabilitylab "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run directory at --out if one is there",
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    for option in RUN_OPTIONS:
        flag = option.flag_name
        if option.repeat:
            parser.add_argument(
                flag,
                action="append",
                dest=option.field,
                metavar=option.metavar,
                default=argparse.SUPPRESS,
                help=option.help,
            )
            continue
        if option.flag:
            parser.add_argument(
                flag, action="store_true", default=argparse.SUPPRESS, help=option.help
            )
            continue
        parser.add_argument(
            flag,
            type=option.type,
            choices=option.choices,
            metavar=option.metavar,
            default=argparse.SUPPRESS,
            help=option.help + _default_text(option),
        )
    return parser


def _add_report_parser(subparsers: argparse._SubParsersAction) -> Parser:
    parser = subparsers.add_parser(
        "report",
        help="write an HTML and Markdown report of one or more runs",
        description="Detect gradient spikes and kNN accuracy dips in one or more run "
        "directories (finished or killed mid-run) and write report.html (figures embedded, "
        "opens offline), report.md, PNG figures and events.json. Several runs are overlaid "
        "and compared; runs of one seed with learned and frozen patch projection are paired.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories written by stabilitylab run"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the report (default: RUN_DIR/report for one run, report/ beside the "
        "first run for several)",
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    return parser


def build_parser() -> Parser:
    parser = Parser(
        prog="stabilitylab",
        description="Find the quiet failures of self-supervised ViT training: train with "
        "per-layer monitoring, then report gradient spikes, accuracy dips and the learned "
        "against frozen patch projection comparison.",
    )
    from stabilitylab import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    parser.commands = {
        "run": _add_run_parser(subparsers),
        "report": _add_report_parser(subparsers),
    }
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: batch schedulers and ``timeout`` send it before a kill."""

    signal_number = signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _command_run(args: argparse.Namespace) -> int:
    from stabilitylab.config import build_config
    from stabilitylab.train.loop import run_training

    signal.signal(signal.SIGTERM, _raise_terminated)
    # Options the user did not pass are absent from args, so the preset's value stays.
    overrides = {}
    for option in RUN_OPTIONS:
        if hasattr(args, option.field):
            value = getattr(args, option.field)
            overrides[option.field] = tuple(value) if option.repeat else value
    config = build_config(args.preset, **overrides)
    result = run_training(config, args.out, overwrite=args.overwrite)
    print(
        f"{result.run_dir}: {result.steps} steps, kNN top-1 final {result.final_knn_top1:.2f}% "
        f"best {result.best_knn_top1:.2f}%"
    )
    return 0


def _command_report(args: argparse.Namespace) -> int:
    from stabilitylab.report import write_report

    folder = write_report(args.runs, args.out)
    print(f"report written to {folder / 'report.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Name the subcommand in the message, which the top-level parser would not.
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    _configure_logging(args.quiet)
    command = {"run": _command_run, "report": _command_report}[args.command]
    try:
        return command(args)
    except TrainingError as error:
        print(f"stabilitylab {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except StabilityLabError as error:
        print(f"stabilitylab {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        kept = "the metrics so far and a checkpoint are kept" if args.command == "run" else ""
        print(f"stabilitylab {args.command}: interrupted. {kept}".rstrip(), file=sys.stderr)
        return 128 + getattr(interrupt, "signal_number", signal.SIGINT)


def _one_line(error: Exception) -> str:
    # An error raised in a DataLoader worker is re-raised in the main process with the
    # worker's traceback in front of the original message, which is the last line.
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
