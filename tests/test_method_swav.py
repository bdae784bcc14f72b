"""SwAV: Sinkhorn-Knopp codes, the swapped-prediction loss, multi-crop, queue, prototypes.

The reference values are computed with plain Python loops, independently of the module.
The runs train on the bundled digits: one tiny run at 16 px for the loss, the frozen patch
projection and the prototype freeze, and the 8 px runs of method_runs.py for exact resume
and the CLI.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from method_runs import (
    DIGITS_TRAIN_SIZE,
    assert_gradients_flow,
    check_resume_bit_exact,
    derived_for,
    run_cli_both_arms,
    small_run,
    uninterrupted_run,
)

import stabilitylab
import stabilitylab.train.loop as loop
from stabilitylab.config import MODELS, build_config
from stabilitylab.methods.swav import SwAV, sinkhorn_knopp, swapped_prediction_loss
from stabilitylab.models.vit import build_backbone
from stabilitylab.train.checkpoint import load_checkpoint

STEPS_PER_EPOCH = DIGITS_TRAIN_SIZE // TINY_RUN["batch_size"]


def _model(tiny_config, **overrides) -> SwAV:
    config = tiny_config(method="swav", **overrides)
    model = loop.build_model(config, derived_for(config))
    assert isinstance(model, SwAV)
    return model


def _views(batch: int, sizes: tuple[int, ...] = (16, 16), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, size, size, generator=generator) for size in sizes]


# -- plain-Python references -----------------------------------------------------------------


def sinkhorn_reference(scores: list[list[float]], epsilon: float, iterations: int):
    """SwAV's Sinkhorn-Knopp with loops: returns the (N, K) codes as nested lists."""
    n, k = len(scores), len(scores[0])
    q = [[math.exp(scores[b][j] / epsilon) for b in range(n)] for j in range(k)]  # (K, N)
    total = sum(sum(row) for row in q)
    q = [[value / total for value in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            row_sum = sum(q[j])
            q[j] = [value / row_sum / k for value in q[j]]
        for b in range(n):
            column_sum = sum(q[j][b] for j in range(k))
            for j in range(k):
                q[j][b] = q[j][b] / column_sum / n
    return [[q[j][b] * n for j in range(k)] for b in range(n)]


def swapped_loss_reference(scores, codes, temperature: float) -> float:
    """Mean over coded views i of the mean over views v != i of batch-mean CE(q_i, p_v)."""
    num_views, batch = len(scores), len(scores[0])
    total = 0.0
    for i, code in enumerate(codes):
        view_total = 0.0
        for v in range(num_views):
            if v == i:
                continue
            cross = 0.0
            for b in range(batch):
                logits = [s / temperature for s in scores[v][b]]
                log_norm = math.log(sum(math.exp(x) for x in logits))
                cross -= sum(q * (x - log_norm) for q, x in zip(code[b], logits, strict=True))
            view_total += cross / batch
        total += view_total / (num_views - 1)
    return total / len(codes)


# -- Sinkhorn-Knopp and the loss -------------------------------------------------------------


def test_sinkhorn_hand_computed():
    scores = [[0.9, -0.2, 0.1], [0.3, 0.8, -0.5], [-0.1, 0.2, 0.7], [0.5, 0.4, 0.0]]
    for iterations in (1, 3):
        expected = torch.tensor(sinkhorn_reference(scores, 0.5, iterations))
        codes = sinkhorn_knopp(torch.tensor(scores), epsilon=0.5, iterations=iterations)
        assert codes.shape == (4, 3)
        torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_marginals_uniform():
    generator = torch.Generator().manual_seed(0)
    samples, prototypes = 96, 12
    # Unit vectors in SwAV's 128 dimensions, so the cosines spread as a model's do at init.
    embeddings = F.normalize(torch.randn(samples, 128, generator=generator), dim=1)
    weight = F.normalize(torch.randn(prototypes, 128, generator=generator), dim=1)
    scores = (embeddings @ weight.T).requires_grad_(True)
    uniform = torch.full((prototypes,), samples / prototypes)
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert not codes.requires_grad
    assert (codes >= 0).all()
    # The column scaling comes last, so each sample's code sums to 1 up to rounding.
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(samples), rtol=0, atol=1e-5)
    # The prototype totals converge to N/K: 2.2 % off after 3 rounds on these scores (5 %
    # allowed), 1e-7 after 50 (1e-4 allowed).
    torch.testing.assert_close(codes.sum(dim=0), uniform, rtol=0.05, atol=0)
    converged = sinkhorn_knopp(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(converged.sum(dim=0), uniform, rtol=1e-4, atol=0)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(samples), rtol=0, atol=1e-5)


def test_sinkhorn_small_epsilon_finite():
    # Unshifted, exp(0.95 / 0.01) overflows float32; the shift by the cosine bound keeps it.
    scores = torch.tensor([[0.95, -0.3], [0.2, 0.9], [-0.8, 0.1]])
    codes = sinkhorn_knopp(scores, epsilon=0.01, iterations=3)
    assert torch.isfinite(codes).all()
    assert not torch.isfinite(torch.exp(scores / 0.01)).all()


def test_swapped_loss_hand_computed():
    scores = [
        [[0.9, -0.2, 0.1], [0.3, 0.8, -0.5]],
        [[0.7, 0.1, -0.3], [-0.2, 0.6, 0.4]],
        [[0.0, 0.5, 0.5], [0.9, -0.9, 0.2]],  # a local crop: predicted, never coded
    ]
    codes = [
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],
        [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]],
    ]
    expected = swapped_loss_reference(scores, codes, temperature=0.1)
    loss = swapped_prediction_loss(torch.tensor(scores), torch.tensor(codes), temperature=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_uniform_prediction_is_ln_k():
    scores = torch.zeros(4, 5, 7)  # equal scores: a uniform prediction over 7 prototypes
    codes = torch.softmax(torch.randn(2, 5, 7), dim=2)
    loss = swapped_prediction_loss(scores, codes, temperature=0.1)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)


