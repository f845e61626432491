"""Tests for auxtl.resize: the filter, pixel semantics, labels and order kept."""

from __future__ import annotations

import numpy as np
import pytest

from auxtl.data import Dataset, load_dataset
from auxtl.errors import InputError
from auxtl.resize import resize_dataset, resize_images
from conftest import U64, gamma
from rounding import assert_within


def triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of bilinear resizing, antialiased when shrinking.

    Output pixel i samples the input at s = (i + 0.5) n_in / n_out - 0.5 with the triangle
    max(0, 1 - |s - j| / k), k = max(n_in / n_out, 1) (the filter widens with the shrink
    factor: antialiasing), normalised over the input pixels j that exist.
    """
    scale = n_in / n_out
    k = max(scale, 1.0)
    s = (np.arange(n_out) + 0.5) * scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(s[:, None] - np.arange(n_in)[None, :]) / k)
    return w / w.sum(axis=1, keepdims=True)


def reference(images: np.ndarray, size) -> np.ndarray:
    """The resize in float64: the separable triangle filter along H, then W."""
    wh = triangle_weights(images.shape[1], size[0])
    ww = triangle_weights(images.shape[2], size[1])
    return np.einsum("ih,nhwc,jw->nijc", wh, images.astype(np.float64), ww)


def bound(n_in: tuple[int, int], size: tuple[int, int]) -> float:
    """Rounding bound for pixel values in [0, 1] with power-of-two size ratios.

    With such ratios the sample positions and unnormalised triangle weights are exact
    in float32; each weight takes one rounding (its normalisation), each term one more
    (the product), and a sum over the taps one per tap, per axis: D = sum over both axes
    of (taps + 2). The weights are non-negative and sum to one, so the absolute
    computation is at most 1 (+ the float64 reference's own rounding).
    """
    taps = [2 * int(np.ceil(max(a / b, 1.0))) + 1 for a, b in zip(n_in, size)]
    depth = sum(t + 2 for t in taps)
    return gamma(depth) + gamma(depth, U64)


@pytest.mark.parametrize("shape, size", [((7, 16, 16, 2), (4, 8)),    # shrink: antialiased
                                         ((7, 4, 8, 3), (16, 16))])   # enlarge: bilinear
def test_float_images_match_the_antialiased_bilinear_filter(shape, size):
    """Shrinking 16 -> 4 weighs 8 input pixels per output (plain bilinear sampling: 2):
    random images tell the two apart far beyond the rounding bound."""
    images = np.random.default_rng(0).random(shape).astype(np.float32)
    got = resize_images(images, size, chunk_size=3)     # chunks of 3, 3, 1: order kept
    assert got.dtype == np.float32 and got.shape == (shape[0], *size, shape[-1])
    assert_within(got, reference(images, size), bound(shape[1:3], size), "resize")


def test_uint8_images_come_back_as_rounded_clipped_uint8():
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    images[0] = 255                                     # a white image stays white
    got = resize_images(images, (8, 4))
    assert got.dtype == np.uint8 and got.shape == (5, 8, 4, 1)
    assert (got[0] == 255).all()
    # rounded to the nearest integer: within 1/2 (+ the float32 filter's rounding) of exact
    exact = reference(images, (8, 4))
    assert_within(got, exact, 0.5 + 255 * bound((16, 16), (8, 4)), "uint8 resize")


def test_float_results_are_clipped_to_the_unit_interval():
    """Weights summing to one in float32 may overshoot 1 by a rounding (6 -> 3 does for
    a white image): clipped, so the result stays a valid [0, 1] image."""
    ones = np.ones((2, 6, 6, 1), np.float32)
    got = resize_images(ones, (3, 3))
    assert got.dtype == np.float32 and got.max() <= 1.0
    assert got.min() >= 1.0 - bound((6, 6), (3, 3))
    assert resize_images(ones.astype(np.float64), (28, 28)).dtype == np.float32


def test_resize_dataset_keeps_labels_order_class_names_and_count():
    digits = load_dataset("digits")
    ds = Dataset("d", digits.images[:50], digits.labels[:50],
                 class_names=tuple(str(i) for i in range(10)))
    resized = resize_dataset(ds, (28, 28))
    assert resized.name == "d@28x28" and len(resized) == 50
    assert resized.images.shape == (50, 28, 28, 1) and resized.images.dtype == np.uint8
    np.testing.assert_array_equal(resized.labels, ds.labels)
    assert resized.class_names == ds.class_names
    # order: image i is image i resized. Rounded to the nearest integer, each pixel is
    # within 1/2 of the exact filter plus float32's rounding (far below 1/2) of it; the
    # images differ by much more than 1, so a mix-up would show
    assert_within(resized.images, reference(ds.images, (28, 28)), 1.0, "digits resized")
    assert resize_dataset(ds, (8, 8)) is ds               # already that size


@pytest.mark.parametrize("size", [(0, 4), (4,), "28", (2.5, 3), (True, 3)])
def test_bad_sizes_are_named(size):
    with pytest.raises(InputError, match="size must be"):
        resize_images(np.zeros((1, 4, 4, 1), np.uint8), size)
