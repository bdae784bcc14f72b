"""The run configuration: one frozen, validated record, built from a preset plus overrides.

Presets are TOML files shipped in ``stabilitylab/presets``; the values a user passes on the
command line (or to :func:`build_config`) override the preset's. Values that follow from the
configuration, such as the lr after batch scaling, are computed by :func:`derive` under their
own names instead of overwriting fields.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from stabilitylab.errors import ConfigError

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "npz")
# The image side of the datasets whose images all have one size: without --img-size a run
# uses it, whatever the model preset's 224 px. npz files give theirs with the arrays.
DATASET_IMG_SIZES = {"cifar10": 32, "cifar100": 32, "mnist": 28, "fashion-mnist": 28}
# Datasets that --download can fetch (through torchvision) and --val-split can split.
DOWNLOADABLE = ("cifar10", "cifar100", "mnist", "fashion-mnist")
SPLITTABLE = ("imagefolder", "npz")
METHODS = ("mocov3", "simclr", "byol", "swav", "dino")
POS_EMBEDS = ("sincos", "learned", "none")
POOLS = ("cls", "gap")
OPTIMIZERS = ("adamw", "lamb", "lars")
# At most this many local crops per image (see _validate_method_knobs).
MAX_LOCAL_CROPS = 32
# Gradient clipping: the norm of all gradients together (torch's clip_grad_norm_), or each
# parameter tensor's own norm (DINO's clip_gradients).
GRAD_CLIP_MODES = ("total", "parameter")
PRECISIONS = ("fp32", "bf16", "fp16")
# Policies at a step whose loss or gradient norm is NaN or infinite: stop the run or skip it.
NONFINITE_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one ViT size preset."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    mlp_ratio: float = 4.0


# ViT-S and ViT-B follow MoCo v3 (12 heads for ViT-S, unlike DeiT's 6); ViT-Ti follows DeiT.
# vit_micro is the CPU-sized default for the bundled 8x8 digits, upsampled to 16 px.
MODELS: dict[str, ModelSpec] = {
    "vit_micro": ModelSpec(embed_dim=64, depth=4, num_heads=4, patch_size=4, img_size=16),
    "vit_tiny": ModelSpec(embed_dim=192, depth=12, num_heads=3, patch_size=16, img_size=224),
    "vit_small": ModelSpec(embed_dim=384, depth=12, num_heads=12, patch_size=16, img_size=224),
    "vit_base": ModelSpec(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=224),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run; see ``stabilitylab run --help`` for units."""

    preset: str = "digits"
    dataset: str = "digits"
    data_dir: str | None = None
    # Fraction of one class-folder tree or of x_train kept for validation; None: the data's
    # own validation split.
    val_split: float | None = None
    download: bool = False  # fetch a DOWNLOADABLE dataset into data_dir when it is missing
    skip_bad_images: bool = False  # skip unreadable image files instead of stopping
    method: str = "mocov3"
    model: str = "vit_micro"
    img_size: int | None = None  # None: the dataset's (DATASET_IMG_SIZES), else the model's
    patch_size: int | None = None  # None: the model preset's
    freeze_patch_embed: bool = False
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1.5e-4  # base lr per 256 images
    weight_decay: float = 0.1
    warmup_epochs: float = 40.0
    momentum: float = 0.99  # momentum-encoder EMA coefficient at step 0
    temperature: float = 0.2
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    crop_min_scale: float = 0.08
    # Ablation knobs of the study. The defaults are MoCo v3's: fixed 2D sin-cos position
    # embedding, class-token pooling, BN in the heads, a predictor, AdamW.
    pos_embed: str = "sincos"  # one of POS_EMBEDS
    pool: str = "cls"  # one of POOLS: the class token, or global average pooling of the patches
    qk_norm: bool = False  # timm's LayerNorm of queries and keys in every attention layer
    # Stochastic depth of the online backbone: timm's drop_path_rate, rising linearly over
    # the blocks to this rate. Target and teacher copies never drop (DINO: 0.1).
    drop_path: float = 0.0
    optimizer: str = "adamw"  # one of OPTIMIZERS, from timm
    weight_decay_end: float | None = None  # None: constant; else cosine from weight_decay
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    grad_clip_mode: str = "total"  # one of GRAD_CLIP_MODES
    predictor: bool = True  # MoCo v3 and BYOL: the online predictor MLP
    head_bn: bool = True  # BatchNorm in the projector and predictor MLPs
    proj_layers: int = 3  # linear layers in the projector
    # SwAV and DINO: prototypes (DINO's output dimension), and the epochs during which the
    # prototypes, DINO's last layer, get no gradient.
    num_prototypes: int = 3000
    freeze_last_layer_epochs: float = 0.0
    # DINO: teacher softmax temperature, warmed up linearly from teacher_temperature_warmup
    # over teacher_temperature_warmup_epochs; EMA coefficient of the output centre.
    teacher_temperature: float = 0.04
    teacher_temperature_warmup: float = 0.04
    teacher_temperature_warmup_epochs: float = 0.0
    center_momentum: float = 0.9
    # DINO: the weight norm of the last layer stays 1 (DINO's norm_last_layer), or trains.
    norm_last_layer: bool = True
    # SwAV: Sinkhorn-Knopp iterations and entropy epsilon; a queue of earlier projections
    # used for the assignments once queue_start_epochs have passed (0 images: none).
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    queue_length: int = 0
    queue_start_epochs: float = 0.0
    # SwAV and DINO multi-crop: local crops per image beside the two global views.
    local_crops: int = 0
    local_crop_size: int | None = None  # None: 96/224 of the image side, in whole patches
    local_crop_min_scale: float = 0.05
    local_crop_max_scale: float = 0.4
    # Attention probes on a fixed batch of validation images: every this many optimiser
    # steps (0: off), over this many images.
    attention_every: int = 0
    attention_images: int = 32
    seed: int = 0
    eval_every: int = 100  # optimiser steps
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_bank: int = 50_000
    knn_max_query: int = 10_000
    # Every few tens of steps, as the MoCo v3 study's dense monitor is described; 0 is off.
    dense_knn_every: int = 20  # optimiser steps
    dense_knn_size: int | None = None  # None: a tenth of the training split, at least knn_k
    flush_every: int = 100  # optimiser steps
    checkpoint_every: int = 1000  # optimiser steps
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False  # torch.compile each transformer block of the backbones
    on_nonfinite: str = "stop"  # one of NONFINITE_POLICIES
    workers: int = 0
    inject_spikes: tuple[str, ...] = ()  # STEP:LAYER:FACTOR gradient multipliers
    lr_spikes: tuple[str, ...] = ()  # STEP:FACTOR learning-rate multipliers
    # Folder for TensorBoard scalars, or None for none. A relative path is taken inside the
    # run directory, so "tensorboard" is RUN_DIR/tensorboard.
    tensorboard: str | None = None

    @property
    def model_spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def resolved_img_size(self) -> int:
        """Return the image side: --img-size, the dataset's own, or the model preset's.

        For npz data without --img-size this is the model preset's; the arrays' own size,
        which the run uses, is known only once they are read.
        """
        if self.img_size is not None:
            return self.img_size
        return DATASET_IMG_SIZES.get(self.dataset, self.model_spec.img_size)

    @property
    def resolved_patch_size(self) -> int:
        return self.patch_size if self.patch_size is not None else self.model_spec.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(RunConfig))
