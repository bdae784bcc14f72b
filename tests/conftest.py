"""Shared fixtures: small configurations that train in seconds on a CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from stabilitylab.config import build_config

# Two threads at most, as on the CI machine, so timings in one test do not starve another.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_RUN = {
    "epochs": 2,
    "warmup_epochs": 0.5,
    "batch_size": 64,
    "proj_hidden_dim": 64,
    "proj_dim": 32,
    "eval_every": 10,
    # Aligned with the validation-split monitor, so the dense monitor reuses its queries.
    "dense_knn_every": 10,
    "flush_every": 8,
    "checkpoint_every": 20,
    "device": "cpu",
}

TINY_RUN_ARGS = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_RUN.items()]


@pytest.fixture
def tiny_config():
    def make(**overrides):
        return build_config("digits", **{**TINY_RUN, **overrides})

    return make


@pytest.fixture
def cli_command():
    """The command that runs the CLI in a fresh interpreter, as a user's shell would."""
    return [sys.executable, "-m", "stabilitylab"]


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
