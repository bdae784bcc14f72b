"""``stabilitylab import``: turn a run logged by another tool into a run directory.

:func:`import_run` reads TensorBoard event files, a Lightning ``CSVLogger`` folder or a
wandb CSV export (:mod:`stabilitylab.importers.formats`), maps its columns to run-directory
signals (:mod:`stabilitylab.importers.mapping`), builds the tables
(:mod:`stabilitylab.importers.tables`) and writes a run directory that
``stabilitylab report`` reads. Signals without a column are NaN and listed, never guessed.

``config.json`` of an imported run has ``config.source`` ``"import"``,
``config.freeze_patch_embed`` from ``frozen``, and ``derived.import`` with the source, its
format and files, the mapping used, the missing signals and the columns left out.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import stabilitylab
from stabilitylab.errors import DataError
from stabilitylab.importers.formats import AUTO, FORMATS, read_source
from stabilitylab.importers.mapping import (
    Mapping,
    listed,
    parse_map_options,
    resolve_mapping,
    step_column_option,
)
from stabilitylab.importers.signals import Signal
from stabilitylab.importers.source import SourceData
from stabilitylab.importers.tables import ImportedTables, build_tables
from stabilitylab.runs import RunWriter, make_dir, prepare_run_dir

__all__ = ["FORMATS", "ImportResult", "import_run"]

log = logging.getLogger(__name__)

SOURCE_NAME = "import"
# Signals of which a source needs at least one, or the detectors have nothing to work on.
_DETECTOR_SIGNALS = (
    Signal("steps", "loss"),
    Signal("steps", "grad_norm"),
    Signal("steps", "token_grad_norm"),
    Signal("evals", "knn_top1"),
    Signal("dense_knn", "knn_top1"),
)


@dataclass(frozen=True)
class ImportResult:
    """Summary of one import: where it went and what it contains."""

    run_dir: Path
    format: str
    rows: dict[str, int]
    layers: list[str]
    missing: list[str]
    unknown_columns: list[str]


def import_run(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: str = AUTO,
    mapping: Sequence[str] = (),
    frozen: bool | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Import the run at ``source`` into the new run directory ``out``.

    ``mapping`` contains ``COLUMN=SIGNAL[:UNIT]`` texts as ``--map`` takes them. ``frozen``
    records whether the run kept its patch projection frozen; None records the default,
    learned, and logs that it was assumed. ``overwrite`` replaces a run directory at ``out``.

    The source is read and checked before anything is written. The run directory is
    written into a hidden folder beside ``out`` and renamed to ``out`` when complete.
    Raises DataError for an unreadable source or one without a loss, gradient norm or kNN
    accuracy, ConfigError for a bad option, and RunDirError for an unusable ``out``.
    """
    options = parse_map_options(mapping)
    _check_out_early(Path(out), overwrite)
    data = read_source(Path(source), format, step_column_option(options))
    resolved = resolve_mapping(data.columns, options, str(data.path), data.ignored)
    _require_detector_signal(data, resolved)
    tables = build_tables(data, resolved)
    if frozen is None:
        arm_from = "default"
    else:
        arm_from = "--frozen" if frozen else "--learned"
    frozen = bool(frozen)
    _log_summary(data, resolved, tables, frozen, arm_from)
    summary = _import_summary(data, resolved, tables, frozen, arm_from)
    run_dir = _write_run_dir(Path(out), overwrite, tables, frozen, summary)
    log.info(
        "%s: imported %d steps, %d layer groups and %d evaluations from %s",
        run_dir,
        len(tables.tables["steps"]),
        len(tables.layer_names),
        len(tables.tables["evals"]),
        data.path,
    )
    return ImportResult(
        run_dir=run_dir,
        format=data.format,
        rows=tables.row_counts(),
        layers=tables.layer_names,
        missing=tables.missing,
        unknown_columns=resolved.unknown,
    )


def _check_out_early(out: Path, overwrite: bool) -> None:
    """Reject an unusable ``out`` before the source is read; prepare_run_dir raises then."""
    if out.exists() and (not out.is_dir() or (not overwrite and any(out.iterdir()))):
        prepare_run_dir(out, overwrite=overwrite)