def test_loss_at_init_near_chance(tiny_config):
    # Unit projections against random unit prototypes give cosines of variance 1/d, so the
    # log-sum-exp of the logits exceeds ln K by about 1 / (2 d tau^2): 0.39 for the recipe's
    # 128-wide output at tau 0.1. Independent noise views keep the codes unrelated to the
    # other view's scores, so no other term remains. This batch measured 8.42 against 8.40.
    model = _model(tiny_config, proj_dim=128, num_prototypes=3000)
    chance = math.log(3000)
    excess = 1 / (2 * 128 * model.temperature**2)
    with torch.no_grad():
        loss, _ = model.training_loss(_views(64), step=0)
    assert abs(loss.item() - (chance + excess)) < 0.1, (loss.item(), chance + excess)
    assert abs(loss.item() - chance) < 0.06 * chance, (loss.item(), chance)


# -- the model -------------------------------------------------------------------------------


def test_multicrop_locals_only_predicted(tiny_config):
    model = _model(
        tiny_config, local_crops=2, local_crop_size=8, num_prototypes=20, queue_length=64
    )
    views = _views(8, sizes=(16, 16, 8, 8))
    batch = 8
    with torch.no_grad():
        features = torch.cat([model.features(view) for view in views])
        embeddings = F.normalize(model.projector(features), dim=1)
        scores = (embeddings @ model.prototypes.weight.T).view(4, batch, 20)
    codes = [
        sinkhorn_reference(scores[view].tolist(), model.sinkhorn_epsilon, 3) for view in range(2)
    ]
    expected = swapped_loss_reference(scores.tolist(), codes, model.temperature)

    loss, pooled = model.training_loss(views, step=0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(pooled, features[:batch], rtol=1e-5, atol=1e-5)
    assert not pooled.requires_grad
    # The queue keeps the two global views' projections, newest first, never a local crop's.
    torch.testing.assert_close(model.queue[0, :batch], embeddings[:batch], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        model.queue[1, :batch], embeddings[batch : 2 * batch], rtol=0, atol=1e-5
    )
    assert model.queue[:, batch:].abs().sum() == 0


def test_every_trainable_parameter_gets_gradient(tiny_config):
    model = _model(tiny_config, num_prototypes=20, freeze_last_layer_epochs=0.0)
    loss, _ = model.training_loss(_views(16), step=0)
    loss.backward()
    model.adjust_gradients(step=0)
    assert_gradients_flow((n, p) for n, p in model.named_parameters() if p.requires_grad)


def test_no_target_network(tiny_config):
    model = _model(tiny_config, num_prototypes=20)
    assert model.target_backbones() == {}
    assert math.isnan(model.momentum_at(0))
    assert list(model.online_modules()) == ["backbone", "projector", "prototypes"]
    # The codes are targets: they carry no gradient back to the scores.
    scores = torch.randn(2, 8, 20, requires_grad=True)
    assert not model.assign_codes(scores, step=0).requires_grad


def test_prototypes_frozen_then_trained(tiny_config):
    model = _model(tiny_config, num_prototypes=20, freeze_last_layer_epochs=1.0)
    assert model.freeze_prototypes_steps == STEPS_PER_EPOCH
    for step, frozen in ((0, True), (STEPS_PER_EPOCH - 1, True), (STEPS_PER_EPOCH, False)):
        model.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(_views(16, seed=step), step=step)
        loss.backward()
        model.adjust_gradients(step)
        if frozen:
            assert model.prototypes.weight.grad is None, step
        else:
            assert model.prototypes.weight.grad is not None, step
            assert model.prototypes.weight.grad.abs().sum() > 0, step
        assert model.projector[0].weight.grad is not None, step


def test_prototypes_stay_unit_norm(tiny_config):
    model = _model(tiny_config, num_prototypes=20, freeze_last_layer_epochs=0.0)
    ones = torch.ones(20)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), ones, rtol=0, atol=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(_views(16, seed=step), step=step)
        torch.testing.assert_close(model.prototypes.weight.norm(dim=1), ones, rtol=0, atol=1e-6)
        loss.backward()
        optimizer.step()
        # The optimiser step moves them off the sphere; the next step normalises again.
        assert (model.prototypes.weight.norm(dim=1) - 1).abs().max() > 1e-4


