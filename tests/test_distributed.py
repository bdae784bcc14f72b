"""Two processes with the gloo backend train like one process on the same global batch.

Each method trains four steps on fixed views (tests/distributed_steps.py) in this process,
and in two processes started with the environment torchrun sets. The recorded loss, the
total and per-layer gradient norms, the update norms, the kNN accuracy and the final weights
must agree within TOLERANCE. The two runs sum the same numbers in another order (a batch
split over two processes, all-reduced), so they agree to float32 rounding, not bit for bit.
Only rank 0 writes into its run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_RUN
from distributed_steps import METHODS, STEPS, train_steps

from stabilitylab.runs import read_run
from stabilitylab.train import distributed
from stabilitylab.train.checkpoint import load_checkpoint

TESTS = Path(__file__).parent
# Relative tolerances. The first step's loss and gradients come from the same weights, so
# they differ only by the order of float32 sums. AdamW then divides each update by the root
# of its second moment, which turns the rounding of a gradient near zero into a visible
# weight difference, so the later steps and the final weights get a looser bound.
FIRST_STEP_TOLERANCE = 1e-5
TOLERANCE = 1e-3
# A gradient element that is zero up to rounding gets an AdamW step of about the lr, whose
# sign is the rounding's. The bias of the attention keys is one: softmax ignores a shift that
# all keys share, so its gradient is zero. A layer's update ratio, unlike its gradient norm,
# can then differ by a tenth (0.11 seen, for the final LayerNorm), and so can such a
# tensor's weights.
UPDATE_RATIO_TOLERANCE = 0.25
WORKER_TIMEOUT = 300  # seconds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes(method: str, outs: list[Path]) -> None:
    port = free_port()
    processes = []
    for rank, out in enumerate(outs):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(len(outs)),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        script = TESTS / "distributed_steps.py"
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), method, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        outputs.append(output)
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"


@pytest.fixture(scope="module", params=sorted(METHODS))
def runs(request, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    method = request.param
    root = tmp_path_factory.mktemp(f"distributed-{method}")
    single = root / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_steps(method, single)
    finally:
        torch.set_num_threads(threads)
    rank0, rank1 = root / "rank0", root / "rank1"
    run_two_processes(method, [rank0, rank1])
    return method, single, rank0, rank1


def test_single_process_joins_no_group():
    assert distributed.current().world_size == 1
    assert distributed.join("cpu").world_size == 1


def test_losses_and_gradient_norms_match(runs):
    method, single, rank0, _ = runs
    one, two = read_run(single), read_run(rank0)
    assert len(one.steps) == len(two.steps) == STEPS
    for column in ("loss", "grad_norm", "token_grad_norm"):
        np.testing.assert_allclose(
            two.steps[column].iloc[0],
            one.steps[column].iloc[0],
            rtol=FIRST_STEP_TOLERANCE,
            err_msg=f"{method} {column} at step 0",
        )
        np.testing.assert_allclose(
            two.steps[column], one.steps[column], rtol=TOLERANCE, err_msg=f"{method} {column}"
        )
    # The steps differ from one another, so the comparison is not of constants.
    assert one.steps["loss"].nunique() == STEPS
    pd.testing.assert_series_equal(one.layers["layer"], two.layers["layer"])
    first = one.layers["step"] == 0
    for column in ("grad_norm", "weight_norm", "update_ratio"):
        np.testing.assert_allclose(
            two.layers.loc[first, column],
            one.layers.loc[first, column],
            rtol=FIRST_STEP_TOLERANCE,
            err_msg=f"{method} layer {column} at step 0",
        )
        tolerance = UPDATE_RATIO_TOLERANCE if column == "update_ratio" else TOLERANCE
        np.testing.assert_allclose(
            two.layers[column], one.layers[column], rtol=tolerance, err_msg=f"{method} {column}"
        )


def test_knn_monitors_match(runs):
    method, single, rank0, _ = runs
    one, two = read_run(single), read_run(rank0)
    np.testing.assert_allclose(two.evals["knn_top1"], one.evals["knn_top1"], atol=1e-9)
    np.testing.assert_allclose(two.dense_knn["knn_top1"], one.dense_knn["knn_top1"], atol=1e-9)
    assert two.evals["n_bank"].tolist() == one.evals["n_bank"].tolist()


def test_weights_match(runs):
    method, single, rank0, _ = runs
    one = load_checkpoint(single / "checkpoint.pt")
    two = load_checkpoint(rank0 / "checkpoint.pt")
    assert two["world_size"] == 2
    assert len(two["rng_by_rank"]) == 2
    assert one["model"].keys() == two["model"].keys()
    # The norm of the difference of all weights against the norm of the weights, which
    # bounds what the tensors of rounding-driven steps (see above) can add.
    squared_difference = squared_norm = 0.0
    for name, weight in one["model"].items():
        if weight.is_floating_point():
            squared_difference += float((two["model"][name] - weight).double().pow(2).sum())
            squared_norm += float(weight.double().pow(2).sum())
        else:
            assert torch.equal(two["model"][name], weight), name
    assert squared_difference**0.5 <= TOLERANCE * squared_norm**0.5, method


def test_only_rank_zero_writes(runs):
    _, _, _, rank1 = runs
    assert list(rank1.iterdir()) == []


# -- the command line under torchrun ----------------------------------------------------------

CLI_RUN = {**TINY_RUN, "epochs": 1, "warmup_epochs": 0.5, "batch_size": 32}


@pytest.fixture(scope="module")
def torchrun_dir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("torchrun") / "run"
    arguments = [f"--{key.replace('_', '-')}={value}" for key, value in CLI_RUN.items()]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "stabilitylab",
        "run",
        "--out",
        str(out),
        *arguments,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_torchrun_trains_one_run_with_the_global_batch(torchrun_dir):
    out, result = torchrun_dir
    run = read_run(out)
    assert run.status["state"] == "finished"
    assert run.environment["world_size"] == 2
    assert run.environment["distributed"]["backend"] == "gloo"
    assert run.environment["distributed"]["launcher"] == "torchrun"
    assert run.environment["distributed"]["nodes"] == 1
    assert run.environment["distributed"]["processes_per_node"] == 2
    assert run.environment["distributed"]["master"].startswith("127.0.0.1:")
    assert run.derived["global_batch_size"] == 32
    assert run.derived["per_process_batch_size"] == 16
    assert run.derived["lr"] == pytest.approx(run.config["lr"] * 32 / 256)
    assert len(run.steps) == run.derived["total_steps"] == 1347 // 32
    assert (run.steps["samples_per_s"] > 0).all()
    # Rank 0 alone reports: one summary line, one start line in the log.
    assert result.stdout.count("kNN top-1 final") == 1
    assert result.stderr.count("processes of 16 images each (global batch 32)") == 1


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(torchrun_dir, tmp_path, cli_command):
    out, _ = torchrun_dir
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "run.lock").unlink(missing_ok=True)
    status = json.loads((copy / "status.json").read_text())
    (copy / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    result = subprocess.run(
        [*cli_command, "run", "--resume", str(copy)],
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "written by 2 training process(es), and this resume has 1" in result.stderr
    assert "torchrun --nproc_per_node 2 -m stabilitylab run --resume" in result.stderr
    assert "Traceback" not in result.stderr


def run_cli(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the CLI ``command`` with ``env`` to its end, its output captured as text."""
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT, check=False
    )


