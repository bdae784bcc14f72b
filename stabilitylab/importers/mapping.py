"""Which source column fills which signal: built-in aliases and ``--map`` overrides.

Resolution, for the columns (or TensorBoard tags) of one source:

1. ``--map COLUMN=SIGNAL`` sets a signal from a column, and ``--map COLUMN=ignore`` skips a
   column. ``--map COLUMN=step`` names the step column of a CSV file.
2. Every other column is looked up, ignoring case, in the alias table: :data:`ALIASES`
   plus the tags that ``stabilitylab run --tensorboard`` writes. Then come the per-layer
   patterns. ``grad_norm/LAYER``, ``weight_norm/LAYER`` and ``update_ratio/LAYER`` name a
   layer group, and ``grad_norm/PARAMETER`` or Lightning's ``grad_2.0_norm/PARAMETER``
   one parameter's gradient norm.
3. A signal that ``--map`` sets takes no alias. When several columns alias one signal, the
   first in alias order is used. For a layer's gradient or weight norm a column that names
   the group wins over parameter columns, and several parameter columns of one group combine
   as the square root of their summed squares. Columns left out are listed with the reason.
4. Columns that match nothing are unknown, and are listed so that they can be mapped.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from stabilitylab.errors import ConfigError, DataError
from stabilitylab.importers.signals import (
    ROW_TABLES,
    Signal,
    layer_group,
    layer_order_key,
    parameter_group,
    parse_signal,
)
from stabilitylab.runs import TABLE_COLUMNS
from stabilitylab.train.tensorboard import LAYER_COLUMNS, scalar_columns, scalar_tag

STEP_TARGET = "step"
IGNORE_TARGET = "ignore"
UNITS = ("percent", "fraction")
# The attention scalars that stabilitylab run --tensorboard writes, one per block.
_ATTENTION_TAG = re.compile(r"^attention_(entropy|max_logit)/", re.IGNORECASE)
# At most this many column names in one log line or error message.
MAX_LISTED = 20

# Common names of each signal in other tools' logs, in the order of preference, lower case.
ALIASES: dict[str, tuple[str, ...]] = {
    "loss": (
        "loss",
        "train/loss",
        "train_loss",
        "training/loss",
        "training_loss",
        "train/loss_step",
        "train_loss_step",
        "loss_step",
    ),
    "lr": ("lr", "train/lr", "learning_rate", "train/learning_rate"),
    "momentum": ("momentum", "train/momentum"),
    "weight_decay": ("weight_decay", "train/weight_decay", "wd", "train/wd"),
    "grad_norm": (
        "grad_norm",
        "train/grad_norm",
        "grad_norm/total",
        "total_grad_norm",
        "gradient_norm",
        "train/gradient_norm",
        "grad_2.0_norm_total",
        "grad_2_norm_total",
    ),
    "token_grad_norm": ("token_grad_norm", "train/token_grad_norm"),
    "loss_scale": ("loss_scale", "train/loss_scale"),
    "samples_per_s": ("samples_per_s", "train/samples_per_s", "samples_per_second"),
    "wall_time": ("wall_time", "train/wall_time", "_runtime"),
    "epoch": ("epoch", "train/epoch"),
    "knn_top1": (
        "knn_top1",
        "knn/top1",
        "knn/acc1",
        "knn_acc1",
        "knn_acc",
        "knn/acc",
        "knn_accuracy",
        "val/knn_top1",
        "val/knn_acc",
        "val/knn_acc1",
        "val_knn_top1",
        "val_knn_acc",
        "val_knn_acc1",
    ),
    "knn_top5": (
        "knn_top5",
        "knn/top5",
        "knn/acc5",
        "knn_acc5",
        "val/knn_top5",
        "val/knn_acc5",
        "val_knn_top5",
        "val_knn_acc5",
    ),
}

# Lightning's LearningRateMonitor logs lr-<optimiser class>, or lr-<class>/pg1 for the first
# of several parameter groups; lr-<class>-momentum and lr-<class>-weight_decay are other values.
_LIGHTNING_LR = re.compile(r"^lr-[a-z0-9_]+(/pg1)?$")
# <layer column>/<group or parameter>, as stabilitylab run --tensorboard writes it.
_LAYER_TAG = re.compile(r"^(" + "|".join(LAYER_COLUMNS) + r")/(.+)$", re.IGNORECASE)
# Lightning's grad_norm utility with norm_type 2: grad_2.0_norm/<parameter>.
_LIGHTNING_GRAD_NORM = re.compile(r"^grad_2(?:\.0)?_norm/(.+)$", re.IGNORECASE)


def _alias_table() -> dict[str, tuple[Signal, int]]:
    """Map each lower-case alias to its signal and its rank among that signal's aliases."""
    table: dict[str, tuple[Signal, int]] = {}

    def add(name: str, signal: Signal, rank: int) -> None:
        key = name.lower()
        if key in table and table[key][0] != signal:
            raise ValueError(f"alias {name!r} names both {table[key][0]} and {signal}")
        table.setdefault(key, (signal, rank))

    for table_name in ROW_TABLES:
        for column in scalar_columns(table_name):
            # The tags of stabilitylab run --tensorboard come first.
            add(scalar_tag(table_name, column), Signal(table_name, column), 0)
    for name, aliases in ALIASES.items():
        signal = parse_signal(name, "alias table")
        for rank, alias in enumerate(aliases, start=1):
            add(alias, signal, rank)
    for table_name in ("steps", "evals"):
        for column in scalar_columns(table_name):
            signal = parse_signal(column, "alias table")
            add(column, signal, len(ALIASES.get(column, ())) + 1)
    return table


