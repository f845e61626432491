"""Read Keras 3 weights (`.keras` archives and `.weights.h5` files) through h5py alone.

Keras 3 stores a model's weights in HDF5: a group per layer, `layers/<path name>`
(nested models nest `layers/` groups), each with a `vars` group whose datasets `0, 1, ...`
are the layer's variables in creation order, unnamed, and whose "name" attribute is the
layer's name. The path name is not the layer's name but its class's, snake-cased and
numbered per class in model order (conv2d, conv2d_1, ...; Keras loads by it). A `.keras`
file is a zip of that HDF5 (`model.weights.h5`), `config.json` (the layers, in model
order, with their settings) and `metadata.json` (the Keras version); a `.weights.h5`
file is the HDF5 alone.

`read_keras` names each array "<layer>/<variable>": the layer's name (nested "outer/
inner"), and the variable's Keras name (kernel, bias, gamma, beta, moving_mean,
moving_variance) when the config states it, else "vars/<i>". Arrays come in the config's
layer order; without a config, in natural order of the path names, which is model order
per class (HDF5 lists names alphabetically, conv2d_10 before conv2d_9). Keras's kernels
are HWIO and (in, out), Flax's layout. Nothing in the file is executed: no Keras, no
pickle, JSON and HDF5 datasets only.

A weights file is untrusted, so before any array is read the whole HDF5 tree is walked
without following links: every link must be a hard link (an external or soft link could
pull in another file on disk or loop), no dataset may keep its bytes outside the file
(external raw storage, virtual datasets), and no dataset may declare more bytes than the
HDF5 file holds (a tiny file can declare a huge unwritten dataset, which reading would
allocate). Keras writes none of these, so this refuses nothing Keras saved uncompressed;
the `.keras` zip's weights entry may not declare more than MAX_ZIP_RATIO times the
archive's size (a zip bomb). Each refusal is an InputError naming the path and object.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import zipfile
from typing import Any

import h5py
import numpy as np

from auxtl.errors import InputError, MissingFileError
from auxtl.interop.source import Source

WEIGHTS_ENTRY = "model.weights.h5"
# Float weights barely compress; a larger inflation than this is a zip bomb, not weights.
MAX_ZIP_RATIO = 100

def _variable_names(class_name: str, config: dict[str, Any]) -> list[str] | None:
    """The variables Keras creates for a layer, in creation order, where its class and
    config say which (None for other classes)."""
    if class_name in ("Conv2D", "Dense"):
        return ["kernel"] + (["bias"] if config.get("use_bias", True) else [])
    if class_name == "BatchNormalization":
        return ((["gamma"] if config.get("scale", True) else [])
                + (["beta"] if config.get("center", True) else [])
                + ["moving_mean", "moving_variance"])
    return None


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside names by value: conv2d_9 before conv2d_10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name) if part)


def _is_setting(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_setting(item) for item in value)
    return isinstance(value, (bool, int, float, str))


def snake_case(class_name: str) -> str:
    """Keras's `naming.to_snake_case`: "BatchNormalization" -> "batch_normalization"."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique(base: str, used: dict[str, int]) -> str:
    """Keras's `_get_unique_name`: base, base_1, base_2, ... per container."""
    used[base] = used.get(base, -1) + 1
    return base if used[base] == 0 else f"{base}_{used[base]}"


def _config_layers(config: dict[str, Any], prefix: str = "", h5_prefix: str = ""
                   ) -> list[tuple[dict[str, Any], str]]:
    """The config's layers in model order, nested models flattened ("outer/inner"), each
    as ({"name", "class_name", every plain, non-null setting of its config (no
    initializers, regularizers, dtype policies)}, its HDF5 path). Keras does not store a
    layer under its name but under its class's snake-case name, numbered per class in
    the container's order (conv2d, conv2d_1, ...): the path is computed that way."""
    layers, used = [], {}
    for layer in config.get("config", {}).get("layers", []):
        settings = layer.get("config", {})
        name = prefix + str(settings.get("name", layer.get("name", "")))
        h5_path = h5_prefix + _unique(snake_case(str(layer.get("class_name", ""))), used)
        if "layers" in settings:
            layers.extend(_config_layers(layer, name + "/", h5_path + "/"))
            continue
        entry = {key: value for key, value in settings.items()
                 if key not in ("name", "trainable", "dtype") and _is_setting(value)}
        layers.append(({"name": name, "class_name": layer.get("class_name"), **entry}, h5_path))
    return layers


