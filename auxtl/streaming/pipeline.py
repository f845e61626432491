"""The grain pipeline of a streamed data set: split, normalisation sample, batches, eval.

The stateless order of the in-memory path is kept: the global batch of step t is
`batch_indices(n_train, B, seed=seed, step=t)` over the training split (the held-out
split is `splits.split_indices`, stratified by class folders when there are some), each
process decodes only its contiguous slice (`parallel.process_slice`'s rule), and a
random crop is a pure function of (seed, step, example index). The grain data set is
`MapDataset.range(steps).map(LoadBatch)`: element t is step t's local batch, decoded
in worker processes (`mp_prefetch`) when `workers > 0`, so the iterator's state is a
position and resuming at step k needs only k (the state is checkpointed as well).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any

import grain
import numpy as np
from absl import flags

from auxtl.data import Normalization, batch_indices
from auxtl.errors import InputError
from auxtl.splits import split_indices
from auxtl.streaming.sources import open_source
from auxtl.streaming.transforms import (crop_rng, decode, random_resized_crop, resize_to,
                                        stored_channels)

NORMALIZATION_SAMPLE = 2048   # training images the normalisation is computed from
EVAL_EXAMPLES = 10_000        # held-out images evaluated when no cap is given
_SAMPLE_SEED = 0x5A3


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True, eq=False)
class StreamData:
    """A streamed set, split: source indices of the training and held-out examples and the
    (H, W, C) every image is brought to."""

    spec: str
    source: Any
    train: np.ndarray
    test: np.ndarray
    image_shape: tuple[int, int, int]

    def metadata(self, *, test_fraction: float, split_seed: int) -> dict[str, Any]:
        """What a trunk records about its streamed data (cheap, and enough to recompute
        the split on the same listing)."""
        return {"data": self.spec, "files": len(self.source), "listing_sha256":
                self.source.listing, "test_fraction": test_fraction, "split_seed": split_seed,
                "n_train": int(len(self.train)), "n_test": int(len(self.test)),
                "image_shape": list(self.image_shape), "labeled": self.source.labels is not None}


def parse_image_size(text: str | None) -> tuple[int, ...] | None:
    """'H,W' or 'H,W,C' (C 1 or 3) -> a tuple; None stays None."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        size = ()
    if len(size) not in (2, 3) or min(size) < 1 or (len(size) == 3 and size[2] not in (1, 3)):
        raise InputError(f"--image-size must be H,W or H,W,C (C 1 or 3) with positive sizes, "
                         f"got {text!r}")
    return size


def prepare_stream(spec: str, *, test_fraction: float, split_seed: int,
                   image_size: tuple[int, ...] | None = None, log=print) -> StreamData:
    """Opens `spec`, splits it, and fixes the image shape: `image_size` (H, W[, C]) or the
    first file's size; C (unless given) is 3 if any image of the normalisation sample is
    stored in colour, else 1 (headers only). `log` hears the defaults chosen."""
    source = open_source(spec)
    train, test = split_indices(len(source), source.labels, test_fraction=test_fraction,
                                seed=split_seed, name=spec)
    size = parse_image_size(",".join(str(v) for v in image_size)) if image_size else ()
    if len(size) < 2:
        first = decode(source.read(0), None, name=source.describe(0))
        size = first.shape[:2]
        log(f"auxtl: streaming {spec}: images resized to the first file's size "
            f"{size[0]}x{size[1]} (HxW; --image-size sets it)")
    if len(size) == 2:
        colour = any(stored_channels(source.read(int(i)), name=source.describe(int(i))) == 3 for i in _sample(train))
        size = (*size, 3 if colour else 1)
    return StreamData(spec, source, train, test, tuple(int(v) for v in size))


def _sample(train: np.ndarray) -> np.ndarray:
    """The normalisation sample: the first NORMALIZATION_SAMPLE training examples of a
    seeded permutation (the same for every run on the same listing)."""
    order = np.random.default_rng(_SAMPLE_SEED).permutation(len(train))
    return train[np.sort(order[:NORMALIZATION_SAMPLE])]


class LoadImages:
    """Source indices -> (N, H, W, C) uint8, resized deterministically (held-out images,
    the normalisation sample). Picklable for grain's worker processes."""

    def __init__(self, source, image_shape: tuple[int, int, int]):
        self.source, self.image_shape = source, tuple(image_shape)

    def one(self, index: int) -> np.ndarray:
        image = decode(self.source.read(index), self.image_shape[2],
                       name=self.source.describe(index))
        return resize_to(image, self.image_shape[:2])

    def __call__(self, indices) -> np.ndarray:
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        for row, index in enumerate(indices):
            out[row] = self.one(int(index))
        return out


