"""The dense kNN monitor: its feature queue, bootstrap standard errors, options and table."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from probes.bootstrap import bootstrap_accuracy_se
from probes.dense import FeatureQueue, queue_feature_std, queue_knn
from stabilitylab.cli import main
from stabilitylab.config import build_config, derive
from stabilitylab.data import build_data
from stabilitylab.detect import detect_run
from stabilitylab.errors import ConfigError
from stabilitylab.report import write_report
from stabilitylab.runs import TABLE_COLUMNS, RunWriter, prepare_run_dir, read_run
from stabilitylab.train.checkpoint import load_checkpoint
from stabilitylab.train.loop import Trainer, epoch_loader, run_training, seed_everything

# One epoch of 21 steps with a small kNN bank and query set keeps each run short.
DENSE_RUN = {
    "epochs": 1,
    "warmup_epochs": 0.5,
    "batch_size": 64,
    "proj_hidden_dim": 64,
    "proj_dim": 32,
    "eval_every": 10,
    "flush_every": 8,
    "checkpoint_every": 20,
    "knn_max_bank": 256,
    "knn_max_query": 128,
    "dense_knn_every": 4,
    "dense_knn_size": 160,
    "device": "cpu",
}


def _labelled_rows(labels):
    """Features whose row for label c is the unit vector along channel c."""
    return F.one_hot(torch.tensor(labels), num_classes=8).float() * 3.0, torch.tensor(labels)


# -- queue -------------------------------------------------------------------------------


def test_queue_push_in_order():
    queue = FeatureQueue(size=5, dim=8)
    queue.push(*_labelled_rows([0, 1, 2]))
    assert queue.filled == 3
    assert queue.position == 3
    assert queue.contents()[1].tolist() == [0, 1, 2]


def test_queue_wraps_around():
    queue = FeatureQueue(size=5, dim=8)
    queue.push(*_labelled_rows([0, 1, 2]))
    queue.push(*_labelled_rows([3, 4, 5, 6]))
    # Rows 3 and 4 fill the end, 5 and 6 overwrite the two oldest rows.
    assert queue.labels.tolist() == [5, 6, 2, 3, 4]
    assert queue.position == 2
    assert queue.filled == 5


def test_queue_batch_longer_than_queue():
    queue = FeatureQueue(size=4, dim=8)
    queue.push(*_labelled_rows([0]))
    queue.push(*_labelled_rows([1, 2, 3, 4, 5, 6]))
    # The ring continues after row 0, as if all six rows had been written one by one.
    assert queue.labels.tolist() == [4, 5, 6, 3]
    assert queue.position == 3
    assert queue.filled == 4


def test_queue_keeps_labels_with_features():
    queue = FeatureQueue(size=6, dim=8)
    for labels in ([3, 1], [7, 0, 5], [2, 6]):
        queue.push(*_labelled_rows(labels))
    features, labels = queue.contents()
    assert features.argmax(dim=1).tolist() == labels.tolist()


def test_queue_normalises_and_detaches():
    queue = FeatureQueue(size=4, dim=3)
    features = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    queue.push(features.to(torch.bfloat16), torch.tensor([0, 1]))
    stored, _ = queue.contents()
    assert stored.dtype == torch.float32
    assert not stored.requires_grad
    assert torch.allclose(stored.norm(dim=1), torch.ones(2), atol=1e-2)
    assert torch.allclose(stored[0], torch.tensor([0.6, 0.8, 0.0]), atol=1e-2)


def test_queue_rejects_wrong_dim():
    queue = FeatureQueue(size=4, dim=3)
    with pytest.raises(ValueError, match="dim 3"):
        queue.push(torch.ones(2, 5), torch.tensor([0, 1]))


def test_queue_rejects_label_count():
    queue = FeatureQueue(size=4, dim=3)
    with pytest.raises(ValueError, match="labels of shape"):
        queue.push(torch.ones(2, 3), torch.tensor([0, 1, 2]))


def test_queue_state_round_trip(tmp_path):
    queue = FeatureQueue(size=5, dim=8)
    queue.push(*_labelled_rows([0, 1, 2, 3, 4, 5, 6]))
    torch.save(queue.state_dict(), tmp_path / "queue.pt")
    restored = FeatureQueue(size=5, dim=8)
    restored.load_state_dict(torch.load(tmp_path / "queue.pt", weights_only=True))
    assert torch.equal(restored.features, queue.features)
    assert torch.equal(restored.labels, queue.labels)
    assert restored.position == queue.position
    assert restored.filled == queue.filled


def test_queue_state_size_mismatch():
    queue = FeatureQueue(size=5, dim=8)
    with pytest.raises(ValueError, match="this queue is"):
        FeatureQueue(size=4, dim=8).load_state_dict(queue.state_dict())


# -- evaluation --------------------------------------------------------------------------


def test_queue_knn_hand_made_queue():
    # Two class-0 rows near channel 0, one class-1 row on channel 1, one class-2 row on 2.
    queue = FeatureQueue(size=8, dim=3)
    queue.push(
        torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
        torch.tensor([0, 0, 1, 2]),
    )
    queries = F.normalize(torch.tensor([[1.0, 0.05, 0.0], [0.1, 1.0, 0.0], [0.0, 0.2, 1.0]]))
    result = queue_knn(queue, queries, torch.tensor([0, 1, 1]), num_classes=3, k=1)
    # The last query lies nearest the class-2 row, so it is the one miss.
    assert result.correct.tolist() == [True, True, False]
    assert result.top1 == pytest.approx(200 / 3)
    assert result.n_bank == 4
    assert result.n_query == 3


def test_queue_knn_uses_filled_rows_only():
    # Unfilled rows are zero vectors labelled -1; they must never be neighbours.
    queue = FeatureQueue(size=50, dim=3)
    queue.push(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([2]))
    result = queue_knn(queue, F.normalize(torch.ones(1, 3)), torch.tensor([2]), 3, k=20)
    assert result.n_bank == 1
    assert result.top1 == 100.0


def test_queue_knn_empty_raises():
    queue = FeatureQueue(size=4, dim=3)
    with pytest.raises(ValueError, match="queue is empty"):
        queue_knn(queue, torch.ones(1, 3), torch.tensor([0]), num_classes=2)


def test_queue_feature_std_collapsed():
    queue = FeatureQueue(size=4, dim=3)
    queue.push(torch.ones(4, 3), torch.zeros(4, dtype=torch.long))
    assert queue_feature_std(queue) == pytest.approx(0.0, abs=1e-7)


# -- bootstrap standard error ------------------------------------------------------------


def test_bootstrap_se_all_correct_is_zero():
    assert bootstrap_accuracy_se(torch.ones(300, dtype=torch.bool), seed=3) == 0.0


def test_bootstrap_se_all_wrong_is_zero():
    assert bootstrap_accuracy_se(torch.zeros(300, dtype=torch.bool), seed=3) == 0.0


def test_bootstrap_se_matches_binomial():
    count, accuracy = 10_000, 0.7
    correct = torch.arange(count) < int(accuracy * count)
    binomial = 100 * math.sqrt(accuracy * (1 - accuracy) / count)  # 0.458 points
    # 200 resamples estimate a standard deviation within about 5 %; 15 % is 3 of those.
    assert bootstrap_accuracy_se(correct, samples=200, seed=11) == pytest.approx(binomial, rel=0.15)


def test_bootstrap_se_chunked_matches_binomial():
    # 4 000 resamples of 2 000 queries exceed one index chunk, so several are drawn.
    count = 2_000
    correct = torch.arange(count) % 4 == 0
    binomial = 100 * math.sqrt(0.25 * 0.75 / count)
    assert bootstrap_accuracy_se(correct, samples=4_000, seed=5) == pytest.approx(
        binomial, rel=0.05
    )


def test_bootstrap_se_fixed_by_seed():
    correct = torch.arange(500) % 3 == 0
    first = bootstrap_accuracy_se(correct, seed=42)
    assert bootstrap_accuracy_se(correct, seed=42) == first
    assert bootstrap_accuracy_se(correct, seed=43) != first


def test_bootstrap_keeps_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    bootstrap_accuracy_se(torch.arange(100) % 2 == 0, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_bootstrap_rejects_one_sample():
    with pytest.raises(ValueError, match="at least 2 samples"):
        bootstrap_accuracy_se(torch.ones(10, dtype=torch.bool), samples=1)


def test_bootstrap_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_accuracy_se(torch.zeros(0, dtype=torch.bool))


# -- options -----------------------------------------------------------------------------


def test_option_every_negative(tiny_config):
    with pytest.raises(ConfigError, match=r"--dense-knn-every -1 is invalid"):
        tiny_config(dense_knn_every=-1)


def test_option_size_below_k(tiny_config):
    with pytest.raises(ConfigError, match=r"--dense-knn-size 5 is invalid.*--knn-k 20"):
        tiny_config(dense_knn_size=5)


def test_option_size_above_train_split(tiny_config):
    config = tiny_config(dense_knn_size=5000)
    with pytest.raises(ConfigError, match=r"--dense-knn-size 5000 is larger .*1347 images"):
        derive(config, train_size=1347, in_chans=1, num_classes=10)


def test_option_default_size_tenth_of_split(tiny_config):
    config = tiny_config(dense_knn_size=None)
    assert derive(config, 1347, 1, 10).dense_knn_size == 135
    assert derive(config, 100, 1, 10).dense_knn_size == 20  # at least knn_k


def test_option_off_has_no_queue(tiny_config):
    config = tiny_config(dense_knn_every=0)
    assert derive(config, 1347, 1, 10).dense_knn_size == 0


def test_cli_size_above_split_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)  # the run command installs its own
    try:
        status = main(["run", "--out", str(out), "--device", "cpu", "--dense-knn-size", "2000"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    error = capsys.readouterr().err
    assert status == 2
    assert len(error.strip().splitlines()) == 1
    assert "--dense-knn-size 2000 is larger than the training split" in error
    assert not out.exists()


# -- runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "run"
    run_training(build_config("digits", **DENSE_RUN), out, show_progress=False)
    return out


def test_run_dense_table_rows(dense_run):
    table = pd.read_parquet(dense_run / "dense_knn")
    assert tuple(table.columns) == TABLE_COLUMNS["dense_knn"]
    assert list(table["step"]) == [4, 8, 12, 16, 20, 21]  # and the final step
    assert list(table["n_bank"]) == [160] * 6  # 4 steps of 64 features fill the queue
    assert table["n_query"].eq(128).all()
    assert table["knn_top1"].between(0, 100).all()
    assert table["knn_top1_se"].between(0.5, 10).all()
    assert table["feature_std"].between(0, 1).all()


def test_run_evals_have_standard_error(dense_run):
    evals = pd.read_parquet(dense_run / "evals")
    # Bootstrap SE of 128 queries near the binomial 100 sqrt(p (1 - p) / 128).
    binomial = 100 * np.sqrt(evals["knn_top1"] / 100 * (1 - evals["knn_top1"] / 100) / 128)
    assert np.allclose(evals["knn_top1_se"], binomial, rtol=0.3)


def test_run_checkpoint_has_queue(dense_run):
    state = load_checkpoint(dense_run / "checkpoint.pt")["dense_knn_queue"]
    assert tuple(state["features"].shape) == (160, 64)
    assert state["filled"] == 160
    assert state["position"] == (21 * 64) % 160
    assert set(state["labels"].tolist()) <= set(range(10))
    restored = FeatureQueue(size=160, dim=64)
    restored.load_state_dict(state)
    assert torch.allclose(restored.features.norm(dim=1), torch.ones(160))


def _short_losses(run_dir, dense_every, steps=6):
    """Train ``steps`` steps with a validation evaluation at step 3 and return the losses.

    With the dense monitor on, it evaluates after every step and encodes the queries itself,
    because only step 3 has queries from the validation monitor.
    """
    config = build_config("digits", **{**DENSE_RUN, "dense_knn_every": dense_every})
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes)
    trainer = Trainer(config, prepare_run_dir(run_dir), data, derived, torch.device("cpu"))
    try:
        for index, batch in enumerate(epoch_loader(data, config, 0, trainer.device)):
            if index == steps:
                break
            trainer.train_step(trainer.views(batch), 0.0, labels=batch[1])
            if trainer.step == 3:
                trainer.evaluate()
            if trainer.dense_queue is not None:
                trainer.evaluate_dense()
        trainer.flush()
        trainer.save()
    finally:
        trainer.close()
    return pd.read_parquet(run_dir / "steps")["loss"].to_numpy()


def test_dense_monitor_keeps_losses(tmp_path):
    losses_on = _short_losses(tmp_path / "on", dense_every=1)
    losses_off = _short_losses(tmp_path / "off", dense_every=0)
    assert len(losses_on) == 6
    assert np.array_equal(losses_on, losses_off)
    assert len(pd.read_parquet(tmp_path / "on" / "dense_knn")) == 6
    assert pd.read_parquet(tmp_path / "off" / "dense_knn").empty
    assert "dense_knn_queue" not in load_checkpoint(tmp_path / "off" / "checkpoint.pt")


def test_run_dense_dips_in_events(dense_run, tmp_path):
    folder = write_report([dense_run], tmp_path / "report")
    events = json.loads((folder / "events.json").read_text())
    assert "dense_dips" in events["runs"][0]
    markdown = (folder / "report.md").read_text()
    assert "dense queue" in markdown


def test_detect_planted_dense_dip(dense_run):
    run = read_run(dense_run)
    # A curve that rises by about 1 point an evaluation, with a 20-point drop at step 110.
    steps = np.arange(10, 210, 10)
    top1 = 30.0 + np.arange(len(steps)) + np.tile([0.3, -0.3], len(steps) // 2)
    top1[10:12] -= 20.0
    run.dense_knn = pd.DataFrame({"step": steps, "knn_top1": top1, "n_query": 5000})
    dips = detect_run(run).dense_dips
    assert [dip.start_step for dip in dips] == [110]
    assert [dip.bottom_step for dip in dips] == [110]
    assert [dip.recovery_step for dip in dips] == [130]


# -- older runs --------------------------------------------------------------------------


def _evals_without_se():
    columns = [name for name in TABLE_COLUMNS["evals"] if name != "knn_top1_se"]
    return pd.DataFrame({name: [0.0, 2.0] for name in columns})


def test_old_run_without_dense_folder(tmp_path):
    path = tmp_path / "old"
    prepare_run_dir(path)
    writer = RunWriter(path)
    writer.write_config({"freeze_patch_embed": False}, {"layers": []}, {})
    writer.append("evals", _evals_without_se())
    (path / "dense_knn").rmdir()
    run = read_run(path)
    assert run.dense_knn.empty
    assert tuple(run.dense_knn.columns) == TABLE_COLUMNS["dense_knn"]
    assert run.evals["knn_top1_se"].isna().all()
    assert tuple(run.evals.columns) == TABLE_COLUMNS["evals"]
    assert detect_run(run).dense_dips == []


def test_old_evals_chunk_reads_nan_se(tmp_path):
    path = tmp_path / "old"
    prepare_run_dir(path)
    RunWriter(path).write_config({"freeze_patch_embed": False}, {"layers": []}, {})
    # A chunk written before the column existed, straight to Parquet.
    _evals_without_se().to_parquet(path / "evals" / "part-000000.parquet", index=False)
    run = read_run(path)
    assert list(run.evals["step"]) == [0.0, 2.0]
    assert run.evals["knn_top1_se"].isna().all()
