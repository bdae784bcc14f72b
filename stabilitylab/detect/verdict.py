"""One verdict per run from its dips, sanity flags, loss and status, with the evidence.

Categories, checked in this order, the first that applies wins:

- ``diverged``: the loss is non-finite (NaN or infinite) at a recorded step that was not
  skipped, ``status.json`` records a ``diverged`` step (a non-finite loss or gradient
  norm), or it is ``failed`` with a reason naming a non-finite value. Training stops
  there, so the run has no usable end. Steps listed in ``skipped_steps`` (an fp16 overflow,
  or ``--on-nonfinite skip``) left the weights unchanged and count for nothing here.
- ``undetermined``: no evaluation with a finite kNN top-1, so there is nothing to judge.
- ``partial failure``: the run ended damaged. At least one of: a dip that never recovered,
  a final kNN top-1 more than the dip margin below the best (the margin that
  :func:`~stabilitylab.detect.dips.score_drawdowns` gives the final evaluation), or a collapse or
  chance-loss flag (:mod:`stabilitylab.detect.sanity`) at the final evaluation.
- ``recovered dips``: every dip recovered and the final kNN top-1 is within the margin of
  the best. The run still had trouble on the way: at least one dip, or a collapse or
  chance-loss flag at an earlier evaluation that had cleared by the final one.
- ``stable``: no dips and no collapse or chance-loss flag at any evaluation.

Low effective rank is listed in the evidence but does not change the category, because a
dataset with few classes can have a low rank in a healthy run. A run that is still running
or was interrupted is judged on what it recorded, and the evidence records its state.

:func:`hidden_costs` compares each run with a stable twin (the same configuration and seed,
the other arm): the twin's best and final kNN top-1 minus this run's, in points.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect.dips import Dip, DipParams, score_drawdowns
from stabilitylab.detect.sanity import SanityReport
from stabilitylab.detect.training_events import recorded_divergence, skipped_steps
from stabilitylab.runs import Run

DIVERGED = "diverged"
UNDETERMINED = "undetermined"
PARTIAL_FAILURE = "partial failure"
RECOVERED_DIPS = "recovered dips"
STABLE = "stable"
VERDICTS = (DIVERGED, UNDETERMINED, PARTIAL_FAILURE, RECOVERED_DIPS, STABLE)

# Run states that mean the tables stop before the planned end.
INCOMPLETE_STATES = ("running", "interrupted", "failed", "unknown")


@dataclass(frozen=True)
class VerdictEvidence:
    """The facts a verdict rests on. Accuracies are kNN top-1 in percent, differences in points.

    ``lost_accuracy`` is ``best_top1 - final_top1``, and ``margin`` is the dip margin of the
    final evaluation against the best before it. The ``*_steps`` lists are evaluation steps
    with that sanity flag.
    """

    state: str
    status_reason: str | None
    nonfinite_loss_step: int | None
    nonfinite_grad_step: int | None
    evaluations: int
    best_top1: float
    final_top1: float
    lost_accuracy: float
    margin: float
    dips: int
    unrecovered_dips: int
    deepest_dip: float
    collapsed_steps: list[int] = field(default_factory=list)
    at_chance_steps: list[int] = field(default_factory=list)
    low_rank_steps: list[int] = field(default_factory=list)
    final_collapsed: bool = False
    final_at_chance: bool = False

    @property
    def incomplete(self) -> bool:
        return self.state in INCOMPLETE_STATES

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "status_reason": self.status_reason,
            "nonfinite_loss_step": self.nonfinite_loss_step,
            "nonfinite_grad_step": self.nonfinite_grad_step,
            "evaluations": self.evaluations,
            "best_top1": _finite_or_none(self.best_top1),
            "final_top1": _finite_or_none(self.final_top1),
            "lost_accuracy": _finite_or_none(self.lost_accuracy),
            "margin": _finite_or_none(self.margin),
            "dips": self.dips,
            "unrecovered_dips": self.unrecovered_dips,
            "deepest_dip": _finite_or_none(self.deepest_dip),
            "collapsed_steps": self.collapsed_steps,
            "at_chance_steps": self.at_chance_steps,
            "low_rank_steps": self.low_rank_steps,
            "final_collapsed": self.final_collapsed,
            "final_at_chance": self.final_at_chance,
        }


@dataclass(frozen=True)
class RunVerdict:
    """A run's category (one of :data:`VERDICTS`), the reasons for it and the evidence."""

    verdict: str
    reasons: list[str]
    evidence: VerdictEvidence

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "evidence": self.evidence.to_dict(),
        }


