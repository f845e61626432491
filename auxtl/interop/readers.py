"""Readers: a foreign weights file -> `Source` (named numpy arrays), chosen by format.

Formats: torch (.pt/.pth zip archives, read without PyTorch: `torch_pickle`),
safetensors, keras (.keras / .weights.h5, through h5py: `keras_h5`), orbax (a folder
another JAX codebase or auxtl wrote) and npz. Nothing here executes code from a file:
npz loads with allow_pickle=False, safetensors and orbax hold no code, and the torch
reader unpickles through an allow-list.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors

from auxtl.errors import InputError, MissingFileError
from auxtl.interop.name_maps import flatten_tree
from auxtl.interop.source import LAYOUTS, Source
from auxtl.interop.keras_h5 import read_keras
from auxtl.interop.torch_pickle import read_torch

FORMATS = ("torch", "safetensors", "keras", "orbax", "npz")
_SUFFIXES = {".pt": "torch", ".pth": "torch", ".bin": "torch", ".safetensors": "safetensors",
             ".keras": "keras", ".h5": "keras", ".npz": "npz"}


def detect_format(path) -> str:
    """The format of `path` from its suffix (a folder: orbax); InputError naming the
    path and the --format choices when the suffix says nothing."""
    path = pathlib.Path(path)
    if path.is_dir():
        return "orbax"
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    raise InputError(f"cannot tell the format of {str(path)!r} from its name; give --format "
                     f"({', '.join(FORMATS)})")


def read_safetensors(path) -> Source:
    """A .safetensors file: its arrays in the file's order, its header metadata in
    `info["metadata"]`; the layout from the header's "layout" key (auxtl exports write
    it), else torch when the names are PyTorch's ("...weight"), else flax."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, ValueError, safetensors.SafetensorError) as error:
        raise InputError(f"{str(path)!r} is not a readable safetensors file ({error})") from error
    layout = metadata.get("layout")
    if layout not in LAYOUTS:
        torch_like = any(name.endswith((".weight", ".running_mean")) for name in tensors)
        layout = "torch" if torch_like else "flax"
    return Source(str(path), "safetensors", tensors, layout, _header_info(metadata))


def _header_info(metadata: Mapping[str, str]) -> dict:
    """safetensors header metadata as info; auxtl's JSON-valued keys decoded."""
    info: dict = {"metadata": dict(metadata)}
    for key in ("auxtl_config", "auxtl_metadata"):
        if key in metadata:
            try:
                info[key] = json.loads(metadata[key])
            except json.JSONDecodeError as error:
                raise InputError(f"safetensors header key {key!r} is not JSON ({error})") from error
    if "auxtl_model" in metadata:
        info["auxtl_model"] = metadata["auxtl_model"]
    return info


def read_npz(path) -> Source:
    """An .npz archive (no pickles): its arrays under their names, flax layout."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            tensors = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise InputError(f"{str(path)!r} is not a readable .npz archive without pickles "
                         f"({error})") from error
    return Source(str(path), "npz", tensors, "flax")


def _restore_numpy(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """One orbax PyTree item, every leaf as a numpy array on the host, '/'-joined names."""
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(folder).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(folder, args=ocp.args.PyTreeRestore(restore_args=args))
    except (ValueError, OSError, KeyError, RuntimeError, AttributeError) as error:
        raise InputError(f"orbax checkpoint {str(folder)!r} cannot be read ({error})") from error
    return {name: np.asarray(leaf) for name, leaf in flatten_tree(restored).items()}


def read_orbax(path) -> Source:
    """An orbax checkpoint folder: one PyTree item (a folder with `_METADATA`), or a
    composite whose items are subfolders (auxtl's own checkpoints: trunk, heads,
    metadata), read as "<item>/<path>". An auxtl checkpoint's metadata JSON goes to
    `info["auxtl_metadata"]`. Flax layout."""
    folder = pathlib.Path(path).resolve()
    if (folder / "_METADATA").is_file():
        return Source(str(path), "orbax", _restore_numpy(folder), "flax")
    items = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "_METADATA").is_file())
    if not items:
        raise InputError(f"{str(path)!r} is not an orbax checkpoint: no _METADATA in it or in "
                         f"its subfolders (for a CheckpointManager folder give the step's item "
                         f"folder, e.g. .../1000/state)")
    tensors = {f"{item.name}/{name}": array for item in items
               for name, array in _restore_numpy(item).items()}
    info = {}
    if (folder / "metadata" / "metadata").is_file():
        try:
            info["auxtl_metadata"] = json.loads((folder / "metadata" / "metadata").read_text())
        except (OSError, json.JSONDecodeError):
            pass  # not auxtl's: the arrays are what counts
    return Source(str(path), "orbax", tensors, "flax", info)


READERS: dict[str, Callable[[pathlib.Path], Source]] = {
    "torch": read_torch, "safetensors": read_safetensors, "keras": read_keras, "npz": read_npz, "orbax": read_orbax}


def read_source(path, format: str | None = None) -> Source:
    """The arrays of `path` in `format` (detected from the name if None); MissingFileError
    if there is nothing at `path`, InputError for an unknown format or unreadable file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(f"no file or folder at {str(path)!r}")
    format = format or detect_format(path)
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    source = READERS[format](path)
    if not source.tensors:
        raise InputError(f"{str(path)!r} holds no arrays")
    return source
