"""Attention probes: the entropy and the maximum logit of every block's attention heads.

At step 0, after every ``attention_every`` optimiser steps and after the last step, the online
backbone encodes a fixed batch of validation images in eval mode, under ``torch.no_grad()``
and the run's autocast. For every block and head the probe records:

- ``entropy``: ``-sum_j A_ij log A_ij`` over the keys ``j``, averaged over the query tokens
  ``i`` and the images, divided by ``log N`` for ``N`` keys, so 1 is uniform attention and 0
  is attention on a single key for every query;
- ``max_logit``: the largest attention logit ``q_i . k_j * scale`` over the images, queries
  and keys, after timm's ``q_norm`` and ``k_norm`` when ``qk_norm`` is on.

timm's ``Attention`` calls ``F.scaled_dot_product_attention``, which never returns the
attention matrix ``A``. A forward pre-hook on each block's ``attn`` module takes the module's
input (the output of ``norm1``) and recomputes ``q`` and ``k`` with the module's own ``qkv``,
``q_norm``, ``k_norm`` and ``scale``. The logits, softmax and entropy are computed in float32
with autocast turned off, because bf16 keeps 8 significant bits and so rounds a logit of 20
to a multiple of 0.125.

The batch is drawn once, with a private generator seeded by the run's seed, so it is the
same in both arms of a seed and on resume, and the global random streams that draw the
augmentations are never touched. The results stay on the device until one transfer per
probe. The hooks exist only while a probe runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from stabilitylab.config import RunConfig
from stabilitylab.models.compiled import eager_blocks
from stabilitylab.monitor.knn_eval import eval_mode
from stabilitylab.runs import TABLE_COLUMNS, empty_table

log = logging.getLogger(__name__)

ATTENTION_TABLE = "attention"
# Attributes of timm's Attention that the probe reads to recompute q and k.
_ATTENTION_ATTRIBUTES = ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale")


def attention_logits(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the attention logits ``q . k * scale`` of timm's ``attn`` for input ``x``.

    ``x`` is the input of the module, (B, N, C). Returns float32 logits (B, heads, N, N),
    indexed by query then key. The projection runs under the caller's autocast, as in the
    model's own forward, and the product of q and k in float32.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)  # each (B, heads, N, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    with torch.autocast(x.device.type, enabled=False):
        # timm's non-fused path also scales q before the product, so the rounding matches it.
        return (q.float() * attn.scale) @ k.float().transpose(-2, -1)


def attention_statistics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the normalised entropy and the maximum logit per head, each (heads,), float32.

    ``logits`` is (B, heads, N, N), indexed by query then key. With a single key (N = 1)
    the normalised entropy is undefined and NaN.
    """
    logits = logits.float()
    keys = logits.shape[-1]
    log_attention = torch.log_softmax(logits, dim=-1)
    entropy = -(log_attention.exp() * log_attention).sum(dim=-1)  # (B, heads, N)
    mean_entropy = entropy.mean(dim=(0, 2))
    if keys > 1:
        normalised = mean_entropy / math.log(keys)
    else:
        normalised = torch.full_like(mean_entropy, math.nan)
    return normalised, logits.amax(dim=(0, 2, 3))


def probe_batch(dataset: Dataset, count: int, seed: int) -> torch.Tensor:
    """Return ``count`` images of ``dataset`` drawn with a private generator, in index order.

    A dataset of fewer than ``count`` images gives all of them, with a log line, so that a
    small validation split still gets its probes.
    """
    available = len(dataset)
    if count > available:
        log.info(
            "attention probes: the kNN monitor has %d validation images, fewer than "
            "--attention-images %d, so the probes use all %d",
            available,
            count,
            available,
        )
        count = available
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(available, generator=generator)[:count].sort().values
    return torch.stack([torch.as_tensor(dataset[index][0]) for index in indices.tolist()])


