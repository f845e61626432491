"""Resizing a data set's images to another resolution (e.g. a trunk's pretraining one).

Host-side and once, before training: numpy in, numpy out, in chunks so that a large
set needs no float copy of the whole array. The computation runs on the CPU device
wherever accelerators are present, so resized pixels (and the content hashes that
identify a data set, see auxtl.splits) are the same on every machine.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from auxtl.data import Dataset, validate_images
from auxtl.errors import InputError


def check_size(size, *, name: str = "size") -> tuple[int, int]:
    """`size` as (H, W) of whole numbers >= 1; an InputError naming `name` otherwise."""
    try:
        h, w = size
    except (TypeError, ValueError):
        raise InputError(f"{name} must be (height, width), got {size!r}") from None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
               for v in (h, w)):
        raise InputError(f"{name} must be two whole numbers >= 1 (height, width), got {size!r}")
    return int(h), int(w)


def resize_images(images, size: tuple[int, int], *, chunk_size: int = 1024) -> np.ndarray:
    """Images (NHWC) resized to `size` = (H, W): bilinear, antialiased when shrinking.

    Keeps the pixel semantics of `auxtl.data`: uint8 in 0..255 in -> uint8 out (rounded
    to the nearest integer, clipped to 0..255); float in [0, 1] in -> float32 out, clipped
    to [0, 1] (the filter's weights are non-negative and sum to one, so clipping only
    removes rounding). Count, order and channels are kept; an array already of that size
    comes back as validated, unchanged.

    Args:
      images: (N, H, W[, C]) as `auxtl.data.validate_images` accepts.
      size: the output (height, width).
      chunk_size: images resized per call (bounds the float32 working memory).
    """
    images = validate_images(images, source="resize_images")
    h, w = check_size(size)
    if images.shape[1:3] == (h, w):
        return images
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) \
            or chunk_size < 1:
        raise InputError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}")
    out = np.empty((len(images), h, w, images.shape[-1]), images.dtype)
    with jax.default_device(jax.devices("cpu")[0]):
        for start in range(0, len(images), chunk_size):
            chunk = images[start:start + chunk_size]
            resized = np.asarray(_resize(jnp.asarray(chunk, jnp.float32), (h, w)))
            if images.dtype == np.uint8:
                out[start:start + len(chunk)] = np.clip(np.rint(resized), 0, 255)
            else:
                out[start:start + len(chunk)] = np.clip(resized, 0.0, 1.0)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _resize(chunk: jax.Array, size: tuple[int, int]) -> jax.Array:
    n, _, _, c = chunk.shape
    return jax.image.resize(chunk, (n, *size, c), method="linear", antialias=True)


def resize_dataset(dataset: Dataset, size: tuple[int, int]) -> Dataset:
    """`dataset` with its images resized to `size` (see `resize_images`).

    Labels (values and order), class names and the example order are kept; the name
    gains a suffix saying the size ("digits" -> "digits@28x28"). A data set already of
    that size is returned as it is.
    """
    h, w = check_size(size)
    if dataset.image_shape[:2] == (h, w):
        return dataset
    return dataclasses.replace(dataset, name=f"{dataset.name}@{h}x{w}",
                               images=resize_images(dataset.images, (h, w)))
