"""One run directory read for analysis: its tables, its detected events and wide views."""

from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.analysis.events import events_frame, lags_frame
from stabilitylab.detect import (
    DetectorParams,
    RunEvents,
    attention_layer_series,
    clean_series,
    detect_run,
    select_first_layer,
    select_last_block,
)
from stabilitylab.detect.params_file import read_detector_file
from stabilitylab.detect.verdict import UNDETERMINED
from stabilitylab.errors import ConfigError, RunDirError
from stabilitylab.report.diagnosis import missing_lag_reason
from stabilitylab.report.summary import best_top1, final_top1, has_first_layer_signal
from stabilitylab.runs import TABLE_COLUMNS, Run, read_run
from stabilitylab.sweep import is_sweep_dir

# Columns of the layers table that layer_frame can spread into one column per layer group.
LAYER_SIGNALS = tuple(name for name in TABLE_COLUMNS["layers"] if name not in ("step", "layer"))
# Columns of the attention table that attention_frame reduces over heads, one column per block.
ATTENTION_SIGNALS = ("entropy", "max_logit")
FIRST_LAYER = "first layer"
LAST_BLOCK = "last block"

Detectors = DetectorParams | str | os.PathLike[str] | None


def resolve_detectors(detectors: Detectors) -> DetectorParams:
    """Return the detector parameters: the defaults, the given ones, or those of a JSON file.

    A path is read as a file from ``stabilitylab calibrate`` or a report's ``events.json``;
    a bad file raises ConfigError naming it.
    """
    if detectors is None:
        return DetectorParams()
    if isinstance(detectors, DetectorParams):
        return detectors
    if isinstance(detectors, str | os.PathLike):
        return read_detector_file(detectors)
    raise TypeError(
        f"detectors is {type(detectors).__name__}; pass DetectorParams, the path of a "
        "detector file written by stabilitylab calibrate, or None for the defaults"
    )


@dataclasses.dataclass(eq=False, repr=False)
class RunData(Run):
    """A run directory with its detected events, for analysis with pandas.

    The tables ``steps``, ``layers`` (long: one row per step and layer group), ``evals``,
    ``dense_knn`` and ``attention`` (long: one row per probe, block and head) are as
    stored, with the columns of docs/run-directory.md. ``config``, ``derived``,
    ``environment`` and ``status`` are the JSON objects of ``config.json`` and
    ``status.json``. Detection runs once, on first use of ``detection``, ``events``,
    ``verdict`` or ``lags``, with ``detector_params``.
    """

    detector_params: DetectorParams = dataclasses.field(default_factory=DetectorParams)

    # Equality is identity, because Run's field-by-field equality compares DataFrames and
    # raises. It also lets a RunData be a dict key or a set member.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @classmethod
    def from_run(cls, run: Run, detector_params: DetectorParams | None = None) -> RunData:
        """Wrap a :class:`~stabilitylab.runs.Run` read by ``read_run``, sharing its tables."""
        values = {field.name: getattr(run, field.name) for field in dataclasses.fields(Run)}
        return cls(**values, detector_params=detector_params or DetectorParams())

    def __repr__(self) -> str:
        return (
            f"RunData(name={self.name!r}, arm={self.arm!r}, state={self.state!r}, "
            f"steps={len(self.steps)}, evals={len(self.evals)}, path={str(self.path)!r})"
        )

    @property
    def state(self) -> str:
        """The ``state`` of ``status.json``: running, finished, failed, interrupted or unknown."""
        return str(self.status.get("state", "unknown"))

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @cached_property
    def detection(self) -> RunEvents:
        """Every detector's output, as ``stabilitylab report`` computes it for events.json."""
        return detect_run(self, self.detector_params)

    @cached_property
    def events(self) -> pd.DataFrame:
        """The spikes, dips and planted faults, one row per event; columns in docs/api.md."""
        return events_frame(self.detection)

    @cached_property
    def lags(self) -> pd.DataFrame:
        """Lags from the first-layer signal to the last block and to each head layer group.

        ``lags.attrs["reason"]`` is :attr:`lag_reason`.
        """
        frame = lags_frame(self.detection)
        frame.attrs["reason"] = self.lag_reason
        return frame

    @property
    def lag_reason(self) -> str | None:
        """Why the run has no first-layer to last-block lag, or None when it can have one.

        Such as "no transformer blocks (blocks.NN) in this run's layer groups" for a ResNet.
        """
        return missing_lag_reason(self, self.detection)

    @property
    def verdict(self) -> str:
        """stable, recovered dips, partial failure, diverged or undetermined."""
        verdict = self.detection.verdict
        return verdict.verdict if verdict is not None else UNDETERMINED

    @property
    def verdict_reasons(self) -> list[str]:
        verdict = self.detection.verdict
        return list(verdict.reasons) if verdict is not None else []

    @property
    def first_layer(self) -> str | None:
        """Series key of the first-layer signal, as :func:`stabilitylab.detect.detect_run` picks it.

        ``grad_norm[patch_embed]``, or ``token_grad_norm`` when the patch projection is frozen.
        None when that signal has no finite, positive value, such as ``token_grad_norm`` of a
        model without a first block.
        """
        return select_first_layer(self)[0] if has_first_layer_signal(self) else None

    @property
    def last_layer(self) -> str | None:
        """Series key of the last block's gradient norm, None without ``blocks.NN`` groups."""
        return select_last_block(self)[0]

    @property
    def final_top1(self) -> float:
        """kNN top-1 of the last evaluation in percent, NaN without evaluations."""
        return final_top1(self)

    @property
    def best_top1(self) -> float:
        """Highest kNN top-1 in percent, NaN without evaluations."""
        return best_top1(self)

    def layer_frame(self, signal: str = "grad_norm") -> pd.DataFrame:
        """Return one column of the layers table wide: index ``step``, one column per layer.

        ``signal`` is ``grad_norm``, ``weight_norm`` or ``update_ratio``. Columns follow the
        order data flows (``derived.layers``); a step recorded twice keeps its later row.
        Raises ConfigError for another ``signal``.
        """
        if signal not in LAYER_SIGNALS:
            raise ConfigError(
                f"layer signal {signal!r} is not a column of the layers table; pass one of "
                f"{', '.join(LAYER_SIGNALS)}"
            )
        rows = self.layers.drop_duplicates(["step", "layer"], keep="last")
        wide = rows.pivot(index="step", columns="layer", values=signal)
        listed = self.layer_names
        extra = [name for name in wide.columns if name not in listed]
        wide = wide.reindex(columns=[*listed, *extra]).astype("float64")
        wide.columns.name = "layer"
        wide.index = wide.index.astype("int64")
        wide.index.name = "step"
        return wide

    def attention_frame(self, signal: str = "entropy") -> pd.DataFrame:
        """Return the attention probes wide: index ``step``, one column per block.

        ``signal`` ``entropy`` gives each block's lowest normalised entropy over its heads,
        and ``max_logit`` its highest maximum logit: the series the detector scores. The
        frame is empty for a run without probes. Raises ConfigError for another ``signal``.
        """
        if signal not in ATTENTION_SIGNALS:
            raise ConfigError(
                f"attention signal {signal!r} is not a column of the attention table; pass one "
                f"of {', '.join(ATTENTION_SIGNALS)}"
            )
        wide = pd.DataFrame(attention_layer_series(self.attention, signal), dtype="float64")
        wide = wide.sort_index()
        wide.index = wide.index.astype("int64")
        wide.index.name = "step"
        wide.columns.name = "layer"
        return wide

    def first_last_frame(self) -> pd.DataFrame:
        """Return the first-layer and last-block gradient norms, long, for one figure.

        Columns: ``step``, ``position`` (``first layer`` or ``last block``), ``series`` (the
        series key), ``grad_norm`` and ``relative`` (``grad_norm`` divided by the series'
        median). Only finite, positive values are kept, as the spike detector reads them.
        """
        first_key, first = select_first_layer(self)
        last_key, last = select_last_block(self)
        frames = [_position_frame(FIRST_LAYER, first_key, first)]
        if last_key is not None:
            frames.append(_position_frame(LAST_BLOCK, last_key, last))
        return pd.concat(frames, ignore_index=True)


