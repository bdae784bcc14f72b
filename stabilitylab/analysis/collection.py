"""Several runs read at once, from run folders, glob patterns or a sweep folder."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitylab.analysis.rundata import Detectors, RunData, resolve_detectors, run_values
from stabilitylab.errors import ConfigError, RunDirError
from stabilitylab.report.summary import run_labels
from stabilitylab.report.sweep import ReportSweep, load_report_sweep
from stabilitylab.runs import CONFIG_FILE, TABLE_COLUMNS, read_run
from stabilitylab.sweep import SWEEP_FILE, is_sweep_dir

log = logging.getLogger(__name__)

RunSource = str | os.PathLike[str]
# Frames that RunSet.table stacks: the stored tables and the detected events.
STACKABLE = (*TABLE_COLUMNS, "events")
GLOB_CHARACTERS = frozenset("*?[")
# The run-level columns that lead every frame of RunSet.table. No stored table or the events
# frame has a column of these names.
LEAD_COLUMNS = ("run", "arm", "seed", "run_lr", "run_batch_size")


class RunSet(list[RunData]):
    """A list of :class:`RunData`, with stacked tables; ``sweep`` is set for a sweep folder.

    ``sweep`` contains the sweep's ``path``, its ``manifest`` (the lr, batch-size, arm and
    seed grid and the shared options) and the names of the grid points not run yet
    (``missing``). ``skipped`` lists the damaged run folders that a pattern, a folder of
    runs or a sweep contained, each as ``"PATH: reason"``.
    """

    def __init__(
        self,
        runs: Iterable[RunData] = (),
        sweep: ReportSweep | None = None,
        skipped: Iterable[str] = (),
    ) -> None:
        super().__init__(runs)
        self.sweep = sweep
        self.skipped = list(skipped)

    def __repr__(self) -> str:
        where = f", sweep={str(self.sweep.path)!r}" if self.sweep is not None else ""
        return f"RunSet({self.labels!r}{where})"

    @property
    def labels(self) -> list[str]:
        """One distinct label per run: name and arm, prefixed by the parent folder on a clash."""
        return run_labels(self)

    def table(self, name: str) -> pd.DataFrame:
        """Stack one frame of every run, led by the columns of :data:`LEAD_COLUMNS`.

        ``name`` is ``steps``, ``layers``, ``evals``, ``dense_knn``, ``attention`` or
        ``events``. The lead columns are ``run`` (the run's label from :attr:`labels`),
        ``arm``, ``seed``, ``run_lr`` (the configured base lr) and ``run_batch_size``. The
        ``run_`` prefix keeps them apart from table columns such as the per-step ``lr`` of
        ``steps``. Raises ConfigError for another name, and RunDirError for a stored table
        that has a column of a lead name.
        """
        if name not in STACKABLE:
            raise ConfigError(
                f"table {name!r} is not a run table; pass one of {', '.join(STACKABLE)}"
            )
        frames = []
        for run, label in zip(self, self.labels, strict=True):
            frames.append(_with_lead_columns(getattr(run, name), name, run, label))
        if not frames:
            raise RunDirError("the run set is empty; load runs with stabilitylab.load_runs first")
        non_empty = [frame for frame in frames if not frame.empty]
        return pd.concat(non_empty or frames[:1], ignore_index=True)


def _with_lead_columns(frame: pd.DataFrame, name: str, run: RunData, label: str) -> pd.DataFrame:
    """Return a copy of ``frame`` with the run's lead columns in front."""
    clash = [column for column in LEAD_COLUMNS if column in frame.columns]
    if clash:
        raise RunDirError(
            f"the {name} table of {run.path} has a column {clash[0]!r}, a name that "
            "RunSet.table gives the run's own values; it was not written by stabilitylab"
        )
    lead = {"run": label, **run_values(run)}
    frame = frame.copy()
    for position, column in enumerate(LEAD_COLUMNS):
        frame.insert(position, column, lead[column])
    return frame


def load_runs(source: RunSource | Iterable[RunSource], detectors: Detectors = None) -> RunSet:
    """Read several runs into a :class:`RunSet`, in the order given, each folder once.

    ``source`` is a run folder, a sweep folder (one with ``sweep.json``), a folder whose
    subfolders are runs, a glob pattern such as ``"runs/*"``, or a list of these. A sweep
    gives its grid points that have a run folder, in grid order, and a pattern's matches
    that are not runs are skipped. A damaged run (an unreadable ``config.json``) that a
    pattern, a folder of runs or a sweep contains is skipped with a warning and listed in
    ``RunSet.skipped``, and one given by its own path raises. ``detectors`` is as in
    :func:`load_run`.

    Raises RunDirError for an empty list, a missing path, a pattern that matches no run
    folder, a folder that is neither a run, a sweep nor a folder of runs, and a damaged run
    given by its path. Raises TypeError for a ``source`` that is not a path, a pattern or a
    list of them.
    """
    sources = _source_list(source)
    if not sources:
        raise RunDirError(
            "no run folder was given; pass a run folder, a sweep folder, a glob pattern such "
            "as 'runs/*', or a list of them"
        )
    params = resolve_detectors(detectors)
    sweep = None
    if len(sources) == 1 and _is_plain_path(sources[0]):
        sweep = _read_sweep(Path(sources[0]).expanduser())
    if sweep is not None:
        entries = [(path, False) for path in sweep.run_paths]
    else:
        entries = _unique(_expand_all(sources))
    runs: list[RunData] = []
    skipped: list[str] = []
    for path, named in entries:
        try:
            run = read_run(path)
        except RunDirError as error:
            if named:
                raise
            log.warning("%s is skipped: %s", path, error)
            skipped.append(f"{path}: {error}")
            continue
        runs.append(RunData.from_run(run, params))
    if not runs and skipped:
        raise RunDirError(
            f"every run folder found is damaged, so none was read; the first: {skipped[0]}"
        )
    log.info("read %d runs", len(runs))
    return RunSet(runs, sweep=sweep, skipped=skipped)


def _source_list(source: Any) -> list[RunSource]:
    """Return ``source`` as a list of paths and patterns; raise TypeError for other types."""
    if isinstance(source, str | os.PathLike):
        return [source]
    if isinstance(source, Iterable) and not isinstance(source, bytes | Mapping):
        items = list(source)
        wrong = [item for item in items if not isinstance(item, str | os.PathLike)]
        if not wrong:
            return items
        raise TypeError(
            f"load_runs got a {type(wrong[0]).__name__} ({wrong[0]!r}) in its list; pass run "
            "folders and glob patterns as str or pathlib.Path"
        )
    raise TypeError(
        f"load_runs got a {type(source).__name__} ({source!r}); pass a run folder, a sweep "
        "folder or a glob pattern as a str or pathlib.Path, or a list of them"
    )


def _is_plain_path(source: RunSource) -> bool:
    return not GLOB_CHARACTERS.intersection(os.fspath(source))


def _read_sweep(path: Path) -> ReportSweep | None:
    return load_report_sweep([path]) if is_sweep_dir(path) else None


def _expand_all(sources: Iterable[RunSource]) -> list[tuple[Path, bool]]:
    """Return each run folder with whether it was named by its own path (not found in one)."""
    entries: list[tuple[Path, bool]] = []
    for source in sources:
        if _is_plain_path(source):
            path = Path(source).expanduser()
            named = path.is_dir() and (path / CONFIG_FILE).is_file() and not is_sweep_dir(path)
            entries += [(found, named) for found in _expand_folder(path)]
        else:
            entries += [(found, False) for found in _expand_pattern(os.fspath(source))]
    return entries


def _expand_folder(path: Path) -> list[Path]:
    """Return the run folders that ``path`` stands for: itself, a sweep's runs or its subfolders."""
    if not path.exists():
        raise RunDirError(
            f"{path} does not exist; pass a run folder, a sweep folder or a glob pattern "
            "such as 'runs/*'"
        )
    if not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run folder; pass the folder that contains it")
    if is_sweep_dir(path):
        return load_report_sweep([path]).run_paths
    if (path / CONFIG_FILE).is_file():
        return [path]
    children = sorted(child for child in path.iterdir() if (child / CONFIG_FILE).is_file())
    if not children:
        raise RunDirError(
            f"{path} is not a run folder (no {CONFIG_FILE}), not a sweep folder (no "
            f"{SWEEP_FILE}), and no subfolder of it is a run; pass the --out folder of "
            "stabilitylab run or stabilitylab sweep"
        )
    return children


def _expand_pattern(pattern: str) -> list[Path]:
    """Return the run folders among the matches of a glob pattern, sweeps expanded."""
    found = glob.glob(os.path.expanduser(pattern), recursive=True)
    matches = sorted(Path(match) for match in found)
    if not matches:
        raise RunDirError(
            f"the pattern {pattern!r} matches nothing; pass a pattern that matches run "
            "folders, such as 'runs/*'"
        )
    paths: list[Path] = []
    for match in matches:
        if is_sweep_dir(match):
            paths += load_report_sweep([match]).run_paths
        elif (match / CONFIG_FILE).is_file():
            paths.append(match)
        else:
            log.info("%s matches %r but is not a run folder, so it is skipped", match, pattern)
    if not paths:
        raise RunDirError(
            f"the pattern {pattern!r} matches {len(matches)} paths but no run folder (one "
            f"with {CONFIG_FILE}); pass a pattern that matches run folders"
        )
    return paths


def _unique(entries: Iterable[tuple[Path, bool]]) -> list[tuple[Path, bool]]:
    """Return ``entries`` in order without a second entry for the same folder."""
    seen: set[Path] = set()
    unique = []
    for path, named in entries:
        resolved = path.resolve()
        if resolved in seen:
            log.info("%s was given more than once, so it is read once", path)
            continue
        seen.add(resolved)
        unique.append((path, named))
    return unique