def _stated_name(group: h5py.Group, default: str) -> str:
    """The layer's name as its `vars` group's "name" attribute states it, else `default`."""
    name = group["vars"].attrs.get("name", default) if "vars" in group else default
    return name.decode() if isinstance(name, bytes) else str(name)


def _h5_layers(group: h5py.Group, path: str = "", name: str = ""
               ) -> dict[str, tuple[str, list[np.ndarray]]]:
    """HDF5 path ("conv2d", "sequential/conv2d": nested `layers/` groups joined with "/")
    -> (the layer's stated name, nested ones "outer/inner"; its variables vars/0,
    vars/1, ...) for every layer holding any, in HDF5's (alphabetical) order."""
    found = {}
    if "vars" in group and len(group["vars"]):
        found[path] = (name.rstrip("/") or _stated_name(group, "model"),
                       [np.asarray(group["vars"][str(i)]) for i in range(len(group["vars"]))])
    for child_name, child in (group["layers"].items() if "layers" in group else ()):
        found.update(_h5_layers(child, f"{path}/{child_name}".lstrip("/"),
                                name + _stated_name(child, child_name) + "/"))
    return found


def _checked_tree(path: pathlib.Path, group: h5py.Group, file_bytes: int) -> None:
    """InputError naming `path` and the object unless every link under `group` is a hard
    link and every dataset keeps at most `file_bytes` declared bytes inside the file.
    Follows no link before checking it; visits each object once (hard links may loop)."""
    seen, pending = {group.id}, [group]
    while pending:
        current = pending.pop()
        for key in current:
            where = f"{current.name.rstrip('/')}/{key}"
            link = current.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise InputError(f"{path}: HDF5 object {where} is a {type(link).__name__}, "
                                 f"not stored in the file; refused (Keras writes hard links only)")
            child = current[key]
            if child.id in seen:
                continue
            seen.add(child.id)
            if isinstance(child, h5py.Group):
                pending.append(child)
            elif isinstance(child, h5py.Dataset):
                _checked_dataset(path, child, where, file_bytes)


def _checked_dataset(path: pathlib.Path, dataset: h5py.Dataset, where: str,
                     file_bytes: int) -> None:
    if dataset.external or dataset.is_virtual:
        raise InputError(f"{path}: HDF5 dataset {where} keeps its bytes outside the file "
                         f"({'virtual' if dataset.is_virtual else 'external storage'}); refused")
    declared = int(np.prod(dataset.shape or (), dtype=np.int64)) * dataset.dtype.itemsize
    if declared > file_bytes:
        raise InputError(f"{path}: HDF5 dataset {where} declares shape {dataset.shape} "
                         f"{dataset.dtype} ({declared} bytes), more than the {file_bytes} "
                         f"bytes of the HDF5 file holding it; refused")


def _read_archive(path: pathlib.Path) -> tuple[bytes, dict | None, dict | None]:
    with zipfile.ZipFile(path) as archive:
        entries = set(archive.namelist())
        if WEIGHTS_ENTRY not in entries:
            raise InputError(f"{path}: a zip without {WEIGHTS_ENTRY}, so no Keras weights inside "
                             f"(entries: {', '.join(sorted(entries)[:8])})")
        declared = archive.getinfo(WEIGHTS_ENTRY).file_size
        limit = MAX_ZIP_RATIO * path.stat().st_size
        if declared > limit:
            raise InputError(f"{path}: its {WEIGHTS_ENTRY} declares {declared} bytes, more than "
                             f"{MAX_ZIP_RATIO} times the archive's size ({limit}); a zip bomb, "
                             f"refused")
        config, metadata = (_json(path, archive, entry) if entry in entries else None
                            for entry in ("config.json", "metadata.json"))
        return archive.read(WEIGHTS_ENTRY), config, metadata


