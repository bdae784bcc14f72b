"""Per-run numbers and the report's tables, with every cell formatted as text.

Accuracies are kNN top-1 in percent, and differences of accuracies are in points.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.config import METHODS, with_field_defaults
from stabilitylab.detect import (
    GRAD_NORM,
    LOSS,
    DetectorParams,
    RunEvents,
    SpikeEvent,
    clean_series,
    select_first_layer,
)
from stabilitylab.report.content import Table
from stabilitylab.runs import Run

MISSING = "n/a"
# Maximum length of a failure reason in the summary table. status.json keeps the full text.
MAX_REASON_CHARS = 120

STATUS_TEXT = {
    "finished": "finished",
    "running": "incomplete (running or killed)",
    "failed": "failed",
    "interrupted": "interrupted (Ctrl-C or SIGTERM)",
    "unknown": "unknown (status.json missing or damaged)",
}

SUMMARY_COLUMNS = (
    "run",
    "arm",
    "status",
    "steps recorded",
    "final kNN top-1",
    "best kNN top-1",
    "dips",
    "deepest dip",
    "grad-norm spikes",
    "first-layer spikes",
    "loss spikes",
    "frozen-weight check",
)

CONFIG_KEYS = (
    ("method", "method"),
    ("model", "model"),
    ("dataset", "dataset"),
    ("epochs", "epochs"),
    ("batch_size", "batch size"),
    ("lr", "base lr (per 256)"),
    ("seed", "seed"),
)


def format_number(value: float | None, digits: int = 2) -> str:
    """Return ``value`` with ``digits`` decimals, or ``n/a`` for None and non-finite values."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:.{digits}f}"


def format_scalar(value: float | None) -> str:
    """Return ``value`` with 3 significant digits, for quantities of any magnitude."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:.3g}"


def format_config_value(value: Any) -> str:
    """Return a configuration value as text for display, without evaluating it."""
    if value is None:
        return MISSING
    return str(value)


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Return one distinct legend label per run.

    This is ``run.label`` unless two runs share a folder name, in which case the parent
    folder is prefixed, and a counter is appended if the labels still collide. When the
    runs are of several methods, each label also names its run's method, unless the folder
    name does.
    """
    with_method = differ_by_method(runs)
    names = Counter(run.name for run in runs)
    own = [_run_label(run, with_method) for run in runs]
    labels = [
        label if names[run.name] == 1 else f"{run.path.parent.name}/{label}"
        for run, label in zip(runs, own, strict=True)
    ]
    seen: Counter[str] = Counter()
    distinct = []
    totals = Counter(labels)
    for label in labels:
        seen[label] += 1
        distinct.append(label if totals[label] == 1 else f"{label} #{seen[label]}")
    return distinct


def _run_label(run: Run, with_method: bool) -> str:
    """Return ``run.label``, or with ``with_method`` the folder name tagged with method and arm."""
    if not with_method:
        return run.label
    name = run.name.lower()
    method = run_method(run)
    tags = []
    if method is None or method.lower() not in name:
        tags.append(method_text(method))
    # As Run.label does: the arm is left out when the name says it, and only it.
    other = "learned" if run.frozen else "frozen"
    if not (run.arm in name and other not in name):
        tags.append(run.arm)
    return f"{run.name} ({', '.join(tags)})" if tags else run.name


def run_method(run: Run) -> str | None:
    """Return the run's self-supervised method, or None for an import that records none.

    A run of ``stabilitylab run`` recorded before the method option existed trained MoCo
    v3, the default that :func:`stabilitylab.config.with_field_defaults` fills in.
    """
    method = _filled_config(run).get("method")
    return None if method is None else str(method)


def method_text(method: str | None) -> str:
    return "unknown method" if method is None else method


def differ_by_method(runs: Sequence[Run]) -> bool:
    """Tell whether ``runs`` are of more than one method (an unrecorded method counts as one)."""
    return len({run_method(run) for run in runs}) > 1


def method_order(method: str | None) -> tuple[int, str]:
    """Sort key of methods: the order of ``stabilitylab run --method``, unknown ones last."""
    if method in METHODS:
        return (METHODS.index(method), "")
    return (len(METHODS), method_text(method))


