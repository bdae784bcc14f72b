"""Source data as the readers return it: each column as a series of logged values by step.

A series contains only the steps at which its column was logged, so a value can be NaN or
infinite only where the source logged it so. That keeps "not logged at this step" apart from
"logged as NaN", which the run directory's tables, NaN in both cases, cannot do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.errors import DataError

log = logging.getLogger(__name__)

# Text cells that mean a logged NaN, as Python's str(float("nan")) and pandas write it.
_NAN_TEXT = {"nan", "-nan", "+nan"}


@dataclass
class SourceData:
    """The columns of one source, read but not yet mapped to signals.

    ``series`` maps a column (or TensorBoard tag) to float64 values indexed by int64 step,
    sorted, one value per step. ``ignored`` maps a column that is not a candidate signal
    (a step counter, a text column, a histogram) to the reason. ``details`` contains
    format-specific facts for ``config.json``, such as Lightning's hyperparameters.
    """

    format: str
    path: Path
    files: list[Path]
    series: dict[str, pd.Series]
    step_column: str | None = None
    ignored: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(self.series)


def logged_series(steps: np.ndarray, values: np.ndarray, name: str) -> tuple[pd.Series, int]:
    """Return the values as a Series indexed by step, keeping the last value of a repeated step.

    The second item is the number of repeated steps that were dropped: a resumed run logs
    the steps after its last checkpoint again, and the later values are the ones it kept.
    """
    series = pd.Series(np.asarray(values, dtype="float64"), index=np.asarray(steps, "int64"))
    repeated = series.index.duplicated(keep="last")
    series = series[~repeated].sort_index(kind="stable")
    series.name = name
    series.index.name = "step"
    return series, int(repeated.sum())


def parse_steps(text: pd.Series, column: str, where: str) -> pd.Series:
    """Return the step column of a text table as int64, without the rows whose step is empty.

    An empty step comes from a logger that writes a summary row without one. Raises
    DataError when a step is not a whole number of at least 0.
    """
    present = text.str.strip() != ""
    numbers = pd.to_numeric(text[present], errors="coerce")
    bad = numbers.isna() | ~np.isfinite(numbers) | (numbers < 0) | (numbers % 1 != 0)
    if bad.any():
        example = text[present][bad].iloc[0]
        raise DataError(
            f"{where}: step column {column!r} contains {example!r}, not a whole number of at "
            "least 0; pass --map COLUMN=step to name the column that counts optimiser steps"
        )
    dropped = int((~present).sum())
    if dropped:
        log.info("%s: %d rows without a value in %s were skipped", where, dropped, column)
    return numbers.astype("int64")


def numeric_cells(text: pd.Series) -> pd.Series | None:
    """Return the non-empty cells of a text column as floats, or None if one is not a number.

    ``nan``, ``inf`` and ``-inf`` are numbers: they are what a logger writes for a
    non-finite value.
    """
    cells = text[text.str.strip() != ""]
    numbers = pd.to_numeric(cells, errors="coerce").astype("float64")
    failed = numbers.isna() & ~cells.str.strip().str.lower().isin(_NAN_TEXT)
    if failed.any():
        return None
    return numbers


def table_series(
    table: pd.DataFrame, step_column: str, where: str
) -> tuple[dict[str, pd.Series], dict[str, str]]:
    """Split a text table with one step column and sparse value columns into series.

    ``table`` contains strings, with ``""`` for an empty cell. Returns the series of the
    numeric columns and, for each text column, the reason it is ignored.
    """
    steps = parse_steps(table[step_column], step_column, where)
    rows = table.loc[steps.index]
    series: dict[str, pd.Series] = {}
    ignored: dict[str, str] = {}
    repeats: dict[str, int] = {}
    for column in rows.columns:
        if column == step_column:
            continue
        numbers = numeric_cells(rows[column])
        if numbers is None:
            ignored[column] = "contains text, not numbers"
            continue
        if numbers.empty:
            ignored[column] = "has no values"
            continue
        series[column], repeats[column] = logged_series(
            steps[numbers.index].to_numpy(), numbers.to_numpy(), column
        )
    _log_repeats(where, repeats)
    return series, ignored


def _log_repeats(where: str, repeats: dict[str, int]) -> None:
    repeated = {column: count for column, count in repeats.items() if count}
    if repeated:
        worst = max(repeated, key=repeated.get)
        log.info(
            "%s: %d columns log some steps more than once (%s repeats %d values); the last "
            "value of each step is kept",
            where,
            len(repeated),
            worst,
            repeated[worst],
        )
