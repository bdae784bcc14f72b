"""Weighted kNN monitor on examples small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from probes.knn import weighted_knn


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_knn_weighted_vote_hand_computed():
    # Bank: two class-0 points near the x axis, one class-1 point on the y axis.
    bank = _unit([1.0, 0.0], [1.0, 0.2], [0.0, 1.0])
    bank_labels = torch.tensor([0, 0, 1])
    # The query at 60 degrees is closer to class 1 (cos 30) than to either class-0 point,
    # but with k=3 and a large temperature the two class-0 votes outweigh the one class-1 vote.
    angle = math.radians(60)
    query = _unit([math.cos(angle), math.sin(angle)])
    sims = (query @ bank.T)[0]
    high_t = weighted_knn(
        bank, bank_labels, query, torch.tensor([1]), num_classes=2, k=3, temperature=10.0
    )
    votes0 = math.exp(sims[0] / 10) + math.exp(sims[1] / 10)
    votes1 = math.exp(sims[2] / 10)
    assert votes0 > votes1
    assert high_t.top1 == 0.0
    # A small temperature makes the closest neighbour dominate: class 1 wins.
    low_t = weighted_knn(
        bank, bank_labels, query, torch.tensor([1]), num_classes=2, k=3, temperature=0.01
    )
    assert low_t.top1 == 100.0
    # k=1 uses only the nearest neighbour.
    nearest = weighted_knn(
        bank, bank_labels, query, torch.tensor([1]), num_classes=2, k=1, temperature=10.0
    )
    assert nearest.top1 == 100.0


def test_knn_top5_counts_only_voted_classes():
    # Ten classes, k=2: only two classes can get a vote, so a query whose class got no vote
    # is a top-5 miss even though five classes are ranked.
    bank = torch.eye(10)
    bank_labels = torch.arange(10)
    query = _unit([1.0, 0.9, 0, 0, 0, 0, 0, 0, 0, 0.05])
    hit = weighted_knn(bank, bank_labels, query, torch.tensor([1]), num_classes=10, k=2)
    assert hit.top1 == 0.0
    assert hit.top5 == 100.0
    miss = weighted_knn(bank, bank_labels, query, torch.tensor([9]), num_classes=10, k=2)
    assert miss.top5 == 0.0


def test_knn_accuracy_over_several_queries():
    bank = _unit([1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1], [0.1, 0, 0.9])
    bank_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    queries = _unit([1, 0.05, 0], [0, 1, 0.05], [0.05, 0, 1], [0.6, 0.5, 0])
    labels = torch.tensor([0, 1, 2, 1])  # the last one lies nearer class 0: a miss
    result = weighted_knn(bank, bank_labels, queries, labels, num_classes=3, k=2)
    assert result.top1 == pytest.approx(75.0)
    assert result.top5 is None  # fewer than 5 classes
    assert result.n_bank == 6
    assert result.n_query == 4


def test_knn_k_larger_than_bank():
    bank = _unit([1, 0], [0, 1])
    result = weighted_knn(
        bank, torch.tensor([0, 1]), _unit([1, 0.1]), torch.tensor([0]), num_classes=2, k=20
    )
    assert result.top1 == 100.0


def test_knn_empty_bank_raises():
    with pytest.raises(ValueError, match="non-empty"):
        weighted_knn(
            torch.empty(0, 2), torch.empty(0, dtype=torch.long), _unit([1, 0]), torch.tensor([0]), 2
        )


def test_knn_correct_mask_per_query():
    bank = _unit([1, 0], [0, 1])
    queries = _unit([1, 0.1], [0.1, 1], [1, 0.2])
    result = weighted_knn(bank, torch.tensor([0, 1]), queries, torch.tensor([0, 0, 0]), 2, k=1)
    assert result.correct.dtype == torch.bool
    assert result.correct.tolist() == [True, False, True]
    assert result.top1 == pytest.approx(100 * 2 / 3)
