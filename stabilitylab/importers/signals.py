"""The signals an import fills: run-directory columns, named as ``--map`` targets.

Names:

- a column of the ``steps`` table: ``loss``, ``lr``, ``grad_norm``, ``token_grad_norm``,
  ``epoch`` ... (also written ``steps.loss``);
- a column of the ``evals`` table: ``knn_top1``, ``knn_top5``, ``knn_top1_se``,
  ``feature_std`` ... (also written ``evals.knn_top1``); its epoch is ``evals.epoch``;
- a column of the ``dense_knn`` table: ``dense_knn.knn_top1`` ...;
- a column of the ``layers`` table for one layer group: ``grad_norm[blocks.00]``,
  ``weight_norm[patch_embed]``, ``update_ratio[projector]``.

Layer groups are those of :mod:`stabilitylab.models.layers`: ``patch_embed``,
``cls_token``, ``reg_token``, ``pos_embed``, ``blocks.NN``, ``norm``, ``projector`` and
``predictor``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stabilitylab.errors import ConfigError
from stabilitylab.train.tensorboard import LAYER_COLUMNS, scalar_columns

# Tables with one row per step (or evaluation); the layers table is handled apart.
ROW_TABLES = ("steps", "evals", "dense_knn")
ACCURACY_COLUMNS = ("knn_top1", "knn_top5")
# Standard errors of an accuracy, in the accuracy's unit.
ACCURACY_SE_COLUMNS = {"knn_top1_se": "knn_top1"}
# Layer columns whose values are L2 norms, so that norms of disjoint parameter sets combine
# into the norm of their union as the square root of the summed squares.
NORM_COLUMNS = ("grad_norm", "weight_norm")

_BLOCK = re.compile(r"^blocks\.(\d+)$")
_LAYER_SIGNAL = re.compile(r"^(\w+)\[(.+)\]$")
_SIMPLE_GROUPS = (
    "patch_embed",
    "cls_token",
    "reg_token",
    "pos_embed",
    "norm",
    "projector",
    "predictor",
    "prototypes",
)


@dataclass(frozen=True)
class Signal:
    """One column of one run-directory table, for one layer group in the layers table."""

    table: str
    column: str
    layer: str | None = None

    @property
    def name(self) -> str:
        """The signal's name as ``--map`` takes it and ``config.json`` records it."""
        if self.table == "layers":
            return f"{self.column}[{self.layer}]"
        if self.table == "steps" or (self.table == "evals" and self.column != "epoch"):
            return self.column
        return f"{self.table}.{self.column}"

    @property
    def is_accuracy(self) -> bool:
        return self.table in ("evals", "dense_knn") and self.column in ACCURACY_COLUMNS

    @property
    def is_accuracy_se(self) -> bool:
        return self.table in ("evals", "dense_knn") and self.column in ACCURACY_SE_COLUMNS

    @property
    def is_norm(self) -> bool:
        """Whether several source columns combine into this signal as an L2 norm."""
        return self.table == "layers" and self.column in NORM_COLUMNS


def row_signals(table: str) -> list[Signal]:
    """Return the signals of one of :data:`ROW_TABLES`, in column order."""
    return [Signal(table, column) for column in scalar_columns(table)]


def all_row_signals() -> list[Signal]:
    return [signal for table in ROW_TABLES for signal in row_signals(table)]


def signal_names_text() -> str:
    """Describe the accepted signal names, for error messages."""
    steps = ", ".join(signal.name for signal in row_signals("steps"))
    evals = ", ".join(signal.name for signal in row_signals("evals"))
    layers = "/".join(LAYER_COLUMNS)
    return (
        f"steps: {steps}; evals: {evals}; dense_knn.COLUMN for the dense kNN table; "
        f"{layers}[LAYER] per layer group; step for the step column; ignore to skip a column"
    )


def layer_group(name: str) -> str | None:
    """Return the layer-group name that ``name`` denotes, or None.

    ``blocks.3`` and ``blocks.03`` both give ``blocks.03``, and ``fc_norm`` gives ``norm``.
    """
    match = _BLOCK.match(name)
    if match:
        return f"blocks.{int(match.group(1)):02d}"
    if name == "fc_norm":
        return "norm"
    return name if name in _SIMPLE_GROUPS else None


def layer_order_key(group: str) -> tuple[int, int]:
    """Sort key that puts layer groups in the order data flows through the model.

    The same order as ``stabilitylab.models.layers.group_order_key``, which imports torch.
    """
    match = _BLOCK.match(group)
    if match:
        return (1, int(match.group(1)))
    before = ("patch_embed", "cls_token", "reg_token", "pos_embed")
    if group in before:
        return (0, before.index(group))
    return (2, ("norm", "projector", "predictor", "prototypes").index(group))


# Name starts of modules that contain an encoder updated by EMA rather than by gradients,
# such as momentum_backbone or teacher. Their parameters belong to no monitored group.
_EMA_PREFIXES = ("momentum", "teacher", "target", "ema")
_HEAD_NAMES = {
    "projector": "projector",
    "projection_head": "projector",
    "predictor": "predictor",
    "prediction_head": "predictor",
    "prototypes": "prototypes",
}


def parameter_group(name: str) -> str | None:
    """Return the layer group of a parameter name such as ``backbone.blocks.0.attn.qkv.weight``.

    Wrapper prefixes (``model.``, ``backbone.``, ``module.`` ...) are skipped: the first
    dotted part that names a group decides. Returns None for a parameter of an EMA encoder
    (a part that starts with momentum, teacher, target or ema) and for names without a
    group, such as a classifier ``head``.
    """
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.lower().startswith(_EMA_PREFIXES) or part.lower().endswith("_ema"):
            return None
        if part == "blocks" and index + 1 < len(parts) and parts[index + 1].isdigit():
            return f"blocks.{int(parts[index + 1]):02d}"
        if part in _HEAD_NAMES:
            return _HEAD_NAMES[part]
        # A bare group name is the parameter itself (cls_token) or its module (norm.weight).
        if part in _SIMPLE_GROUPS or part == "fc_norm":
            return layer_group(part)
    return None


def parse_signal(text: str, option: str) -> Signal:
    """Parse a signal name; raise ConfigError naming ``option`` and the accepted names."""
    name = text.strip()
    layer_match = _LAYER_SIGNAL.match(name)
    if layer_match:
        return _parse_layer_signal(layer_match.group(1), layer_match.group(2), option)
    table, _, column = name.rpartition(".")
    if table:
        if table in ROW_TABLES and column in scalar_columns(table):
            return Signal(table, column)
    else:
        for candidate in ("steps", "evals"):
            if name in scalar_columns(candidate):
                return Signal(candidate, name)
    raise ConfigError(f"{option}: {text!r} is not a signal name; use one of {signal_names_text()}")


def _parse_layer_signal(column: str, layer_text: str, option: str) -> Signal:
    if column not in LAYER_COLUMNS:
        raise ConfigError(
            f"{option}: {column}[...] is not a layer signal; use one of "
            f"{', '.join(name + '[LAYER]' for name in LAYER_COLUMNS)}"
        )
    layer = layer_group(layer_text)
    if layer is None:
        raise ConfigError(
            f"{option}: {layer_text!r} is not a layer group; use patch_embed, cls_token, "
            "blocks.N, norm, projector or predictor"
        )
    return Signal("layers", column, layer)
