"""Self-describing orbax checkpoints.

A trunk checkpoint is a folder with three orbax items: `trunk` (params and batch
statistics), `heads` (the pretraining heads' params) and `metadata` (JSON: model
name and config, ordered layer names, tasks, input shape, normalisation, auxtl
version). `load_trunk` rebuilds the module from the metadata through auxtl's
model registry, so loading never executes code from the file.

Saves are atomic: the checkpoint path is a symbolic link to a versioned folder
beside it (`.NAME.v-TOKEN`); a new version is written in full, then a new link
replaces the old in one os.replace, so an interrupted save at any moment leaves
the old or the new checkpoint at the path, never none.

Readers validate first (`validate_checkpoint`): every item, orbax's metadata and
every file the arrays' OCDBT database references must be present and whole, else
one error names the checkpoint and the file, before anything is planned or loaded.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import pathlib
import re
import shutil
import sys
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils
from flax import nnx

from auxtl.errors import AuxtlError, InputError, MissingFileError
from auxtl.models import list_models
from auxtl.trunk_metadata import TaskRecord, TRUNK_FORMAT, TrunkMetadata, as_trunk_metadata
from auxtl.version import __version__



def _composite_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _save_token() -> str:
    """A fresh name for a save; with several processes, process 0's (all write one folder)."""
    token = uuid.uuid4().int & 0x7FFFFFFF
    if jax.process_count() > 1:
        token = int(multihost_utils.broadcast_one_to_all(np.int32(token)))
    return f"{token:08x}"


def _linked_version(path: pathlib.Path) -> pathlib.Path | None:
    """The versioned folder `path` links to, if `path` is a link atomic_save made."""
    if not path.is_symlink():
        return None
    target = os.readlink(path)
    if os.sep in target or not target.startswith(f".{path.name}.v-"):
        return None  # a link the user made: never delete what it points at
    return path.parent / target