def _require_detector_signal(data: SourceData, mapping: Mapping) -> None:
    has_layer_norm = any(
        signal.table == "layers" and signal.column == "grad_norm" for signal in mapping.signals
    )
    if has_layer_norm or any(signal in mapping.signals for signal in _DETECTOR_SIGNALS):
        return
    raise DataError(
        f"{data.path} has no loss, gradient norm or kNN accuracy to import; its {data.format} "
        f"columns are {listed(data.columns)}. Map one with --map COLUMN=SIGNAL, such as --map "
        "my_loss=loss or --map val_acc=knn_top1"
    )


def _log_summary(
    data: SourceData, mapping: Mapping, tables: ImportedTables, frozen: bool, arm_from: str
) -> None:
    pairs = [f"{signal.name} <- {'+'.join(src.columns)}" for signal, src in mapping.signals.items()]
    log.info("%s (%s): mapped %s", data.path, data.format, listed(pairs))
    if tables.missing:
        log.warning(
            "%s: no column for %s, so they are NaN (see derived.import.missing in config.json)",
            data.path,
            listed(tables.missing, limit=len(tables.missing)),
        )
    if mapping.unknown:
        log.warning(
            "%s: columns not imported because no signal matches them (pass --map "
            "COLUMN=SIGNAL to use one): %s",
            data.path,
            listed(mapping.unknown),
        )
    for column, reason in mapping.unused.items():
        log.info("%s: column %s not used: %s", data.path, column, reason)
    if arm_from == "default":
        log.info(
            "%s: recorded with a learned patch projection, the default; pass --frozen for a run "
            "that kept it frozen",
            data.path,
        )
    elif frozen and any(
        signal == Signal("layers", "grad_norm", "patch_embed") for signal in mapping.signals
    ):
        log.warning(
            "%s: --frozen, but the source logs a gradient norm for patch_embed, which a frozen "
            "patch projection does not have",
            data.path,
        )


def _import_summary(
    data: SourceData, mapping: Mapping, tables: ImportedTables, frozen: bool, arm_from: str
) -> dict[str, Any]:
    """Return ``derived.import``: what was read, how it was mapped and what is missing."""
    signals = {}
    mapped = {column for source in mapping.signals.values() for column in source.columns}
    for signal, source in mapping.signals.items():
        entry = source.to_dict()
        entry.update(tables.units.get(signal.name, {}))
        signals[signal.name] = entry
    return {
        "source": str(data.path.resolve()),
        "format": data.format,
        "files": [str(path.resolve()) for path in data.files],
        "step_column": data.step_column,
        "mapping": signals,
        "derived_columns": tables.derived_columns,
        "missing": tables.missing,
        "unknown_columns": mapping.unknown,
        "unused_columns": mapping.unused,
        "ignored_columns": {
            **{column: reason for column, reason in data.ignored.items() if column not in mapped},
            **{column: "--map COLUMN=ignore" for column in mapping.ignored},
        },
        "nonfinite_loss_step": tables.nonfinite_loss_step,
        "arm": "frozen" if frozen else "learned",
        "arm_from": arm_from,
        "rows": tables.row_counts(),
        **data.details,
    }


def _environment() -> dict[str, Any]:
    return {
        "stabilitylab": stabilitylab.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": sys.argv,
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_run_dir(
    out: Path, overwrite: bool, tables: ImportedTables, frozen: bool, summary: dict[str, Any]
) -> Path:
    """Write the run directory beside ``out`` and rename it into place when complete."""
    make_dir(out.parent, "--out")
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        writer = RunWriter(staging)
        config = {"source": SOURCE_NAME, "freeze_patch_embed": frozen}
        derived = {"layers": tables.layer_names, "import": summary}
        writer.write_config(config, derived, _environment())
        for table, frame in tables.tables.items():
            writer.append(table, frame)
        steps = tables.tables["steps"]["step"]
        done = int(steps.max()) + 1 if len(steps) else 0
        writer.write_status("finished", step=done, source=SOURCE_NAME)
        # Rejects an existing folder unless overwrite, and empties the old run if allowed.
        prepare_run_dir(out, overwrite=overwrite)
        staging.replace(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
