"""stabilitylab: find the quiet failures of self-supervised Vision Transformer training.

The public Python API reads run directories into pandas DataFrames for analysis in Jupyter:

    >>> import stabilitylab as sl
    >>> run = sl.load_run("runs/frozen-seed0")
    >>> run.layer_frame("grad_norm")        # wide: one row per step, one column per layer
    >>> runs = sl.load_runs("sweeps/lr")    # a sweep folder, a glob or a list of paths
    >>> sl.compare_runs(runs)               # one row per run

``Monitor`` records the same gradient signals from a training loop of your own.

Names are imported lazily on first use, so ``import stabilitylab`` stays cheap and does not
import torch. See docs/api.md for the columns of each frame.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it; imported on first attribute access
_LAZY: dict[str, str] = {
    "RunData": "stabilitylab.analysis",
    "RunSet": "stabilitylab.analysis",
    "load_run": "stabilitylab.analysis",
    "load_runs": "stabilitylab.analysis",
    "compare_runs": "stabilitylab.analysis",
    "paired_differences": "stabilitylab.analysis",
    "paired_summary": "stabilitylab.analysis",
    "sweep_table": "stabilitylab.analysis",
    "lr_sensitivity": "stabilitylab.analysis",
    "Monitor": "stabilitylab.monitor.attach",
    "KnnEvaluation": "stabilitylab.monitor.attach",
    "StabilityLabError": "stabilitylab.errors",
    "ConfigError": "stabilitylab.errors",
    "DataError": "stabilitylab.errors",
    "RunDirError": "stabilitylab.errors",
    "TrainingError": "stabilitylab.errors",
}

# Written out, not derived from _LAZY, so that linters and IDEs see the names.
__all__ = [
    "__version__",
    "RunData",
    "RunSet",
    "load_run",
    "load_runs",
    "compare_runs",
    "paired_differences",
    "paired_summary",
    "sweep_table",
    "lr_sensitivity",
    "Monitor",
    "KnnEvaluation",
    "StabilityLabError",
    "ConfigError",
    "DataError",
    "RunDirError",
    "TrainingError",
]

if TYPE_CHECKING:
    from stabilitylab.analysis import (
        RunData,
        RunSet,
        compare_runs,
        load_run,
        load_runs,
        lr_sensitivity,
        paired_differences,
        paired_summary,
        sweep_table,
    )
    from stabilitylab.errors import (
        ConfigError,
        DataError,
        RunDirError,
        StabilityLabError,
        TrainingError,
    )
    from stabilitylab.monitor.attach import KnnEvaluation, Monitor


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access and cache it on the package."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'stabilitylab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the public names with the module's own attributes, for tab completion."""
    return sorted(set(globals()) | set(__all__))
