"""Weighted kNN classification of frozen features, the DINO protocol.

Features are L2-normalised, so the similarity is the cosine. Each query takes its ``k``
most similar bank images; neighbour ``i`` votes for its class with weight
``exp(sim_i / temperature)``. Classes are ranked by their summed votes. A query counts as a
top-n hit when its class received a vote and ranks among the first ``min(n, k, classes)``
candidates, so a class that no neighbour voted for never counts as predicted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class KnnResult:
    """Accuracies in percent; ``top5`` is None with fewer than 5 classes.

    ``correct`` is the top-1 hit of each query in input order, a bool tensor (Q,) on the
    queries' device, for resampling the query set.
    """

    top1: float
    top5: float | None
    n_bank: int
    n_query: int
    correct: torch.Tensor | None = field(default=None, compare=False, repr=False)


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    autocast: Callable[[], object] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (L2-normalised float32 features (N, C), labels (N,)) on ``device``.

    Creating a DataLoader iterator draws its worker base seed from ``generator``, or from the
    global CPU generator when it is None. Pass a private generator to leave the global random
    stream, and so the training augmentations, untouched.
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, generator=generator
    )
    features, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if autocast is not None:
            with autocast():
                output = encode(images)
        else:
            output = encode(images)
        features.append(F.normalize(output.float(), dim=1))
        labels.append(targets.to(device))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def weighted_knn(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> KnnResult:
    """Classify L2-normalised ``queries`` (Q, C) by their neighbours in ``bank`` (N, C)."""
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError(
            f"kNN needs a non-empty bank and query set, got {len(bank)} and {len(queries)}"
        )
    k = min(k, len(bank))
    top5_n = min(5, k, num_classes)
    correct = []
    hits5 = torch.zeros((), dtype=torch.long, device=queries.device)
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start : start + chunk_size]
        labels = query_labels[start : start + chunk_size]
        similarity = chunk @ bank.T  # (q, N)
        top_sim, top_index = similarity.topk(k, dim=1)  # (q, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_index], weights)  # (q, classes)
        ranked_votes, ranked = votes.topk(top5_n, dim=1)
        match = (ranked == labels[:, None]) & (ranked_votes > 0)
        correct.append(match[:, 0])
        hits5 += match.any(dim=1).sum()
    hits = torch.cat(correct)
    total = len(queries)
    top1 = 100.0 * hits.sum().item() / total
    top5 = 100.0 * hits5.item() / total if num_classes >= 5 else None
    return KnnResult(top1=top1, top5=top5, n_bank=len(bank), n_query=total, correct=hits)


def pack_hits(correct: torch.Tensor | None) -> bytes | None:
    """Pack per-query top-1 hits into bytes, 8 queries a byte, in query order.

    The evals table stores them so that the dip detector can compare two evaluations on the
    same queries; ``numpy.unpackbits(..., count=n_query)`` restores them.
    """
    if correct is None:
        return None
    return np.packbits(correct.detach().to("cpu", torch.bool).numpy()).tobytes()