def test_commands_other_than_run_refuse_several_processes(tmp_path, cli_command):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    result = run_cli(
        [*cli_command, "report", str(tmp_path), "--out", str(tmp_path / "report")], env
    )
    assert result.returncode == 2
    assert "only stabilitylab run trains on several processes" in result.stderr
    assert "WORLD_SIZE=2" in result.stderr
    assert not (tmp_path / "report").exists()


def test_batch_that_does_not_split_is_refused():
    from stabilitylab.config import build_config, derive
    from stabilitylab.errors import ConfigError

    config = build_config("digits", batch_size=30)
    with pytest.raises(ConfigError, match="--batch-size 30 cannot be split evenly over 4"):
        derive(config, 1347, 1, 10, world_size=4)


def test_bad_master_port_is_refused(tmp_path, cli_command):
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "abc",
    }
    result = run_cli([*cli_command, "run", "--device", "cpu", "--out", str(tmp_path / "run")], env)
    assert result.returncode == 2
    assert "MASTER_PORT='abc' is not a port number" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def cli_environment(rank: int, port: int) -> dict[str, str]:
    """The variables torchrun would set for ``rank`` of two processes, without torchrun."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.1)


def test_join_wait_stops_on_ctrl_c(tmp_path, cli_command):
    # Rank 0 of two, with no rank 1: it waits in the rendezvous, as a single run does with
    # RANK and WORLD_SIZE left over from an earlier torchrun.
    log_file = tmp_path / "stderr.txt"
    with log_file.open("w") as stderr:
        process = subprocess.Popen(
            [*cli_command, "run", "--device", "cpu", "--out", str(tmp_path / "run")],
            env=cli_environment(0, free_port()),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
        try:
            wait_for(lambda: "joining 2 processes" in log_file.read_text(), 120, "the join")
            time.sleep(1.0)  # well inside the rendezvous
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=30)
        finally:
            process.kill()
    text = log_file.read_text()
    assert returncode == 128 + signal.SIGINT, text
    assert "stabilitylab run: interrupted. Training had not started" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_peer_death_fails_with_one_line(tmp_path, cli_command):
    out = tmp_path / "run"
    arguments = [f"--{key.replace('_', '-')}={value}" for key, value in CLI_RUN.items()]
    # Enough steps that rank 1 dies mid-run, long before the end.
    command = [*cli_command, "run", "--out", str(out), *arguments, "--epochs=5"]
    port = free_port()
    log_file = tmp_path / "rank0.txt"
    with log_file.open("w") as stderr:
        rank0 = subprocess.Popen(
            command, env=cli_environment(0, port), stdout=subprocess.DEVNULL, stderr=stderr
        )
        rank1 = subprocess.Popen(
            command,
            env=cli_environment(1, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def trained_a_while() -> bool:
                status = out / "status.json"
                return status.is_file() and json.loads(status.read_text()).get("step", 0) >= 16

            wait_for(trained_a_while, WORKER_TIMEOUT, "the first steps")
            rank1.kill()
            returncode = rank0.wait(timeout=WORKER_TIMEOUT)
        finally:
            rank0.kill()
            rank1.kill()
    text = log_file.read_text()
    assert returncode == 1, text
    assert "stabilitylab run: failed: the connection to another training process broke" in text
    assert f"-m stabilitylab run --resume {out}" in text
    assert "Traceback" not in text
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["step"] < 5 * (1347 // 32)


def test_busy_master_port_is_one_line(tmp_path, cli_command):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_cli(
            [*cli_command, "run", "--device", "cpu", "--out", str(tmp_path / "run")],
            cli_environment(0, port),
        )
    assert result.returncode == 2, result.stderr
    assert f"rank 0 could not join the process group at 127.0.0.1:{port}" in result.stderr
    assert "pass torchrun another --master_port" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