def test_queue_fills_and_is_used_after_start(tiny_config):
    batch = 8
    backbone = build_backbone(MODELS["vit_micro"], img_size=16, patch_size=4, in_chans=1)
    # A queue of two batches per global view, used from step 3 on.
    model = SwAV(backbone, 64, 32, 20, 0.1, queue_length=2 * batch, queue_start_step=3)
    used = []
    for step in range(5):
        previous = model.queue.clone()
        scores = torch.randn(2, batch, 20, generator=torch.Generator().manual_seed(step))
        scores = F.normalize(scores, dim=2)
        queue_scores = model.queue @ model.prototypes.weight.T  # (2, 2B, K), before the fill
        used.append(model.queue_in_use(step))
        codes = model.assign_codes(scores, step)
        if used[-1]:
            for view in range(2):
                joined = torch.cat([queue_scores[view], scores[view]])
                expected = sinkhorn_knopp(joined, model.sinkhorn_epsilon, 3)[-batch:]
                torch.testing.assert_close(codes[view], expected)
                alone = sinkhorn_knopp(scores[view], model.sinkhorn_epsilon, 3)
                assert not torch.allclose(codes[view], alone, atol=1e-3)
        else:
            for view in range(2):
                expected = sinkhorn_knopp(scores[view], model.sinkhorn_epsilon, 3)
                torch.testing.assert_close(codes[view], expected)

        loss, _ = model.training_loss(_views(batch, seed=step), step)
        assert model.queue_filled.item() == min((step + 1) * batch, 2 * batch)
        # The older rows move back by one batch; the newest rows are unit projections.
        torch.testing.assert_close(model.queue[:, batch:], previous[:, :batch], rtol=0, atol=0)
        norms = model.queue[:, :batch].norm(dim=2)
        torch.testing.assert_close(norms, torch.ones(2, batch), rtol=0, atol=1e-5)
    # Full after two steps, but used only from the start step on.
    assert used == [False, False, False, True, True]


def test_queue_not_used_until_full(tiny_config):
    model = _model(tiny_config, num_prototypes=20, queue_length=128)
    assert model.queue_start_step == 0
    used = []
    for step in range(3):
        used.append(model.queue_in_use(step))
        model.training_loss(_views(64, seed=step), step)
    assert used == [False, False, True]


def test_loaded_queue_fill_restored(tiny_config):
    model = _model(tiny_config, num_prototypes=20, queue_length=128)
    for step in range(2):
        model.training_loss(_views(64, seed=step), step)
    assert model.queue_in_use(2)
    fresh = _model(tiny_config, num_prototypes=20, queue_length=128)
    assert not fresh.queue_in_use(2)
    fresh.load_state_dict(model.state_dict())
    assert fresh.queue_in_use(2)
    assert torch.equal(fresh.queue, model.queue)


