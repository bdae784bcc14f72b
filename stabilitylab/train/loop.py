"""The training loop of ``stabilitylab run``: one self-supervised run into one run directory."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from probes.bootstrap import bootstrap_accuracy_se
from probes.dense import FeatureQueue, queue_feature_std, queue_knn
from probes.knn import KnnResult, extract_features, weighted_knn
from stabilitylab.config import Derived, RunConfig, derive, unread_by
from stabilitylab.data import DataBundle, build_data
from stabilitylab.data.augment import local_crops_of
from stabilitylab.errors import TrainingError
from stabilitylab.launch import TORCHRUN_OPTIONS_HINT, torchrun_command
from stabilitylab.methods import build_method
from stabilitylab.methods.base import Method, StepSchedule
from stabilitylab.models.compiled import compile_blocks
from stabilitylab.models.layers import named_groups
from stabilitylab.models.vit import (
    build_backbone,
    disable_drop_path,
    fixed_parameters,
    freeze_patch_embed,
    patch_embed_parameters,
)
from stabilitylab.monitor.attention import (
    attention_due,
    build_attention_probe,
)
from stabilitylab.monitor.knn_eval import evals_row
from stabilitylab.monitor.recorder import HostStep, MetricsRecorder
from stabilitylab.monitor.signals import TrainingMonitor
from stabilitylab.runs import (
    DIVERGED_REASONS,
    FROZEN_CHECK_FILE,
    SIGNAL_NAMES,
    DiscardingWriter,
    RunWriter,
    prepare_run_dir,
)
from stabilitylab.train import distributed
from stabilitylab.train.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    write_checkpoint,
)
from stabilitylab.train.environment import describe_environment
from stabilitylab.train.faults import FaultPlan
from stabilitylab.train.flops import (
    MATMUL_DTYPES,
    ThroughputMeter,
    measure_matmul_flops,
    peak_flops,
)
from stabilitylab.train.interrupts import DeferredInterrupts, StepInterrupt
from stabilitylab.train.precision import (
    autocast_factory,
    build_scaler,
    optimizer_step,
    scale_tensor,
    scaler_overflow,
)
from stabilitylab.train.runlock import RunLock, check_not_in_use
from stabilitylab.train.sampling import EpochBatches, SeededBatches, ignore_interrupts_in_worker
from stabilitylab.train.schedules import build_lr_schedule, cosine_value, lr_at
from stabilitylab.train.tensorboard import (
    TensorBoardRunWriter,
    check_tensorboard,
    resolve_tensorboard_dir,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """Summary of a finished run."""

    run_dir: Path
    steps: int
    final_knn_top1: float
    best_knn_top1: float
    frozen_check_passed: bool | None
    wall_seconds: float
    # True when a resume found the run finished already, so nothing was trained.
    already_finished: bool = False


@functools.lru_cache(maxsize=8)
def measured_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Return this process's dense matmul FLOP/s on ``device``, measured once in about 0.3 s."""
    return measure_matmul_flops(device, dtype, repeats=3, budget_seconds=0.3)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_for_data(config: RunConfig, data: DataBundle, world_size: int = 1) -> Derived:
    """Return the derived values of ``config`` trained on ``data`` by ``world_size`` processes."""
    return derive(
        config,
        len(data.train),
        data.in_chans,
        data.num_classes,
        data.img_size,
        world_size=world_size,
    )


def build_model(config: RunConfig, derived: Derived) -> Method:
    """Build the model from the run's seed; the freeze only changes ``requires_grad``."""
    torch.manual_seed(config.seed)
    backbone = build_backbone(
        config.model_spec,
        derived.img_size,
        derived.patch_size,
        derived.in_chans,
        pos_embed=config.pos_embed,
        pool=config.pool,
        qk_norm=config.qk_norm,
        dynamic_img_size=config.local_crops > 0,
        drop_path=config.drop_path,
    )
    schedule = StepSchedule(derived.total_steps, derived.steps_per_epoch)
    model = build_method(config, backbone, schedule)
    for target in model.target_backbones().values():
        disable_drop_path(target)
    if config.freeze_patch_embed:
        freeze_patch_embed(model.backbone)
        for target in model.target_backbones().values():
            freeze_patch_embed(target)
    return model


