"""Representation probes for self-supervised backbones: the weighted kNN monitor."""

from probes.knn import KnnResult, extract_features, weighted_knn

__all__ = ["KnnResult", "extract_features", "weighted_knn"]