# As config.json stores them: tuples become lists.
FIELD_DEFAULTS: dict[str, Any] = {
    f.name: list(f.default) if isinstance(f.default, tuple) else f.default
    for f in fields(RunConfig)
}


def with_field_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """Fill the fields that ``recorded`` lacks with their defaults.

    A run recorded by an earlier version has no entry for the fields added since; each was
    added with a default that keeps the earlier behaviour, so that default is what the run
    used. Comparing configurations across versions therefore compares filled ones.
    """
    return {**FIELD_DEFAULTS, **recorded}


def available_presets() -> list[str]:
    folder = resources.files("stabilitylab").joinpath("presets")
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_preset(name: str) -> dict[str, Any]:
    """Read preset ``name`` from the shipped TOML files, rejecting unknown keys."""
    presets = available_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    text = resources.files("stabilitylab").joinpath("presets", f"{name}.toml").read_text("utf-8")
    values = tomllib.loads(text)
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"preset {name!r} has unknown keys {unknown}")
    return values


# Preset values sized to the preset's own dataset (its number of steps per epoch, its image
# size); with another --dataset they would be wrong, so that dataset gets the defaults.
DATASET_SIZED_KEYS = ("eval_every", "dense_knn_every", "dense_knn_size", "crop_min_scale")