def build_optimizer(
    config: RunConfig, parameters: list[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """Build timm's ``config.optimizer`` over ``parameters``, weight decay on all of them.

    MoCo v3 applies weight decay to every trainable parameter, biases and norms included.
    LAMB's built-in clipping is off (see below). AdamW uses the fused kernel, one launch
    for all parameters, on CUDA. Skipping a non-finite step without a host sync needs that
    kernel on the CPU too, because it reads a device flag and leaves the weights and the
    moments unchanged where it is set. Its rounding differs slightly from the default
    multi-tensor kernel's.
    """
    extra: dict[str, Any] = {}
    on_cuda = bool(parameters) and all(p.is_cuda for p in parameters)
    if config.optimizer == "adamw" and (config.on_nonfinite == "skip" or on_cuda):
        extra["fused"] = True
    if config.optimizer == "lamb":
        # timm's Lamb clips the total gradient norm to 1.0 by default; --grad-clip is the
        # only clipping here, so that an unclipped run is unclipped.
        extra["max_grad_norm"] = None
    return create_optimizer_v2(
        parameters, opt=config.optimizer, lr=lr, weight_decay=config.weight_decay, **extra
    )


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters in order; equal for both arms of the same seed."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def epoch_loader(
    data: DataBundle,
    config: RunConfig,
    epoch: int,
    device: torch.device,
    start_batch: int = 0,
) -> DataLoader:
    """Return the loader of one epoch's batches from ``start_batch`` on.

    A generator per (seed, epoch) fixes the data order, the same in both arms, and each
    batch is loaded under its own seed (stabilitylab.train.sampling), so a resumed run gets
    the same batches with the same per-image augmentation. Under torchrun every process
    draws the same global batches and loads its own slice of each.
    """
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    group = distributed.current()
    batches = EpochBatches(
        len(data.train),
        config.batch_size,
        generator,
        config.seed,
        epoch,
        start_batch,
        rank=group.rank,
        world_size=group.world_size,
    )
    return DataLoader(
        SeededBatches(data.train),
        batch_sampler=batches,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=False,
        worker_init_fn=ignore_interrupts_in_worker,
    )


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float, mode: str) -> None:
    """Scale gradients down to ``max_norm``: their total norm, or each tensor's own norm.

    ``parameter`` mode is DINO's ``clip_gradients``: a tensor whose norm exceeds the bound
    is scaled by max_norm / (norm + 1e-6). Both modes scale by device tensors, so neither
    needs a host sync.
    """
    if mode == "total":
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    factors = [(max_norm / (norm + 1e-6)).clamp(max=1.0) for norm in norms]
    torch._foreach_mul_(grads, factors)


