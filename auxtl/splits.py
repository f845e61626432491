"""Held-out and labeled splits of a data set, and the record that lets a later run honour one.

`train_test_split` is deterministic for a seed (stratified when labeled);
`SplitRecord` stores which split a run used with content hashes of the data, so
transfer can keep pretraining's held-out images for test (see transfer.held_out_split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from auxtl.data import Dataset
from auxtl.errors import InputError


def split_indices(num_examples: int, labels: np.ndarray | None, *, test_fraction: float,
                  seed: int, name: str = "the data") -> tuple[np.ndarray, np.ndarray]:
    """(train, test) example indices, sorted and disjoint: `train_test_split`'s choice.

    With labels the split is stratified: each class puts round(test_fraction *
    count) of its examples in test; without, round(test_fraction * N) of all.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(num_examples)]
    else:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    test = []
    for group in groups:
        n_test = int(np.floor(test_fraction * len(group) + 0.5))
        test.append(rng.permutation(group)[:n_test])
    test = np.sort(np.concatenate(test))
    if len(test) == 0 or len(test) == num_examples:
        raise InputError(f"splitting {num_examples} examples of {name!r} with test_fraction="
                         f"{test_fraction} leaves {len(test)} for test and "
                         f"{num_examples - len(test)} for train; both must be non-empty")
    return np.setdiff1d(np.arange(num_examples), test, assume_unique=True), test


def train_test_split(ds: Dataset, *, test_fraction: float = 0.1,
                     seed: int = 0) -> tuple[Dataset, Dataset]:
    """Splits `ds` into disjoint (train, test) sets, deterministically for `seed`.

    Labeled data is stratified: each class puts round(test_fraction * count) of
    its examples in test. Both sets keep the original example order.
    """
    train, test = split_indices(len(ds), ds.labels, test_fraction=test_fraction, seed=seed,
                                name=ds.name)
    return (ds.subset(train, name=f"{ds.name}[train]"),
            ds.subset(test, name=f"{ds.name}[test]"))


def content_hash(array: np.ndarray) -> str:
    """sha256 (hex) over an array's dtype, shape and bytes in C order.

    Equal hashes mean the same examples in the same order, so a split recorded
    with the hash can be recomputed exactly on data loaded again later.
    """
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(json.dumps([array.dtype.str, list(array.shape)]).encode())
    digest.update(memoryview(array.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class SplitRecord:
    """Which held-out split a run used, so later runs on the same data can honour it.

    `data_hash` identifies the images, `labels_hash` the labels the split was
    stratified by (None: the data was unlabeled and the split was not stratified).
    """

    data: str | None
    data_hash: str
    labels_hash: str | None
    test_fraction: float
    seed: int

    @classmethod
    def of(cls, ds: Dataset, *, data: str | None, test_fraction: float,
           seed: int) -> SplitRecord:
        return cls(data=data, data_hash=content_hash(ds.images),
                   labels_hash=None if ds.labels is None else content_hash(ds.labels),
                   test_fraction=float(test_fraction), seed=int(seed))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SplitRecord:
        try:
            return cls(data=raw.get("data"), data_hash=str(raw["data_hash"]),
                       labels_hash=raw.get("labels_hash"),
                       test_fraction=float(raw["test_fraction"]), seed=int(raw["seed"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed split record {raw!r} ({type(e).__name__}: {e}); "
                             "expected data_hash, labels_hash, test_fraction and seed") from e

    def mismatch(self, other: SplitRecord) -> str | None:
        """Why this split cannot be recomputed on the data `other` describes (None: it can)."""
        if other.data_hash != self.data_hash:
            return "the images differ (content hash)"
        if self.labels_hash is not None and other.labels_hash != self.labels_hash:
            return "the labels differ, and the recorded split was stratified by label"
        return None

    def split(self, ds: Dataset) -> tuple[Dataset, Dataset]:
        """(train, test) of `ds` as recorded: stratified only if the recorded split was.

        Exact when `ds` is the recorded data (check with `mismatch` first).
        """
        labels = ds.labels if self.labels_hash is not None else None
        train, test = split_indices(len(ds), labels, test_fraction=self.test_fraction,
                                    seed=self.seed, name=ds.name)
        return (ds.subset(train, name=f"{ds.name}[train]"),
                ds.subset(test, name=f"{ds.name}[test]"))


def per_class_indices(labels, counts: tuple[int, ...], *, seed: int,
                      name: str = "the data") -> list[np.ndarray]:
    """Disjoint index sets, sorted; set j takes counts[j] examples of every class.

    One seeded permutation of all examples decides: each class gives its first
    counts[0] members in that order to set 0, the next counts[1] to set 1, and so
    on. So for a fixed seed a smaller set 0 is contained in a larger one, and
    `ds.subset(per_class_indices(ds.labels, (n,), seed=s)[0])` is an n-per-class
    labeled subset of `ds` (`name` is used in errors).
    """
    if labels is None:
        raise InputError(f"per-class subsets need labels, but {name!r} is unlabeled")
    counts = tuple(counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
                         for c in counts):
        raise InputError(f"per-class counts must be whole numbers >= 1, got {list(counts)}")
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    picked: list[list[int]] = [[] for _ in counts]
    for label in np.unique(labels):
        members = order[labels[order] == label]
        if len(members) < sum(counts):
            raise InputError(f"class {int(label)} of {name!r} has {len(members)} examples, "
                             f"fewer than the {sum(counts)} needed "
                             f"({' + '.join(map(str, counts))} per class)")
        offset = 0
        for j, count in enumerate(counts):
            picked[j].extend(members[offset:offset + count].tolist())
            offset += count
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in picked]
