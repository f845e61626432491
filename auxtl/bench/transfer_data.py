"""The transfer sweep's data: the unlabeled pool, the scored-only test split, and the
per-seed labeled subsets drawn from the pool."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from auxtl.bench import BenchError
from auxtl.bench.transfer_config import ALL
from auxtl.data import load_dataset
from auxtl.pretrain import SPLIT_SEED
from auxtl.splits import train_test_split
from auxtl.splits import per_class_indices
@dataclasses.dataclass(frozen=True)
class BenchData:
    """`pool`: unlabeled pretraining images and the labeled subsets' source; `test`: scored
    only. `pretrain`: what run_pretraining receives (it holds out its own 10%)."""

    pool: Any
    test: Any
    pretrain: Any
    test_origin: str


def load_bench_data(spec: str) -> BenchData:
    """The pretraining held-out split (SPLIT_SEED, 10%) is the test split, and the rest
    the pool; CIFAR-10 with a test_batch uses it as the test split and all training
    batches as the pool."""
    dataset = load_dataset(spec)
    if dataset.labels is None:
        raise BenchError(f"the transfer benchmark needs labeled data; {spec!r} has no labels")
    kind, _, path = spec.partition(":")
    if kind == "cifar10" and (pathlib.Path(path).expanduser() / "test_batch").is_file():
        return BenchData(dataset, load_dataset(f"cifar10-test:{path}"), dataset,
                         "cifar10-test (test_batch)")
    pool, test = train_test_split(dataset, test_fraction=0.1, seed=SPLIT_SEED)
    return BenchData(pool, test, dataset, f"held-out 10% (SPLIT_SEED={SPLIT_SEED})")


def labeled_indices(labels: np.ndarray, budget: int | str, seed: int) -> np.ndarray:
    """Indices into the pool: `budget` examples of every class, drawn by
    `auxtl.splits.per_class_indices` with this seed (one permutation per seed, so a
    seed's smaller budgets are subsets of its larger ones); `all` = the whole pool."""
    if budget == ALL:
        return np.arange(len(labels))
    return per_class_indices(labels, (int(budget),), seed=seed)[0]


def budget_x(budget: int | str, pool_labels: np.ndarray) -> float:
    """Labels per class on the plot's x axis (`all`: the pool's mean per class)."""
    if budget == ALL:
        return len(pool_labels) / len(np.unique(pool_labels))
    return float(budget)
