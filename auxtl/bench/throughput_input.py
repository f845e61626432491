"""The input pipeline's side of the throughput benchmark: how many images per second the
host can gather and place on the devices, measured beside the step's rate so a row says
which of the two bounds a run.

The seam is `BatchIteratorFactory`: a callable `factory(start_step)` returning an
iterator of ready-to-use global batches (a `jax.Array` or a pytree of them, sharded as
the step wants them), batch `start_step`, `start_step + 1`, ... . `in_memory_batches`
is the pretraining loop's own in-memory path; `streamed_batches` its streamed one
(`--data stream:SPEC`: grain workers decode, crop and batch; `device_prefetch` puts).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from auxtl import parallel
from auxtl.bench import BenchError
from auxtl.data import batch_indices, load_dataset
from auxtl.errors import AuxtlError
from auxtl.streaming.pipeline import default_workers, prepare_stream, train_batches
from auxtl.streaming.prefetch import device_prefetch

BatchIteratorFactory = Callable[[int], Iterator[Any]]
SYNTHETIC = "synthetic"
NO_INPUT = "none"
STREAM = "stream:"   # --data stream:SPEC measures the streamed pipeline on SPEC


@dataclasses.dataclass(frozen=True)
class InputSource:
    """The images an input measurement gathers from, and where they came from."""

    images: np.ndarray
    description: str      # "synthetic uint8 (1024, 28, 28, 1)" or the data spec


def input_source(spec: str, image_shape: tuple[int, ...], *, num_images: int,
                 seed: int = 0) -> InputSource:
    """The images for spec: "synthetic" (random uint8 of `image_shape`, `num_images` of
    them) or any `auxtl.data.load_dataset` spec (embedded name, npz:PATH, folder:PATH),
    used as loaded: the pretraining loop feeds its images at their own shape."""
    if spec == SYNTHETIC:
        if num_images < 1:
            raise BenchError(f"--input-images must be >= 1, got {num_images}")
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (num_images, *image_shape), dtype=np.uint8)
        return InputSource(images, f"synthetic uint8 {tuple(images.shape)}")
    try:
        dataset = load_dataset(spec)
    except AuxtlError as error:   # a spec that names nothing usable: before any step runs
        raise BenchError(f"--data: {error}") from error
    return InputSource(dataset.images, f"{spec} {tuple(dataset.images.shape)} "
                                       f"{dataset.images.dtype}")


def in_memory_batches(images: np.ndarray, batch_size: int, mesh, *,
                      seed: int = 0) -> BatchIteratorFactory:
    """The pretraining loop's in-memory input path as a factory: per step, the batch's
    indices (`auxtl.data.batch_indices`, stateless in (seed, step)), this process's slice
    of them (`parallel.process_slice`), the host gather, and `parallel.put_batch` onto
    the mesh."""
    if batch_size > len(images):
        raise BenchError(f"input batch size {batch_size} exceeds the {len(images)} images; "
                         f"raise --input-images or lower --batch-size")

    def factory(start_step: int = 0) -> Iterator[jax.Array]:
        step = start_step
        while True:
            indices = parallel.process_slice(
                batch_indices(len(images), batch_size, seed=seed, step=step))
            yield parallel.put_batch(images[indices], mesh)
            step += 1

    return factory


def streamed_batches(spec: str, image_shape: tuple[int, int, int], batch_size: int, mesh, *,
                     steps: int, workers: int | None = None,
                     seed: int = 0) -> BatchIteratorFactory:
    """The pretraining loop's streamed input path as a factory: `spec` (folder:PATH,
    npz-shards:GLOB, arrayrecord:GLOB) split as pretraining splits it, each step's local
    batch decoded and random-resized-cropped to `image_shape` in `workers` grain
    processes (default `default_workers()`), and put onto the mesh one batch ahead."""
    try:
        stream = prepare_stream(spec, test_fraction=0.1, split_seed=0, image_size=image_shape,
                                log=lambda *_: None)
    except AuxtlError as error:
        raise BenchError(f"--data {STREAM}{spec}: {error}") from error
    workers = default_workers() if workers is None else workers

    def factory(start_step: int = 0) -> Iterator[jax.Array]:
        local = train_batches(stream, batch_size=batch_size, seed=seed, steps=start_step + steps,
                              workers=workers, start=start_step,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
        try:
            # out of grain's shared memory at once (freed when the worker's array goes)
            pairs = ((np.array(item["images"]), None) for item in local)
            for batch, _ in device_prefetch(pairs, lambda x: parallel.put_batch(x, mesh)):
                yield batch
        finally:
            local.close() if hasattr(local, "close") else None

    return factory


def time_input(factory: BatchIteratorFactory, *, batch_size: int, warmup: int,
               steps: int) -> dict[str, Any]:
    """Images/s of the batches `factory(0)` yields, each waited for on the device.

    `warmup` batches are drawn untimed (a pipeline's start-up: workers, first reads),
    then `steps` timed ones. Returns the rate over the timed span (what a loop that
    only consumed batches would see, prefetching included) and per-batch times.
    """
    if steps < 1 or warmup < 0:
        raise BenchError(f"input steps must be >= 1 and warm-up >= 0, got {steps}, {warmup}")
    batches = factory(0)
    try:
        for _ in range(warmup):
            jax.block_until_ready(next(batches))
        times = []
        span_start = time.perf_counter()
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(next(batches))
            times.append(time.perf_counter() - start)
        span = time.perf_counter() - span_start
    finally:   # a streamed pipeline's worker processes end here, on errors too
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return {"input_images_per_s": batch_size * steps / span,
            "input_batch_time_median_s": float(np.median(times)),
            "input_batch_time_max_s": float(max(times)),
            "input_timed_batches": steps}


def _mesh(devices: int):
    available = jax.devices()
    if devices > len(available):
        raise BenchError(f"--devices {devices}: this host has {len(available)} device(s)")
    return parallel.data_mesh(available[:devices])


def measure_streamed(spec: str, image_shape: tuple[int, int, int], batch_size: int, *,
                     devices: int, warmup: int, steps: int, workers: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """The streamed pipeline's rate on `spec` (`streamed_batches`), as `measure_input`."""
    factory = streamed_batches(spec, image_shape, batch_size, _mesh(devices),
                               steps=warmup + steps, workers=workers, seed=seed)
    return {"input_pipeline": "streamed (grain workers, device_prefetch, put_batch)",
            "input_source": f"{STREAM}{spec}", "input_shape": list(image_shape),
            "input_dtype": "uint8",
            **time_input(factory, batch_size=batch_size, warmup=warmup, steps=steps)}


def measure_input(source: InputSource, batch_size: int, *, devices: int, warmup: int,
                  steps: int, seed: int = 0) -> dict[str, Any]:
    """The in-memory pipeline's rate on `source` for a batch over the first `devices`
    devices: `time_input` of `in_memory_batches`, plus what was measured."""
    mesh = _mesh(devices)
    factory = in_memory_batches(source.images, batch_size, mesh, seed=seed)
    return {"input_pipeline": "in-memory (batch_indices, process_slice, put_batch)",
            "input_source": source.description,
            "input_shape": list(source.images.shape[1:]),
            "input_dtype": str(source.images.dtype),
            **time_input(factory, batch_size=batch_size, warmup=warmup, steps=steps)}


def bound(step_images_per_s: float | None, input_images_per_s: float | None) -> str | None:
    """"input" when the pipeline delivers fewer images/s than the step consumes, else
    "step"; None when either rate is missing."""
    if not step_images_per_s or not input_images_per_s:
        return None
    return "input" if input_images_per_s < step_images_per_s else "step"