_ALIASES = _alias_table()


@dataclass(frozen=True)
class MapOption:
    """One ``--map COLUMN=TARGET[:UNIT]`` option, parsed."""

    text: str
    column: str
    target: Signal | None  # None for step and ignore
    kind: str  # "signal", "step" or "ignore"
    unit: str | None = None  # "percent" or "fraction", for accuracy signals only


def parse_map_option(text: str) -> MapOption:
    """Parse ``COLUMN=SIGNAL[:UNIT]``; raise ConfigError naming the option."""
    option = f"--map {text}"
    column, separator, target_text = text.rpartition("=")
    if not separator or not column or not target_text:
        raise ConfigError(
            f"{option} is invalid: write COLUMN=SIGNAL, such as --map val_acc=knn_top1"
        )
    target_text, _, unit = target_text.partition(":")
    target_text = target_text.strip()
    if target_text in (STEP_TARGET, IGNORE_TARGET):
        if unit:
            raise ConfigError(f"{option} is invalid: {target_text} takes no unit")
        return MapOption(text, column, None, target_text)
    signal = parse_signal(target_text, option)
    unit = unit.strip() or None
    if unit is not None:
        if unit not in UNITS:
            raise ConfigError(f"{option}: unit {unit!r} is not one of {', '.join(UNITS)}")
        if not (signal.is_accuracy or signal.is_accuracy_se):
            raise ConfigError(
                f"{option}: a unit applies to an accuracy (knn_top1, knn_top5, knn_top1_se), "
                f"not to {signal.name}; drop :{unit}"
            )
    return MapOption(text, column, signal, "signal", unit)


def parse_map_options(texts: Sequence[str]) -> list[MapOption]:
    """Parse every ``--map`` option and reject a column or a signal given twice.

    Several columns may fill one layer's ``grad_norm`` or ``weight_norm``, which combine as
    norms do.
    """
    options = [parse_map_option(text) for text in texts]
    columns: dict[str, MapOption] = {}
    targets: dict[str, MapOption] = {}
    for option in options:
        if option.column in columns:
            raise ConfigError(
                f"--map {option.text} names column {option.column!r} again (after --map "
                f"{columns[option.column].text}); map each column once"
            )
        columns[option.column] = option
        if option.kind == IGNORE_TARGET:
            continue
        key = option.target.name if option.target is not None else STEP_TARGET
        if key in targets and not (option.target is not None and option.target.is_norm):
            raise ConfigError(
                f"--map {option.text} sets {key} again (after --map {targets[key].text}); "
                "map one column to it"
            )
        targets.setdefault(key, option)
    return options


def step_column_option(options: Sequence[MapOption]) -> str | None:
    """Return the column that ``--map COLUMN=step`` names, or None."""
    return next((option.column for option in options if option.kind == STEP_TARGET), None)


@dataclass
class SignalSource:
    """The source columns of one signal and how they were chosen."""

    columns: list[str]
    origin: str  # "--map", "alias" or "parameter norms"
    unit: str | None = None  # from --map; None lets the import decide

    def to_dict(self) -> dict[str, object]:
        entry: dict[str, object] = {"columns": list(self.columns), "origin": self.origin}
        if len(self.columns) > 1:
            entry["combined"] = "square root of the summed squares"
        if self.unit is not None:
            entry["unit"] = self.unit
        return entry


@dataclass
class Mapping:
    """The resolved mapping of one source.

    ``unused`` maps a column that matched a signal but was left out to the reason, and
    ``ignored`` lists the columns that ``--map COLUMN=ignore`` skips.
    """

    signals: dict[Signal, SignalSource] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def columns_of(self, signal: Signal) -> list[str]:
        source = self.signals.get(signal)
        return source.columns if source is not None else []


