"""Representation probes for self-supervised backbones: the kNN monitors and collapse signals."""

from probes.bootstrap import bootstrap_accuracy_se
from probes.collapse import effective_rank, embedding_std
from probes.dense import FeatureQueue, queue_feature_std, queue_knn
from probes.knn import KnnResult, extract_features, pack_hits, weighted_knn

__all__ = [
    "FeatureQueue",
    "KnnResult",
    "bootstrap_accuracy_se",
    "effective_rank",
    "embedding_std",
    "extract_features",
    "pack_hits",
    "queue_feature_std",
    "queue_knn",
    "weighted_knn",
]