_NO_SYMLINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def _fsync_folder(folder: pathlib.Path) -> None:
    """Makes a rename in `folder` durable (best effort: not every file system allows it)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _point_at(path: pathlib.Path, version: pathlib.Path, token: str) -> None:
    """Makes `path` a link to `version` in one atomic step, then removes what it replaced.

    On a file system without symbolic links (some network and FAT mounts) the version
    folder itself is renamed to `path`, the old one moved aside first; readers bridge
    that moment (resolve_checkpoint).
    """
    previous = _linked_version(path)
    link = path.parent / f".{path.name}.link-{token}"
    link.unlink(missing_ok=True)
    try:
        os.symlink(version.name, link)  # relative: the checkpoint's parent folder can move
    except OSError as error:
        if error.errno not in _NO_SYMLINKS:
            raise
        link = None
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink() or link is None:
            # A folder written by an older auxtl (or no links here): a folder cannot be
            # replaced in one step, so it is moved aside first.
            previous = path.parent / f".{path.name}.old-{token}"
            os.rename(path, previous)
    if link is None:
        os.rename(version, path)
        version = path
    else:
        os.replace(link, path)
    _fsync_folder(path.parent)
    if previous is not None and previous != version:
        shutil.rmtree(previous, ignore_errors=True)
    for aside in path.parent.glob(f".{glob.escape(path.name)}.old-*"):  # an earlier crash's
        shutil.rmtree(aside, ignore_errors=True)


def atomic_save(path: str | os.PathLike, write) -> pathlib.Path:
    """Runs write(version) into a new folder beside `path`, then points `path` at it.

    If write fails, `path` is untouched. Once written, the new version replaces the
    old by one os.replace of a symbolic link (atomic on POSIX), so a crash at any
    point leaves `path` loadable as the old or the new checkpoint. With several
    processes every process writes (orbax coordinates who writes what) into one
    version folder that process 0 names, and process 0 alone swaps it in.
    """
    path = pathlib.Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise InputError(f"cannot save a checkpoint at {str(path)!r}: it is a file, not a "
                         "checkpoint folder")
    primary = jax.process_index() == 0
    token = _save_token()
    version = path.parent / f".{path.name}.v-{token}"
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(version, ignore_errors=True)
    _sync(f"auxtl-save-start-{path}")
    try:
        write(version)
    except BaseException:
        if primary:
            shutil.rmtree(version, ignore_errors=True)
        raise
    _sync(f"auxtl-save-written-{path}")
    if primary:
        _point_at(path, version, token)
    _sync(f"auxtl-save-done-{path}")
    return path


def trunk_metadata(trunk, *, config_json: dict[str, Any], input_shape, normalization,
                   tasks: list, extra: dict[str, Any] | None = None,
                   ) -> TrunkMetadata:
    """The metadata of `trunk` (its model name, layer names and feature size read from the
    module); `extra` holds further checkpoint JSON keys (data, split, steps, seed, ...),
    read into their typed fields (unknown keys into `TrunkMetadata.extra`). `tasks`:
    TaskRecords or their JSON objects."""
    return TrunkMetadata.from_json({
        "format": TRUNK_FORMAT, "model": trunk.model_name, "config": config_json,
        "layer_names": list(trunk.layer_names), "feature_dim": trunk.feature_dim,
        "input_shape": list(input_shape), "normalization": normalization.to_json(),
        "tasks": [t.to_json() if isinstance(t, TaskRecord) else t for t in tasks],
        "auxtl_version": __version__, **(extra or {})},
        where=f"metadata of a {trunk.model_name} trunk")


def save_trunk(path, *, trunk_params, trunk_batch_stats,
               metadata: TrunkMetadata | dict[str, Any], head_params=None) -> pathlib.Path:
    """Writes a self-describing trunk checkpoint to `path` (atomically). `metadata` may
    also be a dict in the checkpoint's JSON form (checked as `TrunkMetadata.from_json`)."""
    document = as_trunk_metadata(metadata, f"metadata for {str(path)!r}").to_json()
    json.dumps(document)  # fail before writing anything if it is not JSON

    def write(tmp):
        items = {
            "trunk": ocp.args.StandardSave({"params": trunk_params,
                                            "batch_stats": trunk_batch_stats}),
            "metadata": ocp.args.JsonSave(document),
        }
        if head_params:
            items["heads"] = ocp.args.StandardSave(head_params)
        _composite_checkpointer().save(tmp, ocp.args.Composite(**items))  # synchronous

    return atomic_save(path, write)


def resolve_checkpoint(path) -> pathlib.Path:
    """The folder that holds the checkpoint `path` names (its link followed, once, so one
    read sees one version even if a save swaps a new one in meanwhile)."""
    path = pathlib.Path(path).absolute()
    if path.exists():
        return path.resolve()
    if path.is_symlink():
        raise MissingFileError(f"checkpoint {str(path)!r} links to {os.readlink(path)!r}, "
                               "which does not exist")
    # A save that moved an older auxtl's folder aside and stopped before linking the new one.
    aside = [p for p in path.parent.glob(f".{glob.escape(path.name)}.old-*") if p.is_dir()]
    if len(aside) == 1:
        return aside[0]
    raise MissingFileError(f"no checkpoint folder at {str(path)!r}")


_LOCATION = re.compile(r"^(value|btreenode|versionnode):([^:]*):([^:]*):(\d+):(\d+)$")


def _locations(node) -> list[str]:
    """Every OCDBT location string ("kind:base:file:offset:length") inside a dumped node."""
    if isinstance(node, str):
        return [node] if _LOCATION.match(node) else []
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [loc for child in node for loc in _locations(child)]
    return []


class _Damage(Exception):
    """Internal: a checkpoint file that is missing (`missing`) or broken."""

    def __init__(self, file: str, problem: str, missing: bool = False):
        super().__init__(file, problem)
        self.file, self.problem, self.missing = file, problem, missing


