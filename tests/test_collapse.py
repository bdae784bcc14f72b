"""Collapse signals on features whose spread is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from probes.collapse import effective_rank, embedding_std


def test_std_of_spread_features_near_inverse_sqrt_dim():
    torch.manual_seed(0)
    dim = 64
    features = F.normalize(torch.randn(4000, dim), dim=1)
    assert embedding_std(features) == pytest.approx(1 / math.sqrt(dim), rel=0.05)


def test_std_of_collapsed_features_is_zero():
    features = F.normalize(torch.ones(100, 16), dim=1)
    assert embedding_std(features) == pytest.approx(0.0, abs=1e-6)


def test_std_needs_two_samples():
    assert math.isnan(embedding_std(torch.ones(1, 4)))


def test_effective_rank_bounds():
    # Orthonormal rows: all singular values equal, so the rank is the full dimension.
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0, rel=1e-5)
    # One direction only: rank 1.
    line = torch.ones(50, 1) * torch.tensor([[0.6, 0.8, 0.0]])
    assert effective_rank(line) == pytest.approx(1.0, rel=1e-4)
    # Two equal directions: rank 2.
    two = torch.cat([torch.eye(3)[:1].repeat(10, 1), torch.eye(3)[1:2].repeat(10, 1)])
    assert effective_rank(two) == pytest.approx(2.0, rel=1e-4)


def test_effective_rank_of_zeros_is_nan():
    assert math.isnan(effective_rank(torch.zeros(5, 3)))
