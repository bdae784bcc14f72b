"""Learning-rate sweeps: a grid of runs over lr, batch size, arm and seed in one folder.

``stabilitylab sweep --out SWEEP_DIR`` trains every grid point in turn, in this process, into
``SWEEP_DIR/NAME`` with names such as ``lr0.003-bs256-learned-s0``, and writes the grid and
the options shared by every run to ``SWEEP_DIR/sweep.json`` before the first run starts.

Rerunning the same command resumes the sweep: a run whose status is ``finished`` and whose
configuration equals its grid point is skipped, and any other run (``running``,
``interrupted``, ``failed``) is trained again from scratch. A run folder whose configuration
differs from its grid point, and a rerun whose grid or shared options differ from
``sweep.json``, raise RunDirError before anything is trained or written, unless
``overwrite`` is set. A run whose loss becomes non-finite (it diverged) is recorded as
failed by the training loop, and the sweep goes on with the next run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabilitylab.atomic import write_text_atomic
from stabilitylab.config import RunConfig, build_config, with_field_defaults
from stabilitylab.errors import ConfigError, RunDirError, TrainingError
from stabilitylab.runs import CONFIG_FILE, DIVERGED_REASONS, STATUS_FILE, make_dir

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT_VERSION = 1
ARMS = ("learned", "frozen")
ARM_CHOICES = (*ARMS, "both")
# Configuration fields that the grid sets, so they cannot be shared options.
SWEPT_FIELDS = ("lr", "batch_size", "freeze_patch_embed", "seed")
# The reasons that the training loop writes to status.json when the loss or the gradient
# norm becomes non-finite.
DIVERGED_STATUS_REASONS = tuple(DIVERGED_REASONS.values())
# Folders named in one error message before the rest are counted.
MAX_NAMED_FOLDERS = 3

# Outcomes of one run in a sweep.
FINISHED = "finished"
SKIPPED = "skipped"  # finished by an earlier invocation, not trained again
DIVERGED = "diverged"
FAILED = "failed"


@dataclass(frozen=True)
class SweepGrid:
    """The swept values, each sorted and without repeats; arms in the order learned, frozen."""

    lrs: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]

    def to_dict(self) -> dict[str, list[Any]]:
        return {
            "lr": list(self.lrs),
            "batch_size": list(self.batch_sizes),
            "arm": list(self.arms),
            "seed": list(self.seeds),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepGrid:
        return cls(
            lrs=tuple(float(v) for v in values["lr"]),
            batch_sizes=tuple(int(v) for v in values["batch_size"]),
            arms=tuple(str(v) for v in values["arm"]),
            seeds=tuple(int(v) for v in values["seed"]),
        )


@dataclass(frozen=True)
class GridPoint:
    """One run of the sweep: the values of the swept fields."""

    lr: float
    batch_size: int
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.lr, self.batch_size, self.arm, self.seed)

    def overrides(self) -> dict[str, Any]:
        """Return the configuration fields that this point sets."""
        return {
            "lr": self.lr,
            "batch_size": self.batch_size,
            "freeze_patch_embed": self.arm == "frozen",
            "seed": self.seed,
        }


def run_name(lr: float, batch_size: int, arm: str, seed: int) -> str:
    """Return the folder name of one grid point, such as ``lr0.003-bs256-learned-s0``.

    The lr is written as Python's shortest round-trip ``repr``, so distinct values always get
    distinct names and equal values always the same one.
    """
    return f"lr{float(lr)!r}-bs{batch_size}-{arm}-s{seed}"


def make_grid(
    lrs: Iterable[float], batch_sizes: Iterable[int], arms: str, seeds: Iterable[int]
) -> SweepGrid:
    """Build the grid from the swept option values; raise ConfigError for empty or repeated ones.

    ``arms`` is ``learned``, ``frozen`` or ``both``. Whether each value is valid for a run
    (a positive lr, a batch of at least 2) is checked by :func:`build_manifest`.
    """
    if arms not in ARM_CHOICES:
        raise ConfigError(f"--arms {arms!r} is not one of: {', '.join(ARM_CHOICES)}")
    return SweepGrid(
        lrs=_sorted_distinct("--lr", [float(v) for v in lrs]),
        batch_sizes=_sorted_distinct("--batch-size", list(batch_sizes)),
        arms=ARMS if arms == "both" else (arms,),
        seeds=_sorted_distinct("--seeds", list(seeds)),
    )


def _sorted_distinct(option: str, values: list[Any]) -> tuple[Any, ...]:
    if not values:
        raise ConfigError(f"{option} needs at least one value")
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise ConfigError(f"{option} value {repeated[0]!r} is given more than once; pass it once")
    return tuple(sorted(values))


@dataclass(frozen=True)
class SweepManifest:
    """The content of ``sweep.json``: the grid and what every run of it shares.

    ``options`` are the configuration values given explicitly. ``shared_config`` is the
    resolved configuration of every run without the swept fields. A rerun is compared on it,
    so passing a preset's default value explicitly is no difference.
    """

    grid: SweepGrid
    preset: str
    options: dict[str, Any]
    shared_config: dict[str, Any]

    @property
    def points(self) -> list[GridPoint]:
        """Return the grid points in training order: batch size, lr, seed, then arm."""
        grid = self.grid
        return [
            GridPoint(lr, batch_size, arm, seed)
            for batch_size in grid.batch_sizes
            for lr in grid.lrs
            for seed in grid.seeds
            for arm in grid.arms
        ]

    def point_config(self, point: GridPoint) -> RunConfig:
        return build_config(self.preset, **{**self.options, **point.overrides()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": SWEEP_FORMAT_VERSION,
            "grid": self.grid.to_dict(),
            "preset": self.preset,
            "options": self.options,
            "shared_config": self.shared_config,
            "runs": [point.name for point in self.points],
        }


def build_manifest(grid: SweepGrid, preset: str, options: dict[str, Any]) -> SweepManifest:
    """Build the manifest and validate every grid point's configuration.

    Raises ConfigError when ``options`` sets a swept field or any grid point is invalid.
    """
    swept = sorted(set(options) & set(SWEPT_FIELDS))
    if swept:
        raise ConfigError(
            f"{swept[0]} is set by the sweep grid, not as a shared option; pass its values "
            "with --lr, --batch-size, --arms or --seeds"
        )
    shared_options = _json_ready(options)
    manifest = SweepManifest(grid, preset, shared_options, {})
    configs = [manifest.point_config(point) for point in manifest.points]
    shared = {k: v for k, v in configs[0].to_dict().items() if k not in SWEPT_FIELDS}
    return SweepManifest(grid, preset, shared_options, _json_ready(shared))


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    # The form the values take after a round trip through JSON: tuples become lists.
    return json.loads(json.dumps(values))


def is_sweep_dir(path: Path) -> bool:
    """Tell whether ``path`` contains a ``sweep.json`` written by ``stabilitylab sweep``."""
    return (Path(path) / SWEEP_FILE).is_file()


def read_manifest(folder: Path) -> SweepManifest:
    """Read ``folder/sweep.json``; raise RunDirError when it is missing or damaged."""
    path = Path(folder) / SWEEP_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(
            f"{folder} contains no {SWEEP_FILE}, so it is not a sweep folder"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(
            f"{path} cannot be read ({error}); the sweep manifest is damaged"
        ) from None
    if not isinstance(payload, dict) or payload.get("format_version") != SWEEP_FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise RunDirError(
            f"{path} has format_version {version!r}; this stabilitylab reads version "
            f"{SWEEP_FORMAT_VERSION}"
        )
    return SweepManifest(
        grid=_manifest_entry(path, payload, "grid", SweepGrid.from_dict),
        preset=_manifest_entry(path, payload, "preset", str),
        options=_manifest_entry(path, payload, "options", dict),
        shared_config=_manifest_entry(path, payload, "shared_config", dict),
    )


def _manifest_entry(path: Path, payload: dict[str, Any], key: str, parse: Callable[[Any], Any]):
    """Parse ``payload[key]`` with ``parse``; a missing or malformed entry names the key."""
    if key not in payload:
        raise RunDirError(f"{path} has no {key!r} entry; the sweep manifest is damaged")
    try:
        return parse(payload[key])
    except (KeyError, TypeError, ValueError) as error:
        detail = f"no {error} field" if isinstance(error, KeyError) else str(error)
        raise RunDirError(
            f"{path} has a malformed {key!r} entry ({detail}); the sweep manifest is damaged, "
            "so remove the sweep folder or pass a new --out"
        ) from None


def write_manifest(folder: Path, manifest: SweepManifest) -> None:
    write_text_atomic(Path(folder) / SWEEP_FILE, json.dumps(manifest.to_dict(), indent=2) + "\n")


def manifest_differences(old: SweepManifest, new: SweepManifest) -> list[str]:
    """Describe, one entry per value, how ``new`` differs from the manifest on disk."""
    differences = []
    old_grid, new_grid = old.grid.to_dict(), new.grid.to_dict()
    for key, option in (("lr", "--lr"), ("batch_size", "--batch-size"), ("seed", "--seeds")):
        if old_grid[key] != new_grid[key]:
            differences.append(
                f"{option} {_values_text(old_grid[key])} in {SWEEP_FILE}, "
                f"{_values_text(new_grid[key])} now"
            )
    if old_grid["arm"] != new_grid["arm"]:
        differences.append(
            f"--arms {_arms_text(old.grid.arms)} in {SWEEP_FILE}, {_arms_text(new.grid.arms)} now"
        )
    if old.preset != new.preset:
        differences.append(f"--preset {old.preset} in {SWEEP_FILE}, {new.preset} now")
    differences += _config_differences(old.shared_config, new.shared_config, SWEEP_FILE)
    return differences


def _values_text(values: Sequence[Any]) -> str:
    return " ".join(str(value) for value in values)


def _arms_text(arms: Sequence[str]) -> str:
    return "both" if tuple(arms) == ARMS else " ".join(arms)


def _config_differences(
    recorded: dict[str, Any], expected: dict[str, Any], where: str
) -> list[str]:
    # A field added after a run was recorded is missing there and took its default.
    recorded, expected = with_field_defaults(recorded), with_field_defaults(expected)
    keys = sorted(set(recorded) | set(expected))
    return [
        f"{key} {recorded.get(key, 'missing')!r} in {where}, {expected.get(key, 'missing')!r} now"
        for key in keys
        if recorded.get(key) != expected.get(key)
    ]


@dataclass(frozen=True)
class PlannedRun:
    """One grid point with its configuration, its folder and what the sweep will do there.

    ``action`` is ``skip`` (finished earlier with this configuration), ``train`` (no run there
    yet) or ``retrain`` (an incomplete run, or with ``overwrite`` one whose configuration
    differs, is replaced from scratch).
    """

    point: GridPoint
    config: RunConfig
    path: Path
    action: str
    reason: str


def plan_sweep(manifest: SweepManifest, out: Path, overwrite: bool = False) -> list[PlannedRun]:
    """Decide for every grid point whether to skip, train or retrain it.

    Raises RunDirError, naming the folders and their differences, when a run folder's
    configuration differs from its grid point and ``overwrite`` is not set, or when a grid
    point's folder is a file or contains files but no run.
    """
    plan = []
    mismatched = []
    for point in manifest.points:
        config = manifest.point_config(point)
        path = Path(out) / point.name
        header = _read_run_header(path)
        if header is None:
            plan.append(PlannedRun(point, config, path, "train", "new run"))
            continue
        recorded, state = header
        differences = _config_differences(recorded, _json_ready(config.to_dict()), CONFIG_FILE)
        if differences and not overwrite:
            mismatched.append(f"{path} ({differences[0]})")
        elif differences:
            reason = f"configuration differs ({differences[0]}), replaced by --overwrite"
            plan.append(PlannedRun(point, config, path, "retrain", reason))
        elif state == "finished":
            plan.append(PlannedRun(point, config, path, "skip", "finished earlier"))
        else:
            plan.append(PlannedRun(point, config, path, "retrain", f"incomplete ({state})"))
    if mismatched:
        named = "; ".join(mismatched[:MAX_NAMED_FOLDERS])
        more = len(mismatched) - MAX_NAMED_FOLDERS
        rest = f"; and {more} more" if more > 0 else ""
        raise RunDirError(
            f"run folders do not match their grid point: {named}{rest}. Pass a new --out, or "
            "--overwrite to train those runs again with the grid's configuration"
        )
    return plan


def _read_run_header(path: Path) -> tuple[dict[str, Any], str] | None:
    """Return the recorded configuration and state of a run folder, None when there is none.

    An empty folder counts as no run (a run killed before it wrote its header). A missing
    or damaged ``status.json`` reads as state ``unknown``.
    """
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file where the sweep keeps a run folder; move it away")
    if not path.is_dir() or not any(path.iterdir()):
        return None
    try:
        payload = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        config = payload["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise RunDirError(
            f"{path} contains files but no readable {CONFIG_FILE} written by stabilitylab; "
            "move it away or pass a new --out"
        ) from None
    try:
        state = json.loads((path / STATUS_FILE).read_text(encoding="utf-8"))["state"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        state = "unknown"
    return config, str(state)


@dataclass(frozen=True)
class RunOutcome:
    """The outcome of one grid point in this invocation: finished, skipped, diverged, failed."""

    name: str
    path: Path
    outcome: str
    message: str


@dataclass
class SweepResult:
    """The outcome of every run of a sweep, and the report folder when a report was written."""

    out: Path
    outcomes: list[RunOutcome] = field(default_factory=list)
    report_dir: Path | None = None

    def count(self, outcome: str) -> int:
        return sum(1 for entry in self.outcomes if entry.outcome == outcome)

    @property
    def failed(self) -> list[RunOutcome]:
        """Runs that stopped for another reason than a non-finite loss."""
        return [entry for entry in self.outcomes if entry.outcome == FAILED]


def prepare_sweep_dir(out: Path, manifest: SweepManifest, overwrite: bool) -> None:
    """Check that ``out`` is new, empty or a sweep of this same manifest.

    Raises RunDirError naming each difference from the ``sweep.json`` already there, unless
    ``overwrite`` is set; a non-empty folder without ``sweep.json`` is always rejected.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; pass a new folder name")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_sweep_dir(out):
        raise RunDirError(
            f"--out {out} already contains files but no {SWEEP_FILE}, so it is not a sweep "
            "folder; pass a new or empty folder"
        )
    differences = manifest_differences(read_manifest(out), manifest)
    if differences and not overwrite:
        raise RunDirError(
            f"--out {out} contains a different sweep: {'; '.join(differences)}. Rerun with the "
            f"values in {out / SWEEP_FILE} to resume it, pass a new --out, or pass --overwrite "
            "to switch the folder to this grid (finished runs that match it are kept)"
        )
    if differences:
        log.warning(
            "%s: replacing the sweep manifest because of --overwrite: %s",
            out,
            "; ".join(differences),
        )