def _json_file(folder: pathlib.Path, relative: str) -> Any:
    file = folder / relative
    if not file.is_file():
        raise _Damage(relative, "is missing", missing=True)
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Damage(relative, f"is not valid JSON ({e})") from e


def _check_ocdbt(folder: pathlib.Path, item: str) -> None:
    """Every file the latest version of the item's OCDBT database references (B-tree
    nodes and array data) exists and is long enough for the bytes it is read at."""
    manifest_file = folder / item / "manifest.ocdbt"
    if not manifest_file.is_file():
        raise _Damage(f"{item}/manifest.ocdbt", "is missing", missing=True)
    if manifest_file.stat().st_size == 0:
        raise _Damage(f"{item}/manifest.ocdbt", "is empty")
    try:
        store = ts.KvStore.open({"driver": "file", "path": f"{folder / item}/"}).result()
        manifest = ts.ocdbt.dump(store).result()
    except (ValueError, RuntimeError, OSError) as e:
        raise _Damage(f"{item}/manifest.ocdbt", f"cannot be read ({e})") from e
    versions = manifest.get("versions") or []
    pending = _locations(versions[-1].get("root", {})) if versions else []
    seen = set()
    while pending:
        location = pending.pop()
        if location in seen:
            continue
        seen.add(location)
        kind, base, name, offset, length = _LOCATION.match(location).groups()
        relative = f"{item}/{base}{name}"
        file = folder / item / f"{base}{name}"
        if not file.is_file():
            raise _Damage(relative, "is missing", missing=True)
        size, needed = file.stat().st_size, int(offset) + int(length)
        if size < needed:
            raise _Damage(relative, f"is truncated ({size} bytes; {needed} are referenced)")
        if kind != "value":
            try:
                pending += _locations(ts.ocdbt.dump(store, location).result())
            except (ValueError, RuntimeError, OSError) as e:
                raise _Damage(relative, f"holds an unreadable {kind} ({e})") from e


def _check_items(folder: pathlib.Path) -> None:
    checkpoint_metadata = _json_file(folder, "_CHECKPOINT_METADATA")
    handlers = (checkpoint_metadata.get("item_handlers")
                if isinstance(checkpoint_metadata, dict) else None)
    if not isinstance(handlers, dict):
        raise _Damage("_CHECKPOINT_METADATA", "names no items (no 'item_handlers')")
    for item in sorted({"trunk", "metadata", *handlers}):
        if not (folder / item).is_dir():
            raise _Damage(f"{item}/", "(an item folder) is missing", missing=True)
    if not isinstance(_json_file(folder, "metadata/metadata"), dict):
        raise _Damage("metadata/metadata", "is not a JSON object")
    for item in sorted(handlers):
        if item == "metadata":
            continue
        tree = _json_file(folder, f"{item}/_METADATA")
        if not isinstance(tree, dict) or not isinstance(tree.get("tree_metadata"), dict):
            raise _Damage(f"{item}/_METADATA", "is not orbax tree metadata (no 'tree_metadata')")
        if tree.get("use_ocdbt", True):
            _check_ocdbt(folder, item)


def validate_checkpoint(path) -> pathlib.Path:
    """Checks that the trunk checkpoint at `path` is complete; returns the folder to read.

    Every item folder `_CHECKPOINT_METADATA` names (`trunk` and `metadata` always),
    the metadata JSON, each array item's `_METADATA` and OCDBT manifest, and every
    file that manifest's B-tree references (present and long enough). Raises one
    MissingFileError (a file is missing) or InputError (a file is broken) naming
    the checkpoint and the file, so that nothing is planned or half-loaded first.
    """
    shown = str(pathlib.Path(path).absolute())
    folder = resolve_checkpoint(path)
    if not folder.is_dir():
        raise MissingFileError(f"no checkpoint folder at {shown!r}")
    if not (folder / "metadata").exists() and not (folder / "_CHECKPOINT_METADATA").exists():
        raise InputError(f"{shown!r} is not an auxtl trunk checkpoint (no 'metadata' item)")
    try:
        _check_items(folder)
    except _Damage as damage:
        error = MissingFileError if damage.missing else InputError
        kind = "incomplete" if damage.missing else "damaged"
        raise error(f"checkpoint {shown!r} is {kind}: {damage.file} {damage.problem}") from (
            damage.__cause__)
    return folder


