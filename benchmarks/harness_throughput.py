"""Benchmark: steps per second of stabilitylab's trainer against a hand-written MoCo v3 loop.

Run: python benchmarks/harness_throughput.py [--rounds 8] [--steps 5] [--device cpu]

Both arms train the configuration that ``stabilitylab run`` uses without options (the digits
preset: MoCo v3, vit_micro, batch 256) on the run's first batch at every step, with models
from stabilitylab's own ``build_model``, so the weights and heads are the same:

- plain: a loop written out here with nothing else in it. Both views go through the online
  encoder and predictor and through the momentum encoder, then come the MoCo v3
  contrastive loss (InfoNCE scaled by 2 tau, symmetrised), backward, ``torch.optim.AdamW``,
  the linear-warmup cosine lr schedule and the cosine EMA of the momentum encoder;
- harness: ``Trainer.train_step`` with everything a run does per step, the full monitor and
  its flush every ``flush_every`` steps (timed on their own and amortised), the timm
  optimiser and schedule, and the push of view-1 features into the dense kNN queue.

Blocks of ``--steps`` steps of the two arms alternate for ``--rounds`` rounds. Printed are
the steps per second of the median block and the ratio harness / plain, the median over
rounds of each round's ratio; the target is at least 0.97.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from _harness import (
    HarnessArm,
    digits_config,
    digits_trainers,
    fixed_views,
    hardware_line,
    interleave,
    paired_ratio,
    positive_int,
    round_ratios,
    spread_text,
    timed,
)
from torch import nn

from stabilitylab.config import Derived, RunConfig
from stabilitylab.train.loop import build_model

# The harness / plain ratio of steps per second that the benchmark checks against.
TARGET_RATIO = 0.97


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of ``query`` (B, D) against all ``key`` rows (B, D), times 2 tau."""
    query = F.normalize(query, dim=1)
    key = F.normalize(key, dim=1)
    logits = query @ key.T / temperature  # (B, B), positives on the diagonal
    targets = torch.arange(len(logits), device=logits.device)
    return 2 * temperature * F.cross_entropy(logits, targets)


class PlainMoCoV3:
    """A MoCo v3 training step written out by hand, on a model from ``build_model``."""

    def __init__(self, config: RunConfig, derived: Derived, device: torch.device) -> None:
        self.model = build_model(config, derived).to(device).train()
        self.temperature = config.temperature
        self.base_momentum = config.momentum
        self.base_lr = derived.lr
        self.warmup_steps = derived.warmup_steps
        self.total_steps = derived.total_steps
        model = self.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=self.base_lr, weight_decay=config.weight_decay
        )
        # The momentum encoder follows the online backbone and projector, not the predictor.
        pairs = [
            (target, online)
            for targets, onlines in (
                (model.momentum_backbone, model.backbone),
                (model.momentum_projector, model.projector),
            )
            for target, online in zip(targets.parameters(), onlines.parameters(), strict=True)
            if online.requires_grad
        ]
        self.targets = [target for target, _ in pairs]
        self.onlines = [online for _, online in pairs]
        self.step = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup from 0, then a half cosine to 0 over the remaining steps."""
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * self.base_lr * (1 + math.cos(math.pi * progress))

    def momentum_at(self, step: int) -> float:
        """EMA coefficient from the base momentum at step 0 to 1 along a half cosine."""
        progress = step / self.total_steps
        return 1 - 0.5 * (1 + math.cos(math.pi * progress)) * (1 - self.base_momentum)

    def loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """Return the symmetrised loss: each view's queries against the other view's keys."""
        model = self.model
        query1 = model.predictor(_encode(model.backbone, model.projector, view1))
        query2 = model.predictor(_encode(model.backbone, model.projector, view2))
        with torch.no_grad():
            key1 = _encode(model.momentum_backbone, model.momentum_projector, view1)
            key2 = _encode(model.momentum_backbone, model.momentum_projector, view2)
        return info_nce(query1, key2, self.temperature) + info_nce(query2, key1, self.temperature)

    def train_step(self, view1: torch.Tensor, view2: torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.loss(view1, view2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.targets, self.onlines, 1 - self.momentum_at(self.step))
        self.step += 1


def _encode(backbone: nn.Module, projector: nn.Module, images: torch.Tensor) -> torch.Tensor:
    pooled = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    return projector(pooled)  # (B, proj_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=8, help="timed blocks per arm")
    parser.add_argument("--steps", type=positive_int, default=5, help="optimiser steps per block")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()

    config = digits_config(args.device)
    with digits_trainers(config) as (trainer,):
        device = trainer.device
        views, labels = fixed_views(trainer)
        harness = HarnessArm(trainer, views, labels, args.steps)
        plain = PlainMoCoV3(config, trainer.derived, device)

        def plain_block() -> float:
            def block() -> None:
                for _ in range(args.steps):
                    plain.train_step(views[0], views[1])

            return timed(block, device) / args.steps

        # The same weights and views give the same loss, which checks the plain loop's math.
        with torch.no_grad():
            losses = (plain.loss(views[0], views[1]), trainer.model.training_loss(views, 0)[0])
        harness.warm_up(2)
        for _ in range(2):
            plain.train_step(views[0], views[1])
        times = interleave({"plain": plain_block, "harness": harness.block}, args.rounds)
        times["harness"] = harness.with_flushes(times["harness"])
        flush_ms = 1000 * harness.flush_median()

    print(hardware_line(device))
    print(
        f"digits preset, {config.model}, batch {config.batch_size}: medians of {args.rounds} "
        f"blocks of {args.steps} steps"
    )
    print(f"loss of the first batch: plain {losses[0]:.6f}, harness {losses[1]:.6f}")
    print("| loop | steps/s | step (ms) |")
    print("|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {1 / seconds:.2f} | {1000 * seconds:.1f} |")
    # Steps per second are the inverse of step times, so their ratio is plain / harness time.
    ratio = paired_ratio(times["plain"], times["harness"])
    spread = spread_text(round_ratios(times["plain"], times["harness"]))
    verdict = "met" if ratio >= TARGET_RATIO else "missed"
    print(
        f"harness / plain steps per second: {ratio:.3f} ({spread}; flush {flush_ms:.1f} ms "
        f"every {config.flush_every} steps included); target at least {TARGET_RATIO}: {verdict}"
    )


if __name__ == "__main__":
    main()
