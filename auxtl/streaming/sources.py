"""Random-access sources of undecoded images for streaming: what is held is a listing.

A source answers `len(source)`, `source.read(i)` (one raw record: a file path, encoded
PNG/JPEG bytes, or a decoded array from an npz shard) and `source.describe(i)` (the
file/record named in errors). Only the listing (file names, shard sizes) is held in
memory; records are read on demand, in grain's worker processes when there are any, so
a source must pickle cheaply (no open file handles until the first read).

Specs: `folder:PATH` (image files, flat or one sub-folder per class: labels),
`npz-shards:GLOB` (.npz files each holding `images` (N, H, W[, C]) uint8, optionally
`labels`), `arrayrecord:GLOB` (ArrayRecord files whose records are encoded images).
"""

from __future__ import annotations

import glob
import hashlib
import os
import collections
import pathlib
import struct
import zipfile
from typing import Any

import grain
import numpy as np

from auxtl.data import STREAMED_KINDS, folder_listing
from auxtl.errors import InputError, MissingFileError

STREAM_KINDS = ("folder", *STREAMED_KINDS)


def is_stream_spec(spec: str) -> bool:
    """Whether `spec` names a streaming source (`folder:`, `npz-shards:`, `arrayrecord:`)."""
    kind, sep, _ = str(spec).partition(":")
    return bool(sep) and kind in STREAM_KINDS


def open_source(spec: str):
    """The source a streaming data spec names; InputError naming the spec and path."""
    kind, sep, rest = str(spec).partition(":")
    if not sep or kind not in STREAM_KINDS:
        raise InputError(f"streaming needs a data spec 'folder:PATH', 'npz-shards:GLOB' or "
                         f"'arrayrecord:GLOB', got {spec!r}")
    if not rest:
        raise InputError(f"data spec {spec!r} has no path; expected {kind}:PATH")
    if kind == "folder":
        return FolderSource(pathlib.Path(rest).expanduser(), spec)
    files = _glob(rest, spec)
    return NpzShardSource(files, spec) if kind == "npz-shards" else ArrayRecordSource(files, spec)


def _glob(pattern: str, spec: str) -> list[str]:
    path = pathlib.Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(glob.glob(str(path)))
    if not files:
        raise MissingFileError(f"data spec {spec!r}: no files match {str(path)!r}")
    return files


def listing_hash(entries) -> str:
    """sha256 over the listing (names and sizes): which files, in which order."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(str(entry).encode())
        digest.update(b"\0")
    return digest.hexdigest()


class FolderSource:
    """Image files under a folder: flat (unlabeled) or one sub-folder per class."""

    def __init__(self, path: pathlib.Path, spec: str):
        if not path.exists():
            raise MissingFileError(f"data spec {spec!r}: no such path {str(path)!r}")
        self.spec = spec
        files, self.labels, self.class_names = folder_listing(path, spec)
        # Paths below the root as one bytes array: one allocation, pickled to each worker
        # at about the paths' total length (a str array pads every path to the longest in
        # 4-byte characters; a list is an object per path).
        relative = [os.path.relpath(f, path) for f in files]
        self.root = str(path)
        self.files = np.asarray([os.fsencode(r) for r in relative], dtype=np.bytes_)
        self.listing = listing_hash(relative)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def describe(self, index: int) -> str:
        return repr(self.read(index))


class NpzShardSource:
    """.npz shards each holding `images`. A shard written by `np.savez` (members stored,
    not compressed) is memory-mapped: an image is read alone, whatever order a batch
    asks for (up to `MAPPED` shards mapped at a time per process). A compressed shard
    (`np.savez_compressed`) can only be read whole: one such shard's array is held at a
    time, and a batch drawn across many shards reloads them (store shards uncompressed)."""

    MAPPED = 64

    def __init__(self, files: list[str], spec: str):
        self.spec, self.files = spec, files
        sizes, labels = [], []
        for file in files:
            shape, has_labels = _npz_images_shape(file, spec)
            sizes.append(shape[0])
            labels.append(has_labels)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise InputError(f"data spec {spec!r}: the shards hold no images")
        self.labels = None  # shard labels are not read for pretraining (unlabeled split)
        self.class_names = None
        self.listing = listing_hash(f"{pathlib.Path(f).name}:{n}" for f, n in zip(files, sizes))
        self._cached: tuple[int, np.ndarray] | None = None
        self._maps: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, int(index - self.offsets[shard])

    def _mapped(self, shard: int) -> np.ndarray | None:
        """Shard `shard`'s images memory-mapped, or None when its member is compressed."""
        if shard not in self._maps:
            self._maps[shard] = _map_stored_images(self.files[shard])
            while len(self._maps) > self.MAPPED:
                self._maps.popitem(last=False)
        self._maps.move_to_end(shard)
        return self._maps[shard]

    def read(self, index: int) -> np.ndarray:
        shard, row = self._locate(index)
        mapped = self._mapped(shard)
        if mapped is not None:
            return np.array(mapped[row])
        if self._cached is None or self._cached[0] != shard:
            self._cached = None  # drop the old shard before loading the next
            with np.load(self.files[shard], allow_pickle=False) as archive:
                self._cached = (shard, archive["images"])
        return self._cached[1][row]

    def describe(self, index: int) -> str:
        shard, row = self._locate(index)
        return f"image {row} of shard {self.files[shard]!r}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached": None, "_maps": collections.OrderedDict()}


