"""The run-directory format: writing it while a run goes, and reading it back.

A run directory contains:

- ``config.json``: the resolved configuration, derived values (the lr after batch scaling,
  steps per epoch, the layer names) and the environment (versions, device, seed).
- ``status.json``: ``running``, ``finished`` or ``failed``, rewritten as the run goes. A run
  killed by a signal it could not catch stays ``running``. ``skipped_steps`` lists the
  optimiser steps that were not applied, and a run stopped at a non-finite loss or gradient
  norm has a ``diverged`` object (see :data:`DIVERGED_REASONS`).
- ``steps/``, ``layers/``, ``evals/``, ``dense_knn/``, ``attention/``: one Parquet file per
  flushed chunk.
  Each chunk is written to a temporary name and renamed, so a killed run loses at most the
  chunk that was still in memory and never leaves a half-written file behind.
- ``frozen_check.json``: the end-of-run comparison of frozen parameters with their
  initial values.
- ``checkpoint.pt``: the last checkpoint, also written atomically, and with
  ``--keep-checkpoints-every`` earlier ones kept as ``checkpoint-NNNNNN.pt``.
- ``run.lock``: locked by the process training into the folder (stabilitylab.train.runlock).
- ``tensorboard/``: TensorBoard event files, with ``stabilitylab run --tensorboard`` only.

Tables, one row per optimiser step (``steps``), per step and layer group (``layers``), per
evaluation of the validation-split kNN monitor (``evals``) or of the dense kNN monitor
(``dense_knn``), and per attention probe, block and head (``attention``), with the columns
listed in :data:`TABLE_COLUMNS`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitylab.atomic import atomic_target, write_text_atomic
from stabilitylab.errors import RunDirError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
FROZEN_CHECK_FILE = "frozen_check.json"
CHECKPOINT_FILE = "checkpoint.pt"
# Checkpoints kept with --keep-checkpoints-every, named by their step.
KEPT_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{6,})\.pt$")
# Locked by the process that trains into the run directory, see stabilitylab.train.runlock.
LOCK_FILE = "run.lock"
# The image files a run with --skip-bad-images skipped (stabilitylab.data.skipped).
SKIPPED_IMAGES_FILE = "skipped_images.json"
# Name prefix of TensorBoard event files, which --overwrite may remove from a run directory.
EVENT_FILE_PREFIX = "events.out.tfevents."

# The ``reason`` of a failed status.json when the run stopped at a non-finite value, by the
# signal that was non-finite. Such a status also has a ``diverged`` object with the ``step``,
# the ``signal`` and the ``lr`` of that step, and from ``stabilitylab run`` the
# ``precision`` and the ``checkpoint_step`` of the checkpoint kept (None without one).
DIVERGED_REASONS = {"loss": "non-finite loss", "grad_norm": "non-finite gradient norm"}
# The signals of DIVERGED_REASONS in words, for messages.
SIGNAL_NAMES = {"loss": "loss", "grad_norm": "gradient norm"}

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "steps": (
        "step",  # optimiser step, from 0
        "epoch",  # fractional epoch at the start of the step
        "loss",
        "lr",  # actual learning rate (after batch scaling and the schedule)
        "momentum",  # momentum-encoder EMA coefficient
        "weight_decay",
        "grad_norm",  # L2 norm of all trainable gradients, after unscaling
        "token_grad_norm",  # L2 norm of d loss / d tokens entering blocks.00
        "loss_scale",  # fp16 gradient-scaler scale, 1.0 otherwise
        "samples_per_s",  # training images per second, averaged over the flushed chunk
        "wall_time",  # seconds since the start of training
    ),
    "layers": (
        "step",
        "layer",  # layer-group name, see stabilitylab.models.layers
        "grad_norm",  # NaN where the group has no gradient (frozen)
        "weight_norm",
        "update_ratio",  # ||w_after - w_before|| / ||w_before||, NaN where frozen
    ),
    "evals": (
        "step",  # evaluated after this many optimiser steps
        "epoch",
        "knn_top1",  # percent
        "knn_top5",  # percent, NaN with fewer than 5 classes
        "knn_top1_se",  # bootstrap standard error of knn_top1 over the queries, points
        "knn_correct",  # per-query top-1 hits in query order, numpy.packbits bytes
        "feature_std",  # per-channel std of the L2-normalised query features, channel mean
        "effective_rank",  # exp(entropy) of the query features' normalised singular values
        "n_bank",  # images in the kNN feature bank
        "n_query",  # images evaluated
        "eval_seconds",
    ),
    "dense_knn": (
        "step",  # evaluated after this many optimiser steps
        "epoch",
        "knn_top1",  # percent, validation images against the queue of training features
        "knn_top5",  # percent, NaN with fewer than 5 classes
        "knn_top1_se",  # bootstrap standard error of knn_top1 over the queries, points
        "feature_std",  # per-channel std of the L2-normalised queue features, channel mean
        "n_bank",  # features in the queue (its fill, at most its size)
        "n_query",  # images evaluated
        "eval_seconds",
    ),
    "attention": (
        "step",  # probed after this many optimiser steps
        "layer",  # block: blocks.00 ... blocks.NN
        "head",  # attention head of the block, from 0
        "entropy",  # attention entropy over the keys / log(keys), mean over queries and images
        "max_logit",  # largest q.k * scale over the images, queries and keys
    ),
}

# Columns added after format version 1 was first written. A chunk without them, from an
# older run or an older writer, reads back (and may be appended) with NaN in their place.
LATER_COLUMNS: dict[str, tuple[str, ...]] = {"evals": ("knn_top1_se", "knn_correct")}

_CHUNK_PATTERN = re.compile(r"^part-(\d{6})\.parquet$")
# Threads that read the chunks of one table.
READ_THREADS = 4


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def _is_run_dir(path: Path) -> bool:
    """Tell whether ``path`` contains a ``config.json`` written by ``stabilitylab run``."""
    try:
        payload = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and "format_version" in payload and "config" in payload


def is_run_dir(path: Path) -> bool:
    """Tell whether ``path`` contains a ``config.json`` written by stabilitylab."""
    return _is_run_dir(Path(path))


def make_dir(path: Path, option: str) -> None:
    """Create ``path`` and its parents, turning OS errors into a RunDirError for ``option``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"{option} {path} cannot be created: {error.strerror or error}") from None


