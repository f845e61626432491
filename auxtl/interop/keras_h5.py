"""Read Keras 3 weights (`.keras` archives and `.weights.h5` files) through h5py alone.

Keras 3 stores a model's weights in HDF5: a group per layer, `layers/<layer name>`
(nested models nest `layers/` groups), each with a `vars` group whose datasets `0, 1, ...`
are the layer's variables in creation order, unnamed. A `.keras` file is a zip of that
HDF5 (`model.weights.h5`), `config.json` (the layers, in model order, with their
settings) and `metadata.json` (the Keras version); a `.weights.h5` file is the HDF5 alone.

`read_keras` names each array "<layer>/<variable>" with the variable's Keras name
(kernel, bias, gamma, beta, moving_mean, moving_variance) when the config states it,
else "<layer>/vars/<i>". Arrays come in the config's layer order; without a config, in
the layers' names sorted naturally (HDF5 lists names alphabetically, which would put
conv2d_10 before conv2d_9). Keras's kernels are HWIO and (in, out), Flax's layout.
Nothing in the file is executed: no Keras, no pickle, JSON and HDF5 datasets only.
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


def _config_layers(config: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """The config's layers in model order, nested models flattened ("outer/inner"); each
    {"name", "class_name", and every plain, non-null setting of its config (no
    initializers, regularizers, dtype policies)}."""
    layers = []
    for layer in config.get("config", {}).get("layers", []):
        settings = layer.get("config", {})
        name = prefix + str(settings.get("name", layer.get("name", "")))
        if "layers" in settings:
            layers.extend(_config_layers(layer, name + "/"))
            continue
        entry = {key: value for key, value in settings.items()
                 if key not in ("name", "trainable", "dtype") and _is_setting(value)}
        layers.append({"name": name, "class_name": layer.get("class_name"), **entry})
    return layers


def _h5_layers(group: h5py.Group, prefix: str = "") -> dict[str, list[np.ndarray]]:
    """Layer name -> its variables (vars/0, vars/1, ...) for every layer group holding
    any, nested `layers/` groups joined with "/"; in HDF5's (alphabetical) order."""
    found = {}
    if "vars" in group and len(group["vars"]):
        count = len(group["vars"])
        found[prefix.rstrip("/") or "vars"] = [
            np.asarray(group["vars"][str(i)]) for i in range(count)]
    if "layers" in group:
        for name, child in group["layers"].items():
            found.update(_h5_layers(child, prefix + name + "/"))
    return found


def _read_archive(path: pathlib.Path) -> tuple[bytes, dict | None, dict | None]:
    with zipfile.ZipFile(path) as archive:
        entries = set(archive.namelist())
        if WEIGHTS_ENTRY not in entries:
            raise InputError(f"{path}: a zip without {WEIGHTS_ENTRY}, so no Keras weights inside "
                             f"(entries: {', '.join(sorted(entries)[:8])})")
        config = json.loads(archive.read("config.json")) if "config.json" in entries else None
        metadata = (json.loads(archive.read("metadata.json"))
                    if "metadata.json" in entries else None)
        return archive.read(WEIGHTS_ENTRY), config, metadata


def _layer_arrays(path: pathlib.Path, h5_file: h5py.File) -> dict[str, list[np.ndarray]]:
    if "layers" not in h5_file:
        legacy = "layer_names" in h5_file.attrs or "model_weights" in h5_file
        what = ("a Keras 2 HDF5 file (layer_names / model_weights); load it in Keras 3 and "
                "save it again" if legacy else f"top-level groups {sorted(h5_file)}")
        raise InputError(f"{path}: unknown layout, not Keras 3 weights (no 'layers' group): {what}")
    layers = _h5_layers(h5_file)
    if not layers:
        raise InputError(f"{path}: no weights inside (no layer has variables)")
    return layers


def _named(layers: dict[str, list[np.ndarray]], config_layers: list[dict] | None
           ) -> dict[str, np.ndarray]:
    """"<layer>/<variable>" -> array, in config order (then the rest, naturally sorted)."""
    described = {layer["name"]: layer for layer in config_layers or []}
    order = [layer["name"] for layer in config_layers or [] if layer["name"] in layers]
    order += sorted((name for name in layers if name not in described), key=natural_key)
    tensors = {}
    for name in order:
        arrays = layers[name]
        layer = described.get(name)
        variables = _variable_names(layer["class_name"], layer) if layer else None
        if variables is None or len(variables) != len(arrays):
            variables = [f"vars/{i}" for i in range(len(arrays))]
        tensors.update({f"{name}/{variable}": array for variable, array in zip(variables, arrays)})
    return tensors


def read_keras(path: str | pathlib.Path) -> Source:
    """A Keras 3 `.keras` archive or `.weights.h5` file as a Source (format "keras",
    layout "flax").

    info: "layers": the config's layers in model order (name, class_name, settings such
    as epsilon, padding, strides, pool_size), absent without a config; "keras_version"
    from metadata.json when present; "layer_order": "config" or "natural" (sorted names).
    Raises MissingFileError if `path` does not exist, InputError naming the path if it
    is neither a zip nor HDF5, holds no weights, or is not laid out as Keras 3 writes.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such Keras file")
    config = metadata = None
    if zipfile.is_zipfile(path):
        payload, config, metadata = _read_archive(path)
    elif h5py.is_hdf5(path):
        payload = path.read_bytes()
    else:
        raise InputError(f"{path}: not a Keras file (neither a .keras zip nor an HDF5 "
                         f".weights.h5)")
    try:
        with h5py.File(io.BytesIO(payload), "r") as h5_file:
            layers = _layer_arrays(path, h5_file)
    except OSError as error:
        raise InputError(f"{path}: its Keras weights are not readable HDF5 ({error})") from error
    config_layers = _config_layers(config) if config is not None else None
    info: dict[str, Any] = {"layer_order": "config" if config_layers else "natural"}
    if config_layers:
        info["layers"] = config_layers
    if metadata and "keras_version" in metadata:
        info["keras_version"] = metadata["keras_version"]
    return Source(path=str(path), format="keras", tensors=_named(layers, config_layers),
                  layout="flax", info=info)
