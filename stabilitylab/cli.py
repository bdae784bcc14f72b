"""Command-line interface: parses options, calls the library, turns errors into one line.

Exit status 0 on success, 2 for a user error (bad option, missing run directory, unusable
data), 1 for a run that failed while training, 130 when interrupted. A sweep exits 0 when
every run finished or diverged (a non-finite loss, recorded as a result of the grid), and 1
when a run failed for another reason, after the remaining runs and the report.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stabilitylab.config import (
    DATASETS,
    GRAD_CLIP_MODES,
    METHOD_DEFAULTS,
    METHODS,
    MODELS,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    POOLS,
    POS_EMBEDS,
    PRECISIONS,
    RunConfig,
    available_presets,
)
from stabilitylab.errors import ConfigError, PeerError, StabilityLabError, TrainingError
from stabilitylab.launch import TORCHRUN_OPTIONS_HINT, launched_rank_and_size, torchrun_command

log = logging.getLogger("stabilitylab")

EXIT_USAGE = 2
DEFAULT_PRESET = "digits"
EXIT_FAILED = 1
# The value argparse stores for --tensorboard given without a folder.
BARE_TENSORBOARD_FLAG = object()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: the problem and where to look."""

    commands: dict[str, Parser]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # An abbreviation such as --seed for --seeds would silently set another option.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
    # --NAME and --no-NAME set the field to True and False (argparse.BooleanOptionalAction).
    boolean: bool = False
    repeat: bool = False  # the option may be given several times; the values form a tuple
    name: str | None = None  # the flag, when it is not the field name with dashes

    @property
    def flag_name(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")


RUN_OPTIONS = (
    Option(
        "dataset",
        "training data: the bundled scikit-learn digits, CIFAR-10/100, MNIST or Fashion-MNIST "
        "in torchvision's layout, an ImageNet-style folder of class folders, or a NumPy .npz "
        "file (docs/datasets.md)",
        choices=DATASETS,
    ),
    Option(
        "data_dir",
        "where the dataset is: for imagefolder a folder with train/ and val/ class folders, "
        "for npz the .npz file, for CIFAR and MNIST torchvision's root folder, which contains "
        "cifar-10-batches-py/, cifar-100-python/, MNIST/raw/ or FashionMNIST/raw/",
        metavar="DIR",
    ),
    Option(
        "val_split",
        "for imagefolder and npz data without a validation split: the fraction of each class "
        "held out for validation, with a fixed seed (imagefolder: DIR is one tree of class "
        "folders)",
        type=finite_float,
        metavar="FRACTION",
    ),
    Option(
        "download",
        "fetch cifar10, cifar100, mnist or fashion-mnist into --data-dir with torchvision "
        "when it is missing there; without it nothing is downloaded",
        flag=True,
    ),
    Option(
        "skip_bad_images",
        "imagefolder: skip unreadable image files (empty, truncated, not an image) instead of "
        "stopping, and list them in RUN_DIR/skipped_images.json",
        flag=True,
    ),
    Option(
        "method",
        "self-supervised method: MoCo v3, SimCLR, BYOL, SwAV or DINO; each brings its own "
        "defaults for the method options below (docs/methods.md)",
        choices=METHODS,
    ),
    Option(
        "model",
        "ViT size: vit_micro (64 wide, 4 blocks, for 16 px digits) or the recipe's "
        "vit_tiny, vit_small, vit_base at patch 16 and 224 px",
        choices=tuple(MODELS),
    ),
    Option(
        "img_size",
        "input image side in pixels; must be a multiple of the patch size (default: 32 for "
        "CIFAR, 28 for MNIST and Fashion-MNIST, the arrays' own for npz, else the model's)",
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
        "weight_decay",
        "weight decay coefficient (decoupled for AdamW and LAMB)",
        type=finite_float,
        metavar="WD",
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
    Option("proj_layers", "linear layers in the projector MLP", type=int, metavar="N"),
    Option(
        "predictor",
        "MoCo v3 and BYOL: keep the online predictor MLP (--no-predictor: the queries are the "
        "projector outputs, the study's ablation)",
        boolean=True,
    ),
    Option(
        "head_bn",
        "BatchNorm in the projector and predictor (--no-head-bn: none, the study's ablation)",
        boolean=True,
    ),
    Option(
        "crop_min_scale",
        "smallest random-resized-crop area of the global views, as a fraction of the image",
        type=finite_float,
        metavar="S",
    ),
    Option(
        "pos_embed",
        "position embedding: fixed 2D sin-cos (MoCo v3), a learned table, or none",
        choices=POS_EMBEDS,
    ),
    Option(
        "pool",
        "backbone features: the class token after the final norm, or global average pooling "
        "of the patch tokens (no class token)",
        choices=POOLS,
    ),
    Option(
        "qk_norm",
        "LayerNorm of queries and keys in every attention layer (timm's qk_norm), a mitigation "
        "to compare with the frozen patch projection",
        boolean=True,
    ),
    Option(
        "drop_path",
        "stochastic depth of the online backbone: the drop rate of the last block, rising "
        "linearly from 0 at the first (timm's drop_path_rate; DINO: 0.1); target and teacher "
        "copies never drop",
        type=finite_float,
        metavar="RATE",
    ),
    Option(
        "optimizer",
        "timm optimiser: AdamW (the recipe), LAMB or LARS; weight decay applies to every "
        "trainable parameter",
        choices=OPTIMIZERS,
    ),
    Option(
        "weight_decay_end",
        "weight decay at the last step, reached along a cosine from --weight-decay (DINO: "
        "0.4); unset: constant",
        type=finite_float,
        metavar="WD",
    ),
    Option(
        "grad_clip",
        "clip the gradient norm to this value before the optimiser step, see "
        "--grad-clip-mode (the monitor records the norms before clipping); unset: no "
        "clipping",
        type=finite_float,
        metavar="NORM",
    ),
    Option(
        "grad_clip_mode",
        "what --grad-clip bounds: the norm of all gradients together, or each parameter "
        "tensor's own norm (DINO's clipping)",
        choices=GRAD_CLIP_MODES,
    ),
    Option(
        "num_prototypes",
        "SwAV: prototypes; DINO: output dimension of the head",
        type=int,
        metavar="K",
    ),
    Option(
        "freeze_last_layer_epochs",
        "SwAV and DINO: epochs during which the prototypes (DINO's last layer) get no gradient",
        type=finite_float,
        metavar="E",
    ),
    Option(
        "teacher_temperature",
        "DINO: teacher softmax temperature after its warmup",
        type=finite_float,
        metavar="TAU",
    ),
    Option(
        "teacher_temperature_warmup",
        "DINO: teacher temperature at step 0, raised linearly to --teacher-temperature",
        type=finite_float,
        metavar="TAU",
    ),
    Option(
        "teacher_temperature_warmup_epochs",
        "DINO: epochs of the linear teacher-temperature warmup",
        type=finite_float,
        metavar="E",
    ),
    Option(
        "center_momentum",
        "DINO: EMA coefficient of the centre subtracted from the teacher outputs",
        type=finite_float,
        metavar="M",
    ),
    Option(
        "norm_last_layer",
        "DINO: keep the weight norm of the last layer at 1 (--no-norm-last-layer: train it, "
        "as DINO's ViT-S/16 recipe does with --norm_last_layer false)",
        boolean=True,
    ),
    Option(
        "sinkhorn_iterations",
        "SwAV: Sinkhorn-Knopp iterations of the equipartitioned assignments",
        type=int,
        metavar="N",
    ),
    Option(
        "sinkhorn_epsilon",
        "SwAV: entropy regularisation epsilon of the assignments",
        type=finite_float,
        metavar="EPS",
    ),
    Option(
        "queue_length",
        "SwAV: earlier projections kept for the assignments, a multiple of --batch-size; 0 "
        "for no queue",
        type=int,
        metavar="N",
    ),
    Option(
        "queue_start_epochs",
        "SwAV: epochs before the queue is used",
        type=finite_float,
        metavar="E",
    ),
    Option(
        "local_crops",
        "SwAV and DINO multi-crop: small crops per image beside the two global views; 0 for none",
        type=int,
        metavar="N",
    ),
    Option(
        "local_crop_size",
        "side of the local crops in pixels, a multiple of the patch size (default: 96/224 of "
        "the image side)",
        type=int,
        metavar="PX",
    ),
    Option(
        "local_crop_min_scale",
        "smallest local-crop area as a fraction of the image",
        type=finite_float,
        metavar="S",
    ),
    Option(
        "local_crop_max_scale",
        "largest local-crop area as a fraction of the image",
        type=finite_float,
        metavar="S",
    ),
    Option(
        "attention_every",
        "optimiser steps between attention probes, which record each layer and head's "
        "attention entropy and maximum attention logit on a fixed batch; 0 turns them off",
        type=int,
        metavar="STEPS",
    ),
    Option(
        "attention_images",
        "validation images in the attention probes' fixed batch",
        type=int,
        metavar="N",
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
        "dense_knn_every",
        "optimiser steps between evaluations of the dense kNN monitor, which classifies the "
        "validation images against a queue of recent training features; 0 turns it off",
        type=int,
        metavar="STEPS",
    ),
    Option(
        "dense_knn_size",
        "features kept in the dense kNN queue, at least --knn-k and at most the training "
        "split (default: a tenth of the training split)",
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
        "optimiser steps between checkpoints (one is also written at the end, and at the step "
        "where SIGINT or SIGTERM stops the run)",
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
        "compile",
        "torch.compile each transformer block (the monitor's hooks stay outside the compiled "
        "code); the first steps pay the compilation",
        boolean=True,
    ),
    Option(
        "on_nonfinite",
        "at a step whose loss or gradient norm is NaN or infinite: stop the run there, keeping "
        "the last checkpoint from before it, or skip that optimiser step and continue",
        choices=NONFINITE_POLICIES,
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


# Fields whose default each method sets (config.METHOD_DEFAULTS).
_METHOD_SET = frozenset(key for values in METHOD_DEFAULTS.values() for key in values)


def _default_text(option: Option) -> str:
    if option.field in _METHOD_SET:
        return " (default: the method's; docs/methods.md)"
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
    parser.add_argument("--out", metavar="RUN_DIR", help="new run directory to write")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the stopped run in RUN_DIR from its last checkpoint, instead of --out; "
        "the run's configuration applies, and options passed with it may change only "
        "--device, --compile, --workers, --flush-every, --checkpoint-every, "
        "--keep-checkpoints-every, --tensorboard and --download (docs/resume.md)",
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=available_presets(),
        help="configuration to start from, a TOML file shipped with stabilitylab "
        f"(default: {DEFAULT_PRESET}; with --resume, the run's configuration)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run directory at --out if one is there",
    )
    parser.add_argument(
        "--keep-checkpoints-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also keep the checkpoint of every step that is a multiple of STEPS as "
        "RUN_DIR/checkpoint-NNNNNN.pt, beside checkpoint.pt, the last one (default: keep "
        "only the last; with --resume, the run's value)",
    )
    parser.add_argument(
        "--tensorboard",
        nargs="?",
        const=BARE_TENSORBOARD_FLAG,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="also write the loss, lr, gradient norms per layer, token gradient norm and kNN "
        "accuracy as TensorBoard scalars into DIR (default: RUN_DIR/tensorboard); needs the "
        "tensorboard package",
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    _add_run_options(parser)
    return parser


def _add_run_options(parser: Parser, skip: tuple[str, ...] = ()) -> None:
    """Add every option of RUN_OPTIONS except the fields in ``skip``."""
    for option in RUN_OPTIONS:
        if option.field in skip:
            continue
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
        if option.boolean:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=option.help + _default_text(option),
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
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories written by stabilitylab run, or one sweep folder written by "
        "stabilitylab sweep, which adds the sweep sections",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the report (default: RUN_DIR/report for one run, report/ beside the "
        "first run for several)",
    )
    _add_detector_options(parser.add_argument_group("detectors"))
    parser.add_argument(
        "--detectors",
        metavar="FILE",
        help="JSON file of detector parameters, as stabilitylab calibrate writes it; it sets "
        "every detector, so the other detector options cannot be combined with it",
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    return parser


def _add_calibrate_parser(subparsers: argparse._SubParsersAction) -> Parser:
    parser = subparsers.add_parser(
        "calibrate",
        help="choose spike thresholds that meet a false-alarm rate on healthy runs",
        description="Scan the z threshold of each spike rule on runs without instabilities, "
        "where every spike is a false alarm, and write the smallest thresholds (one for the "
        "gradient norms, one for the loss) whose false-alarm rate meets --target, as a "
        "detector file for stabilitylab report --detectors.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="healthy run directories, without planted faults"
    )
    parser.add_argument(
        "--target",
        type=finite_float,
        # stabilitylab.detect.calibrate.DEFAULT_TARGET_RATE, which is not imported here
        # because it loads pandas; a test checks that the two agree.
        default=0.5,
        metavar="RATE",
        help="highest false-alarm rate allowed, in spike events per 1,000 recorded steps, for "
        "the gradient norms and the loss each (default: %(default)s)",
    )
    parser.add_argument(
        "--rule",
        metavar="RULE",
        help="spike rule of the written parameters: robust, mean_std or ema; every rule is "
        "scanned and listed (default: the rule of --detectors, else robust)",
    )
    parser.add_argument(
        "--detectors",
        metavar="FILE",
        help="detector file whose other parameters (window, min_ratio, co-occurrence...) are "
        "kept (default: the built-in defaults)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="detector file to write (default: detectors.json beside the first run directory)",
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    return parser


def _add_detector_options(group: argparse._ArgumentGroup) -> None:
    # The defaults repeat those of stabilitylab.detect, which is not imported here because it
    # loads pandas, and a test checks that they agree.
    group.add_argument(
        "--spike-preset",
        default="robust",
        metavar="NAME",
        help="spike rule and thresholds for the loss and every gradient norm: robust (z of "
        "median and MAD over 100 values, z 4), olmo2 (mean + 7 sigma over 1000 values), "
        "olmo-core (mean + 6 sigma over 128 values) or zclip (EMA z 2.5, alpha 0.97), all on "
        "log values (default: %(default)s)",
    )
    group.add_argument(
        "--spike-z",
        type=finite_float,
        metavar="Z",
        help="spike threshold in standard deviations of the trailing baseline "
        "(default: the preset's)",
    )
    group.add_argument(
        "--spike-window",
        type=int,
        metavar="N",
        help="values in the trailing baseline window, which the EMA rule of zclip does not use "
        "(default: the preset's)",
    )
    group.add_argument(
        "--persistence",
        type=int,
        default=1,
        metavar="N",
        help="consecutive flagged values that a spike needs (default: %(default)s)",
    )
    group.add_argument(
        "--co-occurrence",
        type=int,
        default=1,
        metavar="N",
        help="keep a gradient spike only when at least N gradient series, itself included, "
        "spike within --co-window steps of it; 1 keeps every spike (default: %(default)s)",
    )
    group.add_argument(
        "--co-window",
        type=int,
        default=50,
        metavar="STEPS",
        help="steps between two spikes that still count as co-occurring (default: %(default)s)",
    )
    group.add_argument(
        "--dip-z",
        type=finite_float,
        default=3.0,
        metavar="Z",
        help="standard errors of the difference between the peak and the current evaluation "
        "that a kNN accuracy drop must exceed to be a dip; the margin is at least 1 point "
        "(default: %(default)s)",
    )


# Configuration fields that the sweep's own options set (--lr, --batch-size, --arms, --seeds),
# so their run options are left out of the sweep's pass-through options.
SWEPT_FIELDS = ("lr", "batch_size", "freeze_patch_embed", "seed")
SWEEP_ARMS = ("learned", "frozen", "both")


def _run_option(field: str) -> Option:
    return next(option for option in RUN_OPTIONS if option.field == field)


def _add_sweep_parser(subparsers: argparse._SubParsersAction) -> Parser:
    parser = subparsers.add_parser(
        "sweep",
        help="train a grid of runs over lr, batch size, arm and seed, then report it",
        description="Train one run per grid point (every --lr, --batch-size, arm and seed) one "
        "after another into SWEEP_DIR, then write the sweep report into SWEEP_DIR/report. "
        "Rerunning the same command resumes: finished runs are skipped and incomplete ones "
        "start again. Every other option is passed to each run as with stabilitylab run.",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="SWEEP_DIR",
        help="sweep folder: sweep.json, one run folder per grid point and report/",
    )
    parser.add_argument(
        "--preset",
        default="digits",
        choices=available_presets(),
        help="configuration every run starts from (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        dest="lrs",
        nargs="+",
        required=True,
        type=finite_float,
        metavar="LR",
        help=_run_option("lr").help + "; give several values to sweep them",
    )
    parser.add_argument(
        "--batch-size",
        dest="batch_sizes",
        nargs="+",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help=_run_option("batch_size").help + "; several values are swept (default: the preset's)",
    )
    parser.add_argument(
        "--arms",
        choices=SWEEP_ARMS,
        default="both",
        help="patch projection: learned, frozen at its random initialisation, or both, which "
        "trains each grid point twice (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help=_run_option("seed").help + "; several values are swept (default: the preset's)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="switch a sweep folder to a changed grid or changed shared options, and train "
        "again each run folder whose configuration differs from its grid point; finished "
        "runs that match the grid are kept",
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    _add_run_options(parser, skip=SWEPT_FIELDS)
    return parser


# stabilitylab.importers.FORMATS, which is not imported here because it loads pandas; a test
# checks that the two agree.
IMPORT_FORMATS = ("auto", "tensorboard", "lightning-csv", "wandb-csv")


def _add_import_parser(subparsers: argparse._SubParsersAction) -> Parser:
    parser = subparsers.add_parser(
        "import",
        help="turn a run logged by TensorBoard, Lightning's CSVLogger or wandb into a run "
        "directory",
        description="Read the scalars of a run trained with another tool and write a run "
        "directory that stabilitylab report reads. Columns are matched to signals by common "
        "names (train/loss, lr-AdamW, grad_2.0_norm/PARAMETER, val/knn_acc ...) and --map; "
        "signals without a column are NaN and listed in config.json, never guessed.",
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="a TensorBoard event file or folder, a Lightning metrics.csv or version_N "
        "folder, or a wandb CSV export",
    )
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="new run directory")
    parser.add_argument(
        "--format",
        choices=IMPORT_FORMATS,
        default="auto",
        help="format of SOURCE; auto tells it from the file names and CSV columns "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=SIGNAL",
        help="read SIGNAL (loss, lr, grad_norm, knn_top1, grad_norm[blocks.00] ...) from "
        "COLUMN, overriding the built-in names; COLUMN=step names a CSV step column, "
        "COLUMN=ignore skips a column, and knn_top1:fraction or knn_top1:percent sets an "
        "accuracy's unit (default: fraction when every value lies in [0, 1]); repeatable",
    )
    arm = parser.add_mutually_exclusive_group()
    arm.add_argument(
        "--frozen",
        dest="frozen",
        action="store_true",
        default=None,
        help="the run kept its patch projection frozen",
    )
    arm.add_argument(
        "--learned",
        dest="frozen",
        action="store_false",
        help="the run trained its patch projection (the default)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run directory at --out if one is there",
    )
    parser.add_argument(
        "--text-as-nan",
        action="store_true",
        help="read text cells (such as n/a) in a CSV column of numbers as missing values, "
        "with a warning that counts them; without it such a cell in an imported column is "
        "an error",
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
        "calibrate": _add_calibrate_parser(subparsers),
        "sweep": _add_sweep_parser(subparsers),
        "import": _add_import_parser(subparsers),
    }
    return parser


def _configure_logging(quiet: bool, rank: int = 0) -> None:
    # Under torchrun every process logs the same warnings, so ranks above 0 log errors only.
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=logging.ERROR if rank > 0 else level,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: batch schedulers and ``timeout`` send it before a kill."""

    signal_number = signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _run_overrides(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return the configuration values of the RUN_OPTIONS passed, except the fields in ``skip``."""
    # Options the user did not pass are absent from args, so the preset's value stays.
    overrides = {}
    for option in RUN_OPTIONS:
        if option.field not in skip and hasattr(args, option.field):
            value = getattr(args, option.field)
            overrides[option.field] = tuple(value) if option.repeat else value
    return overrides


def _check_run_target(args: argparse.Namespace) -> None:
    """Raise ConfigError unless exactly one of --out and --resume names the run directory."""
    if args.resume is None and args.out is None:
        raise ConfigError("pass --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    if args.resume is not None and args.out is not None:
        raise ConfigError(
            f"--resume {args.resume} names the run directory already, so drop --out {args.out}"
        )
    if args.resume is not None and args.overwrite:
        raise ConfigError(
            "--resume continues the run that is there, and --overwrite replaces it with a new "
            "run built from the preset and the options given, not from the run's config.json; "
            "pass one"
        )
    every = args.keep_checkpoints_every
    if every is not None and every < 0:
        raise ConfigError(
            f"--keep-checkpoints-every {every} is invalid: it must be 0 (keep only the last "
            "checkpoint) or a positive number of steps"
        )


def _command_run(args: argparse.Namespace) -> int:
    from stabilitylab.config import build_config
    from stabilitylab.train import distributed
    from stabilitylab.train.loop import run_training

    signal.signal(signal.SIGTERM, _raise_terminated)
    _check_run_target(args)
    overrides = _run_overrides(args)
    if hasattr(args, "tensorboard"):
        overrides["tensorboard"] = _tensorboard_folder(args.tensorboard)
    if args.resume is not None:
        from stabilitylab.train.resume import resume_training

        result = resume_training(
            args.resume,
            overrides,
            preset=args.preset,
            keep_checkpoints_every=args.keep_checkpoints_every,
        )
        if result.already_finished:
            if launched_rank_and_size()[0] > 0:
                return 0
            print(
                f"{result.run_dir}: the run finished already ({result.steps} steps, kNN top-1 "
                f"final {result.final_knn_top1:.2f}% best {result.best_knn_top1:.2f}%); "
                "nothing to resume"
            )
            return 0
    else:
        config = build_config(args.preset or DEFAULT_PRESET, **overrides)
        result = run_training(
            config,
            args.out,
            overwrite=args.overwrite,
            keep_checkpoints_every=args.keep_checkpoints_every or 0,
        )
    if distributed.current().is_main:
        print(
            f"{result.run_dir}: {result.steps} steps, kNN top-1 final "
            f"{result.final_knn_top1:.2f}% best {result.best_knn_top1:.2f}%"
        )
    return 0


def _tensorboard_folder(value: object) -> str:
    """Return the configuration value of --tensorboard.

    The bare flag gives the relative name that RunConfig takes inside the run directory,
    and a folder the user passed is made absolute, so it keeps meaning the same folder.
    """
    if value is BARE_TENSORBOARD_FLAG:
        return "tensorboard"  # stabilitylab.train.tensorboard.DEFAULT_DIR_NAME
    text = str(value)
    if not text.strip():
        return text  # rejected by the configuration check, which names the option
    return str(Path(text).resolve())


def _command_report(args: argparse.Namespace) -> int:
    from stabilitylab.detect.settings import build_detector_params
    from stabilitylab.report import write_report

    if args.detectors is not None:
        params = _detector_file_params(args)
    else:
        params = build_detector_params(
            spike_preset_name=args.spike_preset,
            spike_z=args.spike_z,
            spike_window=args.spike_window,
            persistence=args.persistence,
            co_occurrence=args.co_occurrence,
            co_window_steps=args.co_window,
            dip_z=args.dip_z,
        )
    folder = write_report(args.runs, args.out, params=params)
    print(f"report written to {folder / 'report.html'}")
    return 0


def _command_import(args: argparse.Namespace) -> int:
    from stabilitylab.importers import import_run

    result = import_run(
        args.source,
        args.out,
        format=args.format,
        mapping=args.map,
        frozen=args.frozen,
        overwrite=args.overwrite,
        text_as_nan=args.text_as_nan,
    )
    print(
        f"{result.run_dir}: imported {result.rows['steps']} steps and {result.rows['evals']} "
        f"evaluations from {args.source} ({result.format}); {len(result.missing)} signals have "
        "no column (derived.import.missing in config.json)"
    )
    return 0


def _detector_file_params(args: argparse.Namespace) -> Any:
    from stabilitylab.detect.params_file import read_detector_file

    # The report's "detectors" option group contains every option that sets a detector
    # parameter. An option left at its default cannot be distinguished from one passed
    # with that value, and both leave the file's parameters as they are.
    report = build_parser().commands["report"]
    group = next(group for group in report._action_groups if group.title == "detectors")
    overriding = [
        action.option_strings[0]
        for action in group._group_actions
        if getattr(args, action.dest, None) != report.get_default(action.dest)
    ]
    if overriding:
        raise ConfigError(
            f"--detectors sets every detector parameter, so {', '.join(overriding)} cannot be "
            "combined with it; edit the file or drop --detectors"
        )
    return read_detector_file(args.detectors)


def _command_calibrate(args: argparse.Namespace) -> int:
    from stabilitylab.detect.calibrate import (
        calibrate,
        calibration_summary,
        default_output,
        read_runs,
    )
    from stabilitylab.detect.params_file import (
        check_detector_output,
        read_detector_file,
        write_detector_file,
    )

    out = args.out if args.out is not None else default_output(args.runs)
    target = check_detector_output(out)
    base = read_detector_file(args.detectors) if args.detectors is not None else None
    runs = read_runs(args.runs)
    result = calibrate(runs, args.target, rule=args.rule, base=base)
    write_detector_file(target, result.params, result.to_dict())
    print(calibration_summary(result))
    print(f"detector parameters written to {target}")
    return 0


def _command_sweep(args: argparse.Namespace) -> int:
    from stabilitylab.config import load_preset
    from stabilitylab.sweep import build_manifest, make_grid, run_sweep

    signal.signal(signal.SIGTERM, _raise_terminated)
    preset = RunConfig(**load_preset(args.preset))
    grid = make_grid(
        args.lrs,
        getattr(args, "batch_sizes", [preset.batch_size]),
        args.arms,
        getattr(args, "seeds", [preset.seed]),
    )
    manifest = build_manifest(grid, args.preset, _run_overrides(args, skip=SWEPT_FIELDS))
    result = run_sweep(manifest, args.out, overwrite=args.overwrite)
    for entry in result.failed:
        print(f"stabilitylab sweep: {entry.name} failed: {entry.message}", file=sys.stderr)
    print(
        f"{result.out}: {len(result.outcomes)} runs, {result.count('finished')} trained, "
        f"{result.count('skipped')} finished earlier, {result.count('diverged')} diverged, "
        f"{len(result.failed)} failed; report written to "
        f"{result.report_dir / 'report.html' if result.report_dir else 'none'}"
    )
    return EXIT_FAILED if result.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Name the subcommand in the message, which the top-level parser would not.
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    # Under torchrun, rank 0 speaks for every process; the others log only warnings.
    rank, world_size = launched_rank_and_size()
    _configure_logging(args.quiet, rank)
    if args.command != "run" and world_size > 1:
        if rank == 0:
            print(
                f"stabilitylab {args.command}: error: only stabilitylab run trains on several "
                f"processes, but this one was started with WORLD_SIZE={world_size}; run "
                f"stabilitylab {args.command} without torchrun",
                file=sys.stderr,
            )
        return EXIT_USAGE
    command = {
        "run": _command_run,
        "report": _command_report,
        "calibrate": _command_calibrate,
        "sweep": _command_sweep,
        "import": _command_import,
    }[args.command]
    try:
        return command(args)
    except TrainingError as error:
        if rank == 0:
            print(f"stabilitylab {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except PeerError:
        return EXIT_USAGE  # rank 0 has printed the error
    except StabilityLabError as error:
        # Every process checks the same options and data, so rank 0 prints their errors.
        # An error about this process's own environment or GPU is printed by it.
        if rank == 0 or getattr(error, "process_specific", False):
            print(f"stabilitylab {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        if rank > 0:
            return 128 + getattr(interrupt, "signal_number", signal.SIGINT)
        kept = {
            "run": _resume_hint(interrupt),
            "sweep": "Rerun the same command to resume; finished runs are skipped",
        }.get(args.command, "")
        print(f"stabilitylab {args.command}: interrupted. {kept}".rstrip(), file=sys.stderr)
        return 128 + getattr(interrupt, "signal_number", signal.SIGINT)
    finally:
        if world_size > 1:
            # The command has reported its outcome. torchrun sends SIGTERM to the other
            # processes when one fails, which would otherwise raise in the exit handlers.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if "stabilitylab.train.distributed" in sys.modules:
            sys.modules["stabilitylab.train.distributed"].shutdown()


def _resume_hint(interrupt: KeyboardInterrupt) -> str:
    """Say where an interrupted run can be resumed from, with the attributes train_run sets."""
    run_dir = getattr(interrupt, "run_dir", None)
    if run_dir is None:
        return "Training had not started"
    step = getattr(interrupt, "checkpoint_step", None)
    command = f"stabilitylab run --resume {run_dir}"
    if launched_rank_and_size()[1] > 1:
        command = torchrun_command(f"run --resume {run_dir}") + TORCHRUN_OPTIONS_HINT
    if step is None:
        return (
            f"The metrics so far are kept in {run_dir}, but no checkpoint; {command} "
            "trains it again from the start"
        )
    return f"The metrics and a checkpoint at step {step} are kept; continue with {command}"


def _one_line(error: Exception) -> str:
    # An error raised in a DataLoader worker is re-raised in the main process with the
    # worker's traceback in front of the original message, which is the last line.
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
