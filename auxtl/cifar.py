"""CIFAR-10 in its standard "python version" layout, read without running pickled code.

A folder holds data_batch_1..5 (training) and test_batch, each a pickle of a dict
with b"data" (N, 3072) uint8 rows (1024 red, 1024 green, 1024 blue values of a
32x32 image, row-major) and b"labels"; batches.meta names the classes. The
unpickler accepts only plain containers, bytes, strings and numbers, plus the
numpy pieces an ndarray needs, so a file cannot execute code.
"""

from __future__ import annotations

import pathlib
import pickle

import numpy as np

from auxtl.errors import InputError, MissingFileError, UnsafeFileError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(f"refusing to load {module}.{name} from a CIFAR batch: "
                                     f"only arrays, lists, bytes and numbers are allowed")


def read_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int32) of one batch file."""
    try:
        with open(path, "rb") as handle:
            batch = _SafeUnpickler(handle, encoding="bytes").load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise InputError(f"{str(path)!r} is not a readable CIFAR-10 batch (truncated or "
                         f"damaged?): {error!r}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise InputError(f"{str(path)!r} is not a CIFAR-10 batch (needs b'data' and b'labels')")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise InputError(f"{str(path)!r}: b'data' has shape {data.shape}, expected (N, 3072)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], dtype=np.int32)


def class_names(folder: pathlib.Path) -> tuple[str, ...] | None:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return None
    with open(meta, "rb") as handle:
        names = _SafeUnpickler(handle, encoding="bytes").load().get(b"label_names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names) if names else None


def read_split(folder: pathlib.Path, *, test: bool) -> tuple[np.ndarray, np.ndarray]:
    """All training batches present (or the test batch), concatenated in file order."""
    names = (TEST_BATCH,) if test else TRAIN_BATCHES
    paths = [folder / n for n in names if (folder / n).is_file()]
    if not paths:
        raise MissingFileError(f"no CIFAR-10 {'test' if test else 'training'} batch "
                                f"({', '.join(names)}) in {str(folder)!r}")
    parts = [read_batch(p) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