def _map_stored_images(file: str) -> np.ndarray | None:
    """`images` of an .npz as a read-only memory map when the member is stored
    (uncompressed, C order); None otherwise. The member's data starts after its zip local
    header (30 bytes + name + extra field) and the .npy header."""
    with zipfile.ZipFile(file) as archive:
        info = archive.getinfo("images.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(file, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype != np.uint8:
        return None
    return np.memmap(file, dtype=np.uint8, mode="r", offset=offset, shape=shape)


def _npz_images_shape(file: str, spec: str) -> tuple[tuple[int, ...], bool]:
    """The shape of `images` in an .npz, read from the member's header (no data loaded)."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
            if "images.npy" not in names:
                raise InputError(f"data spec {spec!r}: shard {file!r} holds "
                                 f"{sorted(n.removesuffix('.npy') for n in names)}; expected an "
                                 "array named 'images'")
            with archive.open("images.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"data spec {spec!r}: shard {file!r} is not a readable .npz archive: "
                         f"{error}") from error
    if len(shape) not in (3, 4) or dtype != np.uint8:
        raise InputError(f"data spec {spec!r}: shard {file!r} has images {shape} {dtype}; "
                         "expected uint8 (N, H, W) or (N, H, W, C)")
    return shape, "labels.npy" in names


class ArrayRecordSource:
    """ArrayRecord shards whose records are encoded images (PNG, JPEG, ...)."""

    def __init__(self, files: list[str], spec: str):
        self.spec, self.files = spec, files
        self.labels, self.class_names = None, None
        self._source = self._open()
        self._length = len(self._source)
        if self._length == 0:
            raise InputError(f"data spec {spec!r}: the ArrayRecord files hold no records")
        self.listing = listing_hash([*(pathlib.Path(f).name for f in files), self._length])

    def _open(self):
        try:
            return grain.sources.ArrayRecordDataSource(self.files)
        except Exception as error:  # the reader raises plain RuntimeErrors on bad files
            raise InputError(f"data spec {self.spec!r}: cannot read ArrayRecord files "
                             f"{self.files[:3]}: {error}") from error

    def __len__(self) -> int:
        return self._length

    def read(self, index: int) -> bytes:
        if self._source is None:
            self._source = self._open()
        return self._source[index]

    def describe(self, index: int) -> str:
        return f"record {index} of {self.spec!r}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}
