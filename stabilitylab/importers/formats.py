"""Tell the format of a source and read it with the matching reader.

``auto`` decides from what is there:

- an ``events.out.tfevents.*`` file, or a folder that contains one at any depth:
  ``tensorboard``;
- a CSV file with a wandb step column (``_step``, ``trainer/global_step`` or a chart
  export's ``Step``) or wandb's ``_runtime`` or ``_timestamp``: ``wandb-csv``;
- a CSV file with a ``step`` column, or a folder with ``metrics.csv`` or
  ``version_N/metrics.csv``: ``lightning-csv``.
"""

from __future__ import annotations

from pathlib import Path

from stabilitylab.errors import ConfigError, DataError
from stabilitylab.importers import csv as csv_reader
from stabilitylab.importers import tensorboard as tensorboard_reader
from stabilitylab.importers.source import SourceData

AUTO = "auto"
FORMATS = (AUTO, tensorboard_reader.FORMAT, csv_reader.LIGHTNING, csv_reader.WANDB)
_WANDB_MARKERS = (*csv_reader.WANDB_STEP_COLUMNS, "_runtime", "_timestamp")


def detect_format(path: Path, step_column: str | None = None) -> str:
    """Return the format of ``path``; raise DataError when it matches none.

    A CSV file whose step column ``step_column`` names (``--map COLUMN=step``) and that has
    no wandb column reads as ``lightning-csv``, the generic layout of one row per log call.
    """
    if tensorboard_reader.is_event_file(path):
        return tensorboard_reader.FORMAT
    if path.is_dir():
        if tensorboard_reader.find_event_folders(path):
            return tensorboard_reader.FORMAT
        csv_reader.find_lightning_metrics(path)  # raises, naming what is missing
        return csv_reader.LIGHTNING
    header = csv_reader.csv_header(path)
    if not header:
        raise DataError(f"{path} is empty; pass the metrics file of a run")
    if any(column in header for column in _WANDB_MARKERS):
        return csv_reader.WANDB
    if csv_reader.LIGHTNING_STEP in header or (step_column is not None and step_column in header):
        return csv_reader.LIGHTNING
    raise DataError(
        f"the format of {path} is not recognised: it is not a TensorBoard event file and, read "
        f"as CSV, has no step column (step, {', '.join(csv_reader.WANDB_STEP_COLUMNS)}); pass "
        f"--format and --map COLUMN=step naming its step column{csv_reader.separator_hint(header)}"
    )


def read_source(path: Path, format: str, step_column: str | None = None) -> SourceData:
    """Read ``path`` in ``format`` (one of :data:`FORMATS`).

    ``step_column`` names the step column of a CSV file; TensorBoard events carry their own
    steps, so it is an error there.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is not one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(
            f"{path} does not exist; pass a TensorBoard event file or folder, a Lightning "
            "metrics.csv or version folder, or a wandb CSV export"
        )
    chosen = detect_format(path, step_column) if format == AUTO else format
    if chosen == tensorboard_reader.FORMAT:
        if step_column is not None:
            raise ConfigError(
                f"--map {step_column}=step applies to CSV files; TensorBoard events carry their "
                "own steps, so drop it"
            )
        return tensorboard_reader.read_tensorboard(path)
    if chosen == csv_reader.LIGHTNING:
        return csv_reader.read_lightning_csv(path, step_column)
    return csv_reader.read_wandb_csv(path, step_column)