def test_bad_views_rejected(tiny_config):
    model = _model(tiny_config, num_prototypes=20, queue_length=64)
    with pytest.raises(ValueError, match="needs 2 global views"):
        model.training_loss(_views(8, sizes=(16,)), step=0)
    with pytest.raises(ValueError, match=r"batch sizes \[8, 4\] differ"):
        model.training_loss([torch.rand(8, 1, 16, 16), torch.rand(4, 1, 16, 16)], step=0)
    with pytest.raises(ValueError, match="queue of 64 projections per view is shorter"):
        model.training_loss(_views(96), step=0)


# -- training runs ---------------------------------------------------------------------------

FROZEN_RUN = {
    **TINY_RUN,
    "method": "swav",
    "freeze_patch_embed": True,
    "num_prototypes": 100,
    "queue_length": 128,
    "queue_start_epochs": 1.0,
    # Only the kNN evaluations at the start and the end, and no dense monitor, for speed.
    "eval_every": 100,
    "dense_knn_every": 0,
}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """A tiny SwAV run with the patch projection frozen and a queue from the second epoch."""
    out = tmp_path_factory.mktemp("swav") / "run"
    result = loop.run_training(build_config("digits", **FROZEN_RUN), out, show_progress=False)
    return out, result


def test_run_loss_decreases(frozen_run):
    out, _ = frozen_run
    loss = stabilitylab.load_run(out).steps["loss"]
    assert len(loss) == 2 * STEPS_PER_EPOCH
    first, last = loss.iloc[:5].mean(), loss.iloc[-5:].mean()
    # Measured: 5.83 over the first five steps, 5.16 over the last five (ln 100 = 4.61).
    assert last < first - 0.2, (first, last)


def test_run_frozen_patch_embed_identical(frozen_run):
    out, result = frozen_run
    assert result.frozen_check_passed is True
    check = json.loads((out / "frozen_check.json").read_text())
    assert check["applies"] is True
    assert check["max_abs_diff"] == 0.0
    assert sorted(entry["name"] for entry in check["parameters"]) == [
        "backbone.patch_embed.proj.bias",
        "backbone.patch_embed.proj.weight",
    ]


def test_run_prototypes_frozen_first_epoch(frozen_run):
    out, _ = frozen_run
    layers = stabilitylab.load_run(out).layers
    prototypes = layers[layers["layer"] == "prototypes"].set_index("step")["grad_norm"]
    assert prototypes.loc[: STEPS_PER_EPOCH - 1].isna().all()
    assert prototypes.loc[STEPS_PER_EPOCH:].gt(0).all()
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["model"]["queue_filled"].item() == 128


SWAV_SMALL_RUN = small_run(
    "swav",
    num_prototypes=30,
    # Two batches of 8 per view, full after step 1 and in use from step 3 on.
    queue_length=16,
    queue_start_epochs=0.5,
)
reference = uninterrupted_run(SWAV_SMALL_RUN, "An uninterrupted SwAV run with a queue.")


def test_resume_exact(reference, tmp_path, monkeypatch):
    interrupted, _ = check_resume_bit_exact(
        SWAV_SMALL_RUN, reference, tmp_path / "interrupted", monkeypatch, interrupt_step=6
    )
    # The queue and its fill count are part of the compared weights.
    assert interrupted["model"]["queue_filled"].item() == 16


def test_cli_run_both_arms(tmp_path, monkeypatch):
    outs = run_cli_both_arms("swav", tmp_path, monkeypatch, ["--num-prototypes=30"])
    for arm, out in outs.items():
        config = json.loads((out / "config.json").read_text())
        assert config["config"]["method"] == "swav", arm
        assert config["derived"]["layers"][-2:] == ["projector", "prototypes"], arm
        unread = config["derived"]["unread_options"]
        assert "momentum" in unread, arm
        assert "teacher_temperature" in unread, arm
        assert "sinkhorn_epsilon" not in unread, arm
        assert "local_crops" not in unread, arm
        status = json.loads((out / "status.json").read_text())
        assert status["state"] == "finished", arm
        assert status["frozen_check_passed"] is (True if arm == "frozen" else None), arm