def _position_frame(position: str, key: str, series: pd.Series) -> pd.DataFrame:
    values = clean_series(series)
    median = float(values.median()) if not values.empty else np.nan
    return pd.DataFrame(
        {
            "step": values.index.to_numpy(dtype="int64"),
            "position": position,
            "series": key,
            "grad_norm": values.to_numpy(dtype="float64"),
            "relative": values.to_numpy(dtype="float64") / median,
        }
    )


def load_run(path: str | os.PathLike[str], detectors: Detectors = None) -> RunData:
    """Read one run directory written by ``stabilitylab run``, finished or not.

    ``detectors`` sets the detector parameters: None for the defaults, a DetectorParams, or
    the path of a file from ``stabilitylab calibrate``. Raises RunDirError for a missing
    path, a file, a sweep folder or a folder without ``config.json``, ConfigError for a bad
    detector file, and TypeError for a ``path`` that is not a str or path.
    """
    if not isinstance(path, str | os.PathLike):
        several = ""
        if isinstance(path, list | tuple):
            several = " (stabilitylab.load_runs reads several)"
        raise TypeError(
            f"load_run got a {type(path).__name__} ({path!r}); pass the folder of one run as "
            f"a str or pathlib.Path{several}"
        )
    run_dir = Path(path).expanduser()
    if is_sweep_dir(run_dir):
        raise RunDirError(
            f"{run_dir} is a sweep folder, not a run directory; pass one of its run folders, "
            f"or read them all with stabilitylab.load_runs({str(run_dir)!r})"
        )
    params = resolve_detectors(detectors)
    return RunData.from_run(read_run(run_dir), params)


def run_values(run: RunData) -> dict[str, Any]:
    """Return the run-level values that lead the frames of ``RunSet.table``."""
    return {
        "arm": run.arm,
        "seed": run.seed,
        "run_lr": run.config.get("lr"),
        "run_batch_size": run.config.get("batch_size"),
    }