@dataclass(frozen=True)
class _Candidate:
    column: str
    signal: Signal
    rank: int
    parameter: bool = False  # one parameter's norm, to combine into its group's norm


def alias_candidate(column: str) -> _Candidate | None:
    """Return the signal that ``column`` is a built-in alias of, or None."""
    key = column.strip().lower()
    if key in _ALIASES:
        signal, rank = _ALIASES[key]
        return _Candidate(column, signal, rank)
    if _LIGHTNING_LR.match(key):
        return _Candidate(column, Signal("steps", "lr"), len(ALIASES["lr"]) + 1)
    layer_match = _LAYER_TAG.match(column.strip())
    if layer_match:
        return _layer_candidate(column, layer_match.group(1).lower(), layer_match.group(2))
    lightning_match = _LIGHTNING_GRAD_NORM.match(column.strip())
    if lightning_match:
        return _layer_candidate(column, "grad_norm", lightning_match.group(1))
    return None


def _layer_candidate(column: str, layer_column: str, name: str) -> _Candidate | None:
    group = layer_group(name)
    if group is not None:
        return _Candidate(column, Signal("layers", layer_column, group), 0)
    if layer_column not in ("grad_norm", "weight_norm"):
        return None  # a ratio of one parameter does not combine into its group's ratio
    group = parameter_group(name)
    if group is None:
        return None
    return _Candidate(column, Signal("layers", layer_column, group), 1, parameter=True)


def resolve_mapping(
    columns: Sequence[str],
    options: Sequence[MapOption],
    source: str,
    bookkeeping: Collection[str] = (),
) -> Mapping:
    """Decide which of ``columns`` fills which signal; see the module documentation.

    Columns in ``bookkeeping`` (the reader's ignored columns, such as wandb's
    ``_timestamp``) fill a signal only through ``--map``. The step column, which the reader
    has taken out of ``columns``, is not checked here. Raises DataError when a ``--map``
    option names a column that ``source`` lacks.
    """
    present = set(columns)
    options = [option for option in options if option.kind != STEP_TARGET]
    for option in options:
        if option.column not in present:
            raise DataError(
                f"--map {option.text}: {source} has no column {option.column!r}; its columns "
                f"are {listed(sorted(columns))}"
            )
    mapping = Mapping()
    explicit = {option.column: option for option in options}
    for option in options:
        if option.kind == IGNORE_TARGET:
            mapping.ignored.append(option.column)
        elif option.kind == "signal" and option.target is not None:
            entry = mapping.signals.setdefault(option.target, SignalSource([], "--map", None))
            entry.columns.append(option.column)
            entry.unit = option.unit or entry.unit
    candidates: dict[Signal, list[_Candidate]] = {}
    for column in columns:
        if column in explicit or column in bookkeeping:
            continue
        if _ATTENTION_TAG.match(column):
            mapping.unused[column] = (
                "a per-block summary of the attention probes, which stabilitylab import does "
                "not read back (the run directory's attention table has every head)"
            )
            continue
        candidate = alias_candidate(column)
        if candidate is None:
            mapping.unknown.append(column)
        elif candidate.signal in mapping.signals:
            mapping.unused[column] = f"{candidate.signal.name} is set by --map"
        else:
            candidates.setdefault(candidate.signal, []).append(candidate)
    for signal, found in candidates.items():
        _choose(mapping, signal, found)
    mapping.signals = dict(sorted(mapping.signals.items(), key=lambda item: _order(item[0])))
    return mapping


def _order(signal: Signal) -> tuple[int, int, tuple[int, int]]:
    """Sort key of a signal: table, column, then layer group in the order data flows."""
    tables = ("steps", "layers", "evals", "dense_knn")
    columns = TABLE_COLUMNS[signal.table]
    layer = layer_order_key(signal.layer) if signal.layer is not None else (0, 0)
    return (tables.index(signal.table), columns.index(signal.column), layer)


def _choose(mapping: Mapping, signal: Signal, found: list[_Candidate]) -> None:
    """Pick the columns of ``signal`` among its alias candidates, recording the others."""
    direct = sorted((c for c in found if not c.parameter), key=lambda c: c.rank)
    parameters = [c for c in found if c.parameter]
    if direct:
        chosen = direct[0]
        mapping.signals[signal] = SignalSource([chosen.column], "alias")
        for other in [*direct[1:], *parameters]:
            mapping.unused[other.column] = f"{signal.name} is read from {chosen.column}"
        return
    mapping.signals[signal] = SignalSource([c.column for c in parameters], "parameter norms")


def listed(names: Sequence[str], limit: int = MAX_LISTED) -> str:
    """Return up to ``limit`` names joined by commas, with the count of the rest."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    rest = len(names) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown
