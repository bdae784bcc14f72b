"""Reports on runs of several methods: pairing within a method, labels, the per-method tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import evals_frame, layers_frame, log_noise, memory_run, steps_frame

import stabilitylab as sl
from stabilitylab.config import build_config
from stabilitylab.report import write_report
from stabilitylab.report.summary import pair_arms, run_labels, run_method
from stabilitylab.runs import RunWriter, read_run

LAYERS = ["patch_embed", "cls_token", "blocks.00", "blocks.01", "norm", "projector"]
STEPS = 400
EVAL_STEPS = np.arange(0, STEPS + 1, 25)
DIP_STEPS = (200, 225)  # evaluations 12 points below the peak before them
SPIKE_STEP = 150  # a patch_embed spike, then one of the total gradient norm a step later

# Final kNN top-1 per method, arm and seed. Frozen minus learned: MoCo v3 +3 and +4 points,
# SimCLR +1 and 0 points. Only the learned MoCo v3 runs spike and dip.
FINAL_TOP1 = {
    ("mocov3", "learned"): (58.0, 59.0),
    ("mocov3", "frozen"): (61.0, 63.0),
    ("simclr", "learned"): (50.0, 51.0),
    ("simclr", "frozen"): (51.0, 51.0),
}


def run_config(method: str, frozen: bool, seed: int) -> dict:
    """Return the configuration that ``stabilitylab run`` records for these options."""
    return build_config("digits", method=method, freeze_patch_embed=frozen, seed=seed).to_dict()


def knn_evals(final_top1: float, dip: bool):
    top1 = np.linspace(10.0, final_top1, len(EVAL_STEPS))
    if dip:
        peak = top1[EVAL_STEPS == DIP_STEPS[0] - 25][0]
        for step in DIP_STEPS:
            top1[EVAL_STEPS == step] = peak - 12.0
    return evals_frame(EVAL_STEPS, top1)


def write_method_run(path: Path, method: str, frozen: bool, seed: int, final_top1: float) -> Path:
    """Write a finished run directory of ``method``. A learned MoCo v3 run spikes and dips."""
    unstable = method == "mocov3" and not frozen
    writer = RunWriter(path)
    derived = {"layers": LAYERS, "lr": 1e-3, "total_steps": STEPS, "steps_per_epoch": 100}
    writer.write_config(run_config(method, frozen, seed), derived, {})
    writer.write_status("finished")
    rng = np.random.default_rng(seed)
    step = np.arange(STEPS)
    loss = 3.0 * np.exp(-step / 2000)
    grad_norm = log_noise(rng, STEPS, {SPIKE_STEP + 1: 10.0} if unstable else None)
    writer.append("steps", steps_frame(step, loss, grad_norm, 0.1 * log_noise(rng, STEPS)))
    grads = {layer: 10.0**-index * log_noise(rng, STEPS) for index, layer in enumerate(LAYERS)}
    if unstable:
        grads["patch_embed"][SPIKE_STEP] *= 20.0
    if frozen:
        grads["patch_embed"] = np.full(STEPS, np.nan)
    writer.append("layers", layers_frame(step, grads))
    writer.append("evals", knn_evals(final_top1, dip=unstable))
    return path


def write_two_methods(root: Path) -> list[Path]:
    """Write both arms of seeds 0 and 1 for MoCo v3 and SimCLR, in folders that name neither."""
    paths = []
    for (method, arm), finals in FINAL_TOP1.items():
        for seed, final in enumerate(finals):
            path = root / f"r{len(paths)}"
            paths.append(write_method_run(path, method, arm == "frozen", seed, final))
    return paths


@pytest.fixture(scope="module")
def method_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    return write_report(write_two_methods(root), root / "report")


def markdown_table(report_dir: Path, caption: str) -> list[list[str]]:
    """Return the body rows of the report.md table under ``**caption**``, as cell lists."""
    lines = (report_dir / "report.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"**{caption}**") + 4
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def read_events(report_dir: Path) -> dict:
    return json.loads((report_dir / "events.json").read_text(encoding="utf-8"))


def test_pairs_stay_within_method(tmp_path):
    runs = [read_run(path) for path in write_two_methods(tmp_path)]
    pairs, unpaired = pair_arms(runs)
    assert unpaired == []
    assert len(pairs) == 4
    for pair in pairs:
        assert run_method(runs[pair.learned]) == run_method(runs[pair.frozen])
        assert runs[pair.learned].config["seed"] == runs[pair.frozen].config["seed"]
    assert [pair.label for pair in pairs] == [
        "method mocov3, seed 0",
        "method mocov3, seed 1",
        "method simclr, seed 0",
        "method simclr, seed 1",
    ]


def test_methods_alone_never_pair():
    # Equal configurations apart from the method and the arm.
    learned = {"freeze_patch_embed": False, "seed": 0, "lr": 1e-3, "method": "simclr"}
    frozen = {**learned, "freeze_patch_embed": True, "method": "mocov3"}
    runs = [_memory_run("a", learned), _memory_run("b", frozen)]
    pairs, unpaired = pair_arms(runs)
    assert pairs == []
    assert unpaired == [
        "seed 0, whose learned and frozen runs also differ in method (simclr learned, mocov3 "
        "frozen)"
    ]


def test_imported_runs_pair_by_method():
    # Imported runs keep only the fields they record. A missing method counts as one method.
    plain = {"source": "tensorboard", "freeze_patch_embed": False, "seed": 0}
    runs = [
        _memory_run("a", plain),
        _memory_run("b", {**plain, "freeze_patch_embed": True}),
        _memory_run("c", {**plain, "method": "dino"}),
        _memory_run("d", {**plain, "freeze_patch_embed": True, "method": "dino"}),
    ]
    pairs, _ = pair_arms(runs)
    assert sorted((pair.learned, pair.frozen) for pair in pairs) == [(0, 1), (2, 3)]
    assert [pair.setting for pair in pairs] == ["method dino", "method unknown method"]


def test_labels_name_method_when_methods_differ():
    config = {"freeze_patch_embed": False, "seed": 0}
    runs = [
        _memory_run("r0", {**config, "method": "mocov3"}),
        _memory_run("simclr-learned", {**config, "method": "simclr"}),
        _memory_run("simclr-run", {**config, "method": "simclr", "freeze_patch_embed": True}),
    ]
    assert run_labels(runs) == [
        "r0 (mocov3, learned)",
        "simclr-learned",
        "simclr-run (frozen)",
    ]
    # Runs of one method keep the labels without it.
    assert run_labels(runs[1:]) == ["simclr-learned", "simclr-run (frozen)"]


def test_report_labels_name_method(method_report):
    labels = [row[0] for row in markdown_table(method_report, "Runs at a glance")]
    assert labels == [
        r"r0 (mocov3, learned)",
        r"r1 (mocov3, learned)",
        r"r2 (mocov3, frozen)",
        r"r3 (mocov3, frozen)",
        r"r4 (simclr, learned)",
        r"r5 (simclr, learned)",
        r"r6 (simclr, frozen)",
        r"r7 (simclr, frozen)",
    ]


def test_report_seed_means_per_method(method_report):
    rows = markdown_table(
        method_report, "Frozen minus learned patch projection, kNN top-1 in points"
    )
    assert [row[:3] for row in rows[:4]] == [
        ["method mocov3, seed 0", "r0 (mocov3, learned)", "r2 (mocov3, frozen)"],
        ["method mocov3, seed 1", "r1 (mocov3, learned)", "r3 (mocov3, frozen)"],
        ["method simclr, seed 0", "r4 (simclr, learned)", "r6 (simclr, frozen)"],
        ["method simclr, seed 1", "r5 (simclr, learned)", "r7 (simclr, frozen)"],
    ]
    means = {row[0]: row[5] for row in rows if row[0].startswith("mean over seeds")}
    assert means == {
        "mean over seeds, method mocov3": "+3.50 (n=2)",
        "mean over seeds, method simclr": "+0.50 (n=2)",
    }


def test_report_stable_twin_same_method(method_report):
    rows = {row[0]: row for row in markdown_table(method_report, "Verdicts")}
    assert rows["r0 (mocov3, learned)"][2] == "recovered dips"
    assert rows["r0 (mocov3, learned)"][4] == "r2 (mocov3, frozen)"
    assert rows["r4 (simclr, learned)"][4] == "r6 (simclr, frozen)"


def test_report_per_method_arm_table(method_report):
    rows = markdown_table(method_report, "Per method and arm")
    assert [row[:4] for row in rows] == [
        ["mocov3", "learned", "2", "2"],
        ["mocov3", "frozen", "2", "2"],
        ["simclr", "learned", "2", "2"],
        ["simclr", "frozen", "2", "2"],
    ]
    mocov3_learned, mocov3_frozen, simclr_learned, simclr_frozen = rows
    assert mocov3_learned[4:6] == ["58.50", "0.71"]  # final kNN top-1: mean, std
    assert mocov3_frozen[4:6] == ["62.00", "1.41"]
    assert simclr_frozen[4:6] == ["51.00", "0.00"]
    assert mocov3_learned[8:11] == ["1.00", "1.00", "1.00"]  # dips, grad-norm, first-layer
    assert mocov3_frozen[8:11] == ["0.00", "0.00", "0.00"]
    assert simclr_learned[8:11] == ["0.00", "0.00", "0.00"]
    assert mocov3_learned[11] == "2 recovered dips"
    assert simclr_learned[11] == "2 stable"


def test_report_per_method_differences(method_report):
    rows = markdown_table(method_report, "Frozen minus learned per method")
    mocov3, simclr = rows
    assert mocov3[:3] == ["mocov3", "2", "+3.50"]
    assert simclr[:3] == ["simclr", "2", "+0.50"]
    assert simclr[3] != "n/a"  # the 95 % interval of two pairs
    assert mocov3[6] == "-1.00"  # dips, frozen minus learned
    assert mocov3[8] == "-1.00"  # first-layer spikes
    assert simclr[6] == "+0.00"


def test_events_json_methods(method_report):
    methods = read_events(method_report)["methods"]
    arms = [(entry["method"], entry["arm"], entry["runs"]) for entry in methods["arms"]]
    assert arms == [
        ("mocov3", "learned", 2),
        ("mocov3", "frozen", 2),
        ("simclr", "learned", 2),
        ("simclr", "frozen", 2),
    ]
    assert methods["arms"][0]["final_top1_mean"] == pytest.approx(58.5)
    assert methods["arms"][0]["verdicts"] == {"recovered dips": 2}
    differences = {entry["method"]: entry for entry in methods["differences"]}
    assert differences["mocov3"]["pairs"] == 2
    final = differences["mocov3"]["frozen_minus_learned"]["final_top1"]
    assert final["mean"] == pytest.approx(3.5)
    assert final["n"] == 2
    assert final["low"] < 3.5 < final["high"]


def test_one_method_has_no_method_section(tmp_path):
    paths = write_two_methods(tmp_path)[:4]  # the MoCo v3 runs
    report_dir = write_report(paths, tmp_path / "report")
    markdown = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "## Per method" not in markdown
    assert "methods" not in read_events(report_dir)
    assert "r0 (learned)" in markdown


def test_compare_runs_method_column(tmp_path):
    frame = sl.compare_runs(write_two_methods(tmp_path))
    assert frame["method"].tolist() == ["mocov3"] * 4 + ["simclr"] * 4
    assert frame["run"].iloc[4] == "r4 (simclr, learned)"
    differences = sl.paired_differences(frame["path"].tolist())
    assert len(differences) == 4
    assert differences["final_top1_diff"].tolist() == pytest.approx([3.0, 4.0, 1.0, 0.0])


def _memory_run(name: str, config: dict):
    step = np.arange(2)
    return memory_run(
        steps_frame(step, np.ones(2), np.ones(2), np.ones(2)),
        layers_frame(step, {"blocks.00": np.ones(2)}),
        name=name,
        config=config,
        derived={"layers": ["blocks.00"]},
        evals=evals_frame([0, 1], [40.0, 50.0]),
    )
