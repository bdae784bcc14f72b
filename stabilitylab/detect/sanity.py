"""Sanity flags at each kNN evaluation: feature collapse, low effective rank, chance loss.

- Collapse: ``feature_std`` (the per-channel std of the L2-normalised features, channel
  mean) below ``collapse_fraction / sqrt(d)``. Features spread uniformly over the sphere of
  dimension d have a std of about 1/sqrt(d), and features collapsed to one point have 0.
  Real features are not uniform: a randomly initialised ``vit_micro`` (d = 64) on the
  bundled digits measured 0.12 to 0.17 times 1/sqrt(d) over its first 63 steps, with 68 to
  74 % kNN top-1. The default fraction of 0.02 therefore flags a spread about 6 times
  below that healthy level, which only a collapse reaches.
- Low effective rank: ``effective_rank`` below ``low_rank_fraction * d``, a dimensional
  collapse in which the features still spread but along very few directions.
- Chance loss: features that carry no information about the positive give the method's
  chance level (:func:`chance_loss`), such as ``4 tau ln(B)`` for MoCo v3. An evaluation
  is flagged when the mean loss of the ``chance_window`` steps before it is within
  ``chance_tolerance`` of that value and all of those steps come after the warmup, because
  the loss starts near chance.

d is the model's embedding width, the dimension of the features the kNN monitor uses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.config import MODELS
from stabilitylab.errors import ConfigError
from stabilitylab.runs import Run


@dataclass(frozen=True)
class SanityParams:
    """Thresholds of the sanity flags; see the module documentation for their reasons."""

    collapse_fraction: float = 0.02
    # NOTE: set by reasoning, not calibrated. With 10 classes, a healthy vit_micro measured
    # an effective rank of 5 to 7 out of 64, about 0.08 d.
    low_rank_fraction: float = 0.03
    chance_tolerance: float = 0.02
    chance_window: int = 50

    def __post_init__(self) -> None:
        for name in ("collapse_fraction", "low_rank_fraction", "chance_tolerance"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"invalid sanity {name} {value}: expected a fraction in [0, 1)")
        if self.chance_window < 1:
            raise ConfigError(
                f"invalid sanity chance_window {self.chance_window}: expected >= 1 step"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalSanity:
    """The sanity flags of one evaluation; a flag is False when its input is missing."""

    step: int
    feature_std: float | None
    effective_rank: float | None
    trailing_loss: float | None
    collapsed: bool
    low_rank: bool
    at_chance: bool

    @property
    def flagged(self) -> bool:
        return self.collapsed or self.at_chance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SanityReport:
    """The sanity flags of every evaluation of one run and the thresholds behind them.

    ``feature_dim`` is None when the model is unknown, and then no collapse or rank flag is
    set. ``chance_loss`` is None when the method has no known chance level, the batch size
    or temperature is missing, and then no chance flag is set.
    """

    feature_dim: int | None
    std_threshold: float | None
    rank_threshold: float | None
    chance_loss: float | None
    warmup_steps: int
    evaluations: list[EvalSanity] = field(default_factory=list)

    def steps_where(self, flag: str) -> list[int]:
        """Return the evaluation steps where ``flag`` (an :class:`EvalSanity` field) is set."""
        return [check.step for check in self.evaluations if getattr(check, flag)]

    @property
    def final(self) -> EvalSanity | None:
        return self.evaluations[-1] if self.evaluations else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_dim": self.feature_dim,
            "std_threshold": self.std_threshold,
            "rank_threshold": self.rank_threshold,
            "chance_loss": self.chance_loss,
            "warmup_steps": self.warmup_steps,
            "collapsed_steps": self.steps_where("collapsed"),
            "low_rank_steps": self.steps_where("low_rank"),
            "at_chance_steps": self.steps_where("at_chance"),
            "evaluations": [check.to_dict() for check in self.evaluations],
        }


def feature_dim(run: Run) -> int | None:
    """Return the embedding width of the run's model, or None for an unknown model."""
    spec = MODELS.get(str(run.config.get("model")))
    return spec.embed_dim if spec is not None else None