def knn_curve(run: Run) -> pd.DataFrame:
    """Return the evaluations with a finite kNN top-1, sorted by step."""
    evals = run.evals
    accuracy = pd.to_numeric(evals["knn_top1"], errors="coerce")
    curve = evals[np.isfinite(accuracy.to_numpy(dtype="float64"))]
    return curve.sort_values("step", kind="stable")


def final_top1(run: Run) -> float:
    """Return the kNN top-1 of the last evaluation, NaN without evaluations."""
    curve = knn_curve(run)
    return float(curve["knn_top1"].iloc[-1]) if not curve.empty else math.nan


def best_top1(run: Run) -> float:
    """Return the highest kNN top-1 of the run, NaN without evaluations."""
    curve = knn_curve(run)
    return float(curve["knn_top1"].max()) if not curve.empty else math.nan


def status_text(run: Run) -> str:
    """Return the run state in words, with the reason of a failure when the status has one.

    A killed run still reads ``running`` on disk.
    """
    state = str(run.status.get("state", "unknown"))
    text = STATUS_TEXT.get(state, state)
    reason = run.status.get("reason")
    if state == "failed" and reason:
        reason = str(reason)
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        text = f"{text}: {reason}"
    return text


def steps_recorded_text(run: Run) -> str:
    """Return the number of recorded steps, with the planned total when the config has it."""
    recorded = int(run.steps["step"].nunique())
    total = run.derived.get("total_steps")
    if isinstance(total, int) and not isinstance(total, bool):
        return f"{recorded} of {total}"
    return str(recorded)


def frozen_check_text(run: Run) -> str:
    """Return the outcome of the end-of-run comparison of frozen weights with their init."""
    if not run.frozen:
        return "not applicable"
    check = run.frozen_check
    if check is None:
        return "missing"
    passed = check.get("passed")
    if passed is True:
        return "passed"
    if passed is False:
        difference = check.get("max_abs_diff")
        if isinstance(difference, int | float) and not isinstance(difference, bool):
            return f"FAILED (max abs diff {difference:.3g})"
        return "FAILED"
    return "missing"


def deepest_dip_text(events: RunEvents) -> str:
    if not events.dips:
        return "none"
    deepest = max(events.dips, key=lambda dip: dip.depth)
    text = f"{deepest.depth:.2f} pts at step {deepest.bottom_step}"
    return text if deepest.recovered else f"{text}, not recovered"


def has_first_layer_signal(run: Run) -> bool:
    """Tell whether the run's first-layer signal has a finite, positive value.

    A model without a patch projection or an identifiable first block (an MLP) records
    ``token_grad_norm`` as NaN, so it has no first-layer signal at all.
    """
    return not clean_series(select_first_layer(run)[1]).empty


def first_layer_spikes_text(run: Run, run_events: RunEvents) -> str:
    """Return the first-layer spike count with its series, or n/a without a signal."""
    if not has_first_layer_signal(run):
        return f"{MISSING} (no first-layer signal)"
    return f"{len(run_events.spikes_on(run_events.first_layer))} ({run_events.first_layer})"


def summary_table(runs: Sequence[Run], events: Sequence[RunEvents], labels: Sequence[str]) -> Table:
    """Build the one-row-per-run summary table."""
    rows = []
    for run, run_events, label in zip(runs, events, labels, strict=True):
        rows.append(
            (
                label,
                run.arm,
                status_text(run),
                steps_recorded_text(run),
                format_number(final_top1(run)),
                format_number(best_top1(run)),
                str(len(run_events.dips)),
                deepest_dip_text(run_events),
                str(len(run_events.spikes_on(GRAD_NORM))),
                first_layer_spikes_text(run, run_events),
                str(len(run_events.spikes_on(LOSS))),
                frozen_check_text(run),
            )
        )
    return Table(columns=SUMMARY_COLUMNS, rows=tuple(rows), caption="Runs at a glance")


