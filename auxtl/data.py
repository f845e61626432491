"""Image data sets: loading, validation, splits, normalisation and batch order.

Everything here is host-side numpy except `normalize`, which is jit-safe jnp so
that it runs on device inside the training step. Images are NHWC, either uint8
in 0..255 or float32 already scaled to [0, 1]; labels are int32 class indices.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import pathlib
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from auxtl import cifar
from auxtl.errors import InputError, MissingFileError

EMBEDDED_DATASETS = ("mnist5k", "digits")
STREAMED_KINDS = ("npz-shards", "arrayrecord")  # specs only streaming reads (auxtl.streaming)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SPEC_FORMS = (f"an embedded name ({', '.join(EMBEDDED_DATASETS)}), 'npz:PATH', "
               "'folder:PATH', 'cifar10:PATH' / 'cifar10-test:PATH' (the python-pickle "
               "batches), or a bare PATH to a .npz file or a directory of images")


# --------------------------------------------------------------------------- validation

def validate_images(images: Any, *, source: str) -> np.ndarray:
    """Checks an image array and returns it as NHWC uint8 or float32.

    (N, H, W) gains a channel axis. uint8 passes unchanged; other integer types
    holding 0..255 become uint8; floats must be finite and in [0, 1] and become
    float32. Anything else is a ValueError naming `source` and the problem.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise InputError(f"images from {source} have shape {images.shape} (rank {images.ndim}); "
                         "expected (N, H, W) or (N, H, W, C)")
    n, h, w, c = images.shape
    if min(n, h, w, c) == 0:
        raise InputError(f"images from {source} are empty: shape {images.shape}; "
                         "expected N, H, W and C all >= 1")
    if c > 4 and images.shape[1] in (1, 3, 4):
        raise InputError(f"images from {source} have shape {images.shape}, which looks "
                         "channels-first (N, C, H, W); expected channels-last (N, H, W, C): "
                         "use images.transpose(0, 2, 3, 1)")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        return _validate_float_images(images, source)
    if np.issubdtype(images.dtype, np.integer):
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise InputError(f"integer images from {source} hold values in [{lo}, {hi}]; "
                             "expected 0..255 (scale them to 8 bits, or to floats in [0, 1])")
        return images.astype(np.uint8)
    raise InputError(f"images from {source} have dtype {images.dtype}; "
                     "expected uint8 (0..255) or a float type (in [0, 1])")


def _validate_float_images(images: np.ndarray, source: str) -> np.ndarray:
    finite = np.isfinite(images)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise InputError(f"images from {source} contain {len(bad)} non-finite values (NaN or inf); "
                         f"the first is at index {first} (image {first[0]})")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        hint = ("divide by 255 if they are 0..255 pixel values" if lo >= 0.0 and hi <= 255.0
                else "rescale them into [0, 1]")
        raise InputError(f"float images from {source} hold values in [{lo:g}, {hi:g}]; "
                         f"expected [0, 1]: {hint}")
    return images.astype(np.float32, copy=False)


