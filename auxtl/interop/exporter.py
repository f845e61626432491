"""Export an auxtl trunk checkpoint to a safetensors file, under auxtl's or PyTorch's names.

Formats (`EXPORT_FORMATS`):
- "safetensors": every param and batch stat under its auxtl leaf name
  ("params/layers/0/conv/kernel"), in Flax layout, values exactly as the checkpoint
  holds them.
- "torch-names": the same arrays under the names of the registered name map for the
  model whose layout is "torch" (torchvision's for resnet18/50), moved into PyTorch's
  layout. BatchNorm's `num_batches_tracked` is not written: auxtl keeps no step
  counter, and torch's BatchNorm fills the missing key in itself (even with
  strict=True); the classifier head `fc.*` is missing too, which is what
  `load_state_dict(..., strict=False)` is for.

The header metadata (str -> str) lets a re-import need no flags: "auxtl_format"
("auxtl-trunk"), "auxtl_model", "auxtl_config" and "auxtl_metadata" (JSON: the model
config and the checkpoint's full TrunkMetadata), "layout" ("flax" or "torch") and, for
torch-names, "names" (the name map's name). The file is written to a temporary file
in the same folder and moved into place, so a reader never sees a partial file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import uuid
import warnings
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from auxtl.checkpoints import load_trunk_state, read_metadata
from auxtl.errors import AuxtlWarning, InputError
from auxtl.interop.maps import maps_in_order
from auxtl.interop import torchvision_names
from auxtl.interop.layout import from_flax
from auxtl.interop.name_maps import NameMap, flat_leaves

EXPORT_FORMATS = ("safetensors", "torch-names")
EXPORT_MARK = "auxtl-trunk"
_TORCH_BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export_trunk` wrote: the file, its format, {auxtl leaf: written name}, the
    number of arrays, and the warnings given (as text)."""

    path: pathlib.Path
    format: str
    names: dict[str, str]
    count: int
    warnings: tuple[str, ...] = ()


def torch_map(model: str) -> NameMap:
    """The registered name map for `model` whose layout is "torch"; InputError naming the
    model and the formats it can export if there is none."""
    found = [m for m in maps_in_order(model) if m.layout == "torch"]
    if not found:
        raise InputError(f"model {model!r} has no PyTorch name map, so it cannot be exported "
                         f"as torch-names; it can be exported as: safetensors")
    return found[0]


def _torch_warnings(config: dict[str, Any]) -> list[str]:
    """Why PyTorch may compute other features than auxtl from these weights."""
    found = []
    if config.get("padding", "same") != "torch":
        found.append(f"the trunk was built with padding={config.get('padding', 'same')!r}: "
                     f"PyTorch pads strided convolutions and the stem max-pool symmetrically, "
                     f"so its features will differ unless the trunk was built with "
                     f"padding='torch'")
    epsilon = config.get("bn_epsilon", _TORCH_BN_EPSILON)
    if epsilon != _TORCH_BN_EPSILON:
        found.append(f"the trunk's BatchNorm epsilon is {epsilon!r}; PyTorch's default is "
                     f"{_TORCH_BN_EPSILON!r}: set eps={epsilon!r} on its BatchNorms")
    return found


def _renamed(model: str, config: dict[str, Any], leaves: dict[str, np.ndarray]
             ) -> tuple[dict[str, str], dict[str, np.ndarray], str]:
    """({leaf: torch name}, {torch name: array in torch layout}, the map's name)."""
    name_map = torch_map(model)
    foreign_to_leaf = name_map.names(model, config, None)
    leaf_to_foreign = {leaf: foreign for foreign, leaf in foreign_to_leaf.items()}
    if set(leaf_to_foreign) != set(leaves) or len(leaf_to_foreign) != len(foreign_to_leaf):
        missing = sorted(set(leaves) - set(leaf_to_foreign))[:5]
        surplus = sorted(set(leaf_to_foreign) - set(leaves))[:5]
        raise InputError(f"name map {name_map.name!r} does not cover the {model} trunk's "
                         f"leaves once each (unnamed: {missing}; not in the trunk: {surplus})")
    arrays = {leaf_to_foreign[leaf]: np.ascontiguousarray(from_flax(array, "torch", leaf))
              for leaf, array in leaves.items()}
    return leaf_to_foreign, arrays, name_map.name


def write_atomically(arrays: dict[str, np.ndarray], out: pathlib.Path,
                     header: dict[str, str]) -> None:
    """safetensors `arrays` with `header` metadata at `out`, through a temporary file in
    the same folder that replaces `out` only once it is complete."""
    temporary = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = temporary.stat().st_mode  # an ordinary file's mode under the umask
        save_file(arrays, temporary, metadata=header)
        os.chmod(temporary, mode)  # save_file itself writes a private (0600) file
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def export_trunk(trunk_path, out, *, format: str = "safetensors",
                 overwrite: bool = False) -> ExportReport:
    """Writes the trunk checkpoint at `trunk_path` to the safetensors file `out` in
    `format` (one of EXPORT_FORMATS; see the module docstring). Refuses an existing
    `out` unless `overwrite`. torch-names warns (AuxtlWarning) where PyTorch would
    compute other features (padding other than "torch", a BatchNorm epsilon other than
    PyTorch's); the report records the warnings."""
    if format not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {format!r}; formats: {', '.join(EXPORT_FORMATS)}")
    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist")
    if format == "torch-names":
        torch_map(read_metadata(trunk_path).model)  # refuses before reading any array
    params, batch_stats, metadata = load_trunk_state(trunk_path)
    leaves = {leaf: np.asarray(value) for leaf, value in flat_leaves(params, batch_stats).items()}
    header = {"auxtl_format": EXPORT_MARK, "auxtl_model": metadata.model,
              "auxtl_config": json.dumps(metadata.config),
              "auxtl_metadata": json.dumps(metadata.to_json()), "layout": "flax"}
    given: list[str] = []
    if format == "safetensors":
        names = {leaf: leaf for leaf in leaves}
        arrays = {leaf: np.ascontiguousarray(array) for leaf, array in leaves.items()}
    else:
        names, arrays, map_name = _renamed(metadata.model, metadata.config, leaves)
        header.update(layout="torch", names=map_name)
        given = _torch_warnings(metadata.config)
        if map_name == torchvision_names.TORCHVISION.name:
            differences = torchvision_names.stock_differences(metadata.model, metadata.config)
            if differences:
                given.append(f"not torchvision's stock {metadata.model} "
                             f"({', '.join(differences)}): torchvision.models.{metadata.model}() "
                             f"would refuse these shapes; load into a model built to match")
        for message in given:
            warnings.warn(AuxtlWarning(f"export of {str(trunk_path)!r}: {message}"), stacklevel=2)
    write_atomically(arrays, out, header)
    return ExportReport(path=out, format=format, names=names, count=len(arrays),
                        warnings=tuple(given))
