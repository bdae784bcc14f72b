"""Checks that every method's tests share: model setup, gradients, freeze, resume and CLI runs.

The runs train on the small digits split of test_resume.py (48 images at 8 px, 6 steps per
epoch at batch 8), so each takes seconds on a CPU. Pytest does not rewrite the asserts of
this module, so each assert carries its own message, and those of the run checks start with
the method's name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import torch
from test_resume import (
    SMALL_ARGS,
    SMALL_RUN,
    SMALL_STEPS,
    TRAIN_IMAGES,
    assert_same_tables,
    assert_same_weights,
    interrupt_at,
    run_cli_here,
    small_digits,
    use_data,
)

import stabilitylab.train.loop as loop
import stabilitylab.train.resume as resume
from stabilitylab.config import RunConfig, build_config, derive
from stabilitylab.models.layers import head_groups, vit_layer_groups
from stabilitylab.runs import FROZEN_CHECK_FILE
from stabilitylab.train.checkpoint import load_checkpoint

DIGITS_TRAIN_SIZE = 1347  # images in the digits training split


def small_run(method: str, **overrides) -> dict:
    """Return the overrides of test_resume's small run, trained with ``method``."""
    return {**SMALL_RUN, "method": method, **overrides}


def derived_for(config: RunConfig, train_size: int = DIGITS_TRAIN_SIZE):
    return derive(config, train_size=train_size, in_chans=1, num_classes=10)


def build_model_for(config: RunConfig) -> torch.nn.Module:
    return loop.build_model(config, derived_for(config))


def assert_gradients_flow(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Assert that each parameter has a finite gradient that is not all zeros."""
    for name, parameter in named_parameters:
        assert parameter.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def uninterrupted_run(overrides: dict, description: str):
    """Make a module-scoped ``reference`` fixture: the run of ``overrides`` on the small split.

    ``description`` becomes the fixture's docstring, which ``pytest --fixtures`` lists.
    """

    @pytest.fixture(scope="module")
    def reference(tmp_path_factory) -> Path:
        out = tmp_path_factory.mktemp(f"{overrides['method']}-reference") / "run"
        with pytest.MonkeyPatch.context() as patch:
            use_data(small_digits, patch)
            loop.run_training(build_config("digits", **overrides), out, show_progress=False)
        return out

    reference.__doc__ = description
    return reference


def check_resume_bit_exact(
    overrides: dict,
    reference: Path,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    interrupt_step: int,
) -> tuple[dict, dict]:
    """Interrupt a run at ``interrupt_step``, resume it and compare it with ``reference``.

    Returns the checkpoint written at the interrupt and the resumed run's model state, for
    the checks of the method's own state.
    """
    method = overrides["method"]
    use_data(small_digits, monkeypatch)
    interrupt_at(monkeypatch, step=interrupt_step)
    with pytest.raises(KeyboardInterrupt):
        loop.run_training(build_config("digits", **overrides), out, show_progress=False)
    interrupted = load_checkpoint(out / "checkpoint.pt")
    # The trainer finishes the step that SIGINT interrupts, and steps count from 0, so the
    # checkpoint records interrupt_step + 1 steps done.
    assert interrupted["step"] == interrupt_step + 1, (
        f"{method}: the checkpoint at the interrupt records step {interrupted['step']}, "
        f"expected {interrupt_step + 1}"
    )

    monkeypatch.undo()
    use_data(small_digits, monkeypatch)
    result = resume.resume_training(out, show_progress=False)
    assert result.steps == SMALL_STEPS, f"{method}: the resumed run ended at step {result.steps}"
    assert_same_tables(out, reference)
    assert_same_weights(out, reference)
    return interrupted, load_checkpoint(out / "checkpoint.pt")["model"]


def check_frozen_patch_embed(
    overrides: dict, out: Path, monkeypatch: pytest.MonkeyPatch, trained: Sequence[str]
) -> dict:
    """Train with the patch projection frozen and compare the final weights with the initial.

    Every parameter that the run's frozen check lists must be bit-identical at the end, and
    every one named in ``trained`` must have moved. Returns the frozen check's JSON.
    """
    method = overrides["method"]
    use_data(small_digits, monkeypatch)
    config = build_config("digits", **{**overrides, "freeze_patch_embed": True})
    result = loop.run_training(config, out, show_progress=False)
    assert result.frozen_check_passed is True, f"{method}: the run's frozen check failed"
    check = json.loads((out / FROZEN_CHECK_FILE).read_text())

    initial = loop.build_model(config, derived_for(config, TRAIN_IMAGES)).state_dict()
    final = load_checkpoint(out / "checkpoint.pt")["model"]
    for entry in check["parameters"]:
        name = entry["name"]
        assert torch.equal(final[name], initial[name]), f"{method}: frozen {name} changed"
    for name in trained:
        assert not torch.equal(final[name], initial[name]), f"{method}: {name} did not change"
    return check


def run_cli_both_arms(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra_args: Sequence[str] = ()
) -> dict[str, Path]:
    """Run ``stabilitylab run`` on the small split with the patch projection learned and frozen.

    Returns the run directory of each arm, under the keys ``learned`` and ``frozen``.
    """
    use_data(small_digits, monkeypatch)
    outs = {}
    for arm, freeze in (("learned", []), ("frozen", ["--freeze-patch-embed"])):
        out = tmp_path / arm
        args = ["run", "--method", method, "--out", str(out), "--quiet", *SMALL_ARGS]
        exit_code = run_cli_here([*args, *extra_args, *freeze])
        assert exit_code == 0, f"{method}: the {arm} arm exited with {exit_code}"
        outs[arm] = out
    return outs


def check_cli_both_arms(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run both arms through the CLI with the method's default options and check their records.

    Both arms must start from the same weights and finish every step, the frozen arm must
    pass its frozen check, and the layer groups must be the ViT's plus the method's heads.
    Returns the learned arm's ``config.json``.
    """
    outs = run_cli_both_arms(method, tmp_path, monkeypatch)
    learned = json.loads((outs["learned"] / "config.json").read_text())
    frozen = json.loads((outs["frozen"] / "config.json").read_text())
    recorded = learned["config"]["method"]
    assert recorded == method, f"{method}: the learned arm recorded method {recorded!r}"
    assert learned["derived"]["init_fingerprint"] == frozen["derived"]["init_fingerprint"], (
        f"{method}: the learned and frozen arms start from different weights"
    )
    depth = build_config("digits", **small_run(method)).model_spec.depth
    assert learned["derived"]["layers"] == vit_layer_groups(depth, heads=head_groups(method)), (
        f"{method}: unexpected layer groups"
    )
    check = json.loads((outs["frozen"] / FROZEN_CHECK_FILE).read_text())
    assert check["passed"] is True, f"{method}: the frozen arm's frozen check failed"
    for arm, out in outs.items():
        status = json.loads((out / "status.json").read_text())
        assert status["state"] == "finished", f"{method}: the {arm} arm is {status['state']}"
        assert status["step"] == SMALL_STEPS, f"{method}: the {arm} arm stopped at {status['step']}"
    return learned
