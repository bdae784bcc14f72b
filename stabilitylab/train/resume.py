"""Continue a stopped run from its last checkpoint, as if it had never stopped.

``stabilitylab run --resume RUN_DIR`` (:func:`resume_training`) reads the configuration
in ``config.json``, applies the options passed with ``--resume``, and rejects any change
outside :data:`MUTABLE_FIELDS`. It then loads the last readable checkpoint and drops the
table rows recorded after it, which a killed run may have flushed. When the ``steps`` or
``layers`` table has lost rows before that checkpoint, in a damaged chunk for instance, it
continues from the newest kept checkpoint before them instead. Training goes on from the
checkpoint's step with the same batch, random streams, optimiser and monitor state. On the
CPU, with the same library versions and thread count, the tables of the resumed run equal
those of an uninterrupted run bit for bit, timings aside.

A run without a checkpoint starts again from step 0 in its folder, which gives the same
tables as an uninterrupted run too. A finished run is left as it is. A run stopped at a
non-finite value is rejected, because the same configuration would diverge again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet
import torch

from probes.knn import KnnResult
from stabilitylab.atomic import atomic_target
from stabilitylab.config import (
    FIELD_NAMES,
    METHOD_DEFAULTS,
    Derived,
    RunConfig,
    build_config,
    load_preset,
    validate,
)
from stabilitylab.data import DataBundle, build_data
from stabilitylab.data.images import UnreadableImagesError
from stabilitylab.errors import ConfigError, DataError, RunDirError
from stabilitylab.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    DIVERGED_REASONS,
    STATUS_FILE,
    TABLE_COLUMNS,
    chunk_paths,
    write_json_atomic,
)
from stabilitylab.train import distributed
from stabilitylab.train.checkpoint import (
    CHECKPOINT_FORMAT,
    kept_checkpoints,
    read_checkpoint,
    restore_rng_state,
)
from stabilitylab.train.distributed import ProcessGroup
from stabilitylab.train.environment import describe_environment
from stabilitylab.train.loop import (
    RunResult,
    Trainer,
    derive_for_data,
    seed_everything,
    train_run,
)
from stabilitylab.train.precision import autocast_factory
from stabilitylab.train.runlock import RunLock
from stabilitylab.train.tensorboard import check_tensorboard, resolve_tensorboard_dir

log = logging.getLogger(__name__)

# Options that may differ on resume because they change how a run is executed or stored,
# not what it computes. A different device, like other library versions or thread counts,
# still gives a valid continuation, but not a bit-identical one.
MUTABLE_FIELDS = (
    "device",
    "compile",
    "workers",
    "flush_every",
    "checkpoint_every",
    "tensorboard",
    "download",
)
# The options that may differ on resume, as the command names them: those of MUTABLE_FIELDS
# and --keep-checkpoints-every, which resume_training takes as an argument of its own.
MUTABLE_OPTIONS = tuple(
    f"--{name.replace('_', '-')}" for name in (*MUTABLE_FIELDS, "keep_checkpoints_every")
)
# Derived values that depend on the data: a resume whose data give others is rejected.
DATA_DERIVED_KEYS = (
    "train_size",
    "in_chans",
    "num_classes",
    "img_size",
    "patch_size",
    "steps_per_epoch",
    "total_steps",
    "warmup_steps",
    "dense_knn_size",
)
# Environment entries whose change makes the continuation differ from an uninterrupted run.
EXACTNESS_ENVIRONMENT_KEYS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "python",
    "device",
    "torch_threads",
)
# Tables with one row per optimiser step: a checkpoint at step S covers rows 0 to S - 1.
# The other tables (evaluations, attention probes) hold rows measured after S steps, before
# the checkpoint at S was written, so they keep rows 0 to S.
STEP_TABLES = ("steps", "layers")


@dataclass(frozen=True)
class RunRecord:
    """Configuration and status of a run directory, read from its JSON files."""

    path: Path
    payload: dict[str, Any]
    status: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.payload.get("config", {})

    @property
    def derived(self) -> dict[str, Any]:
        return self.payload.get("derived", {})

    @property
    def environment(self) -> dict[str, Any]:
        return self.payload.get("environment", {})

    @property
    def state(self) -> str:
        return str(self.status.get("state", "unknown"))


def read_record(run_dir: Path) -> RunRecord:
    """Read the configuration and status of a run of ``stabilitylab run`` for resuming."""
    if not run_dir.exists():
        raise RunDirError(f"--resume {run_dir} does not exist; pass the --out folder of a run")
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir} is a file; pass the --out folder of a run")
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise RunDirError(
            f"--resume {run_dir} contains no {CONFIG_FILE}, so it is not a run directory; pass "
            "the --out folder of a run"
        )
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(f"{config_path} cannot be read ({error}); it is damaged") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise RunDirError(f"{config_path} has no configuration object; it is damaged")
    source = payload["config"].get("source")
    if source is not None:
        raise RunDirError(
            f"--resume {run_dir} was written by stabilitylab {source}, which keeps no "
            "checkpoint; only runs of stabilitylab run can be resumed"
        )
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        status = {}  # a run killed before its first status write
    return RunRecord(run_dir, payload, status if isinstance(status, dict) else {})


# -- configuration ---------------------------------------------------------------------------


def _as_config_values(saved: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Turn a configuration read from JSON back into RunConfig values (lists into tuples)."""
    unknown = sorted(set(saved) - set(FIELD_NAMES))
    if unknown:
        raise RunDirError(
            f"{where} has configuration keys that this stabilitylab does not know: {unknown}; "
            "resume the run with the stabilitylab version that started it"
        )
    defaults = {field.name: field.default for field in dataclasses.fields(RunConfig)}
    missing = [name for name in FIELD_NAMES if name not in saved]
    if missing:
        log.warning(
            "%s has no value for %s, which this stabilitylab added since; the run continues "
            "with the defaults %s",
            where,
            ", ".join(missing),
            ", ".join(f"{name}={defaults[name]!r}" for name in missing),
        )
    values = {}
    for name, value in saved.items():
        values[name] = tuple(value) if isinstance(defaults[name], tuple) else value
    return values


