"""Read metrics from CSV files: Lightning's CSVLogger and the wandb CSV exports.

Lightning's ``CSVLogger`` writes ``NAME/version_N/metrics.csv`` and ``hparams.yaml``. Each
row has ``step`` (the optimiser step, ``trainer.global_step``), ``epoch`` and the metrics
logged together at that step, so the other cells are empty. Training and validation rows
interleave, and a step may appear in several rows.

A wandb run's History export (``run.history()`` of the public API saved as CSV) has
``_step``, wandb's count of ``wandb.log`` calls, ``_runtime`` and ``_timestamp``, and a
column per metric, such as ``train/loss``. When the run logged ``trainer/global_step``
(Lightning's WandbLogger does) that column is the optimiser step and is used instead of
``_step``. A chart's CSV download has ``Step`` and ``RUN - metric`` columns with
``__MIN`` and ``__MAX`` companions. The run-name prefix is removed and the companions are
ignored.

NOTE: wandb's documentation gives no column layout for a chart's CSV download. The
handling here follows such files as users share them and may miss other variants.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitylab.errors import DataError
from stabilitylab.importers.source import SourceData, table_series

log = logging.getLogger(__name__)

LIGHTNING = "lightning-csv"
WANDB = "wandb-csv"
METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"
LIGHTNING_STEP = "step"
# Step columns of wandb exports, in the order of preference.
WANDB_STEP_COLUMNS = ("trainer/global_step", "_step", "Step")
WANDB_BOOKKEEPING = {"_timestamp": "wandb's Unix time of the log call", "_wandb": "wandb metadata"}
_CHART_COMPANION = re.compile(r"__(MIN|MAX)$")
_CHART_PREFIX = " - "


def read_text_table(path: Path) -> pd.DataFrame:
    """Read a CSV file as strings, ``""`` for empty cells; raise DataError when unusable."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; pass the metrics CSV file of a run") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not a readable CSV file ({error})") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read: {error.strerror or error}") from None
    if table.empty:
        raise DataError(f"{path} has a header but no rows, so there is nothing to import")
    return table


def csv_header(path: Path) -> list[str]:
    """Return the column names of a CSV file, [] for an empty one."""
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise DataError(f"{path} is not a readable CSV file ({error})") from None


def find_lightning_metrics(path: Path) -> Path:
    """Return the ``metrics.csv`` of a file, a ``version_N`` folder, a logger folder
    (``NAME``) or the logger's ``save_dir``, which contains ``NAME/version_N``.

    A folder that contains several runs is an error that lists them, because the import
    reads one run and picking one of them would be a guess.
    """
    if path.is_file():
        return path
    if (path / METRICS_FILE).is_file():
        return path / METRICS_FILE
    for pattern in (f"*/{METRICS_FILE}", f"*/*/{METRICS_FILE}"):
        versions = sorted(p.parent for p in path.glob(pattern) if p.is_file())
        if len(versions) == 1:
            log.info("%s: reading the run in %s", path, versions[0])
            return versions[0] / METRICS_FILE
        if versions:
            names = ", ".join(str(version) for version in versions)
            raise DataError(
                f"{path} contains {len(versions)} runs ({names}); pass the folder of one of them"
            )
    raise DataError(
        f"{path} contains no {METRICS_FILE}, neither in version folders (version_N/"
        f"{METRICS_FILE}) nor in logger folders (NAME/version_N/{METRICS_FILE}); pass the "
        "metrics file, or the folder that Lightning's CSVLogger wrote"
    )


def _require_step_column(table: pd.DataFrame, column: str, path: Path) -> None:
    if column not in table.columns:
        raise DataError(
            f"{path} has no step column {column!r}; its columns are "
            f"{', '.join(list(table.columns)[:20])}. Pass --map COLUMN=step to name the column "
            f"that counts optimiser steps{separator_hint(list(table.columns))}"
        )