def _json(path: pathlib.Path, archive: zipfile.ZipFile, entry: str) -> Any:
    try:
        return json.loads(archive.read(entry))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: its {entry} is not JSON ({error})") from error


def _layer_arrays(path: pathlib.Path, h5_file: h5py.File
                  ) -> dict[str, tuple[str, list[np.ndarray]]]:
    if "layers" not in h5_file:
        legacy = "layer_names" in h5_file.attrs or "model_weights" in h5_file
        what = ("a Keras 2 HDF5 file (layer_names / model_weights); load it in Keras 3 and "
                "save it again" if legacy else f"top-level groups {sorted(h5_file)}")
        raise InputError(f"{path}: unknown layout, not Keras 3 weights (no 'layers' group): {what}")
    layers = _h5_layers(h5_file)
    if not layers:
        raise InputError(f"{path}: no weights inside (no layer has variables)")
    return layers


def _named(stored: dict[str, tuple[str, list[np.ndarray]]],
           config_layers: list[tuple[dict[str, Any], str]] | None) -> dict[str, np.ndarray]:
    """"<layer>/<variable>" -> array: the config's layers in its order (named as it names
    them), then any others in natural order of their HDF5 paths (per class, the model's)."""
    claimed = [(layer, h5_path) for layer, h5_path in config_layers or [] if h5_path in stored]
    rest = sorted(set(stored) - {h5_path for _, h5_path in claimed}, key=natural_key)
    tensors = {}
    for layer, h5_path in claimed + [(None, h5_path) for h5_path in rest]:
        name, arrays = stored[h5_path]
        variables = _variable_names(layer["class_name"], layer) if layer else None
        if variables is None or len(variables) != len(arrays):
            variables = [f"vars/{i}" for i in range(len(arrays))]
        name = layer["name"] if layer else name
        tensors.update({f"{name}/{variable}": array for variable, array in zip(variables, arrays)})
    return tensors


def read_keras(path: str | pathlib.Path) -> Source:
    """A Keras 3 `.keras` archive or `.weights.h5` file as a Source (format "keras",
    layout "flax").

    info: "layers": the config's layers in model order (name, class_name, settings such
    as epsilon, padding, strides, pool_size), absent without a config; "keras_version"
    from metadata.json when present; "layer_order": "config" or "natural" (no config).
    Raises MissingFileError if `path` does not exist, InputError naming the path if it
    is neither a zip nor HDF5, holds no weights, is not laid out as Keras 3 writes, or
    fails the checks of an untrusted file (module docstring).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such Keras file")
    config = metadata = None
    if zipfile.is_zipfile(path):
        payload, config, metadata = _read_archive(path)
        weights: Any = io.BytesIO(payload)
        file_bytes = len(payload)
    elif h5py.is_hdf5(path):
        weights, file_bytes = path, path.stat().st_size
    else:
        raise InputError(f"{path}: not a Keras file (neither a .keras zip nor an HDF5 "
                         f".weights.h5)")
    try:
        with h5py.File(weights, "r") as h5_file:
            _checked_tree(path, h5_file, file_bytes)
            layers = _layer_arrays(path, h5_file)
    except OSError as error:
        raise InputError(f"{path}: its Keras weights are not readable HDF5 ({error})") from error
    config_layers = _config_layers(config) if config is not None else None
    info: dict[str, Any] = {"layer_order": "config" if config_layers else "natural"}
    if config_layers:
        info["layers"] = [layer for layer, _ in config_layers]
    if metadata and "keras_version" in metadata:
        info["keras_version"] = metadata["keras_version"]
    return Source(path=str(path), format="keras", tensors=_named(layers, config_layers),
                  layout="flax", info=info)
