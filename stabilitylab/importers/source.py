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
# A CSV file's first data row is line 2, after the header.
_FIRST_DATA_LINE = 2
# The reason recorded in SourceData.ignored for a column without any number.
TEXT_ONLY = "contains text, not numbers"


@dataclass(frozen=True)
class TextCells:
    """The text cells of a CSV column whose other cells are numbers, such as ``n/a``.

    ``count`` is how many there are. ``line`` (the file's line, the header being line 1),
    ``step`` and ``value`` describe the first one.
    """

    column: str
    count: int
    line: int
    step: int
    value: str

    def describe(self) -> str:
        """Return a phrase naming the column, the first text cell and the count."""
        others = f" and {self.count - 1} more" if self.count > 1 else ""
        return (
            f"column {self.column!r} contains the text {self.value!r} at line {self.line} "
            f"(step {self.step}){others}, where its other cells are numbers"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "line": self.line, "step": self.step, "value": self.value}


@dataclass
class SourceData:
    """The columns of one source, read but not yet mapped to signals.

    ``series`` maps a column (or TensorBoard tag) to float64 values indexed by int64 step,
    sorted, one value per step. ``ignored`` maps a column that is not a candidate signal
    (a step counter, a text column, a histogram) to the reason. ``text_cells`` describes
    the columns of numbers with some text cells, which ``series`` contains without those
    cells. ``details`` contains format-specific facts for ``config.json``, such as
    Lightning's hyperparameters.
    """

    format: str
    path: Path
    files: list[Path]
    series: dict[str, pd.Series]
    step_column: str | None = None
    ignored: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    text_cells: dict[str, TextCells] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(self.series)


def logged_series(steps: np.ndarray, values: np.ndarray, name: str) -> tuple[pd.Series, int]:
    """Return the values as a Series indexed by step, keeping the last value of a repeated step.

    The second item is the number of dropped values that differ from the value kept for
    their step: a resumed run logs the steps after its last checkpoint again, and the later
    values are the ones it kept. A value logged twice alike, such as Lightning's ``epoch``
    on the training and the validation row of one step, does not count.
    """
    logged = pd.Series(np.asarray(values, dtype="float64"), index=np.asarray(steps, "int64"))
    repeated = logged.index.duplicated(keep="last")
    series = logged[~repeated].sort_index(kind="stable")
    series.name = name
    series.index.name = "step"
    dropped = logged[repeated].to_numpy()
    kept = series.reindex(logged.index[repeated]).to_numpy()
    same = (dropped == kept) | (np.isnan(dropped) & np.isnan(kept))
    return series, int((~same).sum())


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
        line = int(text[present][bad].index[0]) + _FIRST_DATA_LINE
        raise DataError(
            f"{where}: step column {column!r} contains {example!r} at line {line}, not a whole "
            "number of at least 0; pass --map COLUMN=step to name the column that counts "
            "optimiser steps"
        )
    dropped = int((~present).sum())
    if dropped:
        log.info("%s: %d rows without a value in %s were skipped", where, dropped, column)
    return numbers.astype("int64")


def split_cells(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Split the non-empty cells of a text column into numbers (floats) and text cells.

    ``nan``, ``inf`` and ``-inf`` are numbers: they are what a logger writes for a
    non-finite value. Both results keep the rows' index.
    """
    cells = text[text.str.strip() != ""]
    numbers = pd.to_numeric(cells, errors="coerce").astype("float64")
    failed = numbers.isna() & ~cells.str.strip().str.lower().isin(_NAN_TEXT)
    return numbers[~failed], cells[failed]


def table_series(
    table: pd.DataFrame, step_column: str, where: str
) -> tuple[dict[str, pd.Series], dict[str, str], dict[str, TextCells]]:
    """Split a text table with one step column and sparse value columns into series.

    ``table`` contains strings, with ``""`` for an empty cell. Returns the series of the
    columns with numbers, the reason each other column is ignored (only text, or no value),
    and the text cells of columns that mix numbers and text. Those cells are left out of
    the series, as steps where the column has no value.
    """
    steps = parse_steps(table[step_column], step_column, where)
    rows = table.loc[steps.index]
    series: dict[str, pd.Series] = {}
    ignored: dict[str, str] = {}
    text_cells: dict[str, TextCells] = {}
    repeats: dict[str, int] = {}
    for column in rows.columns:
        if column == step_column:
            continue
        numbers, texts = split_cells(rows[column])
        if numbers.empty:
            ignored[column] = TEXT_ONLY if len(texts) else "has no values"
            continue
        if len(texts):
            first = texts.index[0]
            text_cells[column] = TextCells(
                column=column,
                count=len(texts),
                line=int(first) + _FIRST_DATA_LINE,
                step=int(steps[first]),
                value=str(texts.iloc[0]),
            )
        series[column], repeats[column] = logged_series(
            steps[numbers.index].to_numpy(), numbers.to_numpy(), column
        )
    _log_repeats(where, repeats)
    return series, ignored, text_cells


def _log_repeats(where: str, repeats: dict[str, int]) -> None:
    repeated = {column: count for column, count in repeats.items() if count}
    if repeated:
        worst = max(repeated, key=repeated.get)
        log.info(
            "%s: %d columns log some steps more than once with different values (%s at %d "
            "steps); the last value of each step is kept",
            where,
            len(repeated),
            worst,
            repeated[worst],
        )