def prepare_run_dir(
    path: Path,
    overwrite: bool = False,
    *,
    out_option: str = "--out",
    overwrite_option: str = "--overwrite",
    resume_option: str | None = None,
) -> Path:
    """Create ``path`` for a new run, rejecting a folder that already contains files.

    With ``overwrite`` a previous run directory at ``path`` is emptied first; a non-empty
    folder that is not a run directory is never emptied. ``out_option``,
    ``overwrite_option`` and ``resume_option`` are the names that error messages give the
    settings, such as ``out=`` and ``overwrite=True`` for a Python caller. Without
    ``resume_option`` the messages do not offer to continue the run that is there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{out_option} {path} is a file, not a folder; pass a new folder name")
    if path.is_dir() and _has_content(path):
        if not overwrite and resume_option is not None and _is_run_dir(path):
            raise RunDirError(
                f"{out_option} {path} already contains files of a run ({_state_text(path)}); "
                f"pass {resume_option} {path} to continue it, {overwrite_option} to replace it, "
                "or a new folder"
            )
        if not overwrite:
            raise RunDirError(
                f"{out_option} {path} already contains files; pass a new folder or "
                f"{overwrite_option} "
                "to replace the run that is there"
            )
        if not _is_run_dir(path):
            raise RunDirError(
                f"{out_option} {path} contains files but no {CONFIG_FILE} written by "
                f"stabilitylab, so it is not a run directory; {overwrite_option} only replaces "
                "run directories, pass a new folder"
            )
        _remove_run_files(path, out_option, overwrite_option)
    make_dir(path, out_option)
    return path


def _has_content(path: Path) -> bool:
    """Tell whether ``path`` contains anything but empty table folders and the lock file.

    A run that failed after creating its table folders and before writing its first file
    leaves only those, and its folder counts as empty, so a rerun can use it.
    """
    for entry in path.iterdir():
        if entry.name == LOCK_FILE and entry.is_file() and not entry.is_symlink():
            continue
        empty_table = (
            entry.name in TABLE_COLUMNS
            and entry.is_dir()
            and not entry.is_symlink()
            and not any(entry.iterdir())
        )
        if not empty_table:
            return True
    return False


def _state_text(path: Path) -> str:
    """Describe the status of the run at ``path``, such as ``interrupted at step 24 of 42``."""
    try:
        status = json.loads((path / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "state unknown"
    if not isinstance(status, dict):
        return "state unknown"
    text = str(status.get("state", "unknown"))
    if isinstance(status.get("step"), int):
        text += f" at step {status['step']}"
        if isinstance(status.get("total_steps"), int):
            text += f" of {status['total_steps']}"
    return text


_RUN_FILES = (
    CONFIG_FILE,
    STATUS_FILE,
    FROZEN_CHECK_FILE,
    CHECKPOINT_FILE,
    SKIPPED_IMAGES_FILE,
    LOCK_FILE,
)
# A report written into the run directory (the default for one run) is part of the run.
_REPORT_DIR = "report"
REPORT_FILES = ("report.html", "report.md", "events.json")


def is_report_dir(path: Path) -> bool:
    """Tell whether ``path`` contains an ``events.json`` written by ``stabilitylab report``."""
    try:
        payload = json.loads((path / "events.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and "detector_params" in payload and "runs" in payload


def _is_temporary(entry: Path) -> bool:
    # Left by an atomic write that a kill interrupted.
    return entry.name.startswith(".") and entry.name.endswith(".tmp")


def _is_chunk(entry: Path) -> bool:
    return bool(_CHUNK_PATTERN.match(entry.name)) or _is_temporary(entry)


def _is_report_file(entry: Path) -> bool:
    return entry.name in REPORT_FILES or entry.suffix == ".png" or _is_temporary(entry)


def _is_event_dir(entry: Path) -> bool:
    """Tell whether ``entry`` is a folder of TensorBoard event files and nothing else."""
    children = list(entry.iterdir())
    return bool(children) and all(
        child.is_file() and not child.is_symlink() and child.name.startswith(EVENT_FILE_PREFIX)
        for child in children
    )


def _foreign_children(folder: Path, allowed: Callable[[Path], bool]) -> list[str]:
    return [
        f"{folder.name}/{child.name}"
        for child in sorted(folder.iterdir())
        if child.is_symlink() or not child.is_file() or not allowed(child)
    ]


def _foreign_entries(path: Path) -> list[str]:
    """List what in a run directory stabilitylab did not write, relative to ``path``.

    Symbolic links always count as foreign, so that emptying the folder never follows one.
    """
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_file():
            if not (
                entry.name in _RUN_FILES
                or _is_temporary(entry)
                or KEPT_CHECKPOINT_PATTERN.match(entry.name)
            ):
                foreign.append(entry.name)
        elif entry.name in TABLE_COLUMNS:
            foreign += _foreign_children(entry, _is_chunk)
        elif entry.name == _REPORT_DIR and is_report_dir(entry):
            foreign += _foreign_children(entry, _is_report_file)
        elif _is_event_dir(entry):
            pass  # written by stabilitylab run --tensorboard
        else:
            foreign.append(entry.name)
    return foreign


def _remove_run_files(
    path: Path, out_option: str = "--out", overwrite_option: str = "--overwrite"
) -> None:
    """Empty a run directory, after checking that it contains nothing but run files."""
    foreign = _foreign_entries(path)
    if foreign:
        raise RunDirError(
            f"{out_option} {path} contains {', '.join(foreign)}, which stabilitylab did not "
            f"write, so {overwrite_option} leaves the folder alone; move those away or pass a "
            "new folder"
        )
    for entry in path.iterdir():
        if entry.is_dir():
            for child in entry.iterdir():
                child.unlink()
            entry.rmdir()
        else:
            entry.unlink()


class RunWriter:
    """Writer for one run directory; every write is atomic and flushed to disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Numbering continues after the chunks already there, which a resumed run keeps.
        self._next_chunk = {table: next_chunk_index(self.path / table) for table in TABLE_COLUMNS}
        for table in TABLE_COLUMNS:
            (self.path / table).mkdir(parents=True, exist_ok=True)

    def write_config(
        self, config: dict[str, Any], derived: dict[str, Any], environment: dict[str, Any]
    ) -> None:
        payload = {
            "format_version": FORMAT_VERSION,
            "config": config,
            "derived": derived,
            "environment": environment,
        }
        write_json_atomic(self.path / CONFIG_FILE, payload)

    def write_status(self, state: str, **fields: Any) -> None:
        write_json_atomic(self.path / STATUS_FILE, {"state": state, **fields})

    def write_json(self, name: str, payload: Any) -> None:
        write_json_atomic(self.path / name, payload)

    def close(self) -> None:
        """Release the writer's open files. This writer keeps none open between writes."""

    def append(self, table: str, frame: pd.DataFrame) -> None:
        """Append ``frame`` to ``table`` as one new Parquet chunk."""
        expected = TABLE_COLUMNS[table]
        frame = _with_later_columns(frame, table)
        if tuple(frame.columns) != expected:
            raise ValueError(
                f"{table} chunk has columns {list(frame.columns)}, expected {expected}"
            )
        if frame.empty:
            return
        index = self._next_chunk[table]
        final = self.path / table / f"part-{index:06d}.parquet"
        with atomic_target(final) as tmp_path:
            frame.to_parquet(tmp_path, index=False, engine="pyarrow")
        self._next_chunk[table] = index + 1


