"""Tests of the stability report on synthetic run directories."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import evals_frame, layers_frame, log_noise, memory_run, steps_frame

from stabilitylab.errors import RunDirError
from stabilitylab.report import figures as report_figures
from stabilitylab.report import write_report
from stabilitylab.report.diagnosis import arm_difference_table
from stabilitylab.report.figures import max_pool_steps
from stabilitylab.report.markdown import escape_markdown
from stabilitylab.report.summary import pair_arms, seed_comparison_table, status_text
from stabilitylab.runs import RunWriter, read_run

LAYERS = ["patch_embed", "cls_token", "blocks.00", "blocks.01", "blocks.02", "norm", "projector"]
STEPS = 600
SPIKE_STEP = 300  # first-layer spike; the last block follows 3 steps later
DIP_EVAL_STEPS = (350, 400)  # evaluations that fall 12 points below the peak
FIGURE_FILES = ("knn_top1.png", "loss.png", "grad_first_last.png", "grad_heatmap.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVALS_ONLY = ("evals",)


def make_run(
    path: Path,
    *,
    frozen: bool,
    seed: int = 0,
    final_top1: float = 60.0,
    tables: tuple[str, ...] = ("steps", "layers", "evals"),
    state: str = "finished",
    frozen_check: dict | None = None,
    model: str = "vit_tiny",
) -> Path:
    """Write a run directory with a gradient spike at SPIKE_STEP and a kNN dip after it.

    ``tables`` names the tables to fill; the seed-comparison tests need only the evaluations.
    """
    writer = RunWriter(path)
    writer.write_config(
        {
            "freeze_patch_embed": frozen,
            "seed": seed,
            "lr": 1.5e-4,
            "batch_size": 256,
            "method": "mocov3",
            "model": model,
            "dataset": "synthetic",
            "epochs": 6,
        },
        {"layers": LAYERS, "lr": 1.5e-4, "total_steps": STEPS, "steps_per_epoch": 100},
        {},
    )
    writer.write_status(state)
    if frozen_check is not None:
        writer.write_json("frozen_check.json", frozen_check)
    rng = np.random.default_rng(seed + (100 if frozen else 0))
    step = np.arange(STEPS)
    if "steps" in tables:
        writer.append("steps", spiky_steps(step, rng))
    if "layers" in tables:
        writer.append("layers", spiky_layers(step, rng, frozen))
    if "evals" in tables:
        writer.append("evals", dip_evals(final_top1))
    return path


def spiky_steps(step: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    loss = 3.0 * np.exp(-step / 2000) * log_noise(rng, len(step), spread=0.01)
    loss[450] *= 1.6
    grad = log_noise(rng, len(step), {SPIKE_STEP + 1: 10.0})
    token = 0.1 * log_noise(rng, len(step))
    token[SPIKE_STEP] *= 12.0
    return steps_frame(
        step, loss, grad, token, lr=1.5e-4, samples_per_s=900.0, wall_time=step * 0.2
    )


def spiky_layers(step: np.ndarray, rng: np.random.Generator, frozen: bool) -> pd.DataFrame:
    grads = {}
    updates = {}
    for index, layer in enumerate(LAYERS):
        grad = 10.0**-index * log_noise(rng, len(step))
        update = np.full(len(step), 1e-3)
        planted = len(step) > SPIKE_STEP + 3
        if layer == "patch_embed":
            if planted:
                grad[SPIKE_STEP] *= 20.0
            if frozen:
                grad[:] = np.nan
                update[:] = np.nan
        if layer == "blocks.02" and planted:
            grad[SPIKE_STEP + 3] *= 8.0
        grads[layer] = grad
        updates[layer] = update
    return layers_frame(step, grads, update_ratio=updates)


def dip_evals(final_top1: float) -> pd.DataFrame:
    eval_steps = np.arange(0, STEPS + 1, 50)
    top1 = np.linspace(10.0, final_top1, len(eval_steps))
    peak = top1[eval_steps == DIP_EVAL_STEPS[0] - 50][0]
    for dip_step in DIP_EVAL_STEPS:
        top1[eval_steps == dip_step] = peak - 12.0
    return evals_frame(eval_steps, top1, eval_seconds=1.5)


def write_pair(root: Path) -> list[Path]:
    learned = make_run(root / "learned_s0", frozen=False, final_top1=58.0)
    frozen_check = {
        "passed": True,
        "parameters": ["patch_embed.proj.weight"],
        "max_abs_diff": 0.0,
    }
    frozen = make_run(root / "frozen_s0", frozen=True, final_top1=61.0, frozen_check=frozen_check)
    return [learned, frozen]


def two_seed_runs(root: Path) -> list[Path]:
    """Write evaluation-only learned and frozen runs of seeds 0 and 1.

    The frozen run ends 2 points above the learned one with seed 0 and 1 point with seed 1.
    """
    return [
        make_run(root / "l0", frozen=False, seed=0, final_top1=50.0, tables=EVALS_ONLY),
        make_run(root / "f0", frozen=True, seed=0, final_top1=52.0, tables=EVALS_ONLY),
        make_run(root / "l1", frozen=False, seed=1, final_top1=50.0, tables=EVALS_ONLY),
        make_run(root / "f1", frozen=True, seed=1, final_top1=51.0, tables=EVALS_ONLY),
    ]


@pytest.fixture
def pair(tmp_path: Path) -> list[Path]:
    return write_pair(tmp_path)


@pytest.fixture(scope="module")
def pair_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the report folder of one learned and one frozen run with seed 0."""
    root = tmp_path_factory.mktemp("pair")
    return write_report(write_pair(root), root / "out")