def _comparable(config: RunConfig) -> dict[str, Any]:
    # The JSON form, as config.json stores it, so tuples and lists compare equal.
    return json.loads(json.dumps(config.to_dict(), default=str))


def config_differences(saved: RunConfig, resumed: RunConfig) -> list[str]:
    """Describe each field outside MUTABLE_FIELDS in which ``resumed`` differs from ``saved``."""
    before, after = _comparable(saved), _comparable(resumed)
    return [
        f"{name} {before[name]!r} in the run, {after[name]!r} now"
        for name in FIELD_NAMES
        if name not in MUTABLE_FIELDS and before[name] != after[name]
    ]


def resumed_config(
    record: RunRecord, run_dir: Path, overrides: Mapping[str, Any], preset: str | None
) -> tuple[RunConfig, RunConfig]:
    """Return (the run's configuration, the configuration to continue with).

    The second is the first with ``overrides`` applied, or, when ``preset`` is given, that
    preset with ``overrides``. ConfigError lists every field outside MUTABLE_FIELDS that
    differs between the two.
    """
    saved = RunConfig(**_as_config_values(record.config, str(run_dir / CONFIG_FILE)))
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown configuration keys {unknown}; known keys: {list(FIELD_NAMES)}")
    if preset is not None:
        resumed = _preset_config(preset, overrides)
    else:
        resumed = dataclasses.replace(saved, **overrides)
    # Differences first: an option that differs may also be invalid with the run's values.
    differences = config_differences(saved, resumed)
    if differences:
        raise ConfigError(
            f"--resume {run_dir}: the options differ from the run's configuration: "
            f"{'; '.join(differences)}. Resume without those options (the run's own values "
            f"apply), or start a new run; only {', '.join(MUTABLE_OPTIONS[:-1])} and "
            f"{MUTABLE_OPTIONS[-1]} may change"
        )
    validate(resumed)
    return saved, resumed


def _preset_config(preset: str, overrides: Mapping[str, Any]) -> RunConfig:
    """Build ``preset`` with ``overrides``, to compare it with the run's configuration.

    build_config also validates the result, and a preset can be invalid on its own, such as
    an image-folder preset without --data-dir. Its values are then taken unvalidated, so
    that the comparison lists each key in which it differs from the run.
    """
    try:
        return build_config(preset, **overrides)
    except ConfigError:
        values = load_preset(preset)
        method = overrides.get("method") or values.get("method", RunConfig.method)
        if method not in METHOD_DEFAULTS:
            raise
        # NOTE: build_config drops the preset's dataset- and method-sized values when the
        # options change the dataset or the method; this keeps them. Either change is a
        # difference from the run itself, so the resume is rejected all the same.
        return RunConfig(**{**METHOD_DEFAULTS[method], **values, **overrides, "preset": preset})


