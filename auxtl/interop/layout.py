"""Array layouts: PyTorch's and Flax's (Keras's is Flax's) for the leaves a trunk has.

A conv kernel is (out, in, kh, kw) in PyTorch and (kh, kw, in, out) in Flax; a dense
kernel is (out, in) and (in, out). Every other leaf (biases, BatchNorm scale, bias,
mean, var) is a vector in both. The leaf's auxtl name tells a kernel from the rest.
"""

from __future__ import annotations

import numpy as np

from auxtl.interop.source import LAYOUTS

__all__ = ["LAYOUTS", "to_flax", "from_flax", "converted"]


# PyTorch -> Flax axis order of a kernel, by its rank (conv: OIHW -> HWIO; dense: transpose).
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}


def converted(shape: tuple[int, ...], layout: str, leaf: str) -> bool:
    """Whether an array of `shape` at the auxtl leaf `leaf` moves axes between `layout`
    and Flax's: a 2-D or 4-D kernel of PyTorch's layout."""
    assert layout in LAYOUTS, layout
    return layout == "torch" and leaf.rsplit("/", 1)[-1] == "kernel" and len(shape) in _TO_FLAX


def to_flax(array: np.ndarray, layout: str, leaf: str) -> np.ndarray:
    """`array` of `layout` as the auxtl leaf `leaf` holds it (itself where nothing moves)."""
    if not converted(array.shape, layout, leaf):
        return array
    return np.transpose(array, _TO_FLAX[array.ndim])


def from_flax(array: np.ndarray, layout: str, leaf: str) -> np.ndarray:
    """The inverse of `to_flax`: the auxtl leaf `leaf` as `layout` stores it."""
    if not converted(array.shape, layout, leaf):
        return array
    return np.transpose(array, np.argsort(_TO_FLAX[array.ndim]))