def run_sweep(
    manifest: SweepManifest,
    out: str | Path,
    *,
    overwrite: bool = False,
    report: bool = True,
    show_progress: bool | None = None,
) -> SweepResult:
    """Train every grid point of ``manifest`` into ``out`` in turn, then write the report.

    Every configuration and every existing folder is checked before the manifest is written
    or a run starts. A run that diverges is recorded and the sweep continues. On Ctrl-C
    (KeyboardInterrupt) the interrupted run is marked ``interrupted`` by the training loop,
    this function logs how to resume and re-raises. With ``report`` the sweep report is
    written into ``out/report`` at the end.
    """
    out = Path(out)
    prepare_sweep_dir(out, manifest, overwrite)
    plan = plan_sweep(manifest, out, overwrite)
    _preflight([entry.config for entry in plan if entry.action != "skip"])
    make_dir(out, "--out")
    write_manifest(out, manifest)
    _warn_other_runs(out, manifest)
    result = SweepResult(out)
    started = time.perf_counter()
    for index, entry in enumerate(plan, start=1):
        prefix = f"sweep {out.name} [{index}/{len(plan)}] {entry.point.name}"
        if entry.action == "skip":
            log.info("%s: skipped, %s", prefix, entry.reason)
            result.outcomes.append(RunOutcome(entry.point.name, entry.path, SKIPPED, entry.reason))
            continue
        if entry.action == "retrain":
            log.info("%s: training again from scratch, %s", prefix, entry.reason)
        try:
            outcome = _train_point(entry, show_progress)
        except KeyboardInterrupt:
            log.warning(
                "%s: interrupted after %d of %d runs. Rerun the same command to resume: finished "
                "runs are skipped and this one starts again",
                prefix,
                index - 1,
                len(plan),
            )
            raise
        log.info("%s: %s, %s", prefix, outcome.outcome, outcome.message)
        result.outcomes.append(outcome)
    log.info(
        "sweep %s: %d runs in %.0f s: %d finished, %d skipped, %d diverged, %d failed",
        out,
        len(plan),
        time.perf_counter() - started,
        result.count(FINISHED),
        result.count(SKIPPED),
        result.count(DIVERGED),
        result.count(FAILED),
    )
    if report:
        from stabilitylab.report import write_report

        result.report_dir = write_report([out])
    return result


