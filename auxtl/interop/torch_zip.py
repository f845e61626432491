"""The zip side of a torch.save file: its root folder, byte order and raw storages.

`torch.save` (torch >= 1.6) writes a zip of ZIP_STORED entries: `<root>/data.pkl`,
`<root>/data/<key>` (one raw storage per key), `<root>/byteorder` ("little" when absent).
Every entry is read only after checking that it is stored uncompressed and declares no
more bytes than the archive holds, so a crafted entry cannot decompress into more memory
than the file's own size (a zip bomb); such an entry raises InputError naming it.
"""

from __future__ import annotations

import os
import sys
import zipfile

import numpy as np

from auxtl.errors import InputError


def native_elements(raw: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
    """`raw` bytes of `byteorder` ("<" or ">") as a 1-D array of `dtype` in native order
    (a read-only view when no swap is needed)."""
    if byteorder == ("<" if sys.byteorder == "little" else ">") or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype)
    if dtype.kind == "V":
        # ml_dtypes' types have no byte-order variants: swap as unsigned ints
        return np.frombuffer(raw, f"u{dtype.itemsize}").byteswap().view(dtype)
    return np.frombuffer(raw, dtype.newbyteorder(byteorder)).astype(dtype)


def read_stored_entry(zf: zipfile.ZipFile, name: str, path: str) -> bytes:
    """The bytes of entry `name`; InputError if it is compressed (torch stores entries
    uncompressed) or declares more bytes than the archive `path` holds."""
    entry = zf.getinfo(name)
    if entry.compress_type != zipfile.ZIP_STORED:
        raise InputError(f"{path}: zip entry {name} is compressed (method "
                         f"{entry.compress_type}); torch.save stores entries uncompressed, "
                         f"so auxtl refuses it (a compressed entry can expand without bound)")
    archive_size = os.path.getsize(path)
    if entry.file_size > archive_size:
        raise InputError(f"{path}: zip entry {name} declares {entry.file_size} bytes, more "
                         f"than the whole archive ({archive_size} bytes)")
    return zf.read(entry)


class Archive:
    """One torch.save zip: its root folder, byte order and storages (read once each)."""

    def __init__(self, zf: zipfile.ZipFile, path: str):
        self.zf, self.path = zf, path
        names = set(zf.namelist())
        roots = sorted({name.split("/", 1)[0] for name in names if "/" in name})
        if any(f"{root}/constants.pkl" in names for root in roots):
            raise InputError(
                f"{path} is a TorchScript archive (torch.jit.save); auxtl reads state dicts: "
                f"in PyTorch, torch.save(torch.jit.load(path).state_dict(), 'weights.pt')")
        pickles = [root for root in roots if f"{root}/data.pkl" in names]
        if len(pickles) != 1:
            raise InputError(f"{path}: a torch.save zip holds one <root>/data.pkl, this one "
                             f"holds {len(pickles)} (entries begin: {sorted(names)[:5]})")
        self.root = pickles[0]
        self.names = names
        order_entry = f"{self.root}/byteorder"
        byteorder = (read_stored_entry(zf, order_entry, path).decode("ascii", "replace")
                     .strip() if order_entry in names else "little")
        if byteorder not in ("little", "big"):
            raise InputError(f"{path}: byteorder must be little or big, got {byteorder!r}")
        self.byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[tuple[str, np.dtype], np.ndarray] = {}

    def pickle_bytes(self) -> bytes:
        return read_stored_entry(self.zf, f"{self.root}/data.pkl", self.path)

    def storage(self, key: str, dtype: np.dtype) -> np.ndarray:
        """The elements of storage `key` as `dtype` (native byte order), read once."""
        if (key, dtype) not in self._storages:
            entry = f"{self.root}/data/{key}"
            if entry not in self.names:
                raise InputError(f"{self.path}: storage {entry} is missing (the file is "
                                 f"truncated or was edited); save it again")
            raw = read_stored_entry(self.zf, entry, self.path)
            if len(raw) % dtype.itemsize:
                raise InputError(f"{self.path}: storage {entry} has {len(raw)} bytes, not a "
                                 f"multiple of {dtype} ({dtype.itemsize} bytes)")
            self._storages[key, dtype] = native_elements(raw, dtype, self.byteorder)
        return self._storages[key, dtype]


def refuse_non_zip(path: str, head: bytes) -> None:
    """InputError naming what `path` (not a zip; `head` its first 512 bytes) is instead."""
    if head.startswith(b"PK"):
        raise InputError(f"{path} is a damaged or truncated zip; save it again")
    if head.startswith(b"\x80") or head[257:262] == b"ustar":
        raise InputError(
            f"{path} was written in torch.save's legacy format (torch < 1.6 or "
            f"_use_new_zipfile_serialization=False), which auxtl does not read; re-save it "
            f"with a current PyTorch: torch.save(state_dict, 'weights.pt')")
    raise InputError(f"{path} is not a PyTorch file (neither a torch.save zip nor a pickle)")
