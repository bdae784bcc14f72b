"""Weighted kNN evaluation of a user's model for :class:`stabilitylab.Monitor`.

The protocol is the one of ``stabilitylab run`` (:mod:`probes.knn`): L2-normalised features
of a labelled bank and a labelled query set, each query classified by its ``k`` most
similar bank images. One evaluation becomes one row of the ``evals`` table with the same
columns, so the dip detector reads runs of both writers alike.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from probes.bootstrap import bootstrap_accuracy_se
from probes.collapse import effective_rank, embedding_std
from probes.knn import KnnResult, pack_hits, weighted_knn
from stabilitylab.errors import ConfigError, DataError

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KnnEvaluation:
    """A kNN evaluation that the monitor runs at step 0, every ``every`` steps and at close.

    ``bank`` and ``query`` are iterables of ``(images, labels)`` batches, such as
    DataLoaders without shuffling. ``feature_fn`` maps a batch of images to features
    ``(N, C)``. It runs under ``torch.no_grad()`` with the model in eval mode.
    ``num_classes`` is inferred from the largest label when None.
    """

    feature_fn: FeatureFn
    bank: Iterable[Any]
    query: Iterable[Any]
    every: int
    k: int = 20
    temperature: float = 0.07
    num_classes: int | None = None

    def __post_init__(self) -> None:
        check_knn_settings(self.k, self.temperature, self.num_classes)
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ConfigError(
                f"knn every={self.every!r} is not a positive int; pass optimiser steps, e.g. 100"
            )
        if not callable(self.feature_fn):
            raise ConfigError(
                f"knn feature_fn {self.feature_fn!r} is not callable; pass a function that "
                "maps a batch of images to features (N, C)"
            )


def check_knn_settings(k: int, temperature: float, num_classes: int | None) -> None:
    """Raise ConfigError for a non-positive ``k``, ``temperature`` or ``num_classes``."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"knn k={k!r} is not a positive int; the usual value is 20")
    number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not number or not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(
            f"knn temperature={temperature!r} is not a positive number; the usual value is 0.07"
        )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"knn num_classes={num_classes!r} is not a positive int or None")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` in eval mode, then restore each module's own mode.

    Restoring per module keeps submodules that the caller had put in eval mode, such as
    frozen batch norms, in that mode afterwards.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def encode_batches(
    feature_fn: FeatureFn, batches: Iterable[Any], device: torch.device, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (L2-normalised float32 features (N, C), labels (N,)) of ``batches`` on ``device``."""
    features, labels = [], []
    for batch in batches:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise DataError(
                f"the kNN {what} yielded a {type(batch).__name__}, not an (images, labels) "
                "pair; pass a DataLoader over a labelled dataset"
            )
        images, targets = batch[0], batch[1]
        output = feature_fn(images.to(device, non_blocking=True))
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise DataError(
                f"feature_fn returned {shape} for a kNN {what} batch, not features (N, C); "
                "pool or flatten the features inside feature_fn"
            )
        targets = torch.as_tensor(targets)
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise DataError(
                f"the kNN {what} labels have dtype {targets.dtype}; pass integer class labels"
            )
        features.append(F.normalize(output.float(), dim=1))
        labels.append(targets.to(device).long())
    if not features:
        raise DataError(f"the kNN {what} is empty; pass at least one labelled batch")
    return torch.cat(features), torch.cat(labels)


@dataclass(frozen=True)
class KnnRow:
    """One kNN evaluation: the result, its row of the ``evals`` table and the feature width."""

    result: KnnResult
    frame: pd.DataFrame
    feature_dim: int


def evaluate_knn_row(
    model: nn.Module,
    feature_fn: FeatureFn,
    bank: Iterable[Any],
    query: Iterable[Any],
    device: torch.device,
    *,
    step: int,
    epoch: float,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> KnnRow:
    """Encode the bank and the queries with ``model`` in eval mode and classify the queries.

    The standard error is the bootstrap one of ``stabilitylab run``, seeded by ``step``.
    """
    check_knn_settings(k, temperature, num_classes)
    started = time.perf_counter()
    with eval_mode(model):
        bank_features, bank_labels = encode_batches(feature_fn, bank, device, "bank")
        queries, query_labels = encode_batches(feature_fn, query, device, "query set")
    if bank_features.shape[0] < k:
        raise ConfigError(
            f"knn k={k} is more than the {bank_features.shape[0]} images of the kNN bank; pass "
            f"k={bank_features.shape[0]} or less, or a larger bank"
        )
    if bank_features.shape[1] != queries.shape[1]:
        raise DataError(
            f"feature_fn gave {bank_features.shape[1]} channels for the bank and "
            f"{queries.shape[1]} for the queries; both must come from the same encoder"
        )
    largest = int(max(bank_labels.max().item(), query_labels.max().item()))
    smallest = int(min(bank_labels.min().item(), query_labels.min().item()))
    classes = num_classes if num_classes is not None else largest + 1
    if smallest < 0 or largest >= classes:
        raise DataError(
            f"kNN labels range from {smallest} to {largest}, outside 0 .. {classes - 1} for "
            f"num_classes={classes}; pass labels from 0 and a num_classes above the largest"
        )
    result = weighted_knn(
        bank_features, bank_labels, queries, query_labels, classes, k=k, temperature=temperature
    )
    standard_error = bootstrap_accuracy_se(result.correct, seed=step)
    frame = evals_row(result, queries, step, epoch, standard_error, started)
    return KnnRow(result=result, frame=frame, feature_dim=int(queries.shape[1]))


def evals_row(
    result: KnnResult,
    queries: torch.Tensor,
    step: int,
    epoch: float,
    standard_error: float,
    started: float,
) -> pd.DataFrame:
    """Return the ``evals`` row of one kNN evaluation that began at ``started``.

    ``queries`` are the L2-normalised query features, from which the collapse signals are
    taken; ``started`` is a :func:`time.perf_counter` value. Non-finite features, from a
    model broken while its steps were skipped, get a NaN effective rank, because the SVD
    behind it fails on them.
    """
    finite = bool(torch.isfinite(queries).all())
    return pd.DataFrame(
        {
            "step": [step],
            "epoch": [epoch],
            "knn_top1": [result.top1],
            "knn_top5": [result.top5 if result.top5 is not None else math.nan],
            "knn_top1_se": [standard_error],
            "knn_correct": [pack_hits(result.correct)],
            "feature_std": [embedding_std(queries)],
            "effective_rank": [effective_rank(queries) if finite else math.nan],
            "n_bank": [result.n_bank],
            "n_query": [result.n_query],
            "eval_seconds": [time.perf_counter() - started],
        }
    )