def _restore(folder: pathlib.Path, shown, **items) -> dict[str, Any]:
    """Composite restore; orbax/tensorstore failures become one InputError naming the
    checkpoint (the original chained)."""
    try:
        return _composite_checkpointer().restore(folder, ocp.args.Composite(**items))
    except (AuxtlError, jax.errors.JaxRuntimeError, MemoryError):
        raise  # named already, or the device's (out of memory), not the file's
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        _drop_late_callbacks_into_closed_loops()
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(f"checkpoint {str(pathlib.Path(shown).absolute())!r} is damaged: "
                         f"{detail}") from e


def _drop_late_callbacks_into_closed_loops() -> None:
    """After a failed restore, reads that orbax still had in flight finish and call back into
    its event loop, which orbax has closed; asyncio reports each as an unraisable
    "RuntimeError: Event loop is closed" traceback, possibly at exit. That is noise after the
    error auxtl raised: from now on exactly that report is dropped, all others pass on."""
    previous = sys.unraisablehook
    if getattr(previous, "auxtl_drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.auxtl_drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def read_metadata(path) -> TrunkMetadata:
    """The typed metadata of a trunk checkpoint, validated (see `validate_checkpoint`).

    It also reads like a dict of the JSON (`metadata["layer_names"]`), for older scripts.
    """
    return _read_metadata(path, validate_checkpoint(path))


def _read_metadata(path, folder: pathlib.Path) -> TrunkMetadata:
    shown = repr(str(pathlib.Path(path).absolute()))
    raw = _restore(folder, path, metadata=ocp.args.JsonRestore())["metadata"]
    metadata = TrunkMetadata.from_json(raw, where=f"checkpoint {shown}")  # format checked
    if metadata.model not in list_models():
        raise InputError(f"{shown} names model {metadata.model!r}, which this auxtl does not "
                         f"know ({', '.join(list_models())}); a model of your own must be "
                         f"registered first (auxtl.register_model or auxtl.load_model_module; "
                         f"on the command line --model-module FILE)")
    return metadata


def build_checkpoint_trunk(metadata: TrunkMetadata, *, rngs: nnx.Rngs | None = None):
    """A fresh module of the checkpoint's architecture (`TrunkMetadata.build_module`)."""
    return as_trunk_metadata(metadata).build_module(rngs=rngs)


def abstract_trunk(metadata: TrunkMetadata):
    """The trunk module with abstract (shape-only) variables, from metadata alone."""
    return nnx.eval_shape(lambda: build_checkpoint_trunk(metadata))


def load_trunk_state(path) -> tuple[dict, dict, TrunkMetadata]:
    """(params, batch_stats, metadata) of a trunk checkpoint: plain nested dicts of arrays
    and the typed metadata."""
    folder = validate_checkpoint(path)
    metadata = _read_metadata(path, folder)
    abstract_module = abstract_trunk(metadata)
    _, params, batch_stats = nnx.split(abstract_module, nnx.Param, nnx.BatchStat)
    target = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
    restored = _restore(folder, path,
                        trunk=ocp.args.StandardRestore(_abstract_structs(target)))["trunk"]
    return restored["params"], restored["batch_stats"], metadata


def _abstract_structs(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def load_trunk(path):
    """Rebuilds the trunk module saved at `path` with its parameters and statistics."""
    params, batch_stats, metadata = load_trunk_state(path)
    module = build_checkpoint_trunk(metadata)
    nnx.update(module, params, batch_stats)
    return module
