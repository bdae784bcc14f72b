"""Representation probes for self-supervised backbones: the kNN monitor and collapse signals."""

from probes.collapse import effective_rank, embedding_std
from probes.knn import KnnResult, extract_features, weighted_knn

__all__ = ["KnnResult", "effective_rank", "embedding_std", "extract_features", "weighted_knn"]
