"""The public Python API for reading runs into pandas DataFrames.

- :func:`load_run` reads one run directory into a :class:`RunData`: the stored tables, the
  configuration, the detected events as one tidy frame, the verdict and wide views.
- :func:`load_runs` reads run folders, glob patterns or a sweep folder into a
  :class:`RunSet`.
- :func:`compare_runs`, :func:`paired_differences` and :func:`paired_summary` put runs side
  by side and pair the learned and the frozen arm by seed.
- :func:`sweep_table` and :func:`lr_sensitivity` turn a sweep folder into frames.

Detection, pairing and the sweep numbers are those of ``stabilitylab report``. Every name
here is also available from the package itself, as ``stabilitylab.load_run``.
"""

from stabilitylab.analysis.collection import LEAD_COLUMNS, RunSet, load_runs
from stabilitylab.analysis.compare import (
    COMPARE_COLUMNS,
    compare_runs,
    paired_differences,
    paired_summary,
)
from stabilitylab.analysis.events import EVENT_COLUMNS, EVENT_KINDS, LAG_COLUMNS
from stabilitylab.analysis.rundata import LAYER_SIGNALS, RunData, load_run
from stabilitylab.analysis.sweep_tables import (
    SENSITIVITY_COLUMNS,
    SWEEP_COLUMNS,
    lr_sensitivity,
    sweep_table,
)

__all__ = [
    "COMPARE_COLUMNS",
    "EVENT_COLUMNS",
    "EVENT_KINDS",
    "LAG_COLUMNS",
    "LAYER_SIGNALS",
    "LEAD_COLUMNS",
    "SENSITIVITY_COLUMNS",
    "SWEEP_COLUMNS",
    "RunData",
    "RunSet",
    "compare_runs",
    "load_run",
    "load_runs",
    "lr_sensitivity",
    "paired_differences",
    "paired_summary",
    "sweep_table",
]