def configuration_table(runs: Sequence[Run], labels: Sequence[str]) -> Table:
    """Build the table of each run's main configuration values and its folder."""
    columns = ("run", *(title for _, title in CONFIG_KEYS), "actual lr", "patch projection")
    rows = []
    for run, label in zip(runs, labels, strict=True):
        values = [format_config_value(run.config.get(key)) for key, _ in CONFIG_KEYS]
        actual_lr = format_config_value(run.derived.get("lr"))
        projection = "frozen at init" if run.frozen else "learned"
        if "freeze_patch_embed" not in run.config:
            projection = MISSING  # a monitored model without a patch_embed group
        rows.append((label, *values, actual_lr, projection))
    return Table(columns=columns, rows=tuple(rows), caption="Configuration")


def run_folders_table(runs: Sequence[Run], labels: Sequence[str]) -> Table:
    rows = tuple((label, str(run.path)) for run, label in zip(runs, labels, strict=True))
    return Table(columns=("run", "folder"), rows=rows, caption="Run folders")


# Settings that do not change what a run computes, so two arms may differ in them and still
# be paired.
PAIRING_IGNORED = (
    "freeze_patch_embed",
    "preset",
    "flush_every",
    "checkpoint_every",
    "workers",
    "tensorboard",
)


def pairing_key(run: Run) -> str:
    """Return the run's configuration without the arm and bookkeeping settings, as text.

    A run of ``stabilitylab run`` (one without a ``source``) gets the defaults of the fields
    added after it was recorded, so that runs of two versions still pair. The method is
    always part of the key, so runs of two methods never pair, imported runs included.
    """
    recipe = {k: v for k, v in _filled_config(run).items() if k not in PAIRING_IGNORED}
    recipe["method"] = run_method(run)
    return json.dumps(recipe, sort_keys=True, default=str)


def _filled_config(run: Run) -> dict[str, Any]:
    return run.config if "source" in run.config else with_field_defaults(run.config)


def _differing_keys(runs: Sequence[Run]) -> list[str]:
    configs = [_filled_config(run) for run in runs]
    keys = sorted({k for config in configs for k in config} - set(PAIRING_IGNORED))
    return [
        k for k in keys if len({json.dumps(config.get(k), default=str) for config in configs}) > 1
    ]


@dataclass(frozen=True)
class ArmPair:
    """The indices of the learned and the frozen run of one seed, and the seed as text.

    ``setting`` names the values, other than the seed, in which this pair's configuration
    differs from other pairs' (``"lr 0.1"`` in an lr sweep); it is empty when all pairs
    share them.
    """

    seed: str
    learned: int
    frozen: int
    setting: str = ""

    @property
    def label(self) -> str:
        return f"{self.setting}, seed {self.seed}" if self.setting else self.seed


def group_pairs(pairs: Sequence[ArmPair]) -> list[tuple[str, list[ArmPair]]]:
    """Group pairs by their ``setting``, in the order the settings first appear."""
    groups: dict[str, list[ArmPair]] = {}
    for pair in pairs:
        groups.setdefault(pair.setting, []).append(pair)
    return list(groups.items())


def _with_settings(runs: Sequence[Run], pairs: list[ArmPair]) -> list[ArmPair]:
    """Name each pair's differing settings and order the pairs by them, then by seed.

    Pairs of several methods are grouped by method, in :func:`method_order`. Each setting
    then starts with ``method NAME`` and lists only the values that differ among the pairs
    of that method, because the method also sets its own defaults (temperature, heads ...).
    """
    if not differ_by_method([runs[pair.learned] for pair in pairs]):
        return _named_pairs(runs, pairs)
    by_method: dict[str | None, list[ArmPair]] = defaultdict(list)
    for pair in pairs:
        by_method[run_method(runs[pair.learned])].append(pair)
    named = []
    for method in sorted(by_method, key=method_order):
        named += _named_pairs(runs, by_method[method], prefix=f"method {method_text(method)}")
    return named


def _named_pairs(runs: Sequence[Run], pairs: list[ArmPair], prefix: str = "") -> list[ArmPair]:
    ignored = ("seed", "method")
    keys = [key for key in _differing_keys([runs[p.learned] for p in pairs]) if key not in ignored]
    if not keys and not prefix:
        return pairs

    def values(pair: ArmPair) -> list[Any]:
        return [_filled_config(runs[pair.learned]).get(key) for key in keys]

    def order(pair: ArmPair) -> tuple:
        # Numbers sort by value and before text, so lr 0.05 comes before lr 0.1.
        return tuple(
            (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))
            for value in values(pair)
        )

    def setting(pair: ArmPair) -> str:
        parts = [prefix] if prefix else []
        parts += [
            f"{key} {format_config_value(value)}"
            for key, value in zip(keys, values(pair), strict=True)
        ]
        return ", ".join(parts)

    named = [dataclasses.replace(pair, setting=setting(pair)) for pair in pairs]
    return sorted(named, key=order)  # stable, so seeds stay in order within a setting