class _TrainingStep(torch.nn.Module):
    """A method's training loss as ``forward``, the call DistributedDataParallel wraps."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.training_loss(views, step)


class Trainer:
    """State of one run: model, optimiser, monitor and writers."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        data: DataBundle,
        derived: Derived,
        device: torch.device,
    ):
        self.config = config
        self.derived = derived
        self.data = data
        self.device = device
        self.group = distributed.current()
        self.autocast = autocast_factory(config.precision, device)

        # Model, with the initial state the frozen check and the fingerprint compare against.
        # Under torchrun every process builds the same weights from the seed, and the heads'
        # BatchNorm spans the global batch.
        model = build_model(config, derived)
        self.model = distributed.synchronise_batch_norm(model, device).to(device)
        if config.compile:
            for backbone in (self.model.backbone, *self.model.target_backbones().values()):
                compile_blocks(backbone)
        self.frozen_initial = {name: p.detach().clone() for name, p in self._frozen_parameters()}
        self.init_fingerprint = parameter_fingerprint(self.model)
        # The module the step calls: the method itself, or under torchrun its
        # DistributedDataParallel wrapper, which averages the gradients during backward.
        self.engine = self._training_engine()

        # Optimisation: only trainable parameters reach the optimiser.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.skip_nonfinite = config.on_nonfinite == "skip"
        self.optimizer = build_optimizer(config, self.trainable, derived.lr)
        self.scheduler = build_lr_schedule(
            self.optimizer, derived.total_steps, derived.warmup_steps
        )
        self.scaler = build_scaler(config.precision, device)

        # Monitoring, planted faults and the run directory.
        groups = named_groups(self.model.online_modules(), skip=fixed_parameters(config.pos_embed))
        self.layer_names = [name for name, _ in groups]
        self.faults = FaultPlan(config.inject_spikes, config.lr_spikes, groups, derived.total_steps)
        self.monitor = TrainingMonitor(
            groups, self.model.backbone.blocks[0], device, config.flush_every
        )
        tensorboard_dir = resolve_tensorboard_dir(config.tensorboard, run_dir)
        self.writer: RunWriter
        if not self.group.is_main:
            self.writer = DiscardingWriter(run_dir)
        elif tensorboard_dir is None:
            self.writer = RunWriter(run_dir)
        else:
            self.writer = TensorBoardRunWriter(run_dir, tensorboard_dir)
        self.recorder = MetricsRecorder(
            self.monitor, self.writer, samples_per_step=config.batch_size
        )
        self.run_dir = run_dir
        self.step = 0
        self.evals: list[KnnResult] = []
        self.dense_queue = (
            FeatureQueue(derived.dense_knn_size, self.model.backbone.embed_dim, device)
            if derived.dense_knn_size > 0
            else None
        )
        # (step, features, labels) of the validation queries last encoded, for reuse by the
        # dense monitor at the same step.
        self.query_features: tuple[int, torch.Tensor, torch.Tensor] | None = None
        # Dense kNN rows wait for the next flush, so a frequent monitor does not write a file
        # per evaluation.
        self.dense_rows: list[dict[str, float]] = []
        # None when the attention probes are off. Its rows also wait for the next flush.
        # The weights are alike in every process, so rank 0 alone probes them.
        self.attention = (
            build_attention_probe(
                config, self.model.backbone, data.knn_query, device, self.autocast
            )
            if self.group.is_main
            else None
        )
        # Steps whose optimiser step was not applied, and the step count of the last checkpoint.
        self.skipped_steps: list[int] = []
        self.checkpoint_step: int | None = None
        # Every checkpoint whose step is a multiple of this is also kept; 0 keeps only the last.
        self.keep_checkpoints_every = 0
        self.start_time = time.perf_counter()
        # FLOPs of the first step this process trains and the time of the later ones, for
        # the model FLOP utilisation at the end. A compiled step compiles in its second call.
        self.throughput = ThroughputMeter(device, warmup_steps=1 if config.compile else 0)
        if self.group.rank > 0:
            # Rank 0 keeps the random streams of a single process; the others get their own,
            # so that their augmentations differ.
            seed_everything(distributed.rank_seed(config.seed, self.group.rank))

    def _training_engine(self) -> torch.nn.Module:
        if self.group.world_size == 1:
            return _TrainingStep(self.model)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            _TrainingStep(self.model),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # Buffers are alike in every process already (synchronised BatchNorm statistics,
            # the DINO centre and the SwAV queue are computed from the global batch), so they
            # are not broadcast before each step.
            forward_sync_buffers=False,
        )

    def _frozen_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        if not self.config.freeze_patch_embed:
            return []
        backbones = {"backbone": self.model.backbone, **self.model.target_backbones()}
        return [
            (f"{prefix}.{name}", parameter)
            for prefix, backbone in backbones.items()
            for name, parameter in patch_embed_parameters(backbone)
        ]

    # -- run directory ---------------------------------------------------------------------

    def write_header(self, environment: dict[str, Any]) -> None:
        derived = {
            **self.derived.to_dict(),
            "layers": self.layer_names,
            "first_layer": "patch_embed",
            "last_block": f"blocks.{len(self.model.backbone.blocks) - 1:02d}",
            "init_fingerprint": self.init_fingerprint,
            "faults": self.faults.to_dict(),
            "dataset_description": self.data.description,
            "unread_options": unread_by(self.config.method),
        }
        local = local_crops_of(self.config, self.derived.img_size)
        if local is not None:
            # The side a run without --local-crop-size used, 96/224 of the image side.
            derived["local_crop_size"] = local.size
        self.writer.write_config(self.config.to_dict(), derived, environment)
        self.writer.write_status("running", step=0, total_steps=self.derived.total_steps)

    def flush(self) -> None:
        if self.dense_rows:
            self.writer.append("dense_knn", pd.DataFrame(self.dense_rows))
            self.dense_rows = []
        if self.attention is not None and self.attention.pending:
            self.writer.append("attention", self.attention.drain())
        result = self.recorder.flush()
        if result is None:
            return
        self._note_skipped(result.skipped_steps)
        if result.first_nonfinite is not None:
            self._stop_at_nonfinite(result.first_nonfinite, result.nonfinite_signal or "loss")
        self.writer.write_status(
            "running",
            step=self.step,
            total_steps=self.derived.total_steps,
            skipped_steps=self.skipped_steps,
        )

    def _note_skipped(self, steps: list[int]) -> None:
        if not steps:
            return
        self.skipped_steps.extend(steps)
        step_list = ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")
        log.info(
            "%s: %d optimiser step(s) skipped (non-finite loss or gradients): %s",
            self.run_dir,
            len(steps),
            step_list,
        )

    def _stop_at_nonfinite(self, bad: HostStep, signal: str) -> None:
        """Record the ``diverged`` status of step ``bad`` and raise TrainingError."""
        self.writer.write_status(
            "failed",
            step=bad.step,
            total_steps=self.derived.total_steps,
            reason=DIVERGED_REASONS[signal],
            diverged={
                "step": bad.step,
                "signal": signal,
                "lr": bad.lr,
                "precision": self.config.precision,
                "checkpoint_step": self.checkpoint_step,
            },
            skipped_steps=self.skipped_steps,
        )
        checkpoint_text = (
            f"the checkpoint written after {self.checkpoint_step} steps is kept"
            if self.checkpoint_step is not None
            else "no checkpoint was written before it"
        )
        advice = "lower --lr"
        if self.config.precision != "fp32":
            advice += ", use --precision fp32,"
        raise TrainingError(
            f"the {SIGNAL_NAMES[signal]} became non-finite at step {bad.step} (lr {bad.lr:.3g}, "
            f"precision {self.config.precision}); metrics up to that step are in "
            f"{self.run_dir}, and {checkpoint_text}. To continue, {advice} or pass "
            "--on-nonfinite skip to skip such steps"
        )

    def save(self) -> None:
        # Under the stop policy a few steps may follow a diverged one before the device flag
        # is read. flush() then raises, so their weights never replace the last checkpoint.
        if bool(self.monitor.nonfinite):
            self.flush()
        # stabilitylab.train.checkpoint lists the keys; stabilitylab.train.resume reads them.
        state = {
            "format_version": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
            "rng": capture_rng_state(self.device),
            "world_size": self.group.world_size,
            "evals": [
                {"top1": r.top1, "top5": r.top5, "n_bank": r.n_bank, "n_query": r.n_query}
                for r in self.evals
            ],
            "skipped_steps": list(self.skipped_steps),
            "wall_seconds": time.perf_counter() - self.start_time,
            "keep_checkpoints_every": self.keep_checkpoints_every,
        }
        if self.dense_queue is not None:
            state["dense_knn_queue"] = self.dense_queue.state_dict()
        if self.group.world_size > 1:
            # Every process's generators, so each resumes its own augmentation stream.
            state["rng_by_rank"] = distributed.gather_objects(state["rng"])
        if self.group.is_main:
            write_checkpoint(self.run_dir, state, self.keep_checkpoints_every)
        distributed.barrier()  # no process runs ahead of a checkpoint that is being written
        self.checkpoint_step = self.step

    # -- steps -----------------------------------------------------------------------------

    def views(self, batch: Any) -> list[torch.Tensor]:
        """Move a loader batch to the device as its views, augmenting it there if needed.

        Returns the two global views, then any local crops.
        """
        images = batch[0]
        if self.data.batch_views is not None:
            return list(self.data.batch_views(images.to(self.device, non_blocking=True)))
        return [view.to(self.device, non_blocking=True) for view in images]

    def weight_decay_at(self, step: int) -> float:
        """Return the weight decay of ``step``: constant, or a cosine to weight_decay_end."""
        end = self.config.weight_decay_end
        if end is None:
            return self.config.weight_decay
        return cosine_value(step, self.derived.total_steps, self.config.weight_decay, end)

    def train_step(
        self,
        views: list[torch.Tensor],
        epoch: float,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Run one optimiser step on ``views``; ``labels`` of the batch feed the dense kNN queue."""
        if self.dense_queue is not None and labels is None:
            raise ValueError("the dense kNN monitor is on, so train_step needs the batch labels")
        self.scheduler.step_update(num_updates=self.step)
        lr_factor = self.faults.lr_factor(self.step)
        weight_decay = self.weight_decay_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_factor
            group["weight_decay"] = weight_decay
        lr = lr_at(self.optimizer)
        momentum = self.model.momentum_at(self.step)
        with self.throughput.step():
            self._optimizer_step(views, labels)
        self.recorder.add(
            HostStep(
                step=self.step,
                epoch=epoch,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                wall_time=time.perf_counter() - self.start_time,
            )
        )
        self.step += 1

    def _optimizer_step(self, views: list[torch.Tensor], labels: torch.Tensor | None) -> None:
        """Run forward, backward, the monitor and the optimiser step of ``self.step``."""
        with self.autocast():
            loss, features = self.engine(views, self.step)
        if self.dense_queue is not None:
            assert labels is not None
            self.dense_queue.push(distributed.gather(features), distributed.gather(labels))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # Each process's loss is the mean over its share of the batch, so their mean is the
        # global batch's loss. The gradients were averaged during backward.
        loss = distributed.all_reduce_mean(loss.detach())

        # Every norm is measured on unscaled gradients, after the method's own changes (a
        # layer kept out of training has none) and before clipping, so clipping hides no
        # spike from the monitor.
        self.scaler.unscale_(self.optimizer)
        self.model.adjust_gradients(self.step)
        self.faults.apply_gradient_spikes(self.step)
        overflow = scaler_overflow(self.scaler, self.optimizer)
        skip = self.monitor.record_gradients(
            loss,
            scale_tensor(self.scaler, self.device),
            overflow=overflow if overflow is not None else False,
            skip_nonfinite=self.skip_nonfinite,
        )
        if self.config.grad_clip is not None:
            clip_gradients(self.trainable, self.config.grad_clip, self.config.grad_clip_mode)
        self.monitor.snapshot_weights()
        optimizer_step(self.optimizer, self.scaler, skip if self.skip_nonfinite else None)
        self.scaler.update()
        self.monitor.record_updates()
        self.model.after_optimizer_step(self.step)

    def evaluate(self) -> KnnResult:
        # A broken model would score 0% and read as a dip: stop at the diverged step instead.
        if bool(self.monitor.nonfinite):
            self.flush()
        started = time.perf_counter()
        bank, bank_labels = self.encode(self.data.knn_bank)
        queries, query_labels = self.encode(self.data.knn_query)
        self.query_features = (self.step, queries, query_labels)
        result = weighted_knn(
            bank,
            bank_labels,
            queries,
            query_labels,
            self.data.num_classes,
            k=self.config.knn_k,
            temperature=self.config.knn_temperature,
        )
        epoch = self.step / self.derived.steps_per_epoch
        standard_error = self.top1_standard_error(result)
        frame = evals_row(result, queries, self.step, epoch, standard_error, started)
        self.writer.append("evals", frame)
        self.evals.append(result)
        return result

    def encode(
        self, dataset: Any, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the L2-normalised features and labels of ``dataset``, backbone in eval mode."""
        backbone = self.model.backbone
        was_training = backbone.training
        backbone.eval()
        # Under torchrun each process encodes every N-th image, and the features are
        # gathered back into the dataset's order.
        indices = distributed.shard_indices(len(dataset), self.group)
        shard = dataset if self.group.world_size == 1 else Subset(dataset, indices)
        try:
            features, labels = extract_features(
                self.model.features,
                shard,
                self.device,
                autocast=self.autocast,
                generator=generator,
            )
        finally:
            backbone.train(was_training)
        if self.group.world_size == 1:
            return features, labels
        order = distributed.gather_uneven(torch.as_tensor(indices, device=self.device))
        features = distributed.gather_uneven(features)
        labels = distributed.gather_uneven(labels)
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device)
        return features[position], labels[position]

    def top1_standard_error(self, result: KnnResult) -> float:
        """Return the bootstrap standard error of ``result.top1`` in points, seeded by the step."""
        return bootstrap_accuracy_se(result.correct, seed=self.step)

    def attention_due(self) -> bool:
        """Tell whether the attention probes run after the current step."""
        if self.attention is None:
            return False
        return attention_due(self.config.attention_every, self.step, self.derived.total_steps)

    def probe_attention(self) -> None:
        """Probe the attention of the current weights, keeping the rows for the next flush."""
        if self.attention is None:
            raise ValueError("the attention probes are off (attention_every 0)")
        # Weights broken by a diverged step would give NaN rows: stop at that step instead.
        if bool(self.monitor.nonfinite):
            self.flush()
        self.attention.record(self.step)

    def dense_due(self) -> bool:
        """Tell whether the dense kNN monitor evaluates after the current step."""
        every = self.config.dense_knn_every
        if self.dense_queue is None or self.step == 0:
            return False
        return self.step % every == 0 or self.step == self.derived.total_steps

    def evaluate_dense(self) -> KnnResult | None:
        """Classify the validation images against the dense kNN queue and keep the row.

        Kept rows reach the ``dense_knn`` table at the next :meth:`flush`. Returns None,
        keeping no row, while the queue contains fewer than ``knn_k`` features. The queries
        encoded by :meth:`evaluate` at the same step are reused. Otherwise they are encoded
        with a private generator, so the global random stream that draws the augmentations
        is the same with the dense monitor on or off.
        """
        queue = self.dense_queue
        if queue is None:
            raise ValueError("the dense kNN monitor is off (dense_knn_every 0)")
        if queue.filled < self.config.knn_k:
            log.debug("step %d: dense kNN queue has %d features, skipped", self.step, queue.filled)
            return None
        if bool(self.monitor.nonfinite):
            self.flush()
        started = time.perf_counter()
        if self.query_features is not None and self.query_features[0] == self.step:
            _, queries, query_labels = self.query_features
        else:
            queries, query_labels = self.encode(self.data.knn_query, torch.Generator())
        result = queue_knn(
            queue,
            queries,
            query_labels,
            self.data.num_classes,
            k=self.config.knn_k,
            temperature=self.config.knn_temperature,
        )
        self.dense_rows.append(
            {
                "step": self.step,
                "epoch": self.step / self.derived.steps_per_epoch,
                "knn_top1": result.top1,
                "knn_top5": result.top5 if result.top5 is not None else float("nan"),
                "knn_top1_se": self.top1_standard_error(result),
                "feature_std": queue_feature_std(queue),
                "n_bank": result.n_bank,
                "n_query": result.n_query,
                "eval_seconds": time.perf_counter() - started,
            }
        )
        return result

    def throughput_summary(self) -> tuple[str, dict[str, Any]]:
        """Return the end-of-run line of the step's FLOP/s and MFU, and its figures.

        The achieved rate is compared with the dense matmul rate measured here and now, on
        the same device and dtype, and on a known GPU with the vendor's peak.
        """
        dtype = MATMUL_DTYPES[self.config.precision]
        matmul = measured_matmul_flops(self.device, dtype)
        peak = peak_flops(self.device, dtype)
        return self.throughput.summary(matmul, peak), self.throughput.to_dict(matmul, peak)

    def check_frozen(self) -> bool | None:
        """Compare frozen parameters with their initial values and record the result."""
        entries = []
        for name, parameter in self._frozen_parameters():
            initial = self.frozen_initial[name]
            identical = torch.equal(parameter.detach(), initial)
            diff = (parameter.detach().float() - initial.float()).abs().max().item()
            entries.append({"name": name, "identical": identical, "max_abs_diff": diff})
        applies = bool(entries)
        passed = all(e["identical"] for e in entries) if applies else None
        self.writer.write_json(
            FROZEN_CHECK_FILE,
            {
                "applies": applies,
                "passed": passed,
                "steps": self.step,
                "optimizer": self.config.optimizer,
                "weight_decay": self.config.weight_decay,
                "max_abs_diff": max((e["max_abs_diff"] for e in entries), default=0.0),
                "parameters": entries,
            },
        )
        return passed

    def close(self) -> None:
        self.monitor.close()
        self.writer.close()


