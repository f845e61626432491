"""Self-describing orbax checkpoints.

A trunk checkpoint is a folder with three orbax items: `trunk` (params and batch
statistics), `heads` (the pretraining heads' params) and `metadata` (JSON: model
name and config, ordered layer names, tasks, input shape, normalisation, auxtl
version). `load_trunk` rebuilds the module from the metadata through auxtl's
model registry, so loading never executes code from the file.

Saves are atomic: a new checkpoint is written beside the old one and swapped in
by rename, so a failed save leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from flax import nnx

from auxtl.errors import InputError, MissingFileError
from auxtl.models import build_trunk, list_models
from auxtl.version import __version__

TRUNK_FORMAT = "auxtl.trunk/1"
_METADATA_KEYS = ("format", "model", "config", "layer_names", "input_shape",
                  "normalization", "tasks", "auxtl_version")


def _composite_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def atomic_save(path: str | os.PathLike, write) -> pathlib.Path:
    """Runs write(tmp_path), then swaps tmp_path in for `path`; on error `path` is untouched.

    With several processes every process writes (orbax coordinates who writes
    what) and process 0 alone swaps the folders in.
    """
    path = pathlib.Path(path).absolute()
    primary = jax.process_index() == 0
    token = "shared" if jax.process_count() > 1 else uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.saving-{token}"
    old = path.parent / f".{path.name}.old-{token}"
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _sync(f"auxtl-save-start-{path}")
    try:
        write(tmp)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync(f"auxtl-save-written-{path}")
    if primary:
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _sync(f"auxtl-save-done-{path}")
    return path


def trunk_metadata(trunk, *, config_json: dict[str, Any], input_shape, normalization,
                   tasks: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict:
    return {
        "format": TRUNK_FORMAT,
        "model": trunk.model_name,
        "config": config_json,
        "layer_names": list(trunk.layer_names),
        "feature_dim": trunk.feature_dim,
        "input_shape": list(input_shape),
        "normalization": normalization.to_json(),
        "tasks": tasks,
        "auxtl_version": __version__,
        **(extra or {}),
    }


def save_trunk(path, *, trunk_params, trunk_batch_stats, metadata: dict[str, Any],
               head_params=None) -> pathlib.Path:
    """Writes a self-describing trunk checkpoint to `path` (atomically)."""
    missing = [k for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise InputError(f"trunk metadata lacks {missing}")
    json.dumps(metadata)  # fail before writing anything if it is not JSON

    def write(tmp):
        items = {
            "trunk": ocp.args.StandardSave({"params": trunk_params,
                                            "batch_stats": trunk_batch_stats}),
            "metadata": ocp.args.JsonSave(metadata),
        }
        if head_params:
            items["heads"] = ocp.args.StandardSave(head_params)
        _composite_checkpointer().save(tmp, ocp.args.Composite(**items))  # synchronous

    return atomic_save(path, write)


def read_metadata(path) -> dict[str, Any]:
    """The JSON metadata of a trunk checkpoint, validated."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise MissingFileError(f"no checkpoint folder at {str(path)!r}")
    metadata_dir = path / "metadata"
    if not metadata_dir.exists():
        raise InputError(f"{str(path)!r} is not an auxtl trunk checkpoint (no 'metadata' item)")
    metadata = _composite_checkpointer().restore(
        path, ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    if metadata.get("format") != TRUNK_FORMAT:
        raise InputError(f"{str(path)!r} has format {metadata.get('format')!r}, "
                         f"expected {TRUNK_FORMAT!r}")
    if metadata.get("model") not in list_models():
        raise InputError(f"{str(path)!r} names model {metadata.get('model')!r}, "
                         f"which this auxtl does not know ({', '.join(list_models())})")
    return metadata


def build_checkpoint_trunk(metadata: dict[str, Any], *, rngs: nnx.Rngs | None = None):
    """A fresh module of the checkpoint's architecture (a cut/extended target trunk if
    the metadata carries a `target` spec), built from the registry by name and config."""
    from auxtl.models.target import TargetSpec, build_target_trunk
    rngs = rngs or nnx.Rngs(0)
    if "target" in metadata:
        return build_target_trunk(metadata["model"], metadata["config"],
                                  TargetSpec.from_json(metadata["target"]), rngs=rngs)
    return build_trunk(metadata["model"], metadata["config"], rngs=rngs)


def abstract_trunk(metadata: dict[str, Any]):
    """The trunk module with abstract (shape-only) variables, from metadata alone."""
    return nnx.eval_shape(lambda: build_checkpoint_trunk(metadata))


def load_trunk_state(path) -> tuple[dict, dict, dict]:
    """(params, batch_stats, metadata) of a trunk checkpoint as plain nested dicts."""
    metadata = read_metadata(path)
    abstract_module = abstract_trunk(metadata)
    _, params, batch_stats = nnx.split(abstract_module, nnx.Param, nnx.BatchStat)
    target = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
    restored = _composite_checkpointer().restore(
        pathlib.Path(path).absolute(),
        ocp.args.Composite(trunk=ocp.args.StandardRestore(_abstract_structs(target))))["trunk"]
    return restored["params"], restored["batch_stats"], metadata


def _abstract_structs(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def load_trunk(path):
    """Rebuilds the trunk module saved at `path` with its parameters and statistics."""
    params, batch_stats, metadata = load_trunk_state(path)
    module = build_checkpoint_trunk(metadata)
    nnx.update(module, params, batch_stats)
    return module