def _check_checkpoint_config(checkpoint: dict[str, Any], saved: RunConfig, path: Path) -> None:
    recorded = RunConfig(**_as_config_values(checkpoint["config"], str(path)))
    differences = config_differences(saved, recorded)
    if differences:
        raise RunDirError(
            f"{path} was trained with another configuration than {CONFIG_FILE} records "
            f"({'; '.join(differences)}); the run directory mixes two runs, so start a new run"
        )


def _check_same_data(record: RunRecord, derived: Derived) -> None:
    now = derived.to_dict()
    differences = [
        f"{key} {record.derived[key]!r} in the run, {now[key]!r} now"
        for key in DATA_DERIVED_KEYS
        if key in record.derived and record.derived[key] != now[key]
    ]
    if differences:
        raise DataError(
            f"the data differ from those the run was trained on: {'; '.join(differences)}; "
            "resume with the same dataset, or start a new run"
        )


def _environment_changes(record: RunRecord, environment: Mapping[str, Any]) -> list[str]:
    started = record.environment
    return [
        f"{key} {started[key]!r} at the start, {environment.get(key)!r} now"
        for key in EXACTNESS_ENVIRONMENT_KEYS
        if key in started and started[key] != environment.get(key)
    ]


# -- checkpoints -----------------------------------------------------------------------------


def restart_advice(run_dir: Path) -> str:
    """Say how to train a run again from step 0 with its own configuration."""
    return (
        f"To train it again from step 0 with its own configuration, move {CHECKPOINT_FILE} and "
        f"any checkpoint-NNNNNN.pt out of {run_dir} and resume again. --overwrite instead "
        "starts a new run from the preset and the options given, not from this run's "
        f"{CONFIG_FILE}"
    )


def _check_format(checkpoint: dict[str, Any], path: Path, run_dir: Path) -> None:
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT:
        raise RunDirError(
            f"{path} has checkpoint format {checkpoint.get('format_version')!r}; this "
            f"stabilitylab resumes format {CHECKPOINT_FORMAT}, which also stores the random "
            f"generator states. {restart_advice(run_dir)}"
        )


def latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """Load ``checkpoint.pt``, or the newest kept checkpoint when it is damaged.

    Returns None for a run without any checkpoint. Raises RunDirError when every
    checkpoint there is damaged, or was written without the state an exact resume needs.
    """
    candidates = [run_dir / CHECKPOINT_FILE] if (run_dir / CHECKPOINT_FILE).is_file() else []
    candidates += [path for _, path in kept_checkpoints(run_dir)]
    if not candidates:
        return None
    errors = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except RunDirError as error:
            log.warning("%s; trying an older checkpoint", error)
            errors.append(str(error))
            continue
        _check_format(checkpoint, path, run_dir)
        return checkpoint, path
    raise RunDirError(
        f"--resume {run_dir}: no checkpoint can be loaded ({'; '.join(errors)}). "
        f"{restart_advice(run_dir)}"
    )