def _peer_failure_message(trainer: Trainer, error: BaseException) -> str:
    """Say that another process stopped, where to look, and how the run resumes."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # Gloo's words start with its source file and go on with advice: keep the first sentence.
    cause = re.sub(r"^\[[^\]]*\]\s*", "", cause).split(". ")[0].rstrip(".")
    command = torchrun_command(f"run --resume {trainer.run_dir}") + TORCHRUN_OPTIONS_HINT
    resume = (
        f"continue from the checkpoint at step {trainer.checkpoint_step} with {command}"
        if trainer.checkpoint_step is not None
        else f"there is no checkpoint yet, so {command} trains it again from the start"
    )
    return (
        f"the connection to another training process broke at step {trainer.step} ({cause}). "
        "One of the processes stopped or stalled, and its own log or torchrun's summary says "
        f"why; {resume}"
    )


def _train_epochs(
    trainer: Trainer, progress: tqdm | None, interrupts: DeferredInterrupts | None = None
) -> None:
    """Train from ``trainer.step`` to the end, raising StepInterrupt after a signalled step."""
    config, derived = trainer.config, trainer.derived
    # Every epoch has steps_per_epoch full batches, so the step count gives the position.
    first_epoch, first_batch = divmod(trainer.step, derived.steps_per_epoch)
    for epoch in range(first_epoch, config.epochs):
        start = first_batch if epoch == first_epoch else 0
        loader = epoch_loader(trainer.data, config, epoch, trainer.device, start_batch=start)
        for batch_index, batch in enumerate(loader, start=start):
            views = trainer.views(batch)
            labels = batch[1].to(trainer.device, non_blocking=True)
            trainer.train_step(views, epoch + batch_index / derived.steps_per_epoch, labels=labels)
            if trainer.step % config.eval_every == 0 or trainer.step == derived.total_steps:
                result = trainer.evaluate()
                if progress is not None:
                    progress.set_postfix(knn_top1=f"{result.top1:.1f}", refresh=False)
            if trainer.dense_due():
                trainer.evaluate_dense()
            if trainer.attention_due():
                trainer.probe_attention()
            if trainer.recorder.due:
                trainer.flush()
            if trainer.step % config.checkpoint_every == 0:
                trainer.flush()
                trainer.save()
            if progress is not None:
                progress.update(1)
            if interrupts is not None:
                interrupts.check()


def run_training(
    config: RunConfig,
    out: str | Path,
    overwrite: bool = False,
    show_progress: bool | None = None,
    keep_checkpoints_every: int = 0,
) -> RunResult:
    """Train one run into ``out`` and return its summary.

    Everything that can be checked before training (device, precision, data, batch size) is
    checked before the run directory is created, so a bad option leaves no folder behind.
    ``show_progress=None`` shows a progress bar only on a terminal. Every checkpoint whose
    step is a multiple of ``keep_checkpoints_every`` (0: none) is kept beside the last one.
    :func:`stabilitylab.train.resume.resume_training` continues a run that stopped.
    """
    group = distributed.join(config.device)
    device = distributed.process_device(group, config.device)
    autocast_factory(config.precision, device)
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive_for_data(config, data, group.world_size)

    def prepare() -> Path:
        # Rank 0 alone checks and creates the run directory, and the others wait for it.
        check_tensorboard(config.tensorboard, Path(out))
        if overwrite and Path(out).is_dir():
            check_not_in_use(Path(out))  # before --overwrite empties the folder
        return prepare_run_dir(Path(out), overwrite=overwrite, resume_option="--resume")

    run_dir = distributed.on_main(prepare)
    if group.is_main:
        data.attach_run_dir(run_dir)  # skipped_images.json, with --skip-bad-images

    with RunLock(run_dir) if group.is_main else contextlib.nullcontext():
        trainer = Trainer(config, run_dir, data, derived, device)
        trainer.keep_checkpoints_every = keep_checkpoints_every
        trainer.write_header(describe_environment(device, config.seed, group))
        log.info(
            "%s: %s, %s, %d steps (%d per epoch), lr %.3g, freeze_patch_embed=%s, device %s%s",
            run_dir,
            config.method,
            data.description,
            derived.total_steps,
            derived.steps_per_epoch,
            derived.lr,
            config.freeze_patch_embed,
            device,
            _processes_text(derived),
        )
        return train_run(trainer, show_progress)


def _processes_text(derived: Derived) -> str:
    if derived.world_size == 1:
        return ""
    return (
        f", {derived.world_size} processes of {derived.per_process_batch_size} images each "
        f"(global batch {derived.global_batch_size})"
    )


def _write_interrupted(trainer: Trainer) -> None:
    trainer.writer.write_status(
        "interrupted",
        step=trainer.step,
        total_steps=trainer.derived.total_steps,
        checkpoint_step=trainer.checkpoint_step,
        skipped_steps=trainer.skipped_steps,
    )


def train_run(trainer: Trainer, show_progress: bool | None = None) -> RunResult:
    """Train from ``trainer.step`` to the end, record the outcome and return the summary.

    A run at step 0 is evaluated first, for the start of the kNN curve. SIGINT and SIGTERM
    stop the run after the current step with a checkpoint at that step, and re-raise as
    KeyboardInterrupt with the ``run_dir`` and ``checkpoint_step`` attributes set. The
    caller holds the run directory's RunLock.
    """
    derived, run_dir = trainer.derived, trainer.run_dir
    # tqdm's disable=None hides the bar when stderr is not a terminal.
    disable = None if show_progress is None else not show_progress
    if not trainer.group.is_main:
        disable = True
    progress = tqdm(
        total=derived.total_steps,
        initial=trainer.step,
        desc=run_dir.name,
        unit="step",
        disable=disable,
    )
    interrupts = DeferredInterrupts()
    try:
        with interrupts:
            try:
                if trainer.step == 0:
                    trainer.evaluate()  # the starting point of the kNN curve
                    if trainer.attention_due():
                        trainer.probe_attention()
                _train_epochs(trainer, progress, interrupts)
                trainer.flush()
                passed = trainer.check_frozen()
                trainer.save()
            except StepInterrupt:
                # The signalled step is complete, so its state resumes exactly.
                trainer.flush()
                if trainer.checkpoint_step != trainer.step:
                    trainer.save()
                _write_interrupted(trainer)
                raise
    except KeyboardInterrupt as interrupt:
        if not isinstance(interrupt, StepInterrupt):
            # Raised inside a step, whose state is incomplete: nothing more is flushed or
            # saved, and a resume continues from the last checkpoint.
            _write_interrupted(trainer)
        interrupt.run_dir = run_dir  # type: ignore[attr-defined]
        interrupt.checkpoint_step = trainer.checkpoint_step  # type: ignore[attr-defined]
        raise
    except TrainingError:
        raise  # flush() has already recorded the failure
    except Exception as error:
        trainer.writer.write_status(
            "failed", step=trainer.step, reason=f"{type(error).__name__}: {error}"
        )
        if trainer.group.world_size > 1 and distributed.is_peer_failure(error):
            raise TrainingError(_peer_failure_message(trainer, error)) from error
        raise
    finally:
        progress.close()
        trainer.close()
    wall = time.perf_counter() - trainer.start_time
    top1 = [r.top1 for r in trainer.evals]
    throughput_line, throughput = trainer.throughput_summary()
    trainer.writer.write_status(
        "finished",
        step=trainer.step,
        total_steps=derived.total_steps,
        wall_seconds=wall,
        final_knn_top1=top1[-1],
        best_knn_top1=max(top1),
        frozen_check_passed=passed,
        skipped_steps=trainer.skipped_steps,
        throughput=throughput,
    )
    log.info("%s: %s", run_dir, throughput_line)
    log.info(
        "%s: finished %d steps in %.0f s, kNN top-1 %.2f%% (best %.2f%%)",
        run_dir,
        trainer.step,
        wall,
        top1[-1],
        max(top1),
    )
    if passed is False:
        raise TrainingError(
            f"frozen patch projection changed during training; see {run_dir / FROZEN_CHECK_FILE}"
        )
    return RunResult(run_dir, trainer.step, top1[-1], max(top1), passed, wall)