def read_events(report_dir: Path) -> dict:
    return json.loads((report_dir / "events.json").read_text(encoding="utf-8"))


def markdown_table(markdown: str, caption: str) -> list[list[str]]:
    """Return the body rows of the Markdown table under ``**caption**``, as cell lists."""
    lines = markdown.splitlines()
    start = lines.index(f"**{caption}**") + 2
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_report_writes_all_files(pair_report):
    for name in ("report.html", "report.md", "events.json", *FIGURE_FILES):
        assert (pair_report / name).is_file(), name
    for name in FIGURE_FILES:
        assert (pair_report / name).read_bytes().startswith(PNG_SIGNATURE), name
    assert not [path.name for path in pair_report.iterdir() if path.name.endswith(".tmp")]
    assert (pair_report / "report.html").stat().st_mode & 0o777 == 0o644


def test_report_html_self_contained(pair_report):
    html = (pair_report / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == len(FIGURE_FILES)
    for encoded in images:
        assert base64.b64decode(encoded).startswith(PNG_SIGNATURE)
    assert "http://" not in html
    assert "https://" not in html
    assert "<link" not in html
    assert "<script" not in html
    assert re.search(r'(src|href)="(?!data:)', html) is None
    assert "<style>" in html


def test_report_events_json_has_planted_events(pair_report):
    events = read_events(pair_report)
    assert events["format_version"] == 1
    assert events["detector_params"]["grad_spikes"]["window"] == 100
    assert events["detector_params"]["dips"]["z"] == 3.0
    learned, frozen = events["runs"]
    assert learned["run_name"] == "learned_s0"
    assert learned["label"] == "learned_s0"
    assert learned["first_layer"] == "grad_norm[patch_embed]"
    assert frozen["first_layer"] == "token_grad_norm"
    assert learned["last_layer"] == "grad_norm[blocks.02]"
    for run in (learned, frozen):
        spikes = run["spikes"]
        assert [spike["peak_step"] for spike in spikes["token_grad_norm"]] == [SPIKE_STEP]
        assert [spike["peak_step"] for spike in spikes["grad_norm"]] == [SPIKE_STEP + 1]
        assert [spike["peak_step"] for spike in spikes["grad_norm[blocks.02]"]] == [SPIKE_STEP + 3]
        assert [spike["peak_step"] for spike in spikes["loss"]] == [450]
        (dip,) = run["dips"]
        assert dip["peak_step"] == DIP_EVAL_STEPS[0] - 50
        assert dip["start_step"] == DIP_EVAL_STEPS[0]
        assert dip["bottom_step"] == DIP_EVAL_STEPS[0]
        assert dip["depth"] == pytest.approx(12.0)
        assert dip["recovery_step"] == DIP_EVAL_STEPS[1] + 50
    assert [spike["peak_step"] for spike in learned["spikes"]["grad_norm[patch_embed]"]] == [
        SPIKE_STEP
    ]
    assert frozen["spikes"]["grad_norm[patch_embed]"] == []


def test_report_markdown_summary_rows(pair_report):
    markdown = (pair_report / "report.md").read_text(encoding="utf-8")
    for name in FIGURE_FILES:
        assert f"]({name})" in markdown
    learned, frozen = markdown_table(markdown, "Runs at a glance")
    assert learned[:7] == [
        r"learned\_s0",
        "learned",
        "finished",
        "600 of 600",
        "58.00",
        "58.00",
        "1",
    ]
    assert learned[7] == "12.00 pts at step 350"
    assert learned[8:] == ["1", r"1 (grad\_norm\[patch\_embed\])", "1", "not applicable"]
    assert frozen[4] == "61.00"
    assert frozen[9] == r"1 (token\_grad\_norm)"
    assert frozen[11] == "passed"


def test_report_seed_comparison_frozen_minus_learned(pair_report):
    markdown = (pair_report / "report.md").read_text(encoding="utf-8")
    caption = "Frozen minus learned patch projection, kNN top-1 in points"
    row, mean = markdown_table(markdown, caption)
    assert row[:6] == [
        "0",
        r"learned\_s0",
        r"frozen\_s0",
        "58.00",
        "61.00",
        "+3.00",
    ]
    assert row[8] == "+3.00"
    assert mean[0] == "mean over seeds"
    assert mean[5] == "+3.00 (n=1)"


def test_report_html_lists_events(pair_report):
    html = (pair_report / "report.html").read_text(encoding="utf-8")
    assert "<td>grad_norm[blocks.02]</td><td>303</td>" in html
    assert "Events: frozen_s0" in html


def test_report_seed_mean_over_two_seeds(tmp_path):
    out = write_report(two_seed_runs(tmp_path), tmp_path / "out")
    markdown = (out / "report.md").read_text(encoding="utf-8")
    caption = "Frozen minus learned patch projection, kNN top-1 in points"
    rows = markdown_table(markdown, caption)
    assert [row[5] for row in rows] == ["+2.00", "+1.00", "+1.50 (n=2)"]


def test_report_unpaired_seed_explained(tmp_path):
    runs = [
        make_run(tmp_path / "l0", frozen=False, tables=EVALS_ONLY),
        make_run(tmp_path / "l0b", frozen=False, tables=EVALS_ONLY),
        make_run(tmp_path / "f0", frozen=True, tables=EVALS_ONLY),
    ]
    markdown = (write_report(runs, tmp_path / "out") / "report.md").read_text(encoding="utf-8")
    assert "seed 0 (2 learned, 1 frozen)" in markdown
    assert "| mean over" not in markdown


def test_report_escapes_script_in_name(tmp_path):
    # "$x_$" would be invalid mathtext if a figure label passed it to matplotlib unescaped.
    hostile = "<script>alert(1)<$x_$"
    runs = [
        make_run(tmp_path / hostile, frozen=False, model="<img src=x onerror=alert(2)>"),
    ]
    out = write_report(runs, tmp_path / "out")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;$x_$" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "<script" not in markdown
    assert "&lt;script&gt;" in markdown


def test_report_killed_run_without_tables(tmp_path):
    killed = make_run(tmp_path / "killed", frozen=True, tables=(), state="running")
    out = write_report([killed])
    assert out == killed / "report"
    markdown = (out / "report.md").read_text(encoding="utf-8")
    (row,) = markdown_table(markdown, "Runs at a glance")
    assert row[2] == "incomplete (running or killed)"
    assert row[3] == "0 of 600"
    assert row[4] == "n/a"
    assert row[11] == "missing"
    assert "no training steps were recorded" in markdown
    for name in FIGURE_FILES:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    (run,) = read_events(out)["runs"]
    assert run["dips"] == []
    assert all(spikes == [] for spikes in run["spikes"].values())


def test_report_frozen_check_failure_shown(tmp_path):
    run = make_run(
        tmp_path / "frozen",
        frozen=True,
        frozen_check={
            "passed": False,
            "parameters": ["patch_embed.proj.weight"],
            "max_abs_diff": 0.0125,
        },
    )
    markdown = (write_report([run]) / "report.md").read_text(encoding="utf-8")
    assert "FAILED (max abs diff 0.0125)" in markdown


def test_report_few_steps_and_no_evals(tmp_path):
    path = tmp_path / "short"
    writer = RunWriter(path)
    writer.write_config({"freeze_patch_embed": False, "seed": 3}, {"layers": LAYERS}, {})
    writer.write_status("failed", step=3, reason="TrainingError: non-finite loss " + "x" * 200)
    rng = np.random.default_rng(0)
    step = np.arange(3)
    writer.append("steps", spiky_steps(np.arange(STEPS), rng).iloc[:3])
    writer.append("layers", spiky_layers(step, rng, frozen=False))
    out = write_report([path])
    markdown = (out / "report.md").read_text(encoding="utf-8")
    (row,) = markdown_table(markdown, "Runs at a glance")
    assert row[2].startswith("failed: TrainingError: non-finite loss xxx")
    assert row[2].endswith("...")
    assert len(row[2]) == len("failed: ") + 120
    assert row[3] == "3"
    assert row[4] == "n/a"
    assert row[6] == "0"
    assert (out / "grad_heatmap.png").read_bytes().startswith(PNG_SIGNATURE)


def test_report_empty_list_raises(tmp_path):
    with pytest.raises(RunDirError):
        write_report([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_missing_run_raises(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        write_report([tmp_path / "absent"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="config.json"):
        write_report([tmp_path / "empty"], tmp_path / "out")


def test_report_duplicate_paths_reported_once(tmp_path):
    pair = [
        make_run(tmp_path / "learned_s0", frozen=False, tables=EVALS_ONLY),
        make_run(tmp_path / "frozen_s0", frozen=True, tables=EVALS_ONLY),
    ]
    out = write_report([pair[0], pair[1], pair[0], str(pair[1])], tmp_path / "out")
    names = [run["run_name"] for run in read_events(out)["runs"]]
    assert names == ["learned_s0", "frozen_s0"]


def test_report_default_dir_beside_first_run(tmp_path):
    pair = [
        make_run(tmp_path / "learned_s0", frozen=False, tables=EVALS_ONLY),
        make_run(tmp_path / "frozen_s0", frozen=True, tables=EVALS_ONLY),
    ]
    out = write_report(pair)
    assert out == tmp_path / "report"
    assert (tmp_path / "report" / "report.html").is_file()


def test_report_same_names_get_distinct_labels(tmp_path):
    first = make_run(tmp_path / "a" / "seed0", frozen=False, tables=EVALS_ONLY)
    second = make_run(tmp_path / "b" / "seed0", frozen=True, tables=EVALS_ONLY)
    runs = read_events(write_report([first, second], tmp_path / "out"))["runs"]
    assert [run["label"] for run in runs] == ["a/seed0 (learned)", "b/seed0 (frozen)"]


def test_report_out_dir_is_file_raises(pair, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder", encoding="utf-8")
    with pytest.raises(RunDirError, match="is a file"):
        write_report(pair, target)


def test_report_out_dir_with_user_files_raises(pair, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "report.md").write_text("my notes", encoding="utf-8")
    with pytest.raises(RunDirError, match="not a stabilitylab report"):
        write_report(pair, target)
    assert (target / "report.md").read_text(encoding="utf-8") == "my notes"


def test_report_out_dir_is_run_dir_raises(pair):
    with pytest.raises(RunDirError, match="is a run directory"):
        write_report(pair, pair[0])


def test_report_replaces_earlier_report(pair, tmp_path):
    target = write_report(pair, tmp_path / "report")
    first = (target / "events.json").read_text(encoding="utf-8")
    again = write_report(pair, target)
    assert again == target
    assert (target / "events.json").read_text(encoding="utf-8") == first


def test_report_failure_leaves_no_files(pair, tmp_path, monkeypatch):
    def broken_heatmap(*args, **kwargs):
        raise RuntimeError("heatmap failed")

    monkeypatch.setattr(report_figures, "plot_grad_heatmap", broken_heatmap)
    with pytest.raises(RuntimeError, match="heatmap failed"):
        write_report(pair, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_events_table_capped(tmp_path, monkeypatch):
    monkeypatch.setattr("stabilitylab.report.document.MAX_SPIKE_ROWS", 2)
    run = make_run(tmp_path / "run", frozen=False)
    markdown = (write_report([run]) / "report.md").read_text(encoding="utf-8")
    assert "3 of 5 spikes with smaller ratios are left out" in markdown
    spike_rows = markdown_table(markdown, "Spikes")
    # The two largest ratios, both at SPIKE_STEP, listed in step order and then by name.
    assert [row[0] for row in spike_rows] == [r"grad\_norm\[patch\_embed\]", r"token\_grad\_norm"]


def test_max_pool_keeps_one_step_spike():
    step = np.arange(10_000)
    grad = np.ones(len(step))
    grad[4321] = 500.0
    layers = pd.DataFrame(
        {
            "step": np.concatenate([step, step]),
            "layer": ["blocks.00"] * len(step) + ["patch_embed"] * len(step),
            "grad_norm": np.concatenate([grad, np.full(len(step), np.nan)]),
        }
    )
    grid, edges = max_pool_steps(layers, ["patch_embed", "blocks.00", "norm"], 800)
    assert list(grid.index) == ["patch_embed", "blocks.00", "norm"]
    assert grid.shape[1] <= 800
    assert len(edges) == grid.shape[1] + 1
    assert edges[0] == 0
    assert edges[-1] == 10_000
    assert grid.loc["blocks.00"].max() == 500.0
    column = int(np.searchsorted(edges, 4321, side="right")) - 1
    assert grid.loc["blocks.00"].iloc[column] == 500.0
    assert grid.loc["patch_embed"].isna().all()
    assert grid.loc["norm"].isna().all()


def test_escape_markdown_punctuation():
    assert escape_markdown("a|b_c*d") == r"a\|b\_c\*d"
    assert escape_markdown("<b>&") == "&lt;b&gt;&amp;"
    assert escape_markdown("one\ntwo") == "one two"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("finished", "finished"),
        ("running", "incomplete (running or killed)"),
        ("interrupted", "interrupted (Ctrl-C or SIGTERM)"),
    ],
)
def test_status_text_per_state(tmp_path, state, expected):
    run = read_run(make_run(tmp_path / "run", frozen=False, state=state))
    assert status_text(run) == expected


def test_seed_pairing_needs_same_recipe(tmp_path):
    learned = make_run(tmp_path / "a", frozen=False, model="vit_tiny")
    frozen = make_run(tmp_path / "b", frozen=True, model="vit_small")
    markdown = (write_report([learned, frozen], tmp_path / "out") / "report.md").read_text()
    assert "Not paired: seed 0, whose learned and frozen runs also differ in model" in markdown
    assert "mean over seeds" not in markdown


# Diagnosis: verdicts, lag, attribution and the arm comparison


def test_report_verdict_table_rows(pair_report):
    markdown = (pair_report / "report.md").read_text(encoding="utf-8")
    learned, frozen = markdown_table(markdown, "Verdicts")
    assert learned[:3] == [r"learned\_s0", "learned", "recovered dips"]
    assert "1 dip(s), all recovered" in learned[3]
    assert "deepest dip 12.00 pts" in learned[3]
    assert learned[4:] == ["none", "n/a", "n/a"]
    assert frozen[2] == "recovered dips"


def test_report_lag_table_planted_delay(pair_report):
    markdown = (pair_report / "report.md").read_text(encoding="utf-8")
    rows = markdown_table(markdown, "First-layer to last-layer lag, in steps")
    learned = rows[0]
    assert learned[:4] == [
        r"learned\_s0",
        r"grad\_norm\[patch\_embed\]",
        r"grad\_norm\[blocks.02\]",
        "1",
    ]
    assert learned[4:6] == ["1", "3.0"]
    assert learned[8] == "3"
    frozen = next(row for row in rows if row[0] == r"frozen\_s0")
    assert frozen[1] == r"token\_grad\_norm"
    assert frozen[5] == "3.0"


def test_report_attribution_table_first_series(pair_report):
    markdown = (pair_report / "report.md").read_text(encoding="utf-8")
    (row,) = markdown_table(markdown, "Gradient spikes before each dip")
    assert row[:5] == ["350", "300", "250 to 349", r"grad\_norm\[patch\_embed\]", "300"]
    assert row[5].startswith(r"grad\_norm\[patch\_embed\], token\_grad\_norm")
    assert row[6] == "4"


def test_report_events_json_has_diagnosis(pair_report):
    learned, frozen = read_events(pair_report)["runs"]
    assert learned["verdict"]["verdict"] == "recovered dips"
    assert learned["lag"]["source"] == "grad_norm[patch_embed]"
    assert learned["lag"]["delays"] == [3]
    assert frozen["lag"]["source"] == "token_grad_norm"
    assert learned["attributions"][0]["first_series"] == "grad_norm[patch_embed]"
    assert learned["sanity"]["feature_dim"] == 192
    assert read_events(pair_report)["detector_params"]["lag"]["max_lag"] == 50


def test_report_arm_spread_over_two_seeds(tmp_path):
    out = write_report(two_seed_runs(tmp_path), tmp_path / "out")
    markdown = (out / "report.md").read_text(encoding="utf-8")
    final, _ = markdown_table(markdown, "Frozen minus learned over seeds, kNN top-1 in points")
    assert final[1] == "0: +2.00, 1: +1.00"
    assert final[2:5] == ["+1.50", "0.71", "2"]
    # t(0.975, 1) = 12.706, so the half width is 12.706 * 0.7071 / sqrt(2) = 6.35.
    assert final[5] == "-4.85 to +7.85"
    per_seed = markdown_table(markdown, "Both arms per seed")
    assert [row[0] for row in per_seed] == ["0", "1"]
    assert per_seed[0][9:] == ["recovered dips", "recovered dips"]
    learned, frozen = markdown_table(markdown, "Per arm, over the paired runs")
    assert learned[:3] == ["learned", "2", "2"]
    assert frozen[:3] == ["frozen", "2", "2"]


def test_report_hidden_cost_stable_twin(tmp_path):
    learned = make_run(tmp_path / "learned_s0", frozen=False, final_top1=58.0)
    frozen = make_run(tmp_path / "frozen_s0", frozen=True, tables=("steps", "layers"))
    smooth = dip_evals(61.0)
    smooth["knn_top1"] = np.linspace(10.0, 61.0, len(smooth))
    RunWriter(frozen).append("evals", smooth)
    markdown = (write_report([learned, frozen], tmp_path / "out") / "report.md").read_text()
    learned_row, frozen_row = markdown_table(markdown, "Verdicts")
    assert frozen_row[2] == "stable"
    assert learned_row[4] == r"frozen\_s0"
    assert learned_row[5] == "+3.00"
    assert learned_row[6] == "+3.00"
    assert frozen_row[4:] == ["none", "n/a", "n/a"]


def sweep_pair_runs() -> list:
    """Return in-memory learned and frozen runs at lr 0.1 and 0.05, seeds 0 and 1."""
    runs = []
    for lr, gain in ((0.1, 4.0), (0.05, 1.0)):
        for seed in (0, 1):
            for frozen in (False, True):
                top1 = 50.0 + (gain if frozen else 0.0) + seed
                config = {"freeze_patch_embed": frozen, "seed": seed, "lr": lr}
                runs.append(
                    memory_run(
                        steps_frame(np.arange(2), np.ones(2), np.ones(2), np.ones(2)),
                        layers_frame(np.arange(2), {"blocks.00": np.ones(2)}),
                        name=f"lr{lr}-{'frozen' if frozen else 'learned'}-s{seed}",
                        config=config,
                        derived={"layers": ["blocks.00"]},
                        evals=evals_frame([0, 1], [40.0, top1]),
                    )
                )
    return runs


def test_pairs_named_by_setting():
    pairs, _ = pair_arms(sweep_pair_runs())
    assert [pair.label for pair in pairs] == [
        "lr 0.05, seed 0",
        "lr 0.05, seed 1",
        "lr 0.1, seed 0",
        "lr 0.1, seed 1",
    ]


def test_arm_difference_rows_per_setting():
    runs = sweep_pair_runs()
    pairs, _ = pair_arms(runs)
    rows = arm_difference_table(runs, pairs).rows
    assert [row[0] for row in rows[::2]] == [
        "final kNN top-1, frozen − learned, lr 0.05",
        "final kNN top-1, frozen − learned, lr 0.1",
    ]
    assert rows[0][2] == "+1.00"
    assert rows[2][2] == "+4.00"


def test_seed_comparison_mean_per_setting():
    runs = sweep_pair_runs()
    table = seed_comparison_table(runs, [run.name for run in runs])
    means = [row for row in table.rows if row[0].startswith("mean over seeds")]
    assert [row[0] for row in means] == ["mean over seeds, lr 0.05", "mean over seeds, lr 0.1"]
    assert [row[5] for row in means] == ["+1.00 (n=2)", "+4.00 (n=2)"]


def test_runs_of_two_versions_pair():
    runs = sweep_pair_runs()[:2]
    runs[0].config["on_nonfinite"] = "stop"  # recorded by a version that has the field
    pairs, unpaired = pair_arms(runs)
    assert [pair.label for pair in pairs] == ["0"]
    assert unpaired == []
