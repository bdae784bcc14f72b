"""Benchmark: the kNN monitor's classifier against scikit-learn's, and the monitor's cost.

Run: python benchmarks/knn_sklearn.py [--rounds 20] [--warmup-steps 3] [--device cpu]

Trains the configuration that ``stabilitylab run`` uses without options for
``--warmup-steps`` steps, then encodes the bank and the queries once. That is the digits
preset: MoCo v3, vit_micro, batch 256, ``eval_every`` 2, the 1347 training images as the
bank and the 450 validation images as queries. On those L2-normalised features it times,
interleaved in each round:

- the monitor's ``probes.knn.weighted_knn`` (k 20, votes ``exp(sim / 0.07)``, top-1 and
  top-5);
- scikit-learn's ``KNeighborsClassifier`` fitted and queried (brute force, cosine metric,
  the same k), once with the callable weights ``exp((1 - distance) / 0.07)``, which equal
  the monitor's votes because the cosine distance is 1 - sim, and once with
  ``weights="distance"`` (1 / distance);
- a training step and a full evaluation of the validation-split monitor
  (``Trainer.evaluate``: feature extraction of bank and queries, kNN, bootstrap standard
  error, collapse signals, the evals row), whose ratio gives the monitor's share of the
  training time: one evaluation over ``eval_every`` training steps.

Agreement is the fraction of queries that get the same top-1 class. The monitor's classes
come from ``weighted_knn`` itself, called once per class with every query labelled with it.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch
from _harness import (
    Batches,
    digits_config,
    digits_trainers,
    hardware_line,
    interleave,
    positive_int,
    timed,
)
from sklearn.neighbors import KNeighborsClassifier

from probes.knn import weighted_knn
from stabilitylab.train.loop import Trainer

MONITOR = "monitor (weighted_knn)"
SKLEARN_EXP = "scikit-learn, exp(sim / T) weights"
SKLEARN_DISTANCE = 'scikit-learn, weights="distance"'


class Features:
    """The bank and query features of one trainer state, with the kNN settings of the run."""

    def __init__(self, trainer: Trainer) -> None:
        self.bank, self.bank_labels = trainer.encode(trainer.data.knn_bank)
        self.queries, self.query_labels = trainer.encode(trainer.data.knn_query)
        self.num_classes = trainer.data.num_classes
        self.k = trainer.config.knn_k
        self.temperature = trainer.config.knn_temperature

    def monitor_knn(self) -> None:
        weighted_knn(
            self.bank,
            self.bank_labels,
            self.queries,
            self.query_labels,
            self.num_classes,
            k=self.k,
            temperature=self.temperature,
        )

    def monitor_classes(self) -> np.ndarray:
        """Return the monitor's top-1 class of every query, from ``weighted_knn`` itself."""
        hits = []
        for label in range(self.num_classes):
            labels = torch.full_like(self.query_labels, label)
            result = weighted_knn(
                self.bank,
                self.bank_labels,
                self.queries,
                labels,
                self.num_classes,
                k=self.k,
                temperature=self.temperature,
            )
            hits.append(result.correct.cpu().numpy())
        # Exactly one class is the top-1 of a query, because the top class always has votes.
        hits_by_class = np.stack(hits, axis=1)  # (Q, classes)
        if not (hits_by_class.sum(axis=1) == 1).all():
            raise RuntimeError("weighted_knn gave a query no top-1 class or more than one")
        return np.argmax(hits_by_class, axis=1)

    def sklearn_classes(self, weights: str | Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Fit scikit-learn's classifier on the bank and return its class of every query."""
        classifier = KNeighborsClassifier(
            n_neighbors=self.k, weights=weights, algorithm="brute", metric="cosine"
        )
        classifier.fit(self.bank.cpu().numpy(), self.bank_labels.cpu().numpy())
        return classifier.predict(self.queries.cpu().numpy())

    def exp_weights(self, distances: np.ndarray) -> np.ndarray:
        """Return the monitor's votes ``exp(sim / T)`` from the cosine distances ``1 - sim``."""
        return np.exp((1.0 - distances) / self.temperature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=20, help="timed rounds")
    parser.add_argument(
        "--warmup-steps",
        type=positive_int,
        default=3,
        help="training steps before the features are encoded",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()

    config = digits_config(args.device)
    with digits_trainers(config) as (trainer,):
        batches = Batches(trainer)

        def step() -> float:
            views, labels = batches.next()
            return timed(lambda: trainer.train_step(views, 0.0, labels=labels), trainer.device)

        for _ in range(args.warmup_steps):
            step()
        trainer.evaluate()  # warm-up of the evaluation code paths
        features = Features(trainer)
        arms = {
            MONITOR: lambda: timed(features.monitor_knn, trainer.device),
            SKLEARN_EXP: lambda: timed(
                lambda: features.sklearn_classes(features.exp_weights), trainer.device
            ),
            SKLEARN_DISTANCE: lambda: timed(
                lambda: features.sklearn_classes("distance"), trainer.device
            ),
            "training step": step,
            "evaluation": lambda: timed(trainer.evaluate, trainer.device),
        }
        times = interleave(arms, args.rounds)
        classes = {
            MONITOR: features.monitor_classes(),
            SKLEARN_EXP: features.sklearn_classes(features.exp_weights),
            SKLEARN_DISTANCE: features.sklearn_classes("distance"),
        }
        truth = features.query_labels.cpu().numpy()
        print(hardware_line(trainer.device))
        print(
            f"digits preset after {args.warmup_steps} steps: bank {len(features.bank)}, "
            f"queries {len(features.queries)}, {features.bank.shape[1]}-dim features, "
            f"k {features.k}, T {features.temperature}; medians of {args.rounds} rounds"
        )
        _print_classifiers(times, classes, truth)
        _print_share(times, config.eval_every)


def _print_classifiers(
    times: dict[str, list[float]], classes: dict[str, np.ndarray], truth: np.ndarray
) -> None:
    print("| classifier | time per evaluation (ms) | top-1 (%) | same top-1 as the monitor (%) |")
    print("|---|---|---|---|")
    for name, predicted in classes.items():
        milliseconds = 1000 * statistics.median(times[name])
        top1 = 100 * np.mean(predicted == truth)
        agreement = 100 * np.mean(predicted == classes[MONITOR])
        print(f"| {name} | {milliseconds:.2f} | {top1:.2f} | {agreement:.2f} |")


def _print_share(times: dict[str, list[float]], eval_every: int) -> None:
    step = statistics.median(times["training step"])
    evaluation = statistics.median(times["evaluation"])
    knn = statistics.median(times[MONITOR])
    share = evaluation / (eval_every * step)
    print(
        f"training step {1000 * step:.1f} ms; evaluation {1000 * evaluation:.1f} ms, of which "
        f"the kNN classifier {1000 * knn:.2f} ms; one evaluation every {eval_every} steps adds "
        f"{100 * share:.1f} % to the training time"
    )


if __name__ == "__main__":
    main()
