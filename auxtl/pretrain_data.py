"""Pretraining's input, in memory or streamed: one interface for the loop.

`load_pretrain_data` gives the training split's size, the image shape, the
normalisation, the held-out images to evaluate and `batches(steps, start, state)`: an
iterator of (this process's rows of step t's global batch, the input state after it)
for t = start .. steps - 1. Both paths keep the stateless order (the global batch of
step t is `batch_indices(n_train, B, seed=seed, step=t)`, each process its slice), so
the input state is a position and resuming at step k needs only k.

- In memory (the default): `load_dataset(spec)`, `train_test_split`, normalisation over
  the whole training split, as before.
- Streamed (`stream=True`, or an `npz-shards:` / `arrayrecord:` spec): grain decodes in
  `workers` processes; the normalisation comes from a bounded sample; the held-out
  images are read lazily, at most `eval_examples` of them (`auxtl.streaming`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from auxtl import parallel, streaming
from auxtl.data import (STREAMED_KINDS, Dataset, Normalization, batch_indices,
                        compute_normalization, load_dataset)
from auxtl.errors import InputError
from auxtl.splits import train_test_split

Batches = Iterator[tuple[np.ndarray, dict[str, Any] | None]]
RECORD = "data.json"   # beside a streamed run's config.json: what it reads


@dataclasses.dataclass
class PretrainData:
    n_train: int
    input_shape: tuple[int, int, int]
    normalization: Normalization
    eval_images: Any                  # numpy array, or streaming.EvalImages (sliced lazily)
    batches: Callable[..., Batches]   # (steps, start, state) -> (local batch, input state)
    dataset: Dataset | None = None    # the in-memory set (its split is recorded)
    stream: dict[str, Any] | None = None  # what a streamed set records in the trunk
    close: Callable[[], None] = lambda: None


def wants_stream(stream: bool, spec: str) -> bool:
    """Whether the data is streamed: asked for, or a shard spec (which only streams)."""
    return stream or str(spec).partition(":")[0] in STREAMED_KINDS


def load_pretrain_data(spec: str, *, stream: bool, test_fraction: float, split_seed: int,
                       batch_size: int, seed: int, image_size=None, workers: int | None = None,
                       eval_examples: int | None = None, dataset: Dataset | None = None,
                       log=print) -> PretrainData:
    """The run's input (see the module docstring); InputError for bad data or settings."""
    if wants_stream(stream, spec):
        if dataset is not None:
            raise InputError("a streamed run reads its data spec; it takes no in-memory dataset")
        if not streaming.is_stream_spec(spec):
            raise InputError(f"--stream reads 'folder:PATH', 'npz-shards:GLOB' or "
                             f"'arrayrecord:GLOB' data, got {spec!r}")
        return _streamed(spec, test_fraction=test_fraction, split_seed=split_seed,
                         batch_size=batch_size, seed=seed, image_size=image_size,
                         workers=streaming.default_workers() if workers is None else workers,
                         eval_examples=eval_examples, log=log)
    if image_size is not None:
        raise InputError("--image-size applies to streamed data (--stream); in-memory data "
                         "keeps its own size")
    dataset = load_dataset(spec) if dataset is None else dataset
    train_set, test_set = train_test_split(dataset, test_fraction=test_fraction, seed=split_seed)
    images = train_set.images

    def batches(steps: int, start: int = 0, state=None) -> Batches:
        for step in range(start, steps):
            indices = parallel.process_slice(
                batch_indices(len(images), batch_size, seed=seed, step=step))
            yield images[indices], {"next_step": step + 1}

    held_out = test_set.images if eval_examples is None else test_set.images[:eval_examples]
    return PretrainData(len(train_set), train_set.image_shape,
                        compute_normalization(train_set.images), held_out, batches,
                        dataset=dataset)


def _streamed(spec: str, *, test_fraction, split_seed, batch_size, seed, image_size, workers,
              eval_examples, log) -> PretrainData:
    data = streaming.prepare_stream(spec, test_fraction=test_fraction, split_seed=split_seed,
                                    image_size=image_size, log=log)
    normalization = streaming.normalization_sample(data, workers=workers)
    opened: list = []

    def batches(steps: int, start: int = 0, state=None) -> Batches:
        # A grain state is a position in the iterator it came from: steps `offset`.. read by
        # `workers` processes. The same iterator is rebuilt to restore it; any other
        # (another worker count, an older state) starts afresh at `start`: as exact, since
        # a batch is a pure function of its step.
        offset = start
        saved = None
        if state and state.get("workers") == workers and "offset" in state:
            offset, saved = int(state["offset"]), state.get("grain")
        iterator = streaming.train_batches(
            data, batch_size=batch_size, seed=seed, steps=steps, workers=workers, start=offset,
            state=saved, process_index=jax.process_index(), process_count=jax.process_count())
        opened.append(iterator)
        for step in range(start, steps):
            element = next(iterator)
            given, images = int(element["step"]), np.array(element["images"])
            del element   # a worker's batch lives in shared memory, freed when it goes
            if given != step:  # the restored state must continue at `start`
                raise RuntimeError(f"the input pipeline gave step {given}'s batch for "
                                   f"step {step}")
            yield images, {"workers": workers, "offset": offset,
                           "grain": copy.deepcopy(iterator.get_state())}

    def close() -> None:
        for iterator in opened:
            iterator.close()
        opened.clear()

    limit = streaming.pipeline.EVAL_EXAMPLES if eval_examples is None else eval_examples
    return PretrainData(len(data.train), data.image_shape, normalization,
                        streaming.EvalImages(data, limit), batches,
                        stream={**data.metadata(test_fraction=test_fraction,
                                                split_seed=split_seed),
                                "normalization_sample": streaming.pipeline.NORMALIZATION_SAMPLE,
                                "eval_examples": min(limit, len(data.test))},
                        close=close)


def write_record(out: pathlib.Path, data: PretrainData) -> None:
    """out/data.json for a streamed run: its spec, file count, listing hash and split (for
    people, and for `check_record` on --resume); nothing for in-memory data."""
    if data.stream:
        (out / RECORD).write_text(json.dumps(data.stream, indent=2))


def check_record(out: pathlib.Path, data: PretrainData) -> None:
    """Refuses to resume a run whose streamed files changed since it started (another
    listing hash than its data.json's): added, removed or renamed files change the split
    and every batch."""
    path = out / RECORD
    saved = json.loads(path.read_text()).get("listing_sha256") if path.is_file() else None
    now = (data.stream or {}).get("listing_sha256")
    if saved != now:
        raise InputError(f"cannot resume {str(out)!r}: the streamed data's file listing "
                         f"changed (sha256 {str(saved)[:12]} then, {str(now)[:12]} now): files "
                         f"added, removed or renamed change the split and every batch")
