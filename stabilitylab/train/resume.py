"""Continue a stopped run from its last checkpoint, as if it had never stopped.

``stabilitylab run --resume RUN_DIR`` (:func:`resume_training`) reads the configuration
in ``config.json``, applies the options passed with ``--resume``, and rejects any change
outside :data:`MUTABLE_FIELDS`. It then loads the last readable checkpoint and drops the
table rows recorded after it, which a killed run may have flushed. Training goes on from the
checkpoint's step with the same batch, random streams, optimiser and monitor state. On the
CPU, with the same library versions and thread count, the tables of the resumed run equal
those of an uninterrupted run bit for bit, timings aside.

A run without a checkpoint starts again from step 0 in its folder, which gives the same
tables as an uninterrupted run too. A finished run is left as it is. A run stopped at a
non-finite value is rejected, because the same configuration would diverge again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from probes.knn import KnnResult
from stabilitylab.atomic import atomic_target
from stabilitylab.config import FIELD_NAMES, Derived, RunConfig, build_config, derive, validate
from stabilitylab.data import DataBundle, build_data
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
from stabilitylab.train.checkpoint import (
    CHECKPOINT_FORMAT,
    kept_checkpoints,
    read_checkpoint,
    restore_rng_state,
)
from stabilitylab.train.environment import describe_environment, resolve_device
from stabilitylab.train.loop import RunResult, Trainer, seed_everything, train_run
from stabilitylab.train.precision import autocast_factory
from stabilitylab.train.runlock import RunLock
from stabilitylab.train.tensorboard import check_tensorboard, resolve_tensorboard_dir

log = logging.getLogger(__name__)

# Options that may differ on resume because they change how a run is executed or stored,
# not what it computes. A different device, like other library versions or thread counts,
# still gives a valid continuation, but not a bit-identical one.
MUTABLE_FIELDS = (
    "device",
    "workers",
    "flush_every",
    "checkpoint_every",
    "tensorboard",
    "download",
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
# The evaluation tables hold rows evaluated after S steps, so they keep rows 0 to S.
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
        resumed = build_config(preset, **overrides)
    else:
        resumed = dataclasses.replace(saved, **overrides)
    # Differences first: an option that differs may also be invalid with the run's values.
    differences = config_differences(saved, resumed)
    if differences:
        raise ConfigError(
            f"--resume {run_dir}: the options differ from the run's configuration: "
            f"{'; '.join(differences)}. Resume without those options (the run's own values "
            f"apply), or start a new run; only {', '.join(MUTABLE_FIELDS)} may change"
        )
    validate(resumed)
    return saved, resumed


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
        if checkpoint.get("format_version") != CHECKPOINT_FORMAT:
            raise RunDirError(
                f"{path} has checkpoint format {checkpoint.get('format_version')!r}; this "
                f"stabilitylab resumes format {CHECKPOINT_FORMAT}, which also stores the random "
                "generator states. Pass --overwrite to train the run again from the start"
            )
        return checkpoint, path
    raise RunDirError(
        f"--resume {run_dir}: no checkpoint can be loaded ({'; '.join(errors)}); pass "
        "--overwrite to train the run again from the start"
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
    restore_rng_state(checkpoint["rng"], trainer.device)


# -- tables ----------------------------------------------------------------------------------


@dataclass
class ChunkAction:
    """Action of a resume on one chunk: ``keep``, ``trim`` (to its first rows) or ``drop``."""

    path: Path
    action: str
    rows_dropped: int | None  # None for a damaged chunk, whose rows are unknown


def _last_kept_step(table: str, step: int, has_checkpoint: bool) -> int:
    if table in STEP_TABLES:
        return step - 1
    # Evaluations at the checkpoint's step ran before it was written.
    return step if has_checkpoint else -1


def _read_steps(chunk: Path) -> pd.Series | None:
    try:
        return pd.read_parquet(chunk, columns=["step"], engine="pyarrow")["step"]
    except Exception:  # pyarrow raises several types for a damaged file
        return None


def plan_table(table_dir: Path, last_kept: int) -> tuple[list[ChunkAction], list[int]]:
    """Return the action for each chunk of a table and the steps of the rows kept.

    Chunks are numbered in the order they were written, so a damaged chunk after one with
    rows beyond ``last_kept`` is dropped too. A damaged chunk before a kept one means rows
    before the checkpoint are lost, and raises RunDirError.
    """
    chunks = chunk_paths(table_dir)
    steps = [_read_steps(chunk) for chunk in chunks]
    actions: list[ChunkAction] = []
    kept_steps: list[int] = []
    for position, (chunk, values) in enumerate(zip(chunks, steps, strict=True)):
        if values is None:
            later_kept = any(v is not None and (v <= last_kept).any() for v in steps[position:])
            if later_kept:
                raise RunDirError(
                    f"{chunk} is damaged and lies before the checkpoint, so the table has lost "
                    "rows that a resume cannot recreate; pass --overwrite to train the run "
                    "again from the start"
                )
            log.warning("%s is damaged and lies after the checkpoint, so it is removed", chunk)
            actions.append(ChunkAction(chunk, "drop", None))
            continue
        keep = values <= last_kept
        kept_steps += values[keep].astype(int).tolist()
        if keep.all():
            actions.append(ChunkAction(chunk, "keep", 0))
        elif not keep.any():
            actions.append(ChunkAction(chunk, "drop", len(values)))
        else:
            actions.append(ChunkAction(chunk, "trim", int((~keep).sum())))
    return actions, kept_steps


def _check_complete(table: str, kept_steps: list[int], step: int, per_step: int) -> None:
    expected = [value for value in range(step) for _ in range(per_step)]
    if sorted(kept_steps) != expected:
        raise RunDirError(
            f"the {table} table contains {len(kept_steps)} rows for the {step} steps before the "
            f"checkpoint, {len(expected)} expected; rows were lost or repeated, so the run "
            "cannot continue exactly. Pass --overwrite to train it again from the start"
        )


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


def truncate_tables(
    run_dir: Path, step: int, has_checkpoint: bool, layers_per_step: int
) -> dict[str, int]:
    """Drop the rows recorded after the checkpoint at ``step``; return the rows dropped per table.

    Every table is planned before any file changes, so a run whose tables have lost rows
    before the checkpoint is rejected untouched.
    """
    plans = {}
    for table in TABLE_COLUMNS:
        table_dir = run_dir / table
        last_kept = _last_kept_step(table, step, has_checkpoint)
        if not table_dir.is_dir():
            plans[table] = (last_kept, [])
            continue
        actions, kept_steps = plan_table(table_dir, last_kept)
        if table == "steps":
            _check_complete(table, kept_steps, step, 1)
        elif table == "layers":
            _check_complete(table, kept_steps, step, layers_per_step)
        plans[table] = (last_kept, actions)
    dropped = {}
    for table, (last_kept, actions) in plans.items():
        for action in actions:
            _apply(action, last_kept)
        dropped[table] = sum(action.rows_dropped or 0 for action in actions)
    _remove_temporary_files(run_dir)
    return dropped


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
) -> None:
    """Store the continued configuration and a ``resumes`` entry in ``config.json``."""
    before, after = _comparable(saved), _comparable(config)
    changed = {
        name: [before[name], after[name]] for name in FIELD_NAMES if before[name] != after[name]
    }
    payload = dict(record.payload)
    payload["config"] = after
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
    record: RunRecord, config: RunConfig, device: torch.device
) -> tuple[DataBundle, Derived, dict[str, Any]]:
    """Build the run's data as a new run would, and check it against the recorded values."""
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes, data.img_size)
    _check_same_data(record, derived)
    environment = describe_environment(device, config.seed)
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
    device = resolve_device(config.device)
    autocast_factory(config.precision, device)
    _check_tensorboard_on_resume(config, run_dir)
    with RunLock(run_dir):
        found = latest_checkpoint(run_dir)
        checkpoint, source = found if found is not None else (None, None)
        if checkpoint is not None:
            _check_checkpoint_config(checkpoint, saved, source)
        data, derived, environment = _build_data(record, config, device)
        step = int(checkpoint["step"]) if checkpoint is not None else 0
        layers = record.derived.get("layers") or []
        dropped = truncate_tables(run_dir, step, checkpoint is not None, len(layers))
        _record_resume(run_dir, record, saved, config, step, environment)
        data.attach_run_dir(run_dir)  # skipped_images.json, with --skip-bad-images
        trainer = _resumed_trainer(
            record, config, data, derived, device, checkpoint, keep_checkpoints_every
        )
        trainer.writer.write_status("running", step=trainer.step, total_steps=derived.total_steps)
        log.info(
            "%s: resuming at step %d of %d from %s; dropped the rows recorded after it: %s",
            run_dir,
            step,
            derived.total_steps,
            source.name if source is not None else "the start (no checkpoint)",
            ", ".join(f"{table} {count}" for table, count in dropped.items()),
        )
        return train_run(trainer, show_progress)
