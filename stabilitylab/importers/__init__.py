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
from stabilitylab.errors import DataError, RunDirError
from stabilitylab.importers.formats import AUTO, FORMATS, read_source
from stabilitylab.importers.mapping import (
    Mapping,
    alias_candidate,
    listed,
    parse_map_options,
    resolve_mapping,
    step_column_option,
)
from stabilitylab.importers.signals import Signal
from stabilitylab.importers.source import TEXT_ONLY, SourceData
from stabilitylab.importers.tables import ImportedTables, build_tables
from stabilitylab.runs import RunWriter, is_run_dir, make_dir, prepare_run_dir

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
    text_as_nan: bool = False,
) -> ImportResult:
    """Import the run at ``source`` into the new run directory ``out``.

    ``mapping`` contains ``COLUMN=SIGNAL[:UNIT]`` texts as ``--map`` takes them. ``frozen``
    records whether the run kept its patch projection frozen; None records the default,
    learned, and logs that it was assumed. ``overwrite`` replaces a run directory at ``out``.
    A CSV column that fills a signal and has text cells among its numbers (``n/a``) raises
    DataError naming the first cell, unless ``text_as_nan`` reads such cells as missing.

    The source is read and checked before anything is written. The run directory is
    written into a hidden folder beside ``out`` and renamed to ``out`` when complete.
    Raises DataError for an unreadable source or one without a loss, gradient norm or kNN
    accuracy, ConfigError for a bad option, and RunDirError for an unusable ``out``.
    """
    options = parse_map_options(mapping)
    _check_out_early(Path(out), overwrite)
    data = read_source(Path(source), format, step_column_option(options))
    resolved = resolve_mapping(data.columns, options, str(data.path), data.ignored)
    _check_text_cells(data, resolved, text_as_nan)
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
    """Reject an unusable ``out`` before the source is read.

    These are the checks of prepare_run_dir that leave the folder as it is: ``out`` or a
    parent is a file, ``out`` has files and no ``overwrite``, or ``out`` has files and is
    not a run directory, which ``overwrite`` never empties.
    """
    blocking = next((parent for parent in out.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise RunDirError(
            f"--out {out} cannot be created, because {blocking} is a file, not a folder; "
            "pass a folder path that contains no file"
        )
    if out.exists() and (not out.is_dir() or (not overwrite and any(out.iterdir()))):
        prepare_run_dir(out, overwrite=overwrite)
    if overwrite and out.is_dir() and any(out.iterdir()) and not is_run_dir(out):
        # Rejects a folder with files that is not a run directory, and empties nothing.
        prepare_run_dir(out, overwrite=overwrite)


def _check_text_cells(data: SourceData, mapping: Mapping, text_as_nan: bool) -> None:
    """Reject text cells in a column that fills a signal, or log them with ``text_as_nan``."""
    mapped = {column for source in mapping.signals.values() for column in source.columns}
    for column, cells in data.text_cells.items():
        if column not in mapped:
            continue
        if not text_as_nan:
            raise DataError(
                f"{data.path}: {cells.describe()}; fix the cell, or pass --text-as-nan to read "
                "text cells as missing values"
            )
        log.warning(
            "%s: %s; read its %d text cell(s) as missing values (NaN), as --text-as-nan asks",
            data.path,
            cells.describe(),
            cells.count,
        )


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
            "%s: no column of numbers for %s, so they are NaN (see derived.import.missing in "
            "config.json)",
            data.path,
            listed(tables.missing, limit=len(tables.missing)),
        )
    text_only = [
        column
        for column, reason in data.ignored.items()
        if reason == TEXT_ONLY and alias_candidate(column) is not None
    ]
    if text_only:
        log.warning(
            "%s: columns whose names match a signal contain only text, not numbers, so "
            "they are not imported: %s",
            data.path,
            listed(text_only),
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
    _log_nonfinite_loss(data, tables)
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


def _log_nonfinite_loss(data: SourceData, tables: ImportedTables) -> None:
    transient = tables.transient_nonfinite_steps
    if transient:
        log.warning(
            "%s: the logged loss is NaN or infinite at %d step(s), the first at step %d, and "
            "finite losses follow each; such steps are recorded as skipped steps, not as a "
            "divergence",
            data.path,
            len(transient),
            transient[0],
        )
    if tables.nonfinite_loss_step is not None:
        log.warning(
            "%s: the logged loss is NaN or infinite from step %d to the end of the run, so the "
            "run diverged there",
            data.path,
            tables.nonfinite_loss_step,
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
        "text_cells": {column: cells.to_dict() for column, cells in data.text_cells.items()},
        "nonfinite_loss_step": tables.nonfinite_loss_step,
        "transient_nonfinite_loss_steps": tables.transient_nonfinite_steps,
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
        # A one-off non-finite loss that finite losses follow left the weights usable, so the
        # optimiser step was skipped (or was harmless), as an fp16 gradient scaler does.
        writer.write_status(
            "finished",
            step=done,
            source=SOURCE_NAME,
            skipped_steps=tables.transient_nonfinite_steps,
        )
        # Rejects an existing folder unless overwrite, and empties the old run if allowed.
        prepare_run_dir(out, overwrite=overwrite)
        staging.replace(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