# Each method's own values of the method-specific keys, from its paper or public code
# (docs/methods.md gives the source of each). Keys not listed take the RunConfig default.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # Chen, Xie and He 2021, and facebookresearch/moco-v3.
    "mocov3": {
        "temperature": 0.2,
        "momentum": 0.99,
        "proj_layers": 3,
        "proj_hidden_dim": 4096,
        "proj_dim": 256,
        "predictor": True,
        "head_bn": True,
        "weight_decay": 0.1,
    },
    # Chen et al. 2020 (SimCLR): NT-Xent at tau 0.1 and a 2-layer 2048 -> 128 projector,
    # with BN after each linear layer as in the public code's head.
    "simclr": {
        "temperature": 0.1,
        "proj_layers": 2,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "predictor": False,
        "head_bn": True,
        "weight_decay": 0.1,
    },
    # Grill et al. 2020 (BYOL): 4096 -> 256 projector and predictor, target EMA from 0.996.
    "byol": {
        "momentum": 0.996,
        "proj_layers": 2,
        "proj_hidden_dim": 4096,
        "proj_dim": 256,
        "predictor": True,
        "head_bn": True,
        "weight_decay": 0.1,
    },
    # Caron et al. 2020 (SwAV) and facebookresearch/swav: tau 0.1, 3000 prototypes frozen for
    # the first epoch (313 iterations at batch 4096), 3 Sinkhorn iterations at epsilon 0.05.
    "swav": {
        "temperature": 0.1,
        "proj_layers": 2,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "head_bn": True,
        "num_prototypes": 3000,
        "freeze_last_layer_epochs": 1.0,
        "sinkhorn_iterations": 3,
        "sinkhorn_epsilon": 0.05,
        "weight_decay": 0.1,
    },
    # Caron et al. 2021 (DINO), the defaults of facebookresearch/dino main_dino.py: student
    # tau 0.1, teacher tau 0.04 (no warmup), centre momentum 0.9, 65536 outputs behind a
    # 3-layer 2048 -> 256 head without BN, last layer frozen for one epoch, teacher EMA from
    # 0.996, weight decay 0.04 -> 0.4, each parameter's gradient clipped to norm 3.0.
    "dino": {
        "temperature": 0.1,
        "momentum": 0.996,
        "proj_layers": 3,
        "proj_hidden_dim": 2048,
        "proj_dim": 256,
        "head_bn": False,
        "num_prototypes": 65536,
        "freeze_last_layer_epochs": 1.0,
        "teacher_temperature": 0.04,
        "teacher_temperature_warmup": 0.04,
        "teacher_temperature_warmup_epochs": 0.0,
        "center_momentum": 0.9,
        "norm_last_layer": True,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "grad_clip": 3.0,
        "grad_clip_mode": "parameter",
    },
}
METHOD_KEYS = tuple(sorted({key for values in METHOD_DEFAULTS.values() for key in values}))
# Keys that only some methods read. Passing one with another method is rejected.
METHOD_ONLY_KEYS: dict[str, tuple[str, ...]] = {
    "temperature": ("mocov3", "simclr", "swav", "dino"),
    "momentum": ("mocov3", "byol", "dino"),
    "predictor": ("mocov3", "byol"),
    "num_prototypes": ("swav", "dino"),
    "freeze_last_layer_epochs": ("swav", "dino"),
    "teacher_temperature": ("dino",),
    "teacher_temperature_warmup": ("dino",),
    "teacher_temperature_warmup_epochs": ("dino",),
    "center_momentum": ("dino",),
    "norm_last_layer": ("dino",),
    "sinkhorn_iterations": ("swav",),
    "sinkhorn_epsilon": ("swav",),
    "queue_length": ("swav",),
    "queue_start_epochs": ("swav",),
    "local_crops": ("swav", "dino"),
    "local_crop_size": ("swav", "dino"),
    "local_crop_min_scale": ("swav", "dino"),
    "local_crop_max_scale": ("swav", "dino"),
}


