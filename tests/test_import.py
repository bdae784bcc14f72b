"""stabilitylab import and run --tensorboard: readers, mapping, tables, report and errors."""

from __future__ import annotations

import json
import shutil
import signal
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_RUN_ARGS
from torch.utils.tensorboard import SummaryWriter

from stabilitylab import cli
from stabilitylab.errors import ConfigError, DataError, RunDirError
from stabilitylab.importers import FORMATS, import_run
from stabilitylab.importers.mapping import parse_map_option
from stabilitylab.importers.signals import layer_order_key, parameter_group
from stabilitylab.models.layers import group_order_key, vit_layer_groups
from stabilitylab.report import write_report
from stabilitylab.runs import TABLE_COLUMNS, prepare_run_dir, read_run
from stabilitylab.train.tensorboard import check_tensorboard

# -- sources written by the tests --------------------------------------------------------

PARAMETERS = {
    "patch_embed": "model.backbone.patch_embed.proj.weight",
    "blocks.00": "model.backbone.blocks.0.attn.qkv.weight",
    "blocks.00 mlp": "model.backbone.blocks.0.mlp.fc1.weight",
    "blocks.01": "model.backbone.blocks.1.attn.qkv.weight",
}


def gradient_norms(steps: int, spike_step: int | None = None) -> pd.DataFrame:
    """Per-parameter gradient norms near 1, multiplied by 30 at ``spike_step`` in the first
    layer and 5 steps later in the last block, like a spike that spreads up the network."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {name: 1.0 + rng.normal(0, 0.03, steps) for name in PARAMETERS.values()},
        index=pd.RangeIndex(steps, name="step"),
    )
    if spike_step is not None:
        frame.loc[spike_step, PARAMETERS["patch_embed"]] *= 30
        frame.loc[spike_step + 5, PARAMETERS["blocks.01"]] *= 30
    return frame


def write_tensorboard(folder, steps=60, new_style=False):
    writer = SummaryWriter(log_dir=str(folder))
    norms = gradient_norms(steps)
    for step in range(steps):
        writer.add_scalar("train/loss", 5.0 - 0.01 * step, step, new_style=new_style)
        writer.add_scalar("lr-AdamW", 1e-3, step, new_style=new_style)
        for name, value in norms.loc[step].items():
            writer.add_scalar(f"grad_2.0_norm/{name}", value, step, new_style=new_style)
        if step % 10 == 0:
            writer.add_scalar("val/knn_acc", 0.5 + step / 1000, step, new_style=new_style)
    writer.add_histogram("weights", np.arange(10.0), 0)
    writer.close()
    return norms


def lightning_metrics(steps=200, spike_step=None) -> pd.DataFrame:
    """A CSVLogger table: a training row per step and a validation row every 20 steps."""
    norms = gradient_norms(steps, spike_step)
    train = pd.DataFrame(
        {
            "epoch": np.arange(steps) // 50,
            "step": np.arange(steps),
            "train_loss_step": 5.0 - 0.01 * np.arange(steps),
            "lr-AdamW": 1e-3,
            **{f"grad_2.0_norm/{name}": norms[name].to_numpy() for name in PARAMETERS.values()},
        }
    )
    evals = np.arange(19, steps, 20)
    val = pd.DataFrame(
        {"epoch": evals // 50, "step": evals, "val/knn_acc": 40.0 + 0.1 * evals, "val_loss": 4.0}
    )
    frame = pd.concat([train, val]).sort_values("step", kind="stable")
    return frame[["epoch", "step", *[c for c in frame.columns if c not in ("epoch", "step")]]]


def write_lightning(root, frame, version="version_0"):
    folder = root / "lightning_logs" / version
    folder.mkdir(parents=True)
    frame.to_csv(folder / "metrics.csv", index=False)
    (folder / "hparams.yaml").write_text("lr: 0.001\nbatch_size: 256\n")
    return root / "lightning_logs"


def wandb_history(steps=200, spike_step=None) -> pd.DataFrame:
    """A History export of a Lightning run logged with WandbLogger: _step counts log calls."""
    rng = np.random.default_rng(1)
    loss = 5.0 - 0.005 * np.arange(steps) + rng.normal(0, 0.01, steps)
    if spike_step is not None:
        loss[spike_step] *= 3
    train = pd.DataFrame(
        {
            "trainer/global_step": np.arange(steps),
            "train/loss": loss,
            "_runtime": 0.5 * np.arange(steps),
            "_timestamp": 1.7e9 + 0.5 * np.arange(steps),
        }
    )
    evals = np.arange(0, steps, 25)
    val = pd.DataFrame({"trainer/global_step": evals, "knn/acc1": 30.0 + 0.2 * evals})
    frame = pd.concat([train, val]).sort_values("trainer/global_step", kind="stable")
    frame.insert(0, "_step", np.arange(len(frame)))
    return frame


def imported(run_dir):
    return json.loads((run_dir / "config.json").read_text())["derived"]["import"]


def events_of(run_dir):
    return json.loads((run_dir / "report" / "events.json").read_text())["runs"][0]


# -- TensorBoard ---------------------------------------------------------------------------


def test_tensorboard_scalars_imported(tmp_path):
    norms = write_tensorboard(tmp_path / "tb")
    result = import_run(tmp_path / "tb", tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert result.format == "tensorboard"
    assert run.config == {"source": "import", "freeze_patch_embed": False}
    assert run.finished
    assert run.layer_names == ["patch_embed", "blocks.00", "blocks.01"]
    assert np.allclose(run.steps["loss"], 5.0 - 0.01 * np.arange(60), rtol=1e-6)
    assert np.allclose(run.steps["lr"], 1e-3, rtol=1e-6)
    block = run.layers[run.layers["layer"] == "blocks.00"]["grad_norm"].to_numpy()
    expected = np.hypot(norms[PARAMETERS["blocks.00"]], norms[PARAMETERS["blocks.00 mlp"]])
    assert np.allclose(block, expected, rtol=1e-6)
    # Fractions in [0, 1] are stored in percent.
    assert np.allclose(run.evals["knn_top1"], 50.0 + np.arange(0, 60, 10) / 10, rtol=1e-6)
    summary = imported(tmp_path / "run")
    assert summary["mapping"]["knn_top1"]["unit"] == "fraction"
    assert summary["mapping"]["grad_norm[blocks.00]"]["origin"] == "parameter norms"
    assert summary["ignored_columns"]["weights"] == "histograms, not scalars"
    assert summary["arm_from"] == "default"


def test_tensorboard_tensor_scalars(tmp_path):
    write_tensorboard(tmp_path / "tb", steps=30, new_style=True)
    run = read_run(import_run(tmp_path / "tb", tmp_path / "run").run_dir)
    assert np.allclose(run.steps["loss"], 5.0 - 0.01 * np.arange(30), rtol=1e-6)
    assert len(run.evals) == 3


def test_tensorboard_several_runs_rejected(tmp_path):
    write_tensorboard(tmp_path / "logs" / "a", steps=5)
    write_tensorboard(tmp_path / "logs" / "b", steps=5)
    with pytest.raises(DataError, match="contains the event files of 2 runs"):
        import_run(tmp_path / "logs", tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """A one-epoch tiny run through the CLI with the bare --tensorboard flag."""
    out = tmp_path_factory.mktemp("tensorboard") / "run"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        status = cli.main(
            [
                "run",
                "--out",
                str(out),
                *TINY_RUN_ARGS,
                "--epochs=1",
                "--knn-max-bank=256",
                "--knn-max-query=128",
                "--tensorboard",
                "--quiet",
            ]
        )
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert status == 0
    return out


def test_run_tensorboard_round_trip(tensorboard_run, tmp_path):
    assert json.loads((tensorboard_run / "config.json").read_text())["config"]["tensorboard"] == (
        "tensorboard"
    )
    result = import_run(tensorboard_run / "tensorboard", tmp_path / "imported")
    native, copy = read_run(tensorboard_run), read_run(result.run_dir)
    assert result.unknown_columns == []
    assert copy.layer_names == native.layer_names
    for table in ("steps", "layers", "evals", "dense_knn"):
        original, restored = getattr(native, table), getattr(copy, table)
        assert len(restored) == len(original), table
        assert restored["step"].tolist() == original["step"].tolist(), table
        for column in original.columns.drop(["step", "layer", "knn_correct"], errors="ignore"):
            expected = original[column].to_numpy(dtype="float64")
            actual = restored[column].to_numpy(dtype="float64")
            assert np.allclose(actual, expected, rtol=1e-6, equal_nan=True), (table, column)
    layers = [str(name) for name in copy.layers["layer"]]
    assert layers == [str(name) for name in native.layers["layer"]]


def test_run_tensorboard_overwrite(tensorboard_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tensorboard_run, copy)
    prepare_run_dir(copy, overwrite=True)
    assert list(copy.iterdir()) == []


def test_tensorboard_writer_round_trip(tmp_path):
    from stabilitylab.train.tensorboard import TensorBoardRunWriter

    writer = TensorBoardRunWriter(tmp_path / "run", tmp_path / "run" / "tensorboard")
    steps = pd.DataFrame({column: np.nan for column in TABLE_COLUMNS["steps"]}, index=range(3))
    steps["step"] = [0, 1, 2]
    steps["loss"] = [3.0, np.nan, 1.0]
    layers = pd.DataFrame(
        {
            "step": [0, 0, 1, 1],
            "layer": ["patch_embed", "blocks.00"] * 2,
            "grad_norm": [np.nan, 2.0, np.nan, 4.0],
            "weight_norm": [1.0, 1.5, 1.0, 1.5],
            "update_ratio": [np.nan, 0.1, np.nan, 0.2],
        }
    )
    writer.append("steps", steps)
    writer.append("layers", layers)
    writer.close()
    run = read_run(import_run(tmp_path / "run" / "tensorboard", tmp_path / "copy").run_dir)
    # A NaN is not written, so the loss of step 1 and the patch_embed gradient are missing.
    assert run.steps["step"].tolist() == [0, 1, 2]
    assert run.steps["loss"].tolist()[::2] == [3.0, 1.0]
    assert np.isnan(run.steps["loss"][1])
    assert run.layers["grad_norm"].tolist()[1::2] == [2.0, 4.0]
    assert run.layers["weight_norm"].tolist() == [1.0, 1.5, 1.0, 1.5]
    assert "grad_norm[patch_embed]" in imported(tmp_path / "copy")["missing"]


def test_tensorboard_dir_with_events_rejected(tmp_path):
    write_tensorboard(tmp_path / "shared", steps=2)
    with pytest.raises(ConfigError, match="already contains event files"):
        check_tensorboard(str(tmp_path / "shared"), tmp_path / "run")


def test_tensorboard_path_under_file_rejected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="because .*file is a file, not a folder"):
        check_tensorboard(str(tmp_path / "file" / "sub"), tmp_path / "run")


def test_cli_run_tensorboard_under_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        status = cli.main(
            [
                "run",
                "--out",
                str(out),
                *TINY_RUN_ARGS,
                "--tensorboard",
                str(tmp_path / "file" / "sub"),
            ]
        )
    finally:
        signal.signal(signal.SIGTERM, handler)
    error = capsys.readouterr().err
    assert status == 2
    assert "is a file, not a folder" in error
    assert len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_empty_table_folders_count_as_empty(tmp_path):
    out = tmp_path / "run"
    for table in TABLE_COLUMNS:
        (out / table).mkdir(parents=True)
    assert prepare_run_dir(out) == out
    (out / "steps" / "notes.txt").write_text("keep")
    with pytest.raises(RunDirError, match="already contains files"):
        prepare_run_dir(out)


def test_tensorboard_package_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard.writer", None)
    with pytest.raises(ConfigError, match=r"stabilitylab\[tensorboard\]"):
        check_tensorboard("tensorboard", tmp_path / "run")
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing", None)
    (tmp_path / "tb").mkdir()
    with pytest.raises(ConfigError, match=r"stabilitylab\[tensorboard\]"):
        import_run(tmp_path / "tb", tmp_path / "out", format="tensorboard")


# -- CSV formats ---------------------------------------------------------------------------


def test_lightning_interleaved_rows(tmp_path):
    source = write_lightning(tmp_path, lightning_metrics(steps=100))
    result = import_run(source, tmp_path / "run")
    run = read_run(result.run_dir)
    assert result.format == "lightning-csv"
    assert run.steps["step"].tolist() == list(range(100))
    assert run.evals["step"].tolist() == list(range(19, 100, 20))
    assert np.allclose(run.evals["knn_top1"], 40.0 + 0.1 * np.arange(19, 100, 20))
    # The evaluations' epoch comes from the training rows of the same step.
    assert run.evals["epoch"].tolist() == [0, 0, 1, 1, 1]
    summary = imported(result.run_dir)
    assert summary["hparams"] == {"lr": 0.001, "batch_size": 256}
    assert summary["mapping"]["loss"]["columns"] == ["train_loss_step"]
    assert summary["unknown_columns"] == ["val_loss"]
    assert summary["derived_columns"] == {"evals.epoch": "the steps table's epoch at the same step"}


def test_lightning_several_versions_rejected(tmp_path):
    write_lightning(tmp_path, lightning_metrics(steps=5), "version_0")
    write_lightning(tmp_path, lightning_metrics(steps=5), "version_1")
    with pytest.raises(DataError, match="contains 2 runs"):
        import_run(tmp_path / "lightning_logs", tmp_path / "run")


def test_lightning_save_dir_one_run(tmp_path):
    write_lightning(tmp_path / "logs", lightning_metrics(steps=10))
    result = import_run(tmp_path / "logs", tmp_path / "run")
    assert result.format == "lightning-csv"
    assert read_run(result.run_dir).steps["step"].tolist() == list(range(10))


def test_lightning_save_dir_several_runs_rejected(tmp_path):
    write_lightning(tmp_path / "logs", lightning_metrics(steps=5), "version_0")
    write_lightning(tmp_path / "logs", lightning_metrics(steps=5), "version_1")
    with pytest.raises(DataError, match="contains 2 runs .*version_0.*version_1"):
        import_run(tmp_path / "logs", tmp_path / "run")


def test_lightning_epoch_repeats_not_logged(tmp_path, caplog):
    source = write_lightning(tmp_path, lightning_metrics(steps=40))
    with caplog.at_level("INFO", logger="stabilitylab.importers"):
        import_run(source, tmp_path / "run")
    assert "more than once" not in caplog.text


def test_wandb_history_export(tmp_path):
    wandb_history(steps=50).to_csv(tmp_path / "history.csv", index=False)
    result = import_run(tmp_path / "history.csv", tmp_path / "run")
    run = read_run(result.run_dir)
    summary = imported(result.run_dir)
    assert result.format == "wandb-csv"
    assert summary["step_column"] == "trainer/global_step"
    assert run.steps["step"].tolist() == list(range(50))
    assert np.allclose(run.steps["wall_time"], 0.5 * np.arange(50))
    # Values above 1 are percent already.
    assert np.allclose(run.evals["knn_top1"], [30.0, 35.0])
    assert summary["mapping"]["knn_top1"]["unit"] == "percent"
    assert "_step" in summary["ignored_columns"]
    assert "_timestamp" in summary["ignored_columns"]


def test_wandb_chart_export(tmp_path):
    frame = pd.DataFrame(
        {
            "Step": [0, 1, 2],
            "run-a - train/loss": [3.0, 2.0, 1.0],
            "run-a - train/loss__MIN": [2.9, 1.9, 0.9],
            "run-a - train/loss__MAX": [3.1, 2.1, 1.1],
        }
    )
    frame.to_csv(tmp_path / "chart.csv", index=False)
    run = read_run(import_run(tmp_path / "chart.csv", tmp_path / "run").run_dir)
    assert run.steps["loss"].tolist() == [3.0, 2.0, 1.0]
    assert "run-a - train/loss__MIN" in imported(tmp_path / "run")["ignored_columns"]


# -- mapping -------------------------------------------------------------------------------


def test_map_overrides_alias(tmp_path):
    frame = pd.DataFrame({"step": [0, 1, 2], "loss": [1.0, 2.0, 3.0], "objective": [4.0, 5.0, 6.0]})
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    run_dir = import_run(tmp_path / "metrics.csv", tmp_path / "run", mapping=["objective=loss"])
    run = read_run(run_dir.run_dir)
    assert run.steps["loss"].tolist() == [4.0, 5.0, 6.0]
    assert imported(run.path)["unused_columns"] == {"loss": "loss is set by --map"}


def test_map_accuracy_units(tmp_path):
    frame = pd.DataFrame({"step": [0, 10], "loss": [1.0, 1.0], "acc": [0.5, 0.8]})
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    percent = import_run(tmp_path / "metrics.csv", tmp_path / "a", mapping=["acc=knn_top1:percent"])
    fraction = import_run(tmp_path / "metrics.csv", tmp_path / "b", mapping=["acc=knn_top1"])
    assert read_run(percent.run_dir).evals["knn_top1"].tolist() == [0.5, 0.8]
    assert read_run(fraction.run_dir).evals["knn_top1"].tolist() == [50.0, 80.0]


def test_accuracy_out_of_range_rejected(tmp_path):
    frame = pd.DataFrame({"step": [0, 10], "knn_top1": [50.0, 130.0]})
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(DataError, match="outside 0 to 100"):
        import_run(tmp_path / "metrics.csv", tmp_path / "run")


def test_map_option_parsing():
    option = parse_map_option("a=b=grad_norm[blocks.3]")
    assert option.column == "a=b"
    assert option.target.name == "grad_norm[blocks.03]"
    with pytest.raises(ConfigError, match="not a layer group"):
        parse_map_option("x=grad_norm[head]")
    with pytest.raises(ConfigError, match="is not one of"):
        parse_map_option("x=knn_top1:ratio")


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("backbone.patch_embed.proj.bias", "patch_embed"),
        ("module.encoder.blocks.11.mlp.fc2.weight", "blocks.11"),
        ("cls_token", "cls_token"),
        ("backbone.norm.weight", "norm"),
        ("projection_head.layers.0.weight", "projector"),
        ("predictor.0.weight", "predictor"),
        ("momentum_backbone.blocks.0.attn.qkv.weight", None),
        ("head.weight", None),
    ],
)
def test_parameter_group_names(name, group):
    assert parameter_group(name) == group


def test_layer_order_matches_models():
    groups = vit_layer_groups(12)
    assert sorted(groups, key=layer_order_key) == sorted(groups, key=group_order_key)


def test_pairing_ignores_tensorboard_folder(tmp_path):
    from stabilitylab.report.summary import pairing_key
    from stabilitylab.runs import Run, empty_table

    def run(name, config):
        tables = {table: empty_table(table) for table in ("steps", "layers", "evals")}
        return Run(tmp_path / name, config, {}, {}, {"state": "finished"}, **tables)

    learned = run("a", {"seed": 0, "lr": 1e-3, "tensorboard": "/logs/a"})
    frozen = run("b", {"seed": 0, "lr": 1e-3, "tensorboard": None, "freeze_patch_embed": True})
    assert pairing_key(learned) == pairing_key(frozen)


def test_cli_formats_match_library():
    assert cli.IMPORT_FORMATS == FORMATS


# -- what is missing, and the report -------------------------------------------------------


def test_missing_signals_reported(tmp_path):
    source = write_lightning(tmp_path, lightning_metrics(steps=40))
    run = read_run(import_run(source, tmp_path / "run", frozen=True).run_dir)
    summary = imported(run.path)
    for signal_name in ("momentum", "token_grad_norm", "knn_top5", "weight_norm[LAYER]"):
        assert signal_name in summary["missing"], signal_name
    assert "loss" not in summary["missing"]
    assert run.steps["token_grad_norm"].isna().all()
    assert run.frozen
    assert summary["arm_from"] == "--frozen"


def test_report_finds_planted_grad_spike(tmp_path):
    source = write_lightning(tmp_path, lightning_metrics(steps=200, spike_step=150))
    run_dir = import_run(source, tmp_path / "run").run_dir
    write_report([run_dir])
    events = events_of(run_dir)
    first = [event["peak_step"] for event in events["spikes"]["grad_norm[patch_embed]"]]
    last = [event["peak_step"] for event in events["spikes"]["grad_norm[blocks.01]"]]
    assert first == [150]
    assert last == [155]
    assert events["first_layer"] == "grad_norm[patch_embed]"
    assert events["lag"]["delays"] == [5]


def test_report_finds_planted_loss_spike(tmp_path):
    wandb_history(steps=200, spike_step=160).to_csv(tmp_path / "history.csv", index=False)
    run_dir = import_run(tmp_path / "history.csv", tmp_path / "run").run_dir
    write_report([run_dir])
    events = events_of(run_dir)
    assert [event["peak_step"] for event in events["spikes"]["loss"]] == [160]
    # Steps where only an evaluation was logged have no loss, which is not a divergence.
    assert events["verdict"]["verdict"] != "diverged"


def test_logged_nan_loss_is_divergence(tmp_path):
    # An empty cell is a step without a loss; "nan" is a loss that the run logged as NaN.
    (tmp_path / "metrics.csv").write_text(
        "step,loss,knn_top1\n0,1.0,10.0\n1,1.1,\n2,,12.0\n3,nan,\n"
    )
    run_dir = import_run(tmp_path / "metrics.csv", tmp_path / "run").run_dir
    write_report([run_dir])
    assert imported(run_dir)["nonfinite_loss_step"] == 3
    assert events_of(run_dir)["verdict"]["verdict"] == "diverged"


def test_one_nonfinite_loss_is_skipped_step(tmp_path):
    rows = [f"{step},{'inf' if step == 5 else 1.0 - 0.01 * step}," for step in range(10)]
    rows[9] = "9,0.91,30.0"
    (tmp_path / "metrics.csv").write_text("step,loss,knn_top1\n" + "\n".join(rows) + "\n")
    run_dir = import_run(tmp_path / "metrics.csv", tmp_path / "run").run_dir
    write_report([run_dir])
    summary = imported(run_dir)
    assert summary["nonfinite_loss_step"] is None
    assert summary["transient_nonfinite_loss_steps"] == [5]
    assert read_run(run_dir).status["skipped_steps"] == [5]
    assert events_of(run_dir)["verdict"]["verdict"] != "diverged"


def test_loss_nonfinite_to_the_end_is_divergence(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "step,loss,knn_top1\n0,1.0,10.0\n1,nan,\n2,0.9,\n3,inf,\n4,nan,11.0\n"
    )
    run_dir = import_run(tmp_path / "metrics.csv", tmp_path / "run").run_dir
    summary = imported(run_dir)
    assert summary["nonfinite_loss_step"] == 3
    assert summary["transient_nonfinite_loss_steps"] == [1]


def text_cell_metrics(path):
    frame = lightning_metrics(steps=40).astype(object)
    frame.loc[frame["step"] == 5, "train_loss_step"] = "n/a"
    frame.to_csv(path, index=False)
    return path


def test_text_cell_in_signal_column_rejected(tmp_path):
    source = text_cell_metrics(tmp_path / "metrics.csv")
    with pytest.raises(
        DataError, match=r"'train_loss_step' contains the text 'n/a' at line \d+ \(step 5\)"
    ):
        import_run(source, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_text_cell_read_as_missing(tmp_path, caplog):
    source = text_cell_metrics(tmp_path / "metrics.csv")
    with caplog.at_level("WARNING", logger="stabilitylab.importers"):
        run_dir = import_run(source, tmp_path / "run", text_as_nan=True).run_dir
    run = read_run(run_dir)
    loss = run.steps.set_index("step")["loss"]
    assert np.isnan(loss[5])
    assert loss.drop(5).notna().all()
    assert imported(run_dir)["text_cells"]["train_loss_step"]["count"] == 1
    assert imported(run_dir)["nonfinite_loss_step"] is None
    assert "read its 1 text cell(s) as missing values" in caplog.text


def test_text_only_alias_column_warned(tmp_path, caplog):
    (tmp_path / "metrics.csv").write_text("step,loss,grad_norm\n0,1.0,n/a\n1,0.9,n/a\n")
    with caplog.at_level("WARNING", logger="stabilitylab.importers"):
        import_run(tmp_path / "metrics.csv", tmp_path / "run")
    assert "contain only text, not numbers, so they are not imported: grad_norm" in caplog.text
    assert "no column of numbers for" in caplog.text


# -- errors --------------------------------------------------------------------------------


def test_source_without_signals_rejected(tmp_path):
    pd.DataFrame({"step": [0, 1], "throughput": [3.0, 4.0]}).to_csv(
        tmp_path / "metrics.csv", index=False
    )
    with pytest.raises(DataError, match="no loss, gradient norm or kNN accuracy.*throughput"):
        import_run(tmp_path / "metrics.csv", tmp_path / "run")


def _write_error_sources(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    pd.DataFrame({"iteration": [0, 1], "loss": [1.0, 2.0]}).to_csv(
        tmp_path / "nostep.csv", index=False
    )
    pd.DataFrame({"step": [0, 1], "loss": [1.0, 2.0]}).to_csv(tmp_path / "ok.csv", index=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    (tmp_path / "semicolon.csv").write_text("step;loss\n0;1.0\n1;2.0\n")
    (tmp_path / "file").write_text("x")


@pytest.mark.parametrize(
    ("source", "extra", "expected"),
    [
        ("absent.csv", [], "absent.csv does not exist"),
        ("ok.csv", ["--format", "parquet"], "invalid choice: 'parquet'"),
        ("empty.csv", [], "empty.csv is empty"),
        ("nostep.csv", [], "has no step column"),
        ("nostep.csv", ["--format", "lightning-csv"], "has no step column 'step'"),
        ("ok.csv", ["--map", "val_acc=knn_top1"], "has no column 'val_acc'"),
        ("ok.csv", ["--map", "loss=knn_top9"], "'knn_top9' is not a signal name"),
        ("semicolon.csv", [], "contains semicolons: save the file with commas"),
        ("ok.csv", ["--out-parent-file"], "because {tmp}/file is a file, not a folder"),
        ("ok.csv", ["--out-not-run", "--overwrite"], "so it is not a run directory"),
    ],
)
def test_cli_import_rejects_bad_input(tmp_path, capsys, source, extra, expected):
    _write_error_sources(tmp_path)
    out = tmp_path / "run"
    if "--out-parent-file" in extra:
        out = tmp_path / "file" / "run"
    if "--out-not-run" in extra:
        out = tmp_path / "taken"
    extra = [option for option in extra if option not in ("--out-parent-file", "--out-not-run")]
    expected = expected.format(tmp=tmp_path)
    try:
        status = cli.main(["import", str(tmp_path / source), "--out", str(out), "--quiet", *extra])
    except SystemExit as exit:  # argparse rejects an invalid choice before main's handler
        status = exit.code
    error = capsys.readouterr().err
    assert status == 2
    assert expected in error
    assert len(error.strip().splitlines()) == 1
    assert "Traceback" not in error
    assert not out.exists() or out.name == "taken"


def test_cli_import_existing_out(tmp_path, capsys):
    _write_error_sources(tmp_path)
    taken = tmp_path / "taken"
    status = cli.main(["import", str(tmp_path / "ok.csv"), "--out", str(taken), "--quiet"])
    error = capsys.readouterr().err
    assert status == 2
    assert "already contains files" in error
    assert len(error.strip().splitlines()) == 1
    assert [path.name for path in taken.iterdir()] == ["notes.txt"]
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_cli_import_overwrite(tmp_path, capsys):
    _write_error_sources(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["import", str(tmp_path / "ok.csv"), "--out", str(out), "--quiet"]) == 0
    status = cli.main(
        ["import", str(tmp_path / "ok.csv"), "--out", str(out), "--overwrite", "--frozen"]
    )
    assert status == 0
    assert "imported 2 steps" in capsys.readouterr().out
    assert read_run(out).frozen


def test_import_unknown_format_rejected(tmp_path):
    _write_error_sources(tmp_path)
    with pytest.raises(ConfigError, match="--format 'parquet' is not one of"):
        import_run(tmp_path / "ok.csv", tmp_path / "run", format="parquet")


def test_import_existing_out_rejected(tmp_path):
    _write_error_sources(tmp_path)
    with pytest.raises(RunDirError, match="already contains files"):
        import_run(tmp_path / "ok.csv", tmp_path / "taken")


def test_accuracy_fraction_then_percent_warned(tmp_path, caplog):
    rows = [f"{step},1.0,{0.3 if step < 5 else 45.0}" for step in range(10)]
    (tmp_path / "metrics.csv").write_text("step,loss,knn_top1\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="stabilitylab.importers"):
        run_dir = import_run(tmp_path / "metrics.csv", tmp_path / "run").run_dir
    assert "5 of its 10 values lie in (0, 1]" in caplog.text
    assert imported(run_dir)["mapping"]["knn_top1"]["unit"] == "percent"


def test_damaged_event_file_reported(tmp_path):
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1.host").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="no event could be read"):
        import_run(tmp_path / "tb", tmp_path / "run")
