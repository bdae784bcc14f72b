"""A few training steps of one method on fixed views, in one process or as a torchrun rank.

tests/test_distributed.py runs :func:`train_steps` once in one process and once in each of
two processes started with the environment torchrun sets. Every process builds the same
global batch of views from a seeded generator and trains on its slice of it, so the two runs
see the same global batches and their recorded losses and gradient norms can be compared.

Run as a script: ``python distributed_steps.py METHOD OUT`` (the torchrun variables set).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from stabilitylab.config import build_config, derive
from stabilitylab.data import build_data
from stabilitylab.train import distributed
from stabilitylab.train.loop import Trainer, seed_everything

GLOBAL_BATCH = 16
STEPS = 4
TRAIN_IMAGES = 64
# Per method: the options of its test run. SwAV's queue of two global batches is in use from
# step 2; DINO trains with two local crops.
METHODS = {
    "mocov3": {},
    "simclr": {},
    "byol": {},
    "swav": {"queue_length": 2 * GLOBAL_BATCH, "num_prototypes": 30},
    "dino": {"num_prototypes": 64, "local_crops": 2, "local_crop_size": 4, "head_bn": True},
}
BASE = {
    "img_size": 8,
    "patch_size": 2,
    "batch_size": GLOBAL_BATCH,
    "epochs": 2,
    "warmup_epochs": 1,
    "lr": 0.05,
    "eval_every": 1000,
    "dense_knn_every": 2,
    "dense_knn_size": 32,
    "knn_max_bank": 64,
    "knn_max_query": 40,
    "knn_k": 5,
    "flush_every": STEPS,
    "attention_every": 0,
    "device": "cpu",
}


def global_views(method: str) -> list[list[torch.Tensor]]:
    """Return each step's views of the global batch: two 8 px views, then any local crops."""
    generator = torch.Generator().manual_seed(1234)
    local = METHODS[method].get("local_crops", 0)
    steps = []
    for _ in range(STEPS):
        views = [torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=generator) for _ in range(2)]
        views += [torch.randn(GLOBAL_BATCH, 1, 4, 4, generator=generator) for _ in range(local)]
        steps.append(views)
    return steps


def train_steps(method: str, out: Path) -> None:
    """Train STEPS steps of ``method`` into ``out`` on this process's slice of each batch."""
    group = distributed.join("cpu")
    config = build_config("digits", method=method, **BASE, **METHODS[method])
    seed_everything(config.seed)
    data = build_data(config)
    data.train = Subset(data.train, range(TRAIN_IMAGES))
    derived = derive(
        config, len(data.train), data.in_chans, data.num_classes, world_size=group.world_size
    )
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, out, data, derived, torch.device("cpu"))
    trainer.write_header({"world_size": group.world_size})
    size = derived.per_process_batch_size
    rows = slice(group.rank * size, (group.rank + 1) * size)
    labels = torch.arange(GLOBAL_BATCH) % data.num_classes
    for views in global_views(method):
        trainer.train_step([view[rows] for view in views], epoch=0.0, labels=labels[rows])
        if trainer.dense_due():
            trainer.evaluate_dense()
    trainer.evaluate()
    trainer.flush()
    trainer.save()
    trainer.close()
    distributed.shutdown()


if __name__ == "__main__":
    train_steps(sys.argv[1], Path(sys.argv[2]))