def unread_by(method: str) -> list[str]:
    """Return the configuration keys that ``method`` does not read, such as SimCLR's momentum.

    config.json records every key, these with their defaults, so the run's derived values
    list them to keep a reader from taking them for settings of the run.
    """
    return sorted(key for key, readers in METHOD_ONLY_KEYS.items() if method not in readers)


def _preset_for(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Load ``preset``, dropping its dataset-sized values when another dataset is chosen.

    Its method-specific values (METHOD_KEYS) are dropped too when another method is chosen,
    so that method's own defaults apply.
    """
    values = load_preset(preset)
    dropped: list[str] = []
    own_dataset = values.get("dataset", RunConfig.dataset)
    dataset = overrides.get("dataset") or own_dataset
    if dataset != own_dataset:
        sized = [key for key in DATASET_SIZED_KEYS if key in values and key not in overrides]
        if sized:
            log.info(
                "preset %r is sized for the %s data; with --dataset %s these keys take their "
                "defaults instead: %s",
                preset,
                own_dataset,
                dataset,
                ", ".join(f"{key} {getattr(RunConfig, key)!r}" for key in sized),
            )
        dropped += sized
    own_method = values.get("method", RunConfig.method)
    method = overrides.get("method") or own_method
    if method != own_method:
        specific = [key for key in METHOD_KEYS if key in values and key not in overrides]
        if specific:
            log.info(
                "preset %r sets %s values; with --method %s these keys take that method's "
                "defaults instead: %s",
                preset,
                own_method,
                method,
                ", ".join(specific),
            )
        dropped += specific
    return {key: value for key, value in values.items() if key not in dropped}


def _check_method_only_keys(method: str, overrides: dict[str, Any]) -> None:
    for key in sorted(overrides):
        readers = METHOD_ONLY_KEYS.get(key)
        if readers is not None and method not in readers:
            prefix = "--no-" if overrides[key] is False else "--"
            option = prefix + key.replace("_", "-")
            names = (
                readers[0] if len(readers) == 1 else f"{', '.join(readers[:-1])} or {readers[-1]}"
            )
            raise ConfigError(
                f"{option} is only read with --method {names}, not {method}; "
                f"drop {option} or pass --method {readers[0]}"
            )


def build_config(preset: str = "digits", **overrides: Any) -> RunConfig:
    """Build and validate a configuration from a preset and explicit overrides.

    Precedence, lowest first: the RunConfig defaults, the method's METHOD_DEFAULTS, the
    preset, the overrides.
    """
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown configuration keys {unknown}; known keys: {list(FIELD_NAMES)}")
    preset_values = _preset_for(preset, overrides)
    method = overrides.get("method") or preset_values.get("method", RunConfig.method)
    _check_choice("method", method, METHODS)
    _check_method_only_keys(method, overrides)
    values = {**METHOD_DEFAULTS[method], **preset_values, **overrides, "preset": preset}
    config = RunConfig(**values)
    validate(config)
    _warn_ineffective(config, overrides)
    return config


def _warn_ineffective(config: RunConfig, overrides: dict[str, Any]) -> None:
    """Log a warning for each option given that cannot change this run."""
    warnings = []
    for key in ("freeze_last_layer_epochs", "queue_start_epochs"):
        if key in overrides and getattr(config, key) >= config.epochs > 0:
            warnings.append(
                f"--{key.replace('_', '-')} {getattr(config, key)} is not less than --epochs "
                f"{config.epochs}, so it lasts the whole run"
            )
    if config.method == "dino" and config.teacher_temperature_warmup_epochs >= config.epochs:
        if "teacher_temperature_warmup_epochs" in overrides:
            warnings.append(
                f"--teacher-temperature-warmup-epochs {config.teacher_temperature_warmup_epochs}"
                f" is not less than --epochs {config.epochs}, so the teacher temperature never "
                "reaches --teacher-temperature"
            )
    if "grad_clip_mode" in overrides and config.grad_clip is None:
        warnings.append("--grad-clip-mode has no effect without --grad-clip")
    local_options = [
        key
        for key in ("local_crop_size", "local_crop_min_scale", "local_crop_max_scale")
        if key in overrides
    ]
    if local_options and config.local_crops == 0:
        names = ", ".join("--" + key.replace("_", "-") for key in local_options)
        warnings.append(f"{names} have no effect without --local-crops")
    for warning in warnings:
        log.warning("%s", warning)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    _require(
        value in choices,
        f"--{name.replace('_', '-')} {value!r} is not one of: {', '.join(choices)}",
    )


def _check_positive(name: str, value: float, hint: str) -> None:
    option = f"--{name.replace('_', '-')}"
    _require(
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
        f"{option} {value!r} is invalid: it must be a positive, finite number ({hint})",
    )


def validate(config: RunConfig) -> None:
    """Raise ConfigError naming the first invalid value and what to pass instead."""
    _check_choice("dataset", config.dataset, DATASETS)
    _check_choice("method", config.method, METHODS)
    _check_choice("model", config.model, list(MODELS))
    _check_choice("precision", config.precision, PRECISIONS)
    _check_choice("on_nonfinite", config.on_nonfinite, NONFINITE_POLICIES)
    _check_positive("lr", config.lr, "the base lr per 256 images, such as 1.5e-4")
    peak_lr = config.lr * config.batch_size / 256 if isinstance(config.batch_size, int) else 0.0
    _require(
        math.isfinite(peak_lr),
        f"--lr {config.lr!r} is invalid: the peak lr, lr x batch size / 256, overflows to "
        f"{peak_lr}; pass a base lr such as 1.5e-4",
    )
    _check_positive("temperature", config.temperature, "the contrastive temperature, such as 0.2")
    _check_positive("knn_temperature", config.knn_temperature, "such as 0.07")
    for name, hint in (
        ("epochs", "passes over the training split"),
        ("batch_size", "images per optimiser step over all processes"),
        ("eval_every", "optimiser steps between kNN evaluations"),
        ("flush_every", "optimiser steps between metric flushes"),
        ("checkpoint_every", "optimiser steps between checkpoints"),
        ("knn_k", "neighbours voting in the kNN monitor"),
        ("knn_max_bank", "images in the kNN feature bank"),
        ("knn_max_query", "images evaluated by the kNN monitor"),
        ("proj_hidden_dim", "hidden width of the projector and predictor"),
        ("proj_dim", "output width of the projector and predictor"),
        ("proj_layers", "linear layers in the projector"),
        ("num_prototypes", "SwAV prototypes, or DINO output dimensions"),
        ("sinkhorn_iterations", "Sinkhorn-Knopp normalisation rounds"),
        ("attention_images", "validation images the attention probes run on"),
    ):
        value = getattr(config, name)
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"--{name.replace('_', '-')} {value!r} is invalid: it must be a whole number of at "
            f"least 1 ({hint})",
        )
    _require(
        isinstance(config.weight_decay, (int, float)) and 0 <= config.weight_decay < math.inf,
        f"--weight-decay {config.weight_decay!r} is invalid: it must be 0 or more",
    )
    _require(
        0 <= config.warmup_epochs < config.epochs,
        f"--warmup-epochs {config.warmup_epochs!r} is invalid: it must be at least 0 and less "
        f"than --epochs {config.epochs}",
    )
    _require(
        0 < config.crop_min_scale <= 1,
        f"--crop-min-scale {config.crop_min_scale!r} is invalid: it must be in (0, 1]",
    )
    # BatchNorm in the heads needs two samples per view to compute batch statistics.
    _require(
        config.batch_size >= 2,
        f"--batch-size {config.batch_size} is invalid: the BatchNorm layers of the heads need at "
        "least 2 images per step",
    )
    _require(
        config.on_nonfinite != "skip" or config.optimizer == "adamw",
        f"--on-nonfinite skip needs --optimizer adamw, whose fused kernel skips a step without "
        f"a host sync; timm's {config.optimizer} has no such kernel, so pass --on-nonfinite "
        "stop or --optimizer adamw",
    )
    _require(config.workers >= 0, f"--workers {config.workers!r} is invalid: it must be 0 or more")
    _require(
        0 <= config.seed < 2**32,
        f"--seed {config.seed!r} is invalid: it must be a whole number from 0 to {2**32 - 1}",
    )
    _require(
        config.tensorboard is None
        or (isinstance(config.tensorboard, str) and config.tensorboard.strip() != ""),
        f"--tensorboard {config.tensorboard!r} is invalid: pass a folder name, or the bare "
        "flag for RUN_DIR/tensorboard",
    )
    _validate_ablation_knobs(config)
    _validate_method_knobs(config)
    _validate_dense_knn(config)
    _validate_geometry(config)
    _validate_device(config)
    _validate_faults(config)
    _validate_data_source(config)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_flag(name: str, value: Any) -> None:
    _require(
        isinstance(value, bool),
        f"{name} {value!r} is invalid: it must be true or false",
    )


def _validate_ablation_knobs(config: RunConfig) -> None:
    _check_choice("pos_embed", config.pos_embed, POS_EMBEDS)
    _check_choice("pool", config.pool, POOLS)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("grad_clip_mode", config.grad_clip_mode, GRAD_CLIP_MODES)
    for name in ("qk_norm", "predictor", "head_bn", "compile", "norm_last_layer"):
        _check_flag(name, getattr(config, name))
    _require(
        isinstance(config.drop_path, (int, float))
        and not isinstance(config.drop_path, bool)
        and 0 <= config.drop_path < 1,
        f"--drop-path {config.drop_path!r} is invalid: it must be a rate in [0, 1), such as 0.1",
    )
    if config.weight_decay_end is not None:
        _require(
            isinstance(config.weight_decay_end, (int, float))
            and 0 <= config.weight_decay_end < math.inf,
            f"--weight-decay-end {config.weight_decay_end!r} is invalid: it must be 0 or more",
        )
    if config.grad_clip is not None:
        _check_positive(
            "grad_clip", config.grad_clip, "the maximum total gradient norm, such as 3.0"
        )


def _validate_method_knobs(config: RunConfig) -> None:
    method = config.method
    if method in ("mocov3", "byol", "dino"):
        _require(
            0 <= config.momentum <= 1,
            f"--momentum {config.momentum!r} is invalid: the EMA coefficient must be in [0, 1]",
        )
    if method == "byol":
        _require(
            config.predictor,
            "--no-predictor is invalid with --method byol: without its predictor BYOL collapses "
            "to a constant; drop --no-predictor",
        )
    for name in (
        "freeze_last_layer_epochs",
        "teacher_temperature_warmup_epochs",
        "queue_start_epochs",
    ):
        value = getattr(config, name)
        _require(
            isinstance(value, (int, float)) and 0 <= value < math.inf,
            f"--{name.replace('_', '-')} {value!r} is invalid: it must be 0 or more epochs",
        )
    for name, hint in (
        ("teacher_temperature", "DINO's teacher softmax temperature, such as 0.07"),
        ("teacher_temperature_warmup", "DINO's starting teacher temperature, such as 0.04"),
        ("sinkhorn_epsilon", "SwAV's entropy regularisation, such as 0.05"),
    ):
        _check_positive(name, getattr(config, name), hint)
    _require(
        0 <= config.center_momentum < 1,
        f"--center-momentum {config.center_momentum!r} is invalid: it must be in [0, 1)",
    )
    _require(
        _is_whole(config.queue_length) and config.queue_length >= 0,
        f"--queue-length {config.queue_length!r} is invalid: it must be 0 (no queue) or a "
        "number of images",
    )
    if config.queue_length:
        _require(
            config.queue_length % config.batch_size == 0,
            f"--queue-length {config.queue_length} is invalid: it must be a multiple of "
            f"--batch-size {config.batch_size}, such as {config.batch_size * 15}",
        )
    # NOTE: the bound is a sanity limit, not a measured memory budget: DINO's recipes use 8
    # to 10 local crops, and each crop adds a forward and backward pass of its batch.
    _require(
        _is_whole(config.local_crops) and 0 <= config.local_crops <= MAX_LOCAL_CROPS,
        f"--local-crops {config.local_crops!r} is invalid: it must be 0 to {MAX_LOCAL_CROPS} "
        "crops per image (DINO's recipes use 8 to 10)",
    )
    _require(
        0 < config.local_crop_min_scale < config.local_crop_max_scale <= 1,
        f"--local-crop-min-scale {config.local_crop_min_scale!r} and --local-crop-max-scale "
        f"{config.local_crop_max_scale!r} are invalid: they must satisfy 0 < min < max <= 1",
    )
    _require(
        _is_whole(config.attention_every) and config.attention_every >= 0,
        f"--attention-every {config.attention_every!r} is invalid: it must be 0 (off) or a "
        "number of optimiser steps",
    )


# The contents of --data-dir for each dataset read from disk, for error messages.
DATA_DIR_CONTENTS = {
    "imagefolder": "a folder with train/ and val/ class folders",
    "npz": "a .npz file with x_train, y_train, x_val and y_val arrays",
    "cifar10": "the folder that contains cifar-10-batches-py/",
    "cifar100": "the folder that contains cifar-100-python/",
    "mnist": "the folder that contains MNIST/raw/",
    "fashion-mnist": "the folder that contains FashionMNIST/raw/",
}


def _validate_data_source(config: RunConfig) -> None:
    """Check --data-dir, --download, --val-split and --skip-bad-images against --dataset."""
    dataset = config.dataset
    if dataset == "digits":
        _require(
            config.data_dir is None,
            f"--data-dir {config.data_dir!r} is only read with --dataset imagefolder, npz, "
            "cifar10, cifar100, mnist or fashion-mnist; the digits dataset ships with "
            "stabilitylab, so drop --data-dir",
        )
    else:
        hint = " (add --download to fetch it there)" if dataset in DOWNLOADABLE else ""
        _require(
            bool(config.data_dir),
            f"--dataset {dataset} needs --data-dir, {DATA_DIR_CONTENTS[dataset]}{hint}",
        )
    _require(
        not config.download or dataset in DOWNLOADABLE,
        f"--download fetches only {', '.join(DOWNLOADABLE)}; the {dataset} data cannot be "
        "downloaded, so drop --download",
    )
    if config.val_split is not None:
        _require(
            dataset in SPLITTABLE,
            f"--val-split is only read with --dataset {' or '.join(SPLITTABLE)}; the {dataset} "
            "data has its own validation split, so drop --val-split",
        )
        _require(
            isinstance(config.val_split, (int, float))
            and not isinstance(config.val_split, bool)
            and 0 < config.val_split < 1,
            f"--val-split {config.val_split!r} is invalid: it must be a fraction between 0 and "
            "1, such as 0.1",
        )
    _require(
        not config.skip_bad_images or dataset == "imagefolder",
        f"--skip-bad-images is only read with --dataset imagefolder; the {dataset} data has no "
        "image files to skip, so drop it",
    )


def _validate_dense_knn(config: RunConfig) -> None:
    every, size = config.dense_knn_every, config.dense_knn_size
    _require(
        isinstance(every, int) and not isinstance(every, bool) and every >= 0,
        f"--dense-knn-every {every!r} is invalid: it must be a whole number of at least 0 "
        "(optimiser steps between dense kNN evaluations; 0 turns the dense monitor off)",
    )
    if size is None or every == 0:
        return
    _require(
        isinstance(size, int) and not isinstance(size, bool) and size >= config.knn_k,
        f"--dense-knn-size {size!r} is invalid: the queue must hold at least --knn-k "
        f"{config.knn_k} features, so pass {config.knn_k} or more (or lower --knn-k)",
    )


def dense_knn_queue_size(config: RunConfig, train_size: int) -> int:
    """Return the dense kNN queue length, 0 with the monitor off; raise if it exceeds the data.

    The default is a tenth of the training split, but at least ``knn_k`` so that every query
    has its full set of neighbours, and at most the split.
    """
    if config.dense_knn_every == 0:
        return 0
    if config.dense_knn_size is None:
        return min(train_size, max(math.ceil(train_size / 10), config.knn_k))
    if config.dense_knn_size > train_size:
        raise ConfigError(
            f"--dense-knn-size {config.dense_knn_size} is larger than the training split "
            f"({train_size} images), so the queue would hold features older than an epoch; "
            f"pass --dense-knn-size {train_size} or less"
        )
    return config.dense_knn_size


def _validate_geometry(config: RunConfig) -> None:
    img, patch = config.resolved_img_size, config.resolved_patch_size
    _require(img >= 1, f"--img-size {img!r} is invalid: it must be a positive number of pixels")
    _require(
        patch >= 1, f"--patch-size {patch!r} is invalid: it must be a positive number of pixels"
    )
    if config.local_crops and config.local_crop_size is not None:
        local = config.local_crop_size
        _require(
            _is_whole(local) and local >= patch and local % patch == 0,
            f"--local-crop-size {local!r} is invalid: it must be a multiple of --patch-size "
            f"{patch}, such as {max(patch, round(img * 96 / 224 / patch) * patch)}",
        )
    if config.dataset == "npz" and config.img_size is None:
        return  # the arrays' own size is checked when they are read
    if config.img_size is None and config.dataset in DATASET_IMG_SIZES:
        _require(
            img % patch == 0,
            f"the {config.dataset} images are {img} px, which --patch-size {patch} does not "
            f"divide; pass a --patch-size that divides {img}, such as 4, or --img-size "
            f"{max(patch, -(-img // patch) * patch)} to resize them",
        )
    _require(
        img % patch == 0,
        f"--img-size {img} is not divisible by --patch-size {patch}; pick an image size that is "
        f"a multiple of {patch}, such as {max(patch, img // patch * patch)}",
    )
    spec = config.model_spec
    # The 2D sin-cos position embedding splits each token's channels into four equal parts.
    _require(
        config.pos_embed != "sincos" or spec.embed_dim % 4 == 0,
        f"model {config.model} has embed_dim {spec.embed_dim}, not divisible by 4, which the "
        "2D sin-cos position embedding needs; pass --pos-embed learned or none",
    )


def _validate_faults(config: RunConfig) -> None:
    from stabilitylab.models.layers import head_groups, vit_layer_groups
    from stabilitylab.train.faults import check_fault_specs

    frozen = {"patch_embed"} if config.freeze_patch_embed else set()
    layers = vit_layer_groups(
        config.model_spec.depth,
        class_token=config.pool == "cls",
        learned_pos_embed=config.pos_embed == "learned",
        heads=head_groups(config.method, config.predictor),
    )
    check_fault_specs(config.inject_spikes, config.lr_spikes, layers, frozen)


def _validate_device(config: RunConfig) -> None:
    device = config.device
    ok = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device.removeprefix("cuda:").isdigit()
    )
    _require(ok, f"--device {device!r} is invalid; pass auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Derived:
    """Values that follow from a configuration and the dataset size."""

    global_batch_size: int
    lr: float  # actual peak lr = base lr x global batch / 256
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    train_size: int
    dense_knn_size: int = 0  # features in the dense kNN queue, 0 with the monitor off
    world_size: int = 1  # training processes, each with batch_size / world_size images a step
    per_process_batch_size: int = 0

    def __post_init__(self) -> None:
        if not self.per_process_batch_size:
            object.__setattr__(
                self, "per_process_batch_size", self.global_batch_size // self.world_size
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def derive(
    config: RunConfig,
    train_size: int,
    in_chans: int,
    num_classes: int,
    img_size: int | None = None,
    world_size: int = 1,
) -> Derived:
    """Compute the batch-scaled lr and the step counts; raise if the batch exceeds the data.

    ``img_size`` is the data's image side when it differs from ``config.resolved_img_size``,
    as for npz arrays read at their own size. ``--batch-size`` is the global batch, split
    evenly over ``world_size`` processes, and the lr scales with it.
    """
    if config.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} cannot be split evenly over {world_size} "
            f"processes; pass a multiple of {world_size}, such as "
            f"{max(1, config.batch_size // world_size) * world_size}"
        )
    steps_per_epoch = train_size // config.batch_size  # the last partial batch is dropped
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the training split "
            f"({train_size} images); pass --batch-size {train_size} or less"
        )
    bank_size = min(train_size, config.knn_max_bank)
    if config.knn_k > bank_size:
        raise ConfigError(
            f"--knn-k {config.knn_k} is larger than the kNN feature bank ({bank_size} images: "
            f"the training split of {train_size}, at most --knn-max-bank "
            f"{config.knn_max_bank}); pass --knn-k {bank_size} or less"
        )
    total = steps_per_epoch * config.epochs
    from stabilitylab.train.faults import check_fault_steps

    check_fault_steps(config.inject_spikes, config.lr_spikes, total)
    return Derived(
        global_batch_size=config.batch_size,
        lr=config.lr * config.batch_size / 256,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        img_size=img_size if img_size is not None else config.resolved_img_size,
        patch_size=config.resolved_patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        train_size=train_size,
        dense_knn_size=dense_knn_queue_size(config, train_size),
        world_size=world_size,
    )
