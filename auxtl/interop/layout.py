"""Array layouts: PyTorch's and Flax's (Keras's is Flax's) for the leaves a trunk has.

A conv kernel is (out, in, kh, kw) in PyTorch and (kh, kw, in, out) in Flax; a dense
kernel is (out, in) and (in, out). Every other leaf (biases, BatchNorm scale, bias,
mean, var) is a vector in both. The leaf's auxtl name tells a kernel from the rest.
"""

from __future__ import annotations

import numpy as np

from auxtl.interop.source import LAYOUTS

__all__ = ["LAYOUTS", "to_flax", "from_flax", "converted"]


def _is_kernel(leaf: str) -> bool:
    return leaf.rsplit("/", 1)[-1] == "kernel"


def to_flax(array: np.ndarray, layout: str, leaf: str) -> np.ndarray:
    """`array` of `layout` as the auxtl leaf `leaf` holds it (a view where no move is needed)."""
    assert layout in LAYOUTS, layout
    if layout == "flax" or not _is_kernel(leaf):
        return array
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return np.transpose(array)
    return array


def from_flax(array: np.ndarray, layout: str, leaf: str) -> np.ndarray:
    """The inverse of `to_flax`: the auxtl leaf `leaf` as `layout` stores it."""
    assert layout in LAYOUTS, layout
    if layout == "flax" or not _is_kernel(leaf):
        return array
    if array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
        return np.transpose(array)
    return array


def converted(shape: tuple[int, ...], layout: str, leaf: str) -> bool:
    """Whether `to_flax` moves axes for an array of `shape` at `leaf`."""
    return layout == "torch" and _is_kernel(leaf) and len(shape) in (2, 4)