def validate_labels(labels: Any, num_images: int, *, source: str) -> np.ndarray:
    """Checks class labels against `num_images` and returns them as int32 (N,)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels from {source} have shape {labels.shape}; expected 1-D "
                         f"({num_images},) class indices")
    if len(labels) != num_images:
        raise InputError(f"labels from {source} number {len(labels)} but there are "
                         f"{num_images} images; expected one label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels from {source} have dtype {labels.dtype}; expected integer "
                         "class indices")
    if len(labels) and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise InputError(f"labels from {source} hold values in [{labels.min()}, {labels.max()}]; "
                         "expected class indices >= 0")
    return labels.astype(np.int32, copy=False)


# --------------------------------------------------------------------------- data set

@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images (NHWC, uint8 or float32 in [0, 1]) with optional int32 labels.

    Construction validates and canonicalises both arrays, so every Dataset holds
    well-formed data. `class_names` names label i, when known (folder loading).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        images = validate_images(self.images, source=self.name)
        object.__setattr__(self, "images", images)
        if self.labels is not None:
            object.__setattr__(self, "labels",
                               validate_labels(self.labels, len(images), source=self.name))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        labels = "None" if self.labels is None else f"{self.labels.shape} {self.labels.dtype}"
        return (f"Dataset(name={self.name!r}, images={self.images.shape} {self.images.dtype}, "
                f"labels={labels}, num_classes={self.num_classes})")

    @property
    def num_classes(self) -> int | None:
        """1 + the largest label (or len(class_names)); None when unlabeled."""
        if self.labels is None:
            return None
        largest = int(self.labels.max()) + 1
        return max(largest, len(self.class_names or ()))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)

    def subset(self, indices, *, name: str | None = None) -> Dataset:
        """The examples at `indices` (any numpy index array), in that order."""
        indices = np.asarray(indices)
        if indices.dtype != bool and not np.issubdtype(indices.dtype, np.integer):
            if indices.size:
                raise InputError(f"subset indices must be integers or a boolean mask, "
                                 f"got dtype {indices.dtype}")
            indices = indices.astype(np.int64)
        return Dataset(
            name=self.name if name is None else name,
            images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            class_names=self.class_names)


# --------------------------------------------------------------------------- loading

def load_dataset(spec: str) -> Dataset:
    """Loads a data set from a spec string.

    Args:
      spec: an embedded name ("mnist5k", "digits"); "npz:PATH" (arrays `images`
        or `x`, optional `labels` or `y`); "folder:PATH" (image files, one
        sub-folder per class for labels, or flat for none); or a bare PATH to a
        .npz file or a directory.

    Returns:
      The validated Dataset, named by `spec`.
    """
    spec = str(spec)
    if spec in EMBEDDED_DATASETS:
        return _load_embedded(spec)
    kind, sep, rest = spec.partition(":")
    if sep and kind in STREAMED_KINDS:
        raise InputError(f"data spec {spec!r} names shards, which are streamed, never loaded "
                         "into memory: pretrain on them with --stream")
    if sep and kind in ("npz", "folder", "cifar10", "cifar10-test"):
        if not rest:
            raise InputError(f"data spec {spec!r} has no path; expected {kind}:PATH")
        path = pathlib.Path(rest).expanduser()
        if not path.exists():
            raise MissingFileError(f"data spec {spec!r}: no such path {str(path)!r}")
        if kind.startswith("cifar10"):
            return _load_cifar10(path, spec, test=kind == "cifar10-test")
        return _load_npz(path, spec) if kind == "npz" else _load_folder(path, spec)
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, spec)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _load_npz(path, spec)
        raise InputError(f"data spec {spec!r} is a file but not a .npz archive; expected "
                         f"{_SPEC_FORMS}")
    if _looks_like_path(spec):
        raise MissingFileError(f"data spec {spec!r}: no such path {str(path)!r}")
    raise InputError(f"unknown data spec {spec!r}; expected {_SPEC_FORMS}")


def _looks_like_path(spec: str) -> bool:
    return (os.sep in spec or "/" in spec or spec.startswith(("~", "."))
            or spec.lower().endswith(".npz"))


def _load_cifar10(path: pathlib.Path, spec: str, *, test: bool) -> Dataset:
    if not path.is_dir():
        raise InputError(f"data spec {spec!r}: {str(path)!r} is not a folder of CIFAR-10 batches")
    images, labels = cifar.read_split(path, test=test)
    return Dataset(name=spec, images=images, labels=labels, class_names=cifar.class_names(path))


def _load_embedded(name: str) -> Dataset:
    resource = importlib.resources.files("auxtl") / "datasets" / f"{name}.npz"
    with resource.open("rb") as f, np.load(f, allow_pickle=False) as archive:
        return Dataset(name=name, images=archive["images"], labels=archive["labels"])


def _load_npz(path: pathlib.Path, spec: str) -> Dataset:
    if not path.is_file():
        raise InputError(f"data spec {spec!r}: {str(path)!r} is not a file")
    try:  # a damaged or foreign file, or pickled objects (never loaded), is named
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            image_key = next((k for k in ("images", "x") if k in keys), None)
            if image_key is None:
                raise InputError(f"{str(path)!r} holds arrays {sorted(keys)}; expected one "
                                 "named 'images' or 'x' (and optionally 'labels' or 'y')")
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            images = archive[image_key]
            labels = None if label_key is None else archive[label_key]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, AttributeError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"data spec {spec!r}: {str(path)!r} is not a readable .npz archive of "
                         f"numeric arrays: {error}") from error
    return Dataset(name=spec, images=images, labels=labels)


def _image_files(folder: pathlib.Path, *, recursive: bool) -> list[pathlib.Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_listing(path: pathlib.Path, spec: str) -> tuple[list[pathlib.Path], np.ndarray | None,
                                                           tuple[str, ...] | None]:
    """(image files, int32 labels or None, class names or None) of an image folder: flat
    (unlabeled) or one sub-folder per class (label = the sub-folder's sorted position).
    Hidden files and folders are skipped; an empty folder or class, or a mix of files and
    sub-folders, is an InputError naming it. Shared by the in-memory and streamed loaders."""
    if not path.is_dir():
        raise InputError(f"data spec {spec!r}: {str(path)!r} is not a directory")
    class_dirs = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    flat_files = _image_files(path, recursive=False)
    if class_dirs and flat_files:
        raise InputError(f"{str(path)!r} holds both image files ({flat_files[0].name}, ...) and "
                         f"sub-folders ({class_dirs[0].name}, ...); expected either one "
                         "sub-folder per class or a flat folder of images")
    if not class_dirs:
        if not flat_files:
            raise InputError(f"{str(path)!r} holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        return flat_files, None, None
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        class_files = _image_files(class_dir, recursive=True)
        if not class_files:
            raise InputError(f"class folder {str(class_dir)!r} holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        files += class_files
        labels += [label] * len(class_files)
    return files, np.asarray(labels, np.int32), tuple(p.name for p in class_dirs)


def _load_folder(path: pathlib.Path, spec: str) -> Dataset:
    files, labels, class_names = folder_listing(path, spec)
    return Dataset(name=spec, images=_read_images(files), labels=labels, class_names=class_names)


def _read_images(files: Sequence[pathlib.Path]) -> np.ndarray:
    """Decodes files into one NHWC uint8 array; grey is promoted to RGB if any is colour."""
    try:
        from PIL import Image  # noqa: PLC0415 (only folder loading needs Pillow)
    except ImportError as e:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("loading image folders needs Pillow: pip install pillow") from e
    arrays = []
    for file in files:
        with Image.open(file) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                raise InputError(f"{str(file)!r} has {im.mode!r} pixels (16-bit or float); "
                                 "expected 8-bit grey or RGB images")
            im = im.convert("L" if im.mode in ("1", "L", "LA", "La") else "RGB")
            array = np.asarray(im, dtype=np.uint8)
        array = array[..., None] if array.ndim == 2 else array
        if arrays and array.shape[:2] != arrays[0].shape[:2]:
            raise InputError(f"{str(file)!r} is {array.shape[1]}x{array.shape[0]} (WxH) but "
                             f"{str(files[0])!r} is {arrays[0].shape[1]}x{arrays[0].shape[0]}; "
                             "all images must share one size (or stream the folder: "
                             "auxtl pretrain --stream --image-size H,W resizes each image)")
        arrays.append(array)
    if any(a.shape[-1] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    return np.stack(arrays)


# --------------------------------------------------------------------------- normalisation

@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of pixel values scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if not mean or len(mean) != len(std):
            raise InputError(f"Normalization needs one mean and one std per channel, got "
                             f"mean={mean}, std={std}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise InputError(f"Normalization needs finite means and positive finite stds, "
                             f"got mean={mean}, std={std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Normalization:
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]))


def compute_normalization(images: np.ndarray, *, chunk_size: int = 4096) -> Normalization:
    """Per-channel mean and (population) std of `images` scaled to [0, 1].

    Two passes with float64 accumulation over chunks, so large uint8 sets need
    no float copy of the whole array. The std is floored at 1e-6 so a constant
    channel cannot divide by zero.
    """
    images = validate_images(images, source="compute_normalization")
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    count = images.shape[0] * images.shape[1] * images.shape[2]

    def chunks():
        for start in range(0, len(images), chunk_size):
            yield images[start:start + chunk_size].astype(np.float64) * scale

    mean = sum(c.sum(axis=(0, 1, 2)) for c in chunks()) / count
    var = sum(((c - mean) ** 2).sum(axis=(0, 1, 2)) for c in chunks()) / count
    std = np.maximum(np.sqrt(var), 1e-6)
    return Normalization(mean=tuple(mean.tolist()), std=tuple(std.tolist()))


def normalize(images: jax.Array | np.ndarray, norm: Normalization) -> jax.Array:
    """(x - mean) / std per channel, float32; integer pixels are first divided by 255.

    jit-safe: the statistics are trace-time constants and the channel check uses
    the static shape.
    """
    images = jnp.asarray(images)
    if images.shape[-1] != len(norm.mean):
        raise InputError(f"images have {images.shape[-1]} channels (shape {images.shape}) but "
                         f"the normalization has {len(norm.mean)}")
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
    mean = jnp.asarray(norm.mean, jnp.float32)
    std = jnp.asarray(norm.std, jnp.float32)
    return (x - mean) / std


# --------------------------------------------------------------------------- batching

def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Example indices of training batch `step`: a pure function of its arguments.

    Each epoch of num_examples // batch_size steps walks one permutation seeded
    by (seed, epoch), dropping the remainder, so no example repeats within an
    epoch and resuming at any step continues the exact sequence.
    """
    if batch_size < 1 or num_examples < 1:
        raise InputError(f"batch_size and num_examples must be >= 1, got {batch_size} and "
                         f"{num_examples}")
    if batch_size > num_examples:
        raise InputError(f"batch_size {batch_size} exceeds the {num_examples} examples")
    if step < 0 or seed < 0:
        raise InputError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    steps_per_epoch = num_examples // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    perm = _epoch_permutation(num_examples, seed, epoch)
    return perm[position * batch_size:(position + 1) * batch_size].copy()


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)
    return perm
