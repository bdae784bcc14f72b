"""Collapse signals of a set of L2-normalised features, computed at each kNN evaluation.

- Embedding std: the standard deviation of each channel over the samples, averaged over
  channels (the SimSiam collapse metric). For features spread uniformly on the unit sphere
  of dimension d it is about 1/sqrt(d); for features collapsed to one point it is 0.
- Effective rank (Roy and Vetterli, 2007; used as RankMe by Garrido et al., 2023): exp of the
  entropy of the singular values normalised to sum to 1. It ranges from 1 (all features on
  one line) to min(N, d) (singular values all equal).
"""

from __future__ import annotations

import math

import torch


def embedding_std(features: torch.Tensor) -> float:
    """Return the mean over channels of the per-channel std of ``features`` (N, C)."""
    if features.shape[0] < 2:
        return math.nan
    return float(features.float().std(dim=0).mean())


def effective_rank(features: torch.Tensor, eps: float = 1e-12) -> float:
    """Return exp(entropy) of the normalised singular values of ``features`` (N, C)."""
    singular = torch.linalg.svdvals(features.float())
    total = singular.sum()
    if not torch.isfinite(total) or total <= 0:
        return math.nan
    p = singular / total
    entropy = -(p * (p + eps).log()).sum()
    return float(entropy.exp())