def restore_trainer(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Load the checkpoint's state into a freshly built trainer, random generators last."""
    trainer.model.load_state_dict(checkpoint["model"])
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.scaler.load_state_dict(checkpoint["scaler"])
    if trainer.dense_queue is not None:
        trainer.dense_queue.load_state_dict(checkpoint["dense_knn_queue"])
    trainer.step = int(checkpoint["step"])
    trainer.checkpoint_step = trainer.step
    trainer.evals = [KnnResult(**entry) for entry in checkpoint["evals"]]
    trainer.skipped_steps = [int(step) for step in checkpoint["skipped_steps"]]
    # wall_time continues from the training time the checkpoint had recorded.
    trainer.start_time = time.perf_counter() - float(checkpoint["wall_seconds"])
    # Building the trainer drew from the generators, so they are restored after it.
    rng = checkpoint["rng"]
    if trainer.group.world_size > 1:
        rng = checkpoint["rng_by_rank"][trainer.group.rank]
    restore_rng_state(rng, trainer.device)


# -- tables ----------------------------------------------------------------------------------


@dataclass
class ChunkAction:
    """Action of a resume on one chunk: ``keep``, ``trim`` (to its first rows) or ``drop``."""

    path: Path
    action: str
    rows_dropped: int | None  # None for a damaged chunk whose row count is unknown


@dataclass(frozen=True)
class DamagedChunk:
    """A chunk that cannot be read, and the steps its rows lie between.

    Chunks are written in step order, so its rows come after ``after_step``, the last step
    of the readable chunks before it, and before ``before_step``, the first step of the
    readable chunks after it. Either is None where no readable chunk is on that side.
    """

    path: Path
    after_step: int | None
    before_step: int | None
    rows: int | None  # from the Parquet footer; None when the footer is lost too

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    def first_possible_step(self) -> int:
        return 0 if self.after_step is None else self.after_step + 1

    def steps_text(self) -> str:
        """Describe the steps its rows lie between, such as ``after step 12 and before step 20``."""
        bounds = []
        if self.after_step is not None:
            bounds.append(f"after step {self.after_step}")
        if self.before_step is not None:
            bounds.append(f"before step {self.before_step}")
        return " and ".join(bounds) or "of unknown steps"

    def describe(self) -> str:
        rows = "row count unknown" if self.rows is None else f"{self.rows} rows"
        return f"{self.name} ({self.path.stat().st_size} bytes, {rows})"


@dataclass
class TablePlan:
    """The actions of a resume from the checkpoint at ``step`` on the chunks of one table."""

    table: str
    step: int
    last_kept: int  # rows up to this step stay
    actions: list[ChunkAction]
    kept_steps: list[int]  # the step of every row kept, one entry per row
    damaged: list[DamagedChunk]

    @property
    def rows_dropped(self) -> int:
        return sum(action.rows_dropped or 0 for action in self.actions)

    def lost(self) -> list[DamagedChunk]:
        """Return the damaged chunks left in place, whose rows up to ``last_kept`` are lost."""
        dropped = {action.path for action in self.actions if action.action == "drop"}
        return [chunk for chunk in self.damaged if chunk.path not in dropped]


def _last_kept_step(table: str, step: int, has_checkpoint: bool) -> int:
    if table in STEP_TABLES:
        return step - 1
    # Evaluations and probes at the checkpoint's step ran before it was written.
    return step if has_checkpoint else -1


def _read_steps(chunk: Path) -> pd.Series | None:
    try:
        return pd.read_parquet(chunk, columns=["step"], engine="pyarrow")["step"]
    except Exception:  # pyarrow raises several types for a damaged file
        return None


def _footer_rows(chunk: Path) -> int | None:
    try:
        return int(pyarrow.parquet.read_metadata(chunk).num_rows)
    except Exception:  # a truncated file has no footer, so its row count is unknown
        return None


def _damaged_chunk(
    chunks: list[Path], steps: list[pd.Series | None], position: int
) -> DamagedChunk:
    before = [values for values in steps[:position] if values is not None and len(values)]
    after = [values for values in steps[position + 1 :] if values is not None and len(values)]
    return DamagedChunk(
        chunks[position],
        after_step=int(before[-1].max()) if before else None,
        before_step=int(after[0].min()) if after else None,
        rows=_footer_rows(chunks[position]),
    )


def plan_table(table_dir: Path, step: int, has_checkpoint: bool) -> TablePlan:
    """Plan the action on each chunk of a table for a resume from the checkpoint at ``step``.

    Rows after the checkpoint are dropped. A damaged chunk of ``steps`` or ``layers`` is
    dropped too, and the caller checks that the rows kept cover every step before the
    checkpoint. A damaged chunk of another table is dropped when all its rows lie after
    the checkpoint. Otherwise it is left in place, because those rows cannot be measured
    again and the table's readers warn about the gap it leaves.
    """
    table = table_dir.name
    last_kept = _last_kept_step(table, step, has_checkpoint)
    chunks = chunk_paths(table_dir)
    steps = [_read_steps(chunk) for chunk in chunks]
    plan = TablePlan(table, step, last_kept, [], [], [])
    for position, (chunk, values) in enumerate(zip(chunks, steps, strict=True)):
        if values is None:
            damaged = _damaged_chunk(chunks, steps, position)
            plan.damaged.append(damaged)
            if table not in STEP_TABLES and damaged.first_possible_step() <= last_kept:
                plan.actions.append(ChunkAction(chunk, "keep", 0))
            else:
                plan.actions.append(ChunkAction(chunk, "drop", damaged.rows))
            continue
        keep = values <= last_kept
        plan.kept_steps += values[keep].astype(int).tolist()
        if keep.all():
            plan.actions.append(ChunkAction(chunk, "keep", 0))
        elif not keep.any():
            plan.actions.append(ChunkAction(chunk, "drop", len(values)))
        else:
            plan.actions.append(ChunkAction(chunk, "trim", int((~keep).sum())))
    return plan


def _step_ranges(steps: list[int]) -> str:
    """Write sorted steps as ranges, such as ``3, 10 to 14``."""
    ranges: list[list[int]] = []
    for step in steps:
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    return ", ".join(
        str(first) if first == last else f"{first} to {last}" for first, last in ranges
    )


def _steps_word(steps: list[int]) -> str:
    return f"{'step' if len(steps) == 1 else 'steps'} {_step_ranges(steps)}"


def _gap(plan: TablePlan, per_step: int) -> str | None:
    """Describe how the rows kept differ from ``per_step`` rows for each step before the checkpoint.

    Returns None when they do not differ.
    """
    step = plan.step
    counts = Counter(plan.kept_steps)
    if sorted(plan.kept_steps) == [value for value in range(step) for _ in range(per_step)]:
        return None
    missing = [value for value in range(step) if counts[value] < per_step]
    repeated = [value for value in range(step) if counts[value] > per_step]
    problems = []
    if missing:
        problems.append(f"the rows of {_steps_word(missing)} are missing")
    if repeated:
        problems.append(f"the rows of {_steps_word(repeated)} appear more often than expected")
    damaged = ""
    if plan.damaged:
        names = ", ".join(chunk.name for chunk in plan.damaged)
        damaged = f" ({names} cannot be read)"
    return (
        f"the {plan.table} table contains {len(plan.kept_steps)} rows for the {step} steps before "
        f"the checkpoint at step {step}, {step * per_step} expected: {' and '.join(problems)}"
        f"{damaged}"
    )


def plan_tables(
    run_dir: Path, step: int, has_checkpoint: bool, layers_per_step: int
) -> tuple[dict[str, TablePlan], list[str]]:
    """Plan every table for a resume from ``step``; return the plans and the gaps found.

    A gap is a step table whose kept rows do not cover each step before the checkpoint
    exactly once, so that a resume from ``step`` would not continue exactly.
    """
    plans = {}
    gaps = []
    for table in TABLE_COLUMNS:
        plan = plan_table(run_dir / table, step, has_checkpoint)
        plans[table] = plan
        if table in STEP_TABLES:
            gap = _gap(plan, 1 if table == "steps" else layers_per_step)
            if gap is not None:
                gaps.append(gap)
    return plans, gaps


def _apply(action: ChunkAction, last_kept: int) -> None:
    if action.action == "drop":
        action.path.unlink()
    elif action.action == "trim":
        frame = pd.read_parquet(action.path, engine="pyarrow")
        with atomic_target(action.path) as tmp_path:
            frame[frame["step"] <= last_kept].to_parquet(tmp_path, index=False, engine="pyarrow")


def _remove_temporary_files(run_dir: Path) -> None:
    """Remove the hidden ``.NAME.*.tmp`` files that a kill in the middle of a write leaves."""
    folders = [run_dir, *(run_dir / table for table in TABLE_COLUMNS)]
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink()


def _damaged_chunk_message(plan: TablePlan, chunk: DamagedChunk, has_checkpoint: bool) -> str:
    if not has_checkpoint:
        return (
            f"{chunk.describe()} cannot be read and is removed; the run trains again from step "
            "0 and records its rows again"
        )
    if chunk in plan.lost():
        table, last_kept = plan.table, plan.last_kept
        contents = (
            f"{chunk.describe()} cannot be read: it contains {table} rows {chunk.steps_text()}"
        )
        left = "The file is left in place, so readers of the run warn about the gap"
        if chunk.before_step is not None and chunk.before_step - 1 <= last_kept:
            return (
                f"{contents}, all at or before step {last_kept}, which the checkpoint covers. "
                f"They cannot be measured again, so the {table} table lacks them. {left}"
            )
        return (
            f"{contents}. Any of them at or before step {last_kept}, which the checkpoint "
            f"covers, cannot be measured again, so the {table} table may lack them. {left}"
        )
    if plan.table in STEP_TABLES:
        return (
            f"{chunk.describe()} cannot be read and is removed; the other chunks hold the rows "
            f"of all {plan.step} steps before the checkpoint, so its rows are from step "
            f"{plan.step} on, and the resumed run records them again"
        )
    return (
        f"{chunk.describe()} cannot be read and is removed; its rows lie {chunk.steps_text()}, "
        f"after the checkpoint at step {plan.step}, so the resumed run records them again"
    )


def apply_plans(run_dir: Path, plans: dict[str, TablePlan], has_checkpoint: bool) -> None:
    """Change the chunks as planned, warning about each damaged one, and remove temporary files."""
    for plan in plans.values():
        for chunk in plan.damaged:
            log.warning("%s: %s", run_dir, _damaged_chunk_message(plan, chunk, has_checkpoint))
        for action in plan.actions:
            _apply(action, plan.last_kept)
    _remove_temporary_files(run_dir)


def truncate_tables(
    run_dir: Path, step: int, has_checkpoint: bool, layers_per_step: int
) -> dict[str, int]:
    """Drop the rows recorded after the checkpoint at ``step``; return the rows dropped per table.

    Every table is planned before any file changes, so a run whose step tables have lost
    or repeated rows before the checkpoint is rejected untouched.
    """
    plans, gaps = plan_tables(run_dir, step, has_checkpoint, layers_per_step)
    if gaps:
        raise RunDirError(
            f"--resume {run_dir}: {'; '.join(gaps)}. The run cannot continue exactly from step "
            f"{step}. {restart_advice(run_dir)}"
        )
    apply_plans(run_dir, plans, has_checkpoint)
    return {table: plan.rows_dropped for table, plan in plans.items()}


# -- where to resume from --------------------------------------------------------------------


@dataclass
class ResumePoint:
    """The checkpoint a resume continues from, and the plan for the tables at its step.

    ``checkpoint`` and ``path`` are None for a run that starts again from step 0.
    """

    checkpoint: dict[str, Any] | None
    path: Path | None
    plans: dict[str, TablePlan]

    @property
    def step(self) -> int:
        return int(self.checkpoint["step"]) if self.checkpoint is not None else 0


def _warn_missing_checkpoints(run_dir: Path, status: Mapping[str, Any]) -> None:
    recorded = status.get("checkpoint_step")
    if recorded is not None:
        log.warning(
            "%s: %s records a checkpoint at step %s, but the folder has no %s or "
            "checkpoint-NNNNNN.pt, so the run trains again from step 0 with its own "
            "configuration and records its rows again",
            run_dir,
            STATUS_FILE,
            recorded,
            CHECKPOINT_FILE,
        )


def _older_point(run_dir: Path, newest_step: int, layers_per_step: int) -> ResumePoint | None:
    """Return the newest kept checkpoint before ``newest_step`` whose step tables are whole."""
    for step, path in kept_checkpoints(run_dir):
        if step >= newest_step:
            continue
        plans, gaps = plan_tables(run_dir, step, True, layers_per_step)
        if gaps:
            continue
        try:
            checkpoint = read_checkpoint(path)
        except RunDirError as error:
            log.warning("%s; trying an older checkpoint", error)
            continue
        _check_format(checkpoint, path, run_dir)
        if int(checkpoint["step"]) != step:
            log.warning(
                "%s contains step %s, not the step %d of its name; trying an older checkpoint",
                path,
                checkpoint["step"],
                step,
            )
            continue
        return ResumePoint(checkpoint, path, plans)
    return None


def choose_resume_point(
    run_dir: Path, status: Mapping[str, Any], layers_per_step: int
) -> ResumePoint:
    """Find the newest checkpoint from which the run can continue exactly.

    That is the newest loadable checkpoint, unless the ``steps`` or ``layers`` table lacks
    rows before it, for instance in a damaged chunk. The newest kept ``checkpoint-NNNNNN.pt``
    before the lost rows is then used, because training on from there records them again.
    Raises RunDirError when no such checkpoint exists. Nothing is changed on disk.
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        _warn_missing_checkpoints(run_dir, status)
        plans, _ = plan_tables(run_dir, 0, False, layers_per_step)
        return ResumePoint(None, None, plans)
    checkpoint, path = newest
    step = int(checkpoint["step"])
    plans, gaps = plan_tables(run_dir, step, True, layers_per_step)
    if not gaps:
        return ResumePoint(checkpoint, path, plans)
    older = _older_point(run_dir, step, layers_per_step)
    if older is None:
        raise RunDirError(
            f"--resume {run_dir}: {'; '.join(gaps)}. No kept checkpoint-NNNNNN.pt precedes "
            f"the rows that are missing, so the run cannot continue exactly. "
            f"{restart_advice(run_dir)}"
        )
    assert older.path is not None
    log.warning(
        "%s: %s; resuming from %s at step %d instead of %s at step %d, because training on "
        "from there records those rows again",
        run_dir,
        "; ".join(gaps),
        older.path.name,
        older.step,
        path.name,
        step,
    )
    return older


# -- resuming --------------------------------------------------------------------------------


def _finished_result(run_dir: Path, status: dict[str, Any]) -> RunResult:
    log.info(
        "%s: the run finished already (%s steps); nothing to resume", run_dir, status.get("step")
    )
    return RunResult(
        run_dir=run_dir,
        steps=int(status.get("step", 0)),
        final_knn_top1=float(status.get("final_knn_top1", float("nan"))),
        best_knn_top1=float(status.get("best_knn_top1", float("nan"))),
        frozen_check_passed=status.get("frozen_check_passed"),
        wall_seconds=float(status.get("wall_seconds", float("nan"))),
        already_finished=True,
    )


def _check_not_diverged(run_dir: Path, status: dict[str, Any]) -> None:
    reason = status.get("reason")
    diverged = "diverged" in status or reason in DIVERGED_REASONS.values()
    if status.get("state") == "failed" and diverged:
        raise RunDirError(
            f"--resume {run_dir}: the run stopped at step {status.get('step')} ({reason}), and "
            "the same configuration would diverge at the same step again; start a new run, "
            "such as with a lower --lr (--overwrite reuses the folder)"
        )


def _record_resume(
    run_dir: Path,
    record: RunRecord,
    saved: RunConfig,
    config: RunConfig,
    step: int,
    environment: dict[str, Any],
    derived: Derived,
) -> None:
    """Store the continued configuration and a ``resumes`` entry in ``config.json``.

    The process count may differ only on a resume without a checkpoint, which trains from
    step 0, so ``derived`` then takes the new count and per-process batch.
    """
    before, after = _comparable(saved), _comparable(config)
    changed = {
        name: [before[name], after[name]] for name in FIELD_NAMES if before[name] != after[name]
    }
    payload = dict(record.payload)
    payload["config"] = after
    payload["derived"] = {
        **payload.get("derived", {}),
        "world_size": derived.world_size,
        "per_process_batch_size": derived.per_process_batch_size,
    }
    payload["resumes"] = [
        *payload.get("resumes", []),
        {"step": step, "changed": changed, "environment": environment},
    ]
    write_json_atomic(run_dir / CONFIG_FILE, payload)


def _check_tensorboard_on_resume(config: RunConfig, run_dir: Path) -> None:
    folder = resolve_tensorboard_dir(config.tensorboard, run_dir)
    if folder is not None:
        # The folder may contain this run's event files, so only the package is checked.
        check_tensorboard(str(folder), folder)


def _build_data(
    record: RunRecord, config: RunConfig, device: torch.device, group: ProcessGroup
) -> tuple[DataBundle, Derived, dict[str, Any]]:
    """Build the run's data as a new run would, and check it against the recorded values."""
    seed_everything(config.seed)
    try:
        data = build_data(config)
    except UnreadableImagesError as error:
        raise error.for_resume() from None
    data.mark_resumed()
    derived = derive_for_data(config, data, group.world_size)
    _check_same_data(record, derived)
    environment = describe_environment(device, config.seed, group)
    changes = _environment_changes(record, environment)
    if changes:
        log.warning(
            "%s: %s; the run continues, but not bit-identical to an uninterrupted one",
            record.path,
            "; ".join(changes),
        )
    return data, derived, environment


def _resumed_trainer(
    record: RunRecord,
    config: RunConfig,
    data: DataBundle,
    derived: Derived,
    device: torch.device,
    checkpoint: dict[str, Any] | None,
    keep_checkpoints_every: int | None,
) -> Trainer:
    run_dir = record.path
    trainer = Trainer(config, run_dir, data, derived, device)
    if keep_checkpoints_every is None and checkpoint is not None:
        keep_checkpoints_every = int(checkpoint["keep_checkpoints_every"])
    trainer.keep_checkpoints_every = keep_checkpoints_every or 0
    if trainer.init_fingerprint != record.derived.get("init_fingerprint"):
        log.warning(
            "%s: the model built from seed %d differs from the run's initial weights, so "
            "another library version builds it differently; the frozen check compares with "
            "the new initial weights",
            run_dir,
            config.seed,
        )
    if checkpoint is not None:
        restore_trainer(trainer, checkpoint)
    return trainer


def resume_training(
    run_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    preset: str | None = None,
    show_progress: bool | None = None,
    keep_checkpoints_every: int | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint and return its summary.

    ``overrides`` are configuration values passed on resume; only MUTABLE_FIELDS may
    differ from the run's. ``keep_checkpoints_every`` of None keeps the value the run used.
    A finished run is returned as it is, with ``already_finished`` set. Every check runs
    before the first file changes.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    saved, config = resumed_config(record, run_dir, dict(overrides or {}), preset)
    if record.state == "finished":
        return _finished_result(run_dir, record.status)
    _check_not_diverged(run_dir, record.status)
    group = distributed.join(config.device)
    device = distributed.process_device(group, config.device)
    autocast_factory(config.precision, device)
    _check_tensorboard_on_resume(config, run_dir)
    with main_process_lock(run_dir):
        layers = record.derived.get("layers") or []

        chosen: list[ResumePoint] = []

        def choose() -> tuple[Path | None, int, dict[str, TablePlan]]:
            point = choose_resume_point(run_dir, record.status, len(layers))
            chosen.append(point)
            if point.checkpoint is not None:
                assert point.path is not None
                _check_checkpoint_config(point.checkpoint, saved, point.path)
                _check_world_size(point.checkpoint, point.path, group.world_size)
            return point.path, point.step, point.plans

        # Rank 0 chooses the checkpoint; the others load the same file.
        path, step, plans = distributed.on_main(choose)
        checkpoint = chosen[0].checkpoint if chosen else None
        if checkpoint is None and path is not None:
            checkpoint = read_checkpoint(path)
        data, derived, environment = _build_data(record, config, device, group)

        def repair() -> None:
            apply_plans(run_dir, plans, checkpoint is not None)
            _record_resume(run_dir, record, saved, config, step, environment, derived)
            data.attach_run_dir(run_dir)  # skipped_images.json, with --skip-bad-images

        distributed.on_main(repair)
        trainer = _resumed_trainer(
            record, config, data, derived, device, checkpoint, keep_checkpoints_every
        )
        trainer.writer.write_status("running", step=trainer.step, total_steps=derived.total_steps)
        log.info(
            "%s: resuming at step %d of %d from %s; dropped the rows recorded after it: %s%s",
            run_dir,
            step,
            derived.total_steps,
            path.name if path is not None else "the start (no checkpoint)",
            ", ".join(f"{table} {plan.rows_dropped}" for table, plan in plans.items()),
            _lost_summary(plans),
        )
        return train_run(trainer, show_progress)


@contextlib.contextmanager
def main_process_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's RunLock in rank 0 while every process runs the block."""
    group = distributed.current()
    if group.world_size == 1:
        with RunLock(run_dir):
            yield
        return
    lock = RunLock(run_dir)

    def acquire() -> None:
        lock.__enter__()

    distributed.on_main(acquire)
    try:
        yield
    finally:
        if group.is_main:
            lock.__exit__(None, None, None)


def _check_world_size(checkpoint: dict[str, Any], path: Path, world_size: int) -> None:
    """Refuse to resume a checkpoint with another number of processes than wrote it."""
    saved = int(checkpoint.get("world_size", 1))
    if saved == world_size:
        return
    command = (
        f"stabilitylab run --resume {path.parent}"
        if saved == 1
        else f"torchrun --nproc_per_node {saved} -m stabilitylab run --resume {path.parent}"
    )
    raise ConfigError(
        f"{path} was written by {saved} training process(es), and this resume has "
        f"{world_size}: each process's random streams are in the checkpoint, so the run "
        f"continues exactly only with {saved}; resume it with {command} (with nodes x "
        f"processes per node = {saved})"
    )


def _lost_summary(plans: dict[str, TablePlan]) -> str:
    """Count the rows lost in damaged chunks left in place, for the resume's log line."""
    parts = []
    for table, plan in plans.items():
        lost = plan.lost()
        if not lost:
            continue
        known = [chunk.rows for chunk in lost if chunk.rows is not None]
        if len(known) == len(lost):
            rows = str(sum(known))
        elif known:
            rows = f"at least {sum(known)}"
        else:
            rows = "an unknown number"
        parts.append(f"{table} {rows} ({len(lost)} chunk{'s' if len(lost) > 1 else ''})")
    return f"; rows lost in damaged chunks: {', '.join(parts)}" if parts else ""
