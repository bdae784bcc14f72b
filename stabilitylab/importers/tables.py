"""Build the run-directory tables from a source's series and its mapping.

Rows:

- ``steps``: one row per step at which a signal of the steps table (other than ``epoch``
  and ``wall_time``, which loggers attach to every row) or of the layers table was logged;
- ``layers``: one row per layer group for each step at which a layer signal was logged;
- ``evals`` and ``dense_knn``: one row per step at which a signal of that table other than
  ``epoch`` was logged.

A signal without a column is NaN in every row, and so is a signal at a step where its column
has no value. An evaluation's epoch, when not mapped, is the steps table's epoch at the same
step. Accuracies are stored in percent, as ``stabilitylab run`` stores them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.errors import DataError
from stabilitylab.importers.mapping import Mapping
from stabilitylab.importers.signals import (
    ACCURACY_SE_COLUMNS,
    ROW_TABLES,
    Signal,
    layer_order_key,
    row_signals,
)
from stabilitylab.importers.source import SourceData
from stabilitylab.runs import TABLE_COLUMNS
from stabilitylab.train.tensorboard import LAYER_COLUMNS

log = logging.getLogger(__name__)

# Columns that loggers write with every row, so they do not make a row on their own.
_COMPANION_COLUMNS = ("epoch", "wall_time")
FRACTION_SCALE = 100.0


@dataclass
class ImportedTables:
    """The four tables of an imported run and what the import derived or could not fill.

    ``units`` maps each accuracy signal to the unit its source used and the factor applied.
    ``nonfinite_loss_step`` is the step from which the logged loss stays NaN or infinite to
    the end of the run, None when the last logged loss is finite. ``transient_nonfinite_steps``
    are the earlier steps with a non-finite logged loss that finite losses followed, such as
    fp16 overflow steps that the gradient scaler skipped.
    """

    tables: dict[str, pd.DataFrame]
    layer_names: list[str]
    missing: list[str]
    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    derived_columns: dict[str, str] = field(default_factory=dict)
    nonfinite_loss_step: int | None = None
    transient_nonfinite_steps: list[int] = field(default_factory=list)

    def row_counts(self) -> dict[str, int]:
        return {table: len(frame) for table, frame in self.tables.items()}


def build_tables(source: SourceData, mapping: Mapping) -> ImportedTables:
    """Combine, scale and lay out every mapped signal; see the module documentation."""
    values = {signal: _combined(source, mapping, signal) for signal in mapping.signals}
    units = _scale_accuracies(values, mapping, str(source.path))
    result = ImportedTables(tables={}, layer_names=[], missing=[], units=units)
    layer_values = {s: v for s, v in values.items() if s.table == "layers"}
    layer_steps = _union_index(layer_values.values())
    steps_index = _union_index(
        [v for s, v in values.items() if s.table == "steps" and s.column not in _COMPANION_COLUMNS]
        + [layer_steps.to_series()]
    )
    result.tables["steps"] = _row_table("steps", values, steps_index)
    for table in ("evals", "dense_knn"):
        index = _union_index(
            [v for s, v in values.items() if s.table == table and s.column != "epoch"]
        )
        epoch = Signal(table, "epoch")
        if epoch not in values and Signal("steps", "epoch") in values and len(index):
            values[epoch] = values[Signal("steps", "epoch")]
            result.derived_columns[epoch.name] = "the steps table's epoch at the same step"
        result.tables[table] = _row_table(table, values, index)
    result.layer_names = sorted({s.layer for s in layer_values}, key=layer_order_key)
    result.tables["layers"] = _layers_table(layer_values, layer_steps, result.layer_names)
    result.missing = _missing(values, result)
    diverged, transient = nonfinite_loss_steps(values.get(Signal("steps", "loss")))
    result.nonfinite_loss_step = diverged
    result.transient_nonfinite_steps = transient
    return result


def _combined(source: SourceData, mapping: Mapping, signal: Signal) -> pd.Series:
    """Return the values of ``signal``: its column, or the L2 norm of several norm columns.

    Several columns combine only at steps where every one of them was logged.
    """
    columns = mapping.columns_of(signal)
    if len(columns) == 1:
        return source.series[columns[0]]
    frame = pd.concat([source.series[column] for column in columns], axis=1, join="inner")
    partial = len(_union_index(source.series[column] for column in columns)) - len(frame)
    if partial:
        log.info(
            "%s: %d steps log only some of the %d parameter norms of %s, so %s is NaN there",
            source.path,
            partial,
            len(columns),
            signal.name,
            signal.name,
        )
    norms = np.sqrt(np.square(frame.to_numpy(dtype="float64")).sum(axis=1))
    return pd.Series(norms, index=frame.index, name=signal.name)


def _union_index(series: Any) -> pd.Index:
    index = pd.Index([], dtype="int64")
    for values in series:
        index = index.union(values.index)
    return index.astype("int64")


def _scale_accuracies(
    values: dict[Signal, pd.Series], mapping: Mapping, where: str
) -> dict[str, dict[str, Any]]:
    """Convert accuracies logged as fractions to percent, in place; return the units used.

    An accuracy without a ``--map`` unit is a fraction when all its finite values lie in
    [0, 1], and percent otherwise. A standard error follows its accuracy's unit.
    """
    units: dict[str, dict[str, Any]] = {}
    scales: dict[str, float] = {}
    for signal in [s for s in values if s.is_accuracy]:
        unit = mapping.signals[signal].unit
        finite = values[signal][np.isfinite(values[signal])]
        chosen_by = "--map"
        if unit is None:
            in_unit_range = finite.empty or (finite.min() >= 0 and finite.max() <= 1)
            unit = "fraction" if not finite.empty and in_unit_range else "percent"
            chosen_by = "values"
        scale = FRACTION_SCALE if unit == "fraction" else 1.0
        if chosen_by == "values" and unit == "percent":
            _warn_mixed_units(signal, finite, mapping, where)
        _check_percent(signal, finite * scale, mapping, where)
        if unit == "fraction" and chosen_by == "values":
            column = mapping.columns_of(signal)[0]
            log.info(
                "%s: %s from %s lies in [0, 1], so it is read as a fraction and multiplied by "
                "100; pass --map %s=%s:percent if it is in percent",
                where,
                signal.name,
                column,
                column,
                signal.name,
            )
        values[signal] = values[signal] * scale
        scales[f"{signal.table}.{signal.column}"] = scale
        units[signal.name] = {"unit": unit, "scale": scale, "chosen_by": chosen_by}
    for signal in [s for s in values if s.is_accuracy_se]:
        unit = mapping.signals[signal].unit
        if unit is not None:
            scale = FRACTION_SCALE if unit == "fraction" else 1.0
            chosen_by = "--map"
        else:
            accuracy = f"{signal.table}.{ACCURACY_SE_COLUMNS[signal.column]}"
            scale = scales.get(accuracy, 1.0)
            unit = "fraction" if scale == FRACTION_SCALE else "percent"
            chosen_by = "accuracy"
        values[signal] = values[signal] * scale
        units[signal.name] = {"unit": unit, "scale": scale, "chosen_by": chosen_by}
    return units


def _warn_mixed_units(signal: Signal, finite: pd.Series, mapping: Mapping, where: str) -> None:
    """Warn when an accuracy read as percent also has values in (0, 1], as fractions would.

    A run's accuracy can stay below 1 % for a while, so this is a warning, not an error.
    """
    small = int(((finite > 0) & (finite <= 1)).sum())
    if not small:
        return
    column = mapping.columns_of(signal)[0]
    log.warning(
        "%s: %s from %s is read as percent because it exceeds 1, but %d of its %d values lie "
        "in (0, 1]; if part of the run logged it as a fraction, the unit changed and those "
        "values are 100 times too small",
        where,
        signal.name,
        column,
        small,
        len(finite),
    )


def _check_percent(signal: Signal, percent: pd.Series, mapping: Mapping, where: str) -> None:
    if percent.empty or (percent.min() >= 0 and percent.max() <= 100):
        return
    column = mapping.columns_of(signal)[0]
    raise DataError(
        f"{where}: {column} ranges from {percent.min():g} to {percent.max():g} as {signal.name} "
        "in percent, outside 0 to 100, so it is not an accuracy; map another column, or pass "
        f"--map {column}={signal.name}:fraction or :percent if the unit was misread"
    )


def _row_table(table: str, values: dict[Signal, pd.Series], index: pd.Index) -> pd.DataFrame:
    data: dict[str, Any] = {"step": index.to_numpy(dtype="int64")}
    for column in TABLE_COLUMNS[table][1:]:
        signal = Signal(table, column)
        if column == "knn_correct":
            data[column] = [None] * len(index)  # per-query hits exist only in native runs
        elif signal in values:
            data[column] = values[signal].reindex(index).to_numpy(dtype="float64")
        else:
            data[column] = np.full(len(index), np.nan)
    return pd.DataFrame(data, columns=list(TABLE_COLUMNS[table]))


def _layers_table(
    values: dict[Signal, pd.Series], index: pd.Index, layer_names: list[str]
) -> pd.DataFrame:
    rows = len(index) * len(layer_names)
    data: dict[str, Any] = {
        "step": np.repeat(index.to_numpy(dtype="int64"), len(layer_names)),
        "layer": np.tile(np.array(layer_names, dtype=object), len(index)),
    }
    for column in LAYER_COLUMNS:
        # (steps, layers) laid out step-major, as stabilitylab run writes its rows.
        grid = np.full((len(index), len(layer_names)), np.nan)
        for position, layer in enumerate(layer_names):
            signal = Signal("layers", column, layer)
            if signal in values:
                grid[:, position] = values[signal].reindex(index).to_numpy(dtype="float64")
        data[column] = grid.reshape(rows)
    return pd.DataFrame(data, columns=list(TABLE_COLUMNS["layers"]))


def _missing(values: dict[Signal, pd.Series], result: ImportedTables) -> list[str]:
    """List the signals that no column fills, in table order.

    The dense kNN table counts only when the source has one of its signals, because most
    runs have no dense monitor. A layer column absent for every group is listed as
    ``COLUMN[LAYER]``.
    """
    missing = []
    for table in ROW_TABLES:
        signals = row_signals(table)
        if table == "dense_knn" and not any(signal in values for signal in signals):
            continue
        missing += [signal.name for signal in signals if signal not in values]
    for column in LAYER_COLUMNS:
        have = {s.layer for s in values if s.table == "layers" and s.column == column}
        if not have:
            missing.append(f"{column}[LAYER]")
            continue
        missing += [f"{column}[{layer}]" for layer in result.layer_names if layer not in have]
    return missing


def nonfinite_loss_steps(loss: pd.Series | None) -> tuple[int | None, list[int]]:
    """Split the steps of non-finite logged losses into a divergence and one-off values.

    ``loss`` contains the logged values by step. A run diverged when its last logged loss is
    NaN or infinite: the first item is the first step of that final non-finite stretch, and
    None when the last logged loss is finite. The second item lists the other steps with a
    non-finite loss, each followed by a finite one, so the run went on training after them.
    """
    if loss is None or loss.empty:
        return None, []
    ordered = loss.sort_index(kind="stable")
    finite = np.isfinite(ordered.to_numpy(dtype="float64"))
    steps = ordered.index.to_numpy(dtype="int64")
    bad = np.flatnonzero(~finite)
    if not len(bad):
        return None, []
    if finite[-1]:
        return None, [int(step) for step in steps[bad]]
    good = np.flatnonzero(finite)
    start = int(good[-1]) + 1 if len(good) else 0
    transient = [int(steps[index]) for index in bad if index < start]
    return int(steps[start]), transient
