"""Decoding and resizing one streamed image to the trunk's (H, W, C) as uint8.

Pure functions of their inputs: `decode` turns a raw record (a path, encoded bytes or
an array) into HWC uint8 with the wanted channel count; `resize_to` resizes it
deterministically (bilinear, antialiased: Pillow); `random_resized_crop` takes a
random crop (area 35-100 %, aspect 3/4-4/3, as Inception/torchvision) and resizes it,
its randomness drawn from `crop_rng(seed, step, index)` alone, so a crop does not
depend on workers, processes or where a run resumed.
"""

from __future__ import annotations

import io
import math

import numpy as np

from auxtl.errors import InputError

CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _pil():
    try:
        from PIL import Image  # noqa: PLC0415 (only image decoding needs Pillow)
    except ImportError as e:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("streaming images needs Pillow: pip install pillow") from e
    return Image


def decode(record, channels: int | None, *, name: str) -> np.ndarray:
    """HWC uint8 from a path, encoded bytes or an array; `channels` 1 or 3 (None: as
    stored, grey -> 1, anything else -> 3). InputError naming `name` for an
    unreadable, 16-bit or float image."""
    if isinstance(record, np.ndarray):
        image = record[..., None] if record.ndim == 2 else record
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise InputError(f"{name} has shape {record.shape} {record.dtype}; expected "
                             "uint8 (H, W) or (H, W, 1|3)")
        if channels == 3 and image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if channels == 1 and image.shape[-1] == 3:
            return _pil().fromarray(image).convert("L").__array__()[..., None]
        return image
    Image = _pil()
    try:
        source = io.BytesIO(record) if isinstance(record, bytes) else record
        with Image.open(source) as im:
            if im.mode in _HIGH_DEPTH_MODES:
                raise InputError(f"{name} has {im.mode!r} pixels (16-bit or float); expected "
                                 "8-bit grey or RGB images")
            grey = im.mode in ("1", "L", "LA", "La")
            wanted = channels if channels is not None else (1 if grey else 3)
            array = np.asarray(im.convert("L" if wanted == 1 else "RGB"), dtype=np.uint8)
    except InputError:
        raise
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
        raise InputError(f"{name} is not a readable image: {error}") from error
    return array[..., None] if array.ndim == 2 else array


def stored_channels(record, *, name: str) -> int:
    """3 if an image is stored in colour, else 1, from its header (nothing decoded)."""
    if isinstance(record, np.ndarray):
        return 3 if record.ndim == 3 and record.shape[-1] == 3 else 1
    try:
        with _pil().open(io.BytesIO(record) if isinstance(record, bytes) else record) as im:
            return 1 if im.mode in ("1", "L", "LA", "La", *_HIGH_DEPTH_MODES) else 3
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, ...
        raise InputError(f"{name} is not a readable image: {error}") from error


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` (HWC uint8) resized to (H, W), bilinear with antialiasing; same size: as is."""
    if image.shape[:2] == tuple(size):
        return image
    Image = _pil()
    h, w = size
    planes = [np.asarray(Image.fromarray(image[..., c]).resize((w, h), Image.BILINEAR))
              for c in range(image.shape[-1])]
    return np.stack(planes, axis=-1)


def crop_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of example `index`'s crop at `step`: a pure function of the three."""
    return np.random.default_rng([seed, step, index, 0xC409])


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop: area CROP_SCALE of the image, aspect CROP_RATIO
    (log-uniform); ten tries, then the largest centred crop within the ratios."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size: tuple[int, int],
                        rng: np.random.Generator) -> np.ndarray:
    """A random crop of `image` (crop_box) resized to `size`."""
    top, left, h, w = crop_box(image.shape[0], image.shape[1], rng)
    return resize_to(image[top:top + h, left:left + w], size)