def chance_loss(run: Run) -> float | None:
    """Return the loss of uninformative features for the run's method, or None.

    - MoCo v3: the InfoNCE over the global batch B, scaled by 2 tau and summed over both
      views, gives ``4 tau ln(B)``.
    - SimCLR: NT-Xent over the 2B views, each against 2B - 1 candidates, gives
      ``ln(2B - 1)``.
    - SwAV and DINO: a uniform prediction over K prototypes (DINO's K outputs) gives
      ``ln(K)`` against any assignment, and a collapse to uniform outputs sits there.
    - BYOL regresses features and has no chance level: its collapse drives the loss to 0.

    B is the global batch size from the derived values, or the configured batch size. A run
    that does not name its method (one recorded by the monitor or imported) has no known
    chance level.
    """
    method = run.config.get("method")
    batch = run.derived.get("global_batch_size", run.config.get("batch_size"))
    if method in ("swav", "dino"):
        prototypes = run.config.get("num_prototypes")
        if not _is_number(prototypes) or prototypes < 2:
            return None
        return math.log(float(prototypes))
    if not _is_number(batch) or batch < 2:
        return None
    if method == "simclr":
        return math.log(2.0 * float(batch) - 1.0)
    if method != "mocov3":
        return None
    temperature = run.config.get("temperature")
    if not _is_number(temperature) or temperature <= 0:
        return None
    return 4.0 * float(temperature) * math.log(float(batch))


def warmup_steps(run: Run) -> int:
    """Return the lr warmup in steps from the derived values, or from the configured epochs.

    Returns 0 when neither is known.
    """
    steps = run.derived.get("warmup_steps")
    if _is_number(steps):
        return int(steps)
    epochs = run.config.get("warmup_epochs")
    per_epoch = run.derived.get("steps_per_epoch")
    if _is_number(epochs) and _is_number(per_epoch):
        return int(round(float(epochs) * float(per_epoch)))
    return 0


def check_sanity(run: Run, params: SanityParams | None = None) -> SanityReport:
    """Compute the sanity flags of every evaluation of ``run``, in step order."""
    params = params or SanityParams()
    dim = feature_dim(run)
    std_threshold = params.collapse_fraction / math.sqrt(dim) if dim else None
    rank_threshold = params.low_rank_fraction * dim if dim else None
    chance = chance_loss(run)
    warmup = warmup_steps(run)
    trailing = _trailing_mean_loss(run.steps, params.chance_window)
    evaluations = []
    for row in _evaluation_rows(run.evals).itertuples(index=False):
        step = int(row.step)
        std = _finite(row.feature_std)
        rank = _finite(row.effective_rank)
        loss = _trailing_loss_before(trailing, step, warmup, params.chance_window)
        evaluations.append(
            EvalSanity(
                step=step,
                feature_std=std,
                effective_rank=rank,
                trailing_loss=loss,
                collapsed=_below(std, std_threshold),
                low_rank=_below(rank, rank_threshold),
                at_chance=_near(loss, chance, params.chance_tolerance),
            )
        )
    return SanityReport(
        feature_dim=dim,
        std_threshold=std_threshold,
        rank_threshold=rank_threshold,
        chance_loss=chance,
        warmup_steps=warmup,
        evaluations=evaluations,
    )


def _evaluation_rows(evals: pd.DataFrame) -> pd.DataFrame:
    """Return step, feature_std and effective_rank per evaluation, by step.

    A step recorded twice keeps its later row.
    """
    frame = pd.DataFrame(
        {
            name: pd.to_numeric(evals[name], errors="coerce")
            for name in ("step", "feature_std", "effective_rank")
        }
    )
    frame = frame[frame["step"].notna()]
    frame = frame.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return frame.reset_index(drop=True)


def _trailing_mean_loss(steps: pd.DataFrame, window: int) -> pd.Series:
    """Return the mean loss of the ``window`` steps ending at each step, NaN where any is missing.

    A missing step or a non-finite loss inside the window makes the mean NaN, so it never
    averages over a gap.
    """
    if steps.empty:
        return pd.Series(dtype="float64")
    loss = pd.Series(
        pd.to_numeric(steps["loss"], errors="coerce").to_numpy(dtype="float64"),
        index=pd.to_numeric(steps["step"], errors="coerce").to_numpy(),
    )
    loss = loss[~loss.index.duplicated(keep="last")].sort_index()
    loss = loss.reindex(np.arange(int(loss.index.min()), int(loss.index.max()) + 1))
    loss = loss.where(np.isfinite(loss.to_numpy()))
    return loss.rolling(window, min_periods=window).mean()


def _trailing_loss_before(trailing: pd.Series, step: int, warmup: int, window: int) -> float | None:
    """Return the mean loss of steps ``step - window`` to ``step - 1`` if all follow the warmup."""
    if step - window < warmup or (step - 1) not in trailing.index:
        return None
    return _finite(trailing.loc[step - 1])


def _below(value: float | None, threshold: float | None) -> bool:
    return value is not None and threshold is not None and value < threshold


def _near(value: float | None, target: float | None, tolerance: float) -> bool:
    return value is not None and target is not None and abs(value - target) <= tolerance * target


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
