"""Exact resume, checkpoint policy and crash safety of ``stabilitylab run``.

The runs train on the first 48 images of the digits training split at 8 px, so a run of
18 optimiser steps takes seconds on a CPU. A resumed run must equal an uninterrupted one
bit for bit in every table, once the timing columns are dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

import stabilitylab.train.loop as loop
import stabilitylab.train.resume as resume
from stabilitylab.cli import build_parser, main
from stabilitylab.config import build_config
from stabilitylab.data import build_data
from stabilitylab.errors import ConfigError, RunDirError
from stabilitylab.runs import TABLE_COLUMNS, RunWriter, read_run
from stabilitylab.train.checkpoint import load_checkpoint
from stabilitylab.train.runlock import RunLock

TRAIN_IMAGES = 48  # 6 steps per epoch at batch 8
SMALL_RUN = {
    **TINY_RUN,
    "epochs": 3,
    "batch_size": 8,
    "img_size": 8,
    "eval_every": 4,
    "dense_knn_every": 4,
    "dense_knn_size": 24,
    "flush_every": 3,
    "checkpoint_every": 5,
    "knn_max_bank": 96,
    "knn_max_query": 64,
}
SMALL_STEPS = 18
KEEP_EVERY = 10
SMALL_ARGS = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL_RUN.items()]
# Columns that hold timings, which differ between any two runs.
TIMING_COLUMNS = {
    "steps": ["wall_time", "samples_per_s"],
    "layers": [],
    "evals": ["eval_seconds"],
    "dense_knn": ["eval_seconds"],
}
# Runs this file as the CLI in a fresh interpreter, on the small training split.
DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import test_resume
test_resume.use_data(test_resume.small_digits)
from stabilitylab.cli import build_parser, main
sys.exit(main(sys.argv[1:]))
"""


def small_digits(config):
    data = build_data(config)
    data.train = Subset(data.train, range(TRAIN_IMAGES))
    return data


class ViewPairs(Dataset):
    """Digits with two views cropped per image by torchvision, like an image folder's views."""

    def __init__(self, images: Dataset) -> None:
        self.images = images
        self.crop = v2.RandomResizedCrop(8, scale=(0.3, 1.0), antialias=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, label = self.images[index]
        return (self.crop(image), self.crop(image)), label


def per_image_digits(config):
    data = small_digits(config)
    data.train = ViewPairs(data.train)
    data.batch_views = None
    return data


def use_data(builder, patch: pytest.MonkeyPatch | None = None) -> None:
    """Make run_training and resume_training build their data with ``builder``."""
    for module in (loop, resume):
        if patch is None:
            module.build_data = builder
        else:
            patch.setattr(module, "build_data", builder)


def assert_same_tables(resumed: Path, reference: Path) -> None:
    first, second = read_run(resumed), read_run(reference)
    for table, timings in TIMING_COLUMNS.items():
        pd.testing.assert_frame_equal(
            getattr(first, table).drop(columns=timings),
            getattr(second, table).drop(columns=timings),
            check_exact=True,
            obj=table,
        )


def assert_same_weights(resumed: Path, reference: Path) -> None:
    first = load_checkpoint(resumed / "checkpoint.pt")["model"]
    second = load_checkpoint(reference / "checkpoint.pt")["model"]
    different = [name for name in second if not torch.equal(first[name], second[name])]
    assert different == []


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def interrupt_at(patch: pytest.MonkeyPatch, step: int, signals: int = 1) -> None:
    """Send SIGINT to this process while the trainer is inside optimiser step ``step``."""
    train_step = loop.Trainer.train_step

    def signalled(self, *args, **kwargs):
        if self.step == step:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, *args, **kwargs)

    patch.setattr(loop.Trainer, "train_step", signalled)


def run_cli_here(args: list[str]) -> int:
    handler = signal.getsignal(signal.SIGTERM)  # the run command installs its own
    try:
        return main(args)
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of SMALL_RUN, keeping every checkpoint at a multiple of 10."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        use_data(small_digits, patch)
        loop.run_training(
            build_config("digits", **SMALL_RUN),
            out,
            show_progress=False,
            keep_checkpoints_every=KEEP_EVERY,
        )
    return out