class LoadBatch(LoadImages):
    """Step t -> {"step": t, "images": this process's slice of step t's global batch},
    random-resized-cropped (`crop`) or resized. A pure function of t."""

    def __init__(self, stream: StreamData, *, batch_size: int, seed: int, crop: bool = True,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(stream.source, stream.image_shape)
        if batch_size % process_count:
            raise InputError(f"batch size {batch_size} is not divisible by the "
                             f"{process_count} processes")
        self.train, self.batch_size, self.seed, self.crop = stream.train, batch_size, seed, crop
        per = batch_size // process_count
        self.rows = slice(process_index * per, (process_index + 1) * per)

    def indices(self, step: int) -> np.ndarray:
        positions = batch_indices(len(self.train), self.batch_size, seed=self.seed, step=step)
        return self.train[positions[self.rows]]

    def __call__(self, step) -> dict[str, np.ndarray]:
        step = int(step)
        indices = self.indices(step)
        if not self.crop:
            return {"step": np.int64(step), "images": super().__call__(indices)}
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        for row, index in enumerate(indices):
            index = int(index)
            image = decode(self.source.read(index), self.image_shape[2],
                           name=self.source.describe(index))
            out[row] = random_resized_crop(image, self.image_shape[:2],
                                           crop_rng(self.seed, step, index))
        return {"step": np.int64(step), "images": out}


def iterate(dataset: grain.MapDataset, workers: int) -> grain.DatasetIterator:
    """An iterator over `dataset` in order, decoded in `workers` processes (0: threads of
    this process), with small buffers so memory stays bounded."""
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
    iter_ds = dataset.to_iter_dataset(read)
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker start reads absl flags (defaults)
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=2))
    return iter(iter_ds)


def train_batches(stream: StreamData, *, batch_size: int, seed: int, steps: int,
                  workers: int, start: int = 0, state: dict | None = None,
                  process_index: int = 0, process_count: int = 1,
                  crop: bool = True) -> grain.DatasetIterator:
    """The iterator over steps `start`..`steps - 1`'s local batches. A checkpointed grain
    `state` must come from an iterator built with the same `start`, `steps` and `workers`
    (it counts positions from `start`): it is restored to where that one was."""
    load = LoadBatch(stream, batch_size=batch_size, seed=seed, crop=crop,
                     process_index=process_index, process_count=process_count)
    dataset = grain.MapDataset.range(steps).map(load)
    if start:
        dataset = dataset.slice(slice(start, steps))
    iterator = iterate(dataset, workers)
    if state is not None:
        iterator.set_state(state)
    return iterator


def normalization_sample(stream: StreamData, *, workers: int = 0) -> Normalization:
    """Per-channel mean and std of the normalisation sample (images resized to the image
    shape, scaled to [0, 1]), accumulated in float64 image by image (Chan's pairwise
    update): memory is one batch, not the sample."""
    indices = _sample(stream.train)
    chunks = np.array_split(indices, max(1, len(indices) // 64))
    load = LoadImages(stream.source, stream.image_shape)
    count, mean, m2 = 0, np.zeros(stream.image_shape[2]), np.zeros(stream.image_shape[2])
    iterator = iterate(grain.MapDataset.source(chunks).map(load), workers)
    try:
        for images in iterator:
            for image in images:
                x = image.reshape(-1, image.shape[-1]).astype(np.float64) / 255.0
                n_b, mean_b = len(x), x.mean(axis=0)
                m2_b = ((x - mean_b) ** 2).sum(axis=0)
                delta, total = mean_b - mean, count + n_b
                mean = mean + delta * (n_b / total)
                m2 = m2 + m2_b + delta ** 2 * (count * n_b / total)
                count = total
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    std = np.maximum(np.sqrt(m2 / count), 1e-6)
    return Normalization(mean=tuple(mean.tolist()), std=tuple(std.tolist()))


class EvalImages:
    """The held-out images as a lazy array: `len()` and slices decode on demand (what
    `pretrain_step.evaluate` reads), at most `limit` of them, in split order, in
    `threads` threads (decoding and resizing release the GIL)."""

    def __init__(self, stream: StreamData, limit: int | None = EVAL_EXAMPLES,
                 threads: int | None = None):
        self.indices = stream.test if limit is None else stream.test[:limit]
        self.load = LoadImages(stream.source, stream.image_shape)
        self.threads = default_workers() if threads is None else max(1, threads)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("EvalImages is read in slices")
        indices = [int(i) for i in self.indices[key]]
        out = np.empty((len(indices), *self.load.image_shape), np.uint8)
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            for row, image in enumerate(pool.map(self.load.one, indices)):
                out[row] = image
        return out


def pipeline_images_per_s(spec: str, *, batch_size: int = 64, steps: int = 40,
                          workers: int | None = None, image_size=None, seed: int = 0,
                          test_fraction: float = 0.1, stream: StreamData | None = None) -> float:
    """The input pipeline's rate alone (images/s decoded, cropped and batched on this
    host), after two warm-up batches (worker start-up excluded)."""
    stream = stream or prepare_stream(spec, test_fraction=test_fraction, split_seed=0,
                                      image_size=image_size, log=lambda *_: None)
    workers = default_workers() if workers is None else workers
    iterator = train_batches(stream, batch_size=batch_size, seed=seed, steps=steps + 2,
                             workers=workers)
    take = lambda: np.array(next(iterator)["images"])  # noqa: E731 (out of shared memory)
    try:
        take(), take()
        start = time.perf_counter()
        for _ in range(steps):
            take()
        return steps * batch_size / (time.perf_counter() - start)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