def chunk_paths(table_dir: Path) -> list[Path]:
    """Return the ``part-NNNNNN.parquet`` files of one table folder in the order written."""
    if not table_dir.is_dir():
        return []
    return sorted(p for p in table_dir.iterdir() if _CHUNK_PATTERN.match(p.name))


def next_chunk_index(table_dir: Path) -> int:
    """Return the number after the highest ``part-NNNNNN.parquet`` in ``table_dir``, or 0."""
    if not table_dir.is_dir():
        return 0
    numbers = [
        int(match.group(1))
        for entry in table_dir.iterdir()
        if (match := _CHUNK_PATTERN.match(entry.name))
    ]
    return max(numbers, default=-1) + 1


def _with_later_columns(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """Insert the :data:`LATER_COLUMNS` that ``frame`` lacks as NaN, in table order."""
    later = [name for name in LATER_COLUMNS.get(table, ()) if name not in frame.columns]
    if not later:
        return frame
    known = [name for name in TABLE_COLUMNS[table] if name in frame.columns or name in later]
    if list(frame.columns) != [name for name in known if name not in later]:
        return frame  # a different mismatch, which the caller reports
    return frame.assign(**{name: float("nan") for name in later})[known]


def empty_table(table: str) -> pd.DataFrame:
    """Return an empty frame with the columns of ``table``, as read from a run without rows."""
    return pd.DataFrame({name: pd.Series(dtype="float64") for name in TABLE_COLUMNS[table]})


class DiscardingWriter(RunWriter):
    """The writer of a process that writes nothing: the ranks other than 0 under torchrun.

    It checks each chunk's columns as :class:`RunWriter` does, so every rank fails alike on a
    bad chunk, and discards it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write_config(
        self, config: dict[str, Any], derived: dict[str, Any], environment: dict[str, Any]
    ) -> None:
        pass

    def write_status(self, state: str, **fields: Any) -> None:
        pass

    def write_json(self, name: str, payload: Any) -> None:
        pass

    def append(self, table: str, frame: pd.DataFrame) -> None:
        expected = TABLE_COLUMNS[table]
        frame = _with_later_columns(frame, table)
        if tuple(frame.columns) != expected:
            raise ValueError(
                f"{table} chunk has columns {list(frame.columns)}, expected {expected}"
            )


@dataclass
class Run:
    """One run directory read into memory: configuration, status and the tables.

    ``dense_knn`` is empty for a run without the dense kNN monitor, and ``attention`` for a
    run without attention probes, older runs included.
    :func:`stabilitylab.load_run` returns a subclass that adds the detected events.
    """

    path: Path
    config: dict[str, Any]
    derived: dict[str, Any]
    environment: dict[str, Any]
    status: dict[str, Any]
    steps: pd.DataFrame
    layers: pd.DataFrame
    evals: pd.DataFrame
    frozen_check: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    dense_knn: pd.DataFrame = field(default_factory=lambda: empty_table("dense_knn"))
    attention: pd.DataFrame = field(default_factory=lambda: empty_table("attention"))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def frozen(self) -> bool:
        return bool(self.config.get("freeze_patch_embed", False))

    @property
    def arm(self) -> str:
        """``frozen`` or ``learned``: whether the patch projection was trained."""
        return "frozen" if self.frozen else "learned"

    @property
    def label(self) -> str:
        """The run name, followed by its arm unless the name already says it (and only it)."""
        name = self.name.lower()
        other = "learned" if self.frozen else "frozen"
        if self.arm in name and other not in name:
            return self.name
        return f"{self.name} ({self.arm})"

    @property
    def layer_names(self) -> list[str]:
        """The layer groups of ``derived.layers``, or of the layers table when that is unusable.

        A ``derived.layers`` that is not a list of str (a damaged config.json, which
        :func:`read_run` warns about) gives the groups of the layers table, in table order.
        """
        names = self.derived.get("layers")
        if _is_name_list(names):
            return list(names)
        return list(dict.fromkeys(self.layers["layer"])) if not self.layers.empty else []

    @property
    def finished(self) -> bool:
        return self.status.get("state") == "finished"


def _is_name_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    data = path.read_bytes()
    try:
        payload = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirError(
            f"{path} is not valid JSON ({error}, in {len(data)} bytes); the {what} file is "
            "damaged or truncated"
        ) from None
    if not isinstance(payload, dict):
        raise RunDirError(f"{path} does not contain a JSON object; the {what} file is damaged")
    return payload


def _read_optional_json(path: Path, what: str, warnings: list[str]) -> dict[str, Any] | None:
    """Read a JSON file that a killed run may lack; a damaged one is a warning, not an error."""
    if not path.is_file():
        return None
    try:
        return _read_json(path, what)
    except RunDirError as error:
        message = f"{error}, so its contents are ignored"
        log.warning("%s", message)
        warnings.append(message)
        return None


def _read_chunks(run_dir: Path, chunks: list[Path], warnings: list[str]) -> list[Any]:
    """Read the chunks of one table in order as Arrow tables, skipping damaged ones.

    A damaged last chunk is dropped, and its warning names the step the table now ends at.
    A damaged chunk between readable ones is skipped as well, so the rest of the run can
    still be reported, and its warning names the steps missing from the table.
    """
    import pyarrow.compute

    # pyarrow releases the GIL while it reads, so a few threads read a long run's thousands
    # of small chunks about twice as fast as one, even on two cores.
    if len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(chunks))) as pool:
            read = list(pool.map(_read_chunk, chunks))
    else:
        read = [_read_chunk(chunk) for chunk in chunks]
    for position, (chunk, frame, error) in enumerate(read):
        if frame is not None:
            continue
        before = [t for _, t, _ in read[:position] if t is not None and t.num_rows]
        after = [t for _, t, _ in read[position + 1 :] if t is not None and t.num_rows]
        last_step = pyarrow.compute.max(before[-1]["step"]).as_py() if before else None
        next_step = pyarrow.compute.min(after[0]["step"]).as_py() if after else None
        message = _damaged_chunk_message(run_dir, chunk, error, last_step, next_step)
        log.warning("%s: %s", run_dir, message)
        warnings.append(message)
    return [table for _, table, _ in read if table is not None]


def _read_chunk(chunk: Path) -> tuple[Path, Any, str]:
    """Return ``(chunk, Arrow table, "")``, or ``(chunk, None, error)`` for a damaged file."""
    import pyarrow.parquet

    try:
        # ParquetFile reads one file without read_table's dataset set-up, which took about
        # twice as long per chunk of a long run.
        with pyarrow.parquet.ParquetFile(chunk) as parquet:
            return chunk, parquet.read(use_threads=False), ""
    except Exception as error:  # pyarrow raises several types for a damaged file
        return chunk, None, _first_line(error)


def _damaged_chunk_message(
    run_dir: Path, chunk: Path, error: str, last_step: int | None, next_step: int | None
) -> str:
    size = chunk.stat().st_size
    lost = f"{size} bytes"
    try:
        import pyarrow.parquet

        lost += f", {pyarrow.parquet.read_metadata(chunk).num_rows} rows"
    except Exception:  # a truncated file has no footer, so its row count is unknown
        lost += ", row count unknown"
    name = chunk.relative_to(run_dir)
    if next_step is None:
        ends = "the table is empty" if last_step is None else f"the table ends at step {last_step}"
        return f"dropped the damaged last chunk {name} ({lost}): {ends} ({error})"
    first_missing = 0 if last_step is None else last_step + 1
    return (
        f"skipped the damaged chunk {name} ({lost}): rows of steps {first_missing} to "
        f"{next_step - 1} are missing from the table ({error})"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_table(run_dir: Path, table: str, warnings: list[str]) -> pd.DataFrame:
    columns = TABLE_COLUMNS[table]
    table_dir = run_dir / table
    chunks = []
    if table_dir.is_dir():
        chunks = sorted(p for p in table_dir.iterdir() if _CHUNK_PATTERN.match(p.name))
    tables = _read_chunks(run_dir, chunks, warnings)
    if not tables:
        return empty_table(table)
    later = LATER_COLUMNS.get(table, ())
    # One conversion of all chunks: converting each chunk to pandas and concatenating the
    # frames took about twice as long on a 100,000-step run of 1,000 chunks per table.
    import pyarrow

    try:
        frame = pyarrow.concat_tables(tables, promote_options="default").to_pandas()
    except pyarrow.ArrowException:
        # Chunks whose column types differ, such as int and float, or layer names and
        # numbers: Arrow raises ArrowInvalid or ArrowTypeError, and pandas unifies them.
        frame = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    for name in later:
        if name not in frame.columns:
            frame[name] = float("nan")
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise RunDirError(
            f"{table_dir} lacks the columns {missing}; it was not written by this version"
        )
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def read_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory written by ``stabilitylab run``, finished or not."""
    run_dir = Path(path)
    if not run_dir.exists():
        raise RunDirError(f"run directory {run_dir} does not exist; pass the --out folder of a run")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory")
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise RunDirError(
            f"{run_dir} contains no {CONFIG_FILE}, so it is not a run directory (or its run "
            "stopped before it began); pass the --out folder of a run"
        )
    payload = _read_json(config_path, "configuration")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise RunDirError(
            f"{config_path} has format_version {version!r}; this stabilitylab reads version "
            f"{FORMAT_VERSION}"
        )
    warnings: list[str] = []
    status = _read_optional_json(run_dir / STATUS_FILE, "status", warnings) or {"state": "unknown"}
    if not isinstance(status.get("state"), str):
        message = (
            f"{run_dir / STATUS_FILE} has no text state ({status.get('state')!r}); it is damaged"
        )
        log.warning("%s", message)
        warnings.append(message)
        status = {"state": "unknown"}
    frozen_check = _read_optional_json(run_dir / FROZEN_CHECK_FILE, "frozen-check", warnings)
    derived = payload.get("derived")
    layers = derived.get("layers") if isinstance(derived, dict) else None
    if layers and not _is_name_list(layers):
        message = (
            f"{config_path} has derived.layers {layers!r}, not a list of layer names; the "
            "layer groups of the layers table are used"
        )
        log.warning("%s", message)
        warnings.append(message)
    tables = {table: _read_table(run_dir, table, warnings) for table in TABLE_COLUMNS}
    return Run(
        path=run_dir,
        config=payload.get("config", {}),
        derived=payload.get("derived", {}),
        environment=payload.get("environment", {}),
        status=status,
        frozen_check=frozen_check,
        warnings=warnings,
        **tables,
    )
