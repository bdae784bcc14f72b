"""The run-directory writer and reader: atomic chunks, refusal to mix runs, damaged files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stabilitylab.errors import RunDirError
from stabilitylab.runs import TABLE_COLUMNS, RunWriter, prepare_run_dir, read_run


def _steps_frame(steps):
    return pd.DataFrame(
        {name: [float(s) for s in steps] for name in TABLE_COLUMNS["steps"]}
    ).astype({"step": "int64"})


def _write_run(path, chunks=2):
    prepare_run_dir(path)
    writer = RunWriter(path)
    writer.write_config({"freeze_patch_embed": False}, {"layers": []}, {})
    writer.write_status("running", step=0)
    for index in range(chunks):
        writer.append("steps", _steps_frame(range(index * 5, index * 5 + 5)))
    return writer


def test_chunks_read_back_in_order(tmp_path):
    _write_run(tmp_path / "run", chunks=3)
    run = read_run(tmp_path / "run")
    assert list(run.steps["step"]) == list(range(15))
    assert run.layers.empty
    assert run.status["state"] == "running"
    assert run.arm == "learned"


def test_append_rejects_wrong_columns(tmp_path):
    writer = _write_run(tmp_path / "run")
    with pytest.raises(ValueError, match="columns"):
        writer.append("steps", pd.DataFrame({"step": [1]}))


def test_damaged_chunk_skipped_with_warning(tmp_path):
    _write_run(tmp_path / "run", chunks=2)
    (tmp_path / "run" / "steps" / "part-000001.parquet").write_bytes(b"PAR1 not really")
    run = read_run(tmp_path / "run")
    assert list(run.steps["step"]) == list(range(5))
    assert len(run.warnings) == 1
    assert "part-000001.parquet" in run.warnings[0]


def test_chunks_of_different_column_types_combine(tmp_path):
    # Layer names in one chunk, numbers in another (as a hand-edited run has), and an int
    # column that a later chunk stores as float: Arrow cannot merge them, pandas can.
    writer = _write_run(tmp_path / "run", chunks=0)
    columns = TABLE_COLUMNS["layers"]
    named = pd.DataFrame({name: [1.0, 2.0] for name in columns})
    named["step"] = [0, 0]
    named["layer"] = pd.Categorical(["patch_embed", "blocks.00"])
    numbered = named.copy()
    numbered["step"] = [1.0, 1.0]
    numbered["layer"] = [7, 8]
    writer.append("layers", named)
    writer.append("layers", numbered)
    layers = read_run(tmp_path / "run").layers
    assert list(layers["step"]) == [0, 0, 1, 1]
    assert list(layers["layer"]) == ["patch_embed", "blocks.00", 7, 8]


def test_damaged_config_named(tmp_path):
    _write_run(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text('{"format_version": 1, "con')
    with pytest.raises(RunDirError, match="config.json is not valid JSON"):
        read_run(tmp_path / "run")


def test_existing_run_needs_overwrite(tmp_path):
    _write_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="already contains files"):
        prepare_run_dir(tmp_path / "run")
    prepare_run_dir(tmp_path / "run", overwrite=True)
    assert list((tmp_path / "run").iterdir()) == []


def test_overwrite_keeps_foreign_files(tmp_path):
    _write_run(tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt"):
        prepare_run_dir(tmp_path / "run", overwrite=True)
    # Nothing was removed before the refusal.
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["format_version"] == 1
    assert len(list((tmp_path / "run" / "steps").iterdir())) == 2


def test_overwrite_removes_report_inside_run(tmp_path):
    _write_run(tmp_path / "run")
    report = tmp_path / "run" / "report"
    report.mkdir()
    (report / "report.html").write_text("<html></html>")
    (report / "knn_top1.png").write_bytes(b"png")
    (report / "events.json").write_text('{"detector_params": {}, "runs": []}')
    prepare_run_dir(tmp_path / "run", overwrite=True)
    assert list((tmp_path / "run").iterdir()) == []


def test_overwrite_keeps_user_file_in_table(tmp_path):
    _write_run(tmp_path / "run")
    (tmp_path / "run" / "steps" / "mynotes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="steps/mynotes.txt"):
        prepare_run_dir(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "steps" / "mynotes.txt").read_text() == "mine"
    assert len(list((tmp_path / "run" / "steps").glob("part-*.parquet"))) == 2


def test_overwrite_never_follows_symlink(tmp_path):
    _write_run(tmp_path / "run")
    precious = tmp_path / "userdata"
    precious.mkdir()
    (precious / "p.txt").write_text("precious")
    (tmp_path / "run" / "evals").rmdir()
    (tmp_path / "run" / "evals").symlink_to(precious)
    with pytest.raises(RunDirError, match="contains evals, which stabilitylab did not write"):
        prepare_run_dir(tmp_path / "run", overwrite=True)
    assert (precious / "p.txt").read_text() == "precious"
    assert (tmp_path / "run" / "config.json").is_file()


def test_overwrite_keeps_user_file_in_report(tmp_path):
    _write_run(tmp_path / "run")
    report = tmp_path / "run" / "report"
    report.mkdir()
    (report / "events.json").write_text('{"detector_params": {}, "runs": []}')
    (report / "my-notes.md").write_text("# notes")
    with pytest.raises(RunDirError, match="report/my-notes.md"):
        prepare_run_dir(tmp_path / "run", overwrite=True)
    assert (report / "my-notes.md").read_text() == "# notes"


def test_overwrite_keeps_folder_named_report(tmp_path):
    _write_run(tmp_path / "run")
    report = tmp_path / "run" / "report"
    report.mkdir()
    (report / "summary.md").write_text("mine, no events.json")
    with pytest.raises(RunDirError, match="contains report, which"):
        prepare_run_dir(tmp_path / "run", overwrite=True)
    assert (report / "summary.md").is_file()


def test_out_that_is_a_file_rejected(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_run_dir(target, overwrite=True)
    assert target.read_text() == "x"


def test_foreign_config_json_not_a_run(tmp_path):
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / "config.json").write_text('{"name": "my webapp"}')
    with pytest.raises(RunDirError, match="not a run directory"):
        prepare_run_dir(folder, overwrite=True)
    assert (folder / "config.json").read_text() == '{"name": "my webapp"}'


def test_damaged_status_is_a_warning(tmp_path):
    _write_run(tmp_path / "run")
    (tmp_path / "run" / "status.json").write_bytes(b"\xff\xfe garbage")
    run = read_run(tmp_path / "run")
    assert run.status == {"state": "unknown"}
    assert any("status.json" in warning for warning in run.warnings)
    assert len(run.steps) == 10


def test_status_without_text_state_is_a_warning(tmp_path):
    _write_run(tmp_path / "run")
    (tmp_path / "run" / "status.json").write_text('{"state": 5}')
    run = read_run(tmp_path / "run")
    assert run.status == {"state": "unknown"}
    assert any("no text state" in warning for warning in run.warnings)