def pair_arms(runs: Sequence[Run]) -> tuple[list[ArmPair], list[str]]:
    """Pair runs that differ only in the arm, and describe the seeds left unpaired.

    Two runs are paired when their configurations are equal, seed included, except for
    ``freeze_patch_embed`` and the settings in :data:`PAIRING_IGNORED`. A recipe with several
    runs of one arm, and a seed whose two arms differ in other settings, are left out,
    because pairing them would be a guess. Pairs are in seed order.
    """
    by_recipe: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, run in enumerate(runs):
        if run.config.get("seed") is not None:
            by_recipe[pairing_key(run)][run.arm].append(index)
    pairs = []
    unpaired = []
    for key in sorted(by_recipe, key=lambda k: json.loads(k).get("seed", 0)):
        arms = by_recipe[key]
        seed = format_config_value(json.loads(key).get("seed"))
        if not arms["learned"] or not arms["frozen"]:
            continue
        if len(arms["learned"]) > 1 or len(arms["frozen"]) > 1:
            unpaired.append(
                f"seed {seed} ({len(arms['learned'])} learned, {len(arms['frozen'])} frozen)"
            )
            continue
        pairs.append(ArmPair(seed=seed, learned=arms["learned"][0], frozen=arms["frozen"][0]))
    unpaired += _mismatched_seeds(runs, {pair.seed for pair in pairs})
    return _with_settings(runs, pairs), unpaired


def seed_comparison_table(runs: Sequence[Run], labels: Sequence[str]) -> Table | None:
    """Build the frozen-minus-learned table for runs that differ only in the arm.

    Runs are paired by :func:`pair_arms`. Returns None when no pair exists and nothing needs
    explaining. Seeds left unpaired are named in the note, so the table may have a note and
    no rows.
    """
    pairs, unpaired = pair_arms(runs)
    rows = []
    final_deltas = []
    best_deltas = []
    for pair in pairs:
        learned, frozen = runs[pair.learned], runs[pair.frozen]
        final_delta = final_top1(frozen) - final_top1(learned)
        best_delta = best_top1(frozen) - best_top1(learned)
        final_deltas.append(final_delta)
        best_deltas.append(best_delta)
        rows.append(
            (
                pair.label,
                labels[pair.learned],
                labels[pair.frozen],
                format_number(final_top1(learned)),
                format_number(final_top1(frozen)),
                _format_delta(final_delta),
                format_number(best_top1(learned)),
                format_number(best_top1(frozen)),
                _format_delta(best_delta),
            )
        )
    if not rows and not unpaired:
        return None
    for setting, group in group_pairs(pairs):
        members = [pairs.index(pair) for pair in group]
        rows.append(
            _mean_row(
                [final_deltas[i] for i in members],
                [best_deltas[i] for i in members],
                f"mean over seeds, {setting}" if setting else "mean over seeds",
            )
        )
    note = ""
    if unpaired:
        note = "Not paired: " + "; ".join(unpaired)
    return Table(
        columns=(
            "seed",
            "learned run",
            "frozen run",
            "final learned",
            "final frozen",
            "final frozen − learned",
            "best learned",
            "best frozen",
            "best frozen − learned",
        ),
        rows=tuple(rows),
        caption="Frozen minus learned patch projection, kNN top-1 in points",
        note=note,
    )


def _mismatched_seeds(runs: Sequence[Run], paired_seeds: set[str]) -> list[str]:
    """Describe seeds that have both arms only in runs whose other settings differ."""
    by_seed: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.config.get("seed") is not None:
            by_seed[format_config_value(run.config["seed"])].append(run)
    notes = []
    for seed, seed_runs in sorted(by_seed.items()):
        arms = {run.arm for run in seed_runs}
        if seed in paired_seeds or arms != {"learned", "frozen"}:
            continue
        differing = ", ".join(_differing_texts(seed_runs))
        notes.append(f"seed {seed}, whose learned and frozen runs also differ in {differing}")
    return notes