@dataclass(frozen=True)
class HiddenCost:
    """Accuracy a run lost against its stable twin, in kNN top-1 points.

    A positive cost means the twin did better.
    """

    twin_index: int
    best_cost: float
    final_cost: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "twin_index": self.twin_index,
            "best_cost": _finite_or_none(self.best_cost),
            "final_cost": _finite_or_none(self.final_cost),
        }


def judge_run(
    run: Run, dips: Sequence[Dip], sanity: SanityReport, dip_params: DipParams | None = None
) -> RunVerdict:
    """Return the verdict of ``run`` from its dips and sanity flags; see the module docs."""
    evidence = collect_evidence(run, dips, sanity, dip_params)
    verdict, reasons = classify(evidence)
    return RunVerdict(verdict=verdict, reasons=reasons, evidence=evidence)


def collect_evidence(
    run: Run, dips: Sequence[Dip], sanity: SanityReport, dip_params: DipParams | None = None
) -> VerdictEvidence:
    """Gather the status, loss, accuracy, dip and sanity facts of one run."""
    drawdowns = score_drawdowns(run.evals, dip_params)
    best, final, margin = _accuracy_summary(drawdowns)
    final_check = sanity.final
    reason = run.status.get("reason")
    # A loss that was non-finite on a step the gradient scaler skipped is only in status.json.
    divergence = recorded_divergence(run)
    recorded = {divergence.signal: divergence.step} if divergence is not None else {}
    loss_step = run_nonfinite_loss_step(run)
    return VerdictEvidence(
        state=str(run.status.get("state", "unknown")),
        status_reason=str(reason) if reason else None,
        nonfinite_loss_step=loss_step if loss_step is not None else recorded.get("loss"),
        nonfinite_grad_step=recorded.get("grad_norm"),
        evaluations=len(drawdowns),
        best_top1=best,
        final_top1=final,
        lost_accuracy=best - final,
        margin=margin,
        dips=len(dips),
        unrecovered_dips=sum(1 for dip in dips if not dip.recovered),
        deepest_dip=max((dip.depth for dip in dips), default=0.0),
        collapsed_steps=sanity.steps_where("collapsed"),
        at_chance_steps=sanity.steps_where("at_chance"),
        low_rank_steps=sanity.steps_where("low_rank"),
        final_collapsed=final_check is not None and final_check.collapsed,
        final_at_chance=final_check is not None and final_check.at_chance,
    )


def classify(evidence: VerdictEvidence) -> tuple[str, list[str]]:
    """Return the category of ``evidence`` and the reasons for it, as short phrases."""
    divergence = _divergence_reasons(evidence)
    if divergence:
        return DIVERGED, divergence
    if evidence.evaluations == 0:
        return UNDETERMINED, ["no evaluation with a finite kNN top-1"]
    failures = _failure_reasons(evidence)
    if failures:
        return PARTIAL_FAILURE, failures
    trouble = _trouble_reasons(evidence)
    if trouble:
        return RECOVERED_DIPS, trouble
    return STABLE, ["no dips and no collapse or chance-loss flag"]