class AttentionProbe:
    """Probe of the attention statistics of ``backbone`` on fixed ``images``.

    ``backbone`` is a timm VisionTransformer, whose ``blocks`` each have a timm ``Attention``
    as ``attn``. ``autocast`` opens the run's autocast context. The values of
    :meth:`record` wait in memory until :meth:`drain` turns them into rows, so a frequent
    probe neither writes a file nor builds a DataFrame per probe.
    """

    def __init__(
        self,
        backbone: nn.Module,
        images: torch.Tensor,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        blocks = list(getattr(backbone, "blocks", ()))
        if not blocks:
            raise ValueError("the attention probe needs a timm VisionTransformer with blocks")
        for index, block in enumerate(blocks):
            missing = [name for name in _ATTENTION_ATTRIBUTES if not hasattr(block.attn, name)]
            if missing:
                raise ValueError(
                    f"blocks.{index:02d}.attn is a {type(block.attn).__name__} without "
                    f"{', '.join(missing)}; the attention probe reads timm's Attention"
                )
        self.backbone = backbone
        self.blocks = blocks
        self.layer_names = [f"blocks.{index:02d}" for index in range(len(blocks))]
        self.images = images
        self.autocast = autocast
        # (step, host values (2, heads of all blocks)) of each probe since the last drain.
        self.pending: list[tuple[int, np.ndarray]] = []
        self._heads: list[int] = []  # heads per block, known after the first probe

    @torch.no_grad()
    def measure(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the backbone on the images and return the entropy and max logit of each head.

        Both lists hold one device tensor (heads,) per block, in block order.
        """
        entropy: list[torch.Tensor | None] = [None] * len(self.blocks)
        max_logit: list[torch.Tensor | None] = [None] * len(self.blocks)

        def capture(index: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["x"]
            entropy[index], max_logit[index] = attention_statistics(attention_logits(module, x))

        handles = [
            block.attn.register_forward_pre_hook(partial(capture, index), with_kwargs=True)
            for index, block in enumerate(self.blocks)
        ]
        try:
            # The hooks sit inside the blocks, so compiled blocks run eagerly here.
            with eval_mode(self.backbone), eager_blocks(self.backbone), self.autocast():
                self.backbone.forward_features(self.images)
        finally:
            for handle in handles:
                handle.remove()
        names = zip(self.layer_names, entropy, strict=True)
        skipped = [name for name, value in names if value is None]
        if skipped:
            raise RuntimeError(f"the forward pass skipped the attention of {', '.join(skipped)}")
        return entropy, max_logit  # type: ignore[return-value]

    def record(self, step: int) -> None:
        """Measure the probe after ``step`` optimiser steps and keep the values for drain()."""
        entropy, max_logit = self.measure()
        self._heads = [len(values) for values in entropy]
        # The one device-to-host transfer of this probe: (2, heads of all blocks).
        host = torch.stack([torch.cat(entropy), torch.cat(max_logit)]).cpu()
        self.pending.append((step, host.double().numpy()))

    def drain(self) -> pd.DataFrame:
        """Return the rows recorded since the last drain, in step order, and forget them.

        Rows are ordered by step, then block, then head.
        """
        if not self.pending:
            return empty_table(ATTENTION_TABLE)
        heads = self._heads
        per_probe = sum(heads)
        steps = np.array([step for step, _ in self.pending], dtype=np.int64)
        values = np.concatenate([host for _, host in self.pending], axis=1)
        layers = np.repeat(np.array(self.layer_names, dtype=object), heads)
        frame = pd.DataFrame(
            {
                "step": np.repeat(steps, per_probe),
                "layer": pd.Categorical(np.tile(layers, len(steps)), categories=self.layer_names),
                "head": np.tile(
                    np.concatenate([np.arange(count, dtype=np.int64) for count in heads]),
                    len(steps),
                ),
                "entropy": values[0],
                "max_logit": values[1],
            },
            columns=list(TABLE_COLUMNS[ATTENTION_TABLE]),
        )
        self.pending = []
        return frame


def build_attention_probe(
    config: RunConfig,
    backbone: nn.Module,
    dataset: Dataset,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> AttentionProbe | None:
    """Build the probe of a run on ``config.attention_images`` images of ``dataset``.

    Returns None when ``config.attention_every`` is 0.
    """
    if config.attention_every == 0:
        return None
    images = probe_batch(dataset, config.attention_images, config.seed)
    return AttentionProbe(backbone, images.to(device), autocast)


def attention_due(every: int, step: int, total_steps: int) -> bool:
    """Tell whether a probe runs after ``step`` steps: at 0, every ``every`` steps and the last."""
    if every == 0:
        return False
    return step % every == 0 or step == total_steps