def _differing_texts(runs: Sequence[Run]) -> list[str]:
    """Name the settings in which ``runs`` differ, the method first with each arm's methods."""
    keys = _differing_keys(runs)
    if "method" not in keys:
        return keys
    arm_methods = []
    for arm in ("learned", "frozen"):
        methods = sorted({run_method(run) for run in runs if run.arm == arm}, key=method_order)
        if methods:
            arm_methods.append(f"{' and '.join(method_text(m) for m in methods)} {arm}")
    return [f"method ({', '.join(arm_methods)})", *(key for key in keys if key != "method")]


def _mean_row(final_deltas: list[float], best_deltas: list[float], title: str) -> tuple[str, ...]:
    def mean_text(deltas: list[float]) -> str:
        finite = [delta for delta in deltas if math.isfinite(delta)]
        if not finite:
            return MISSING
        return f"{_format_delta(float(np.mean(finite)))} (n={len(finite)})"

    return (
        title,
        "",
        "",
        "",
        "",
        mean_text(final_deltas),
        "",
        "",
        mean_text(best_deltas),
    )


def _format_delta(value: float) -> str:
    if not math.isfinite(value):
        return MISSING
    return f"{value:+.2f}"


def dips_table(events: RunEvents, dense: bool = False) -> Table:
    """Build the table of every dip of one run, of the dense kNN monitor with ``dense``."""
    dips = events.dense_dips if dense else events.dips
    rows = tuple(
        (
            str(dip.peak_step),
            format_number(dip.peak_top1),
            str(dip.start_step),
            str(dip.bottom_step),
            format_number(dip.bottom_top1),
            format_number(dip.depth),
            format_number(dip.margin),
            dip.margin_source,
            str(dip.recovery_step) if dip.recovery_step is not None else "not recovered",
            str(dip.duration_steps),
        )
        for dip in dips
    )
    columns = (
        "peak step",
        "peak top-1",
        "start step",
        "bottom step",
        "bottom top-1",
        "depth (pts)",
        "margin (pts)",
        "margin source",
        "recovery step",
        "duration (steps)",
    )
    caption = "kNN top-1 dips of the dense queue monitor" if dense else "kNN top-1 dips"
    return Table(columns=columns, rows=rows, caption=caption)


def spikes_table(events: RunEvents, max_rows: int) -> Table:
    """Build the table of one run's spikes on every series, at most ``max_rows`` rows.

    When there are more, the largest by ratio to the baseline are kept, still listed in
    step order, and the note states how many were left out.
    """
    spikes = [spike for series_spikes in events.spikes.values() for spike in series_spikes]
    listed = sorted(spikes, key=lambda spike: spike.ratio, reverse=True)[:max_rows]
    listed.sort(key=lambda spike: (spike.peak_step, spike.series))
    rows = tuple(_spike_row(spike) for spike in listed)
    left_out = len(spikes) - len(listed)
    note = ""
    if left_out:
        note = (
            f"{left_out} of {len(spikes)} spikes with smaller ratios are left out; "
            "events.json lists all of them."
        )
    columns = (
        "series",
        "start step",
        "peak step",
        "duration (steps)",
        "peak value",
        "baseline median",
        "ratio",
        "z",
    )
    return Table(columns=columns, rows=rows, caption="Spikes", note=note)


def _spike_row(spike: SpikeEvent) -> tuple[str, ...]:
    return (
        spike.series,
        str(spike.start_step),
        str(spike.peak_step),
        str(spike.duration_steps),
        format_scalar(spike.peak_value),
        format_scalar(spike.baseline),
        f"{spike.ratio:.1f}×",
        format_number(spike.z, 1) if math.isfinite(spike.z) else "inf (MAD 0)",
    )


def parameters_table(params: DetectorParams) -> Table:
    """Build the table of every detector parameter used for the report."""
    rows = tuple(
        (detector, name, str(value))
        for detector, values in params.to_dict().items()
        for name, value in values.items()
    )
    return Table(columns=("detector", "parameter", "value"), rows=rows, caption="Detectors")
