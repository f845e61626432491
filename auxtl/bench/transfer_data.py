"""The transfer sweep's data: the unlabeled pool, the scored-only test split, and the
per-seed labeled training and validation subsets drawn from the pool."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, NamedTuple

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


VAL_SEED = 1_000_003   # draws the validation images, the same for every seed


class SeedSplit(NamedTuple):
    """One seed's labeled subsets: indices into the pool, disjoint."""

    train: np.ndarray
    val: np.ndarray


def val_count(budget: int | str, *, minimum: int, maximum: int) -> int:
    """Validation images per class for a budget: the budget itself (as many to validate as
    to train), at least `minimum`, at most `maximum`; `all`: `maximum`."""
    if budget == ALL:
        return maximum
    return max(minimum, min(int(budget), maximum))


def labeled_split(labels: np.ndarray, budget: int | str, seed: int, *, val_per_class: int
                  ) -> SeedSplit:
    """`val_per_class` validation images of every class, drawn with VAL_SEED (so every seed
    of a budget validates on the same images and the seeds differ only in their training
    subsets: the engine validates all seeds on one shared set), then `budget` training
    images of every class from the rest with `seed` (`all`: the whole rest), both by
    `auxtl.splits.per_class_indices`. For a fixed seed and validation size, a smaller
    training subset is contained in a larger one."""
    val = per_class_indices(labels, (val_per_class,), seed=VAL_SEED)[0]
    rest = np.setdiff1d(np.arange(len(labels)), val)
    if budget == ALL:
        return SeedSplit(rest, val)
    train = rest[per_class_indices(labels[rest], (int(budget),), seed=seed)[0]]
    return SeedSplit(train, val)