def separator_hint(columns: list[str]) -> str:
    """Return a hint when a one-column header looks split by another separator than commas."""
    if len(columns) != 1:
        return ""
    header = str(columns[0])
    for separator, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
        if separator in header:
            return (
                f". The header was read as one column, and it contains {name}: save the file "
                "with commas between the columns"
            )
    return ""


def read_lightning_csv(path: Path, step_column: str | None = None) -> SourceData:
    """Read a Lightning ``metrics.csv`` and its ``hparams.yaml``, if there is one."""
    metrics = find_lightning_metrics(path)
    table = read_text_table(metrics)
    column = step_column or LIGHTNING_STEP
    _require_step_column(table, column, metrics)
    series, ignored, text_cells = table_series(table, column, str(metrics))
    files = [metrics]
    details: dict[str, Any] = {}
    hparams_path = metrics.parent / HPARAMS_FILE
    if hparams_path.is_file():
        files.append(hparams_path)
        details["hparams"] = _read_hparams(hparams_path)
    return SourceData(LIGHTNING, path, files, series, column, ignored, details, text_cells)


def _read_hparams(path: Path) -> Any:
    """Return the hyperparameters of ``hparams.yaml``, or None when they cannot be read."""
    try:
        import yaml
    except ImportError:
        log.warning("%s is not read: it needs the PyYAML package", path)
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        # A value that yaml.dump wrote as a Python object has a tag that safe_load rejects.
        log.warning("%s is not read: %s", path, str(error).splitlines()[0])
        return None


def wandb_step_column(columns: list[str], table: pd.DataFrame | None = None) -> str | None:
    """Return the preferred step column among ``columns`` that has a value, or None."""
    for column in WANDB_STEP_COLUMNS:
        if column in columns and (table is None or (table[column].str.strip() != "").any()):
            return column
    return None


def read_wandb_csv(path: Path, step_column: str | None = None) -> SourceData:
    """Read a wandb History or chart CSV export; see the module documentation."""
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the CSV file that wandb exported")
    table = read_text_table(path)
    table, ignored = _strip_chart_columns(table, path)
    column = step_column or wandb_step_column(list(table.columns), table)
    if column is None:
        raise DataError(
            f"{path} has none of the step columns {', '.join(WANDB_STEP_COLUMNS)}; pass "
            "--map COLUMN=step to name the column that counts optimiser steps"
        )
    _require_step_column(table, column, path)
    for other in WANDB_STEP_COLUMNS:
        if other in table.columns and other != column:
            ignored[other] = f"a step counter; {column} is the step column"
    for name, reason in WANDB_BOOKKEEPING.items():
        if name in table.columns:
            ignored[name] = reason
    # Chart companions are dropped. Step counters and bookkeeping stay mappable with --map.
    series, text_columns, text_cells = table_series(table, column, str(path))
    ignored.update(text_columns)
    return SourceData(WANDB, path, [path], series, column, ignored, text_cells=text_cells)


def _strip_chart_columns(table: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Drop the ``__MIN``/``__MAX`` columns of a chart export and its ``RUN - `` prefix."""
    ignored = {
        column: "minimum or maximum of a wandb chart bucket"
        for column in table.columns
        if _CHART_COMPANION.search(column)
    }
    table = table.drop(columns=list(ignored))
    values = [column for column in table.columns if column not in WANDB_STEP_COLUMNS]
    prefixes = {column.split(_CHART_PREFIX, 1)[0] for column in values if _CHART_PREFIX in column}
    if not prefixes or any(_CHART_PREFIX not in column for column in values):
        return table, ignored
    if len(prefixes) > 1:
        raise DataError(
            f"{path} contains the metrics of {len(prefixes)} runs ({', '.join(sorted(prefixes))}); "
            "export one run"
        )
    prefix = prefixes.pop() + _CHART_PREFIX
    log.info("%s: removed the run name %r from the column names", path, prefix.strip(" -"))
    renamed = {column: column.removeprefix(prefix) for column in values}
    return table.rename(columns=renamed), ignored
