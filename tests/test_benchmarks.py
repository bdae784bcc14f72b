"""The benchmark scripts run with their smallest options and print every row of their tables.

Timings are not checked: they depend on the machine. What is checked are the rows, and the
figures that do not depend on timing, such as equal losses and classifier agreement.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(name: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def table_rows(output: str) -> dict[str, list[str]]:
    """Return the cells after the first of every Markdown table body row, by that first cell.

    A header row is the one right above a ``|---`` line, and is left out.
    """
    lines = output.splitlines()
    rows = {}
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        if line.startswith("| ") and not following.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def numbers(cells: list[str]) -> list[float]:
    return [float(cell) for cell in cells]


@pytest.mark.slow
def test_monitor_overhead_prints_both_parts():
    result = run_benchmark(
        "monitor_overhead.py", "--rounds=1", "--steps=1", "--harness-rounds=1", "--harness-steps=1"
    )
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    for model in ("vit (docs example)", "resnet18"):
        assert model in rows
        assert all(value > 0 for value in numbers(rows[model]))
    for arm in (
        "every signal",
        "none",
        "naive (.item() per parameter)",
        "histogram (wandb-like, every step)",
    ):
        assert arm in rows
        assert all(value > 0 for value in numbers(rows[arm]))
    assert numbers(rows["none"])[2] == 1.0  # the reference's ratio to itself
    assert "every signal: flush" in result.stdout
    assert result.stdout.startswith("machine: ")


@pytest.mark.slow
def test_harness_throughput_matches_plain_loss():
    result = run_benchmark("harness_throughput.py", "--rounds=1", "--steps=1")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert set(rows) == {"plain", "harness"}
    losses = re.search(r"loss of the first batch: plain (\S+), harness (\S+)", result.stdout)
    assert losses is not None
    assert losses.group(1) == losses.group(2)
    assert "harness / plain steps per second: " in result.stdout


@pytest.mark.slow
def test_knn_sklearn_agrees_with_monitor():
    result = run_benchmark("knn_sklearn.py", "--rounds=1", "--warmup-steps=1")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    monitor = numbers(rows["monitor (weighted_knn)"])
    exp_weights = numbers(rows["scikit-learn, exp(sim / T) weights"])
    distance = numbers(rows['scikit-learn, weights="distance"'])
    assert monitor[2] == 100.0
    # Both use the same votes, so only a tie broken another way can differ (1 in 450 queries
    # is 0.22 points).
    assert exp_weights[2] >= 99.0
    assert abs(exp_weights[1] - monitor[1]) <= 1.0
    assert 0.0 <= distance[2] <= 100.0
    assert "to the training time" in result.stdout


@pytest.mark.slow
def test_report_generation_small_run():
    result = run_benchmark("report_generation.py", "--steps=1000", "--layers=6")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    for table in ("steps", "layers", "evals", "dense_knn", "all"):
        assert table in rows
    files, size, values, per_value = numbers(rows["layers"])
    assert files == 10  # one chunk per 100 steps
    assert values == 1000 * 6 * 3  # steps x layers x (grad_norm, weight_norm, update_ratio)
    assert per_value == pytest.approx(size / values, abs=0.01)
    assert numbers(rows["evals"])[0] == 10  # one chunk per evaluation
    assert re.search(r"stabilitylab report: [\d.]+ s .* peak RSS \d+ MB", result.stdout)


@pytest.mark.slow
def test_report_generation_rejects_partial_epoch():
    result = run_benchmark("report_generation.py", "--steps=150")
    assert result.returncode == 2
    assert "--steps 150 is not a multiple of 100" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("knn_monitors.py", "validation evaluation: "),
        ("attention_probe.py", "share of training time with --attention-every"),
    ],
)
def test_trainer_benchmarks_run(name, expected):
    result = run_benchmark(name, "--rounds=1", "--warmup-steps=1")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert "training step: " in result.stdout