def _warn_other_runs(out: Path, manifest: SweepManifest) -> None:
    """Log the run folders in ``out`` that are not grid points, such as those of an older grid."""
    names = {point.name for point in manifest.points}
    others = sorted(
        child.name
        for child in out.iterdir()
        if child.is_dir() and child.name not in names and (child / CONFIG_FILE).is_file()
    )
    if others:
        log.warning(
            "%s: %d run folders are not part of this grid, so they are left in place and "
            "not reported: %s",
            out,
            len(others),
            ", ".join(others),
        )


def _preflight(configs: Sequence[RunConfig]) -> None:
    """Check device, precision and batch size against the data once, before any run starts.

    run_training checks the same for each run, but only when that run begins. This check
    finds a bad --batch-size or fault step at the last grid point before the first one trains.
    """
    if not configs:
        return
    from stabilitylab.config import derive
    from stabilitylab.data import build_data
    from stabilitylab.train.environment import resolve_device
    from stabilitylab.train.precision import autocast_factory

    first = configs[0]
    autocast_factory(first.precision, resolve_device(first.device))
    # The shared options fix the dataset, so one build gives every run's training split.
    data = build_data(first)
    for config in configs:
        derive(config, len(data.train), data.in_chans, data.num_classes)


def _train_point(entry: PlannedRun, show_progress: bool | None) -> RunOutcome:
    from stabilitylab.train.loop import run_training

    name = entry.point.name
    started = time.perf_counter()
    # NOTE: an incomplete run restarts from step 0, although
    # stabilitylab.train.resume.resume_training could continue it from its last checkpoint.
    try:
        result = run_training(
            entry.config,
            entry.path,
            overwrite=entry.action == "retrain",
            show_progress=show_progress,
        )
    except TrainingError as error:
        state, reason = _read_state(entry.path)
        if state == "failed" and reason in DIVERGED_STATUS_REASONS:
            return RunOutcome(name, entry.path, DIVERGED, f"{error}; the sweep continues")
        return RunOutcome(name, entry.path, FAILED, str(error))
    seconds = time.perf_counter() - started
    message = (
        f"{result.steps} steps, kNN top-1 final {result.final_knn_top1:.2f}% best "
        f"{result.best_knn_top1:.2f}% in {seconds:.0f} s"
    )
    return RunOutcome(name, entry.path, FINISHED, message)


def _read_state(path: Path) -> tuple[str, str | None]:
    try:
        status = json.loads((path / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "unknown", None
    if not isinstance(status, dict):
        return "unknown", None
    return str(status.get("state", "unknown")), status.get("reason")