@pytest.fixture(scope="module")
def per_image_reference(tmp_path_factory):
    """An uninterrupted run with per-image views loaded by two DataLoader workers."""
    out = tmp_path_factory.mktemp("per-image") / "run"
    with pytest.MonkeyPatch.context() as patch:
        use_data(per_image_digits, patch)
        config = build_config("digits", **{**SMALL_RUN, "epochs": 2, "workers": 2})
        loop.run_training(config, out, show_progress=False)
    return out


@pytest.fixture
def stopped_copy(reference, tmp_path):
    """A copy of the reference run, with a status of interrupted at step 10."""
    copy = tmp_path / "stopped"
    shutil.copytree(reference, copy)
    (copy / "status.json").write_text(json.dumps({"state": "interrupted", "step": 10}))
    return copy


# -- exact resume ----------------------------------------------------------------------------


def test_sigkill_report_then_resume_exact(reference, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    driver = DRIVER.format(tests=str(Path(__file__).parent))
    command = [sys.executable, "-c", driver, "run", "--out", str(out), "--quiet", *SMALL_ARGS]
    command.append(f"--keep-checkpoints-every={KEEP_EVERY}")
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + 240
    try:
        # Kill once a flush after the first checkpoint (step 5) has been written.
        while time.monotonic() < deadline:
            if (out / "checkpoint.pt").is_file() and (out / "status.json").is_file():
                if status_of(out).get("step", 0) > 5:
                    break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint was written within the time limit")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert status_of(out)["state"] == "running"
    killed_steps = read_run(out).steps["step"]
    checkpoint_step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert killed_steps.max() >= checkpoint_step  # rows beyond the checkpoint were flushed

    assert run_cli_here(["report", str(out), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    assert (tmp_path / "report" / "report.html").is_file()

    use_data(small_digits, monkeypatch)
    assert run_cli_here(["run", "--resume", str(out), "--quiet"]) == 0
    assert status_of(out)["state"] == "finished"
    assert status_of(out)["step"] == SMALL_STEPS
    assert_same_tables(out, reference)
    assert_same_weights(out, reference)
    assert not list(out.rglob("*.tmp"))


def test_sigint_checkpoints_current_step(per_image_reference, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    use_data(per_image_digits, monkeypatch)
    interrupt_at(monkeypatch, step=6)
    config = build_config("digits", **{**SMALL_RUN, "epochs": 2, "workers": 0})
    with pytest.raises(KeyboardInterrupt):
        loop.run_training(config, out, show_progress=False)
    status = status_of(out)
    assert status["state"] == "interrupted"
    assert status["checkpoint_step"] == 7  # the signalled step completed first
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 7
    assert list(read_run(out).steps["step"]) == list(range(7))

    monkeypatch.undo()
    use_data(per_image_digits, monkeypatch)
    result = resume.resume_training(out, {"workers": 2}, show_progress=False)
    assert result.steps == 12
    assert_same_tables(out, per_image_reference)
    assert_same_weights(out, per_image_reference)
    resumes = json.loads((out / "config.json").read_text())["resumes"]
    assert [entry["step"] for entry in resumes] == [7]
    assert resumes[0]["changed"] == {"workers": [0, 2]}


def test_second_sigint_stops_without_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "forced"
    use_data(small_digits, monkeypatch)
    interrupt_at(monkeypatch, step=2, signals=2)
    with pytest.raises(KeyboardInterrupt):
        loop.run_training(build_config("digits", **SMALL_RUN), out, show_progress=False)
    status = status_of(out)
    assert status["state"] == "interrupted"
    assert status["checkpoint_step"] is None
    assert not (out / "checkpoint.pt").exists()


def test_kept_checkpoints_load(reference):
    kept = sorted(path.name for path in reference.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-000010.pt"]
    state = load_checkpoint(reference / "checkpoint-000010.pt")  # weights_only=True
    assert state["step"] == 10
    assert state["keep_checkpoints_every"] == KEEP_EVERY
    assert set(state["rng"]) == {"torch", "numpy", "python"}


# -- damaged chunks and missing checkpoints --------------------------------------------------


def chunk_with_step(table_dir: Path, step: int) -> Path:
    return next(
        chunk
        for chunk in sorted(table_dir.glob("part-*.parquet"))
        if step in set(pd.read_parquet(chunk)["step"])
    )


def truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_steps_chunk_falls_back(reference, stopped_copy, monkeypatch, caplog):
    # checkpoint.pt is at step 18; the chunk of steps 13 and 14 is lost before it.
    truncate_file(chunk_with_step(stopped_copy / "steps", 13))
    use_data(small_digits, monkeypatch)
    with caplog.at_level("WARNING", logger="stabilitylab.train.resume"):
        result = resume.resume_training(stopped_copy, show_progress=False)
    assert "the rows of steps 13 to 14 are missing" in caplog.text
    assert "resuming from checkpoint-000010.pt at step 10 instead of checkpoint.pt" in caplog.text
    assert "lies after the checkpoint" not in caplog.text
    assert result.steps == SMALL_STEPS
    resumes = json.loads((stopped_copy / "config.json").read_text())["resumes"]
    assert [entry["step"] for entry in resumes] == [10]
    assert_same_tables(stopped_copy, reference)
    assert_same_weights(stopped_copy, reference)


def test_damaged_steps_chunk_without_older_checkpoint(stopped_copy):
    damaged = chunk_with_step(stopped_copy / "steps", 3)
    truncate_file(damaged)
    before = {path: path.stat().st_mtime_ns for path in stopped_copy.rglob("*")}
    with pytest.raises(RunDirError) as error:
        resume.resume_training(stopped_copy, show_progress=False)
    message = str(error.value)
    assert "the rows of steps 3 to 4 are missing" in message
    assert f"(steps/{damaged.name} cannot be read)" in message
    assert "No kept checkpoint-NNNNNN.pt precedes the rows that are missing" in message
    assert "move checkpoint.pt and any checkpoint-NNNNNN.pt out of" in message
    assert "--overwrite instead starts a new run from the preset" in message
    assert {path: path.stat().st_mtime_ns for path in stopped_copy.rglob("*")} == before


def test_damaged_evals_chunk_counted_as_lost(stopped_copy, monkeypatch, caplog):
    damaged = chunk_with_step(stopped_copy / "evals", 16)  # before the checkpoint at 18
    truncate_file(damaged)
    use_data(small_digits, monkeypatch)
    with caplog.at_level("INFO", logger="stabilitylab.train.resume"):
        resume.resume_training(stopped_copy, show_progress=False)
    assert f"evals/{damaged.name}" in caplog.text
    assert "evals rows after step 12 and before step 18" in caplog.text
    assert "so the evals table lacks them" in caplog.text
    assert "rows lost in damaged chunks: evals an unknown number (1 chunk)" in caplog.text
    assert damaged.exists()
    run = read_run(stopped_copy)
    assert list(run.evals["step"]) == [0, 4, 8, 12, 18]
    assert any("rows of steps 13 to 17 are missing" in warning for warning in run.warnings)


def test_missing_checkpoints_warn_and_restart(reference, stopped_copy, monkeypatch, caplog):
    status = {"state": "interrupted", "step": 10, "checkpoint_step": 10}
    (stopped_copy / "status.json").write_text(json.dumps(status))
    for path in stopped_copy.glob("checkpoint*.pt"):
        path.unlink()
    use_data(small_digits, monkeypatch)
    with caplog.at_level("WARNING", logger="stabilitylab.train.resume"):
        resume.resume_training(stopped_copy, show_progress=False)
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "status.json records a checkpoint at step 10" in warnings[0].getMessage()
    assert "trains again from step 0" in warnings[0].getMessage()
    assert_same_tables(stopped_copy, reference)


def test_unloadable_checkpoint_reason_is_safe(stopped_copy, caplog):
    (stopped_copy / "checkpoint.pt").write_text("not a checkpoint\n")

    class Payload:
        def __reduce__(self):
            return (os.getpid, ())

    torch.save({"step": 10, "model": {}, "extra": Payload()}, stopped_copy / "checkpoint-000010.pt")
    with caplog.at_level("WARNING", logger="stabilitylab.train.resume"):
        with pytest.raises(RunDirError) as error:
            resume.resume_training(stopped_copy, show_progress=False)
    message = str(error.value)
    for text in (message, caplog.text):
        assert "weights_only" not in text
        assert "Re-running" not in text
    assert "weights-only loading rejected it: Unsupported operand" in message
    assert "weights-only loading rejected it: Trying to load unsupported GLOBAL" in message
    assert "move checkpoint.pt and any checkpoint-NNNNNN.pt out of" in message


# -- what a resume accepts -------------------------------------------------------------------


def test_resume_changed_config_lists_keys(reference, capsys):
    before = (reference / "status.json").read_text()
    args = ["run", "--resume", str(reference), "--lr=0.1", "--freeze-patch-embed"]
    assert run_cli_here([*args, "--model=vit_tiny"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "lr 0.001 in the run, 0.1 now" in error
    assert "freeze_patch_embed False in the run, True now" in error
    assert "model 'vit_micro' in the run, 'vit_tiny' now" in error
    assert (reference / "status.json").read_text() == before


def test_resume_finished_run_exit_0(reference, capsys):
    before = {path: path.stat().st_mtime_ns for path in reference.rglob("*")}
    assert run_cli_here(["run", "--resume", str(reference), "--quiet"]) == 0
    assert "finished already (18 steps" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in reference.rglob("*")} == before


def test_resume_locked_run_rejected(stopped_copy):
    with RunLock(stopped_copy):
        with pytest.raises(RunDirError, match="is in use"):
            resume.resume_training(stopped_copy)
        with pytest.raises(RunDirError, match="is in use"):
            loop.run_training(build_config("digits", **SMALL_RUN), stopped_copy, overwrite=True)
    assert (stopped_copy / "checkpoint.pt").is_file()


def test_existing_run_needs_resume_or_overwrite(stopped_copy):
    with pytest.raises(RunDirError, match=r"\(interrupted at step 10\); pass --resume"):
        loop.run_training(build_config("digits", **SMALL_RUN), stopped_copy)


def test_resume_with_out_rejected(stopped_copy, capsys):
    assert run_cli_here(["run", "--resume", str(stopped_copy), "--out", "x"]) == 2
    assert "names the run directory already, so drop --out" in capsys.readouterr().err


def test_resume_with_overwrite_explains_both(stopped_copy, capsys):
    assert run_cli_here(["run", "--resume", str(stopped_copy), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert "--overwrite replaces it with a new run built from the preset and the options" in error
    assert "not from the run's config.json" in error


def test_resume_other_preset_lists_keys(stopped_copy, capsys):
    # The preset is an image-folder one, invalid without --data-dir; the comparison comes first.
    assert run_cli_here(["run", "--resume", str(stopped_copy), "--preset", "mocov3-vit-small"]) == 2
    error = capsys.readouterr().err
    assert "the options differ from the run's configuration" in error
    assert "dataset 'digits' in the run, 'imagefolder' now" in error
    assert "preset 'digits' in the run, 'mocov3-vit-small' now" in error
    assert "needs --data-dir" not in error


def test_resume_error_lists_mutable_options(stopped_copy):
    with pytest.raises(ConfigError) as error:
        resume.resume_training(stopped_copy, {"lr": 0.5})
    listed = str(error.value).split("only ")[-1]
    for field in resume.MUTABLE_FIELDS:
        assert f"--{field.replace('_', '-')}" in listed
    assert "--keep-checkpoints-every" in listed


def test_interrupted_message_sentences(tmp_path, monkeypatch, capsys):
    use_data(small_digits, monkeypatch)
    interrupt_at(monkeypatch, step=2)
    out = tmp_path / "stopped"
    assert run_cli_here(["run", "--out", str(out), "--quiet", *SMALL_ARGS]) == 130
    error = capsys.readouterr().err
    assert "interrupted. The metrics and a checkpoint at step 3 are kept" in error


def test_resume_diverged_run_rejected(stopped_copy):
    status = {"state": "failed", "step": 9, "reason": "non-finite loss", "diverged": {}}
    (stopped_copy / "status.json").write_text(json.dumps(status))
    with pytest.raises(RunDirError, match="would diverge at the same step again"):
        resume.resume_training(stopped_copy)


def test_resume_unknown_override_rejected(stopped_copy):
    with pytest.raises(ConfigError, match="unknown configuration keys"):
        resume.resume_training(stopped_copy, {"learning_rate": 1.0})


# -- tables after a kill ---------------------------------------------------------------------


def steps_frame(steps) -> pd.DataFrame:
    return pd.DataFrame(
        {name: [float(step) for step in steps] for name in TABLE_COLUMNS["steps"]}
    ).astype({"step": "int64"})


def evals_frame(steps) -> pd.DataFrame:
    frame = pd.DataFrame(
        {name: [float(step) for step in steps] for name in TABLE_COLUMNS["evals"]}
    ).astype({"step": "int64"})
    return frame.assign(knn_correct=[b"\x01"] * len(frame))


def write_chunks(path: Path, ranges, table: str = "steps") -> None:
    writer = RunWriter(path)
    writer.write_config({"freeze_patch_embed": False}, {"layers": []}, {})
    make = steps_frame if table == "steps" else evals_frame
    for steps in ranges:
        writer.append(table, make(steps))


def test_truncate_trims_and_drops(tmp_path):
    write_chunks(tmp_path, [range(0, 5), range(5, 10), range(10, 12)])
    write_chunks(tmp_path, [[0, 4], [8], [12]], table="evals")
    dropped = resume.truncate_tables(tmp_path, step=7, has_checkpoint=True, layers_per_step=0)
    assert dropped["steps"] == 5
    assert dropped["evals"] == 2
    assert list(read_run(tmp_path).steps["step"]) == list(range(7))
    assert list(read_run(tmp_path).evals["step"]) == [0, 4]
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]


def test_truncate_damaged_before_checkpoint(tmp_path):
    write_chunks(tmp_path, [range(0, 5), range(5, 10), range(10, 12)])
    (tmp_path / "steps" / "part-000000.parquet").write_bytes(b"PAR1 damaged")
    with pytest.raises(RunDirError) as error:
        resume.truncate_tables(tmp_path, step=7, has_checkpoint=True, layers_per_step=0)
    message = str(error.value)
    assert "the rows of steps 0 to 4 are missing" in message
    assert "(steps/part-000000.parquet cannot be read)" in message
    assert "lies after" not in message
    assert len(list((tmp_path / "steps").iterdir())) == 3  # nothing was changed


def test_truncate_damaged_step_chunk_after_checkpoint(tmp_path, caplog):
    write_chunks(tmp_path, [range(0, 5), range(5, 10), range(10, 12)])
    damaged = tmp_path / "steps" / "part-000002.parquet"
    damaged.write_bytes(b"PAR1 damaged")
    with caplog.at_level("WARNING", logger="stabilitylab.train.resume"):
        resume.truncate_tables(tmp_path, step=10, has_checkpoint=True, layers_per_step=0)
    assert not damaged.exists()
    assert "steps/part-000002.parquet (12 bytes, row count unknown) cannot be read" in caplog.text
    assert "the other chunks hold the rows of all 10 steps before the checkpoint" in caplog.text
    assert list(read_run(tmp_path).steps["step"]) == list(range(10))


def test_truncate_damaged_evals_chunk_kept_as_lost(tmp_path, caplog):
    write_chunks(tmp_path, [range(0, 16)])
    write_chunks(tmp_path, [[0], [4], [8], [12], [16]], table="evals")
    damaged = tmp_path / "evals" / "part-000002.parquet"  # step 8, before the checkpoint
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="stabilitylab.train.resume"):
        dropped = resume.truncate_tables(tmp_path, step=12, has_checkpoint=True, layers_per_step=0)
    assert damaged.exists()  # left in place, so readers of the run see the gap
    assert dropped["evals"] == 1  # step 16
    assert "contains evals rows after step 4 and before step 12" in caplog.text
    assert "all at or before step 12, which the checkpoint covers" in caplog.text
    assert "cannot be measured again, so the evals table lacks them" in caplog.text
    assert "after the checkpoint" not in caplog.text
    run = read_run(tmp_path)
    assert list(run.evals["step"]) == [0, 4, 12]
    assert "rows of steps 5 to 11 are missing from the table" in run.warnings[0]


def test_truncate_damaged_last_evals_chunk(tmp_path, caplog):
    write_chunks(tmp_path, [range(0, 12)])
    write_chunks(tmp_path, [[0], [4], [8], [12]], table="evals")
    damaged = tmp_path / "evals" / "part-000003.parquet"  # step 12, no later chunk bounds it
    damaged.write_bytes(b"PAR1 damaged")
    with caplog.at_level("WARNING", logger="stabilitylab.train.resume"):
        resume.truncate_tables(tmp_path, step=10, has_checkpoint=True, layers_per_step=0)
    assert damaged.exists()
    assert "evals rows after step 8" in caplog.text
    assert "Any of them at or before step 10, which the checkpoint covers" in caplog.text
    assert "the evals table may lack them" in caplog.text


def test_truncate_damaged_evals_after_checkpoint(tmp_path, caplog):
    write_chunks(tmp_path, [range(0, 12)])
    write_chunks(tmp_path, [[0], [4], [8], [12]], table="evals")
    damaged = tmp_path / "evals" / "part-000003.parquet"
    damaged.write_bytes(b"PAR1 damaged")
    with caplog.at_level("WARNING", logger="stabilitylab.train.resume"):
        resume.truncate_tables(tmp_path, step=8, has_checkpoint=True, layers_per_step=0)
    assert not damaged.exists()
    assert "its rows lie after step 8, after the checkpoint at step 8" in caplog.text
    assert list(read_run(tmp_path).evals["step"]) == [0, 4, 8]


def test_truncate_missing_rows_rejected(tmp_path):
    write_chunks(tmp_path, [range(0, 5), range(6, 10)])
    with pytest.raises(RunDirError, match="contains 7 rows for the 8 steps") as error:
        resume.truncate_tables(tmp_path, step=8, has_checkpoint=True, layers_per_step=0)
    assert "the rows of step 5 are missing" in str(error.value)
    assert "move checkpoint.pt and any checkpoint-NNNNNN.pt out of" in str(error.value)
    assert "Pass --overwrite to train" not in str(error.value)


def test_reader_truncated_last_chunk(tmp_path):
    write_chunks(tmp_path, [range(0, 5), range(5, 10), range(10, 15)])
    last = tmp_path / "steps" / "part-000002.parquet"
    size = last.stat().st_size
    last.write_bytes(last.read_bytes()[: size // 2])
    run = read_run(tmp_path)
    assert list(run.steps["step"]) == list(range(10))
    assert len(run.warnings) == 1
    assert "dropped the damaged last chunk steps/part-000002.parquet" in run.warnings[0]
    assert f"({size // 2} bytes, row count unknown)" in run.warnings[0]
    assert "the table ends at step 9" in run.warnings[0]


def test_reader_damaged_middle_chunk(tmp_path):
    write_chunks(tmp_path, [range(0, 5), range(5, 10), range(10, 15)])
    (tmp_path / "steps" / "part-000001.parquet").write_bytes(b"PAR1 damaged")
    run = read_run(tmp_path)
    assert list(run.steps["step"]) == [*range(5), *range(10, 15)]
    assert len(run.warnings) == 1
    assert "rows of steps 5 to 9 are missing from the table" in run.warnings[0]


def test_reader_truncated_status(tmp_path):
    write_chunks(tmp_path, [range(0, 5)])
    (tmp_path / "status.json").write_text('{"state": "runn')
    run = read_run(tmp_path)
    assert run.status == {"state": "unknown"}
    assert "in 15 bytes" in run.warnings[0]
    assert "its contents are ignored" in run.warnings[0]


def test_resume_help_lists_mutable_options():
    actions = build_parser().commands["run"]._actions
    help_text = next(action.help for action in actions if action.dest == "resume")
    for field in resume.MUTABLE_FIELDS:
        assert f"--{field.replace('_', '-')}" in help_text
    assert "--keep-checkpoints-every" in help_text