def run_nonfinite_loss_step(run: Run) -> int | None:
    """Return the first step of ``run`` whose loss is NaN or infinite and not skipped, or None.

    An imported run (``stabilitylab import``) has NaN in its steps table where the source
    logged no loss, so its first non-finite logged loss is read from
    ``derived.import.nonfinite_loss_step`` in ``config.json`` instead.
    """
    imported = run.derived.get("import")
    if isinstance(imported, dict):
        step = imported.get("nonfinite_loss_step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None
    return nonfinite_loss_step(run.steps, skipped_steps(run))


def nonfinite_loss_step(steps: pd.DataFrame, skipped: Sequence[int] = ()) -> int | None:
    """Return the first step whose loss is NaN or infinite, leaving out ``skipped``, or None."""
    if steps.empty:
        return None
    loss = pd.to_numeric(steps["loss"], errors="coerce").to_numpy(dtype="float64")
    step = pd.to_numeric(steps["step"], errors="coerce").to_numpy()
    bad = np.flatnonzero(~np.isfinite(loss) & ~np.isin(step, list(skipped)))
    if len(bad) == 0:
        return None
    return int(step[bad].min())


def hidden_costs(
    runs: Sequence[Run],
    verdicts: Sequence[RunVerdict],
    twin_key: Callable[[Run], Hashable | None],
) -> list[HiddenCost | None]:
    """Return each run's cost against its stable twin, or None where it has no single one.

    Runs are twins when ``twin_key`` gives them the same key (the configuration without the
    arm, seed included) and their arms differ. A key of None means the run has no twin. The
    twin must have the verdict ``stable``. Several runs of the other arm with one key are
    ambiguous, so the run gets None, as it does when its twin is not stable.
    """
    by_key: dict[Hashable, list[int]] = defaultdict(list)
    for index, run in enumerate(runs):
        key = twin_key(run)
        if key is not None:
            by_key[key].append(index)
    costs: list[HiddenCost | None] = []
    for index, run in enumerate(runs):
        key = twin_key(run)
        others = [i for i in by_key.get(key, []) if runs[i].arm != run.arm]
        if len(others) != 1 or verdicts[others[0]].verdict != STABLE:
            costs.append(None)
            continue
        twin = verdicts[others[0]].evidence
        mine = verdicts[index].evidence
        costs.append(
            HiddenCost(
                twin_index=others[0],
                best_cost=twin.best_top1 - mine.best_top1,
                final_cost=twin.final_top1 - mine.final_top1,
            )
        )
    return costs


def _divergence_reasons(evidence: VerdictEvidence) -> list[str]:
    reasons = []
    if evidence.nonfinite_loss_step is not None:
        reasons.append(f"non-finite loss at step {evidence.nonfinite_loss_step}")
    if evidence.nonfinite_grad_step is not None:
        reasons.append(f"non-finite gradient norm at step {evidence.nonfinite_grad_step}")
    reason = evidence.status_reason or ""
    if evidence.state == "failed" and "non-finite" in reason.lower():
        reasons.append(f"run failed: {reason}")
    return reasons


def _failure_reasons(evidence: VerdictEvidence) -> list[str]:
    reasons = []
    if evidence.unrecovered_dips:
        reasons.append(f"{evidence.unrecovered_dips} dip(s) never recovered")
    if evidence.lost_accuracy > evidence.margin:
        reasons.append(
            f"final kNN top-1 {evidence.lost_accuracy:.2f} pts below the best, more than the "
            f"{evidence.margin:.2f}-pt margin"
        )
    if evidence.final_collapsed:
        reasons.append("features collapsed at the final evaluation")
    if evidence.final_at_chance:
        reasons.append("loss at chance level at the final evaluation")
    return reasons


def _trouble_reasons(evidence: VerdictEvidence) -> list[str]:
    reasons = []
    if evidence.dips:
        reasons.append(f"{evidence.dips} dip(s), all recovered")
    if evidence.collapsed_steps:
        reasons.append(f"collapse flagged at {len(evidence.collapsed_steps)} evaluation(s)")
    if evidence.at_chance_steps:
        reasons.append(f"loss at chance at {len(evidence.at_chance_steps)} evaluation(s)")
    return reasons


def _accuracy_summary(drawdowns: pd.DataFrame) -> tuple[float, float, float]:
    """Return the best and final top-1 and the dip margin of the final evaluation.

    ``drawdowns`` is the output of :func:`~stabilitylab.detect.dips.score_drawdowns`, so the
    margin is the one the dip detector applies to the final evaluation against the best
    before it, and a final top-1 more than the margin below the best is also the end of an
    unrecovered dip.
    """
    if drawdowns.empty:
        return math.nan, math.nan, math.nan
    final = drawdowns.iloc[-1]
    return float(final["running_max"]), float(final["accuracy"]), float(final["margin"])


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
