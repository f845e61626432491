"""Import a trunk from another framework's weights file into a self-describing checkpoint.

reader (`readers.read_source`) -> prefix and name map (chosen, or named by the user) ->
the model config (what the file decides, then --model-arg) -> every foreign array
matched against every leaf of the trunk that config builds, strictly -> layout and dtype
conversion -> `checkpoints.save_trunk`, with the import report in the metadata. The
checkpoint is an ordinary auxtl trunk: `load_trunk`, `auxtl transfer` and surgery take
it like a pretrained one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from auxtl.checkpoints import save_trunk, trunk_metadata
from auxtl.data import Normalization
from auxtl.errors import AuxtlWarning, InputError
from auxtl.interop import rule_maps
from auxtl.interop.maps import maps_in_order
from auxtl.interop.layout import converted, to_flax
from auxtl.interop.name_maps import NAME_MAPS, NameMap, flat_leaves, get_name_map
from auxtl.interop.readers import read_source
from auxtl.interop.report import ImportReport, LeafRecord, mismatch_error
from auxtl.interop.source import LAYOUTS, Source
from auxtl.models import build_trunk, config_to_json, make_config, model_entry
from auxtl.trunk_metadata import TrunkMetadata

# Wrappers training code puts around a state dict: tried in turn when no prefix is given.
WRAPPERS = ("state_dict.", "model.", "module.", "state_dict.module.", "model.module.",
            "model_state_dict.", "trunk/", "params/")


@dataclasses.dataclass(frozen=True)
class ImportResult:
    trunk: nnx.Module
    metadata: TrunkMetadata
    report: ImportReport
    path: pathlib.Path | None


def file_sha256(path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, sorted)."""
    path = pathlib.Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _resolve_map(name_map: str | NameMap | None, model: str) -> list[NameMap] | None:
    if name_map is None:
        return None
    if isinstance(name_map, NameMap):
        return [name_map]
    if name_map in NAME_MAPS:
        chosen = get_name_map(name_map)
        if "*" not in chosen.models and model not in chosen.models:
            raise InputError(f"name map {name_map!r} maps {', '.join(chosen.models)}, not "
                             f"{model!r}")
        return [chosen]
    if "=" in name_map or name_map.startswith("@"):
        return [rule_maps.rule_map(name_map)]
    return [get_name_map(name_map)]  # UnknownNameError naming the known maps


def choose_map(source: Source, model: str, name_map=None,
               prefix: str | None = None) -> tuple[NameMap, str]:
    """(name map, prefix): the named map, else the first map for `model` that recognizes
    the names; the given prefix, else "" or the first wrapper (WRAPPERS) under which a
    map recognizes them. InputError naming the first names when none does."""
    named = _resolve_map(name_map, model)
    prefixes = [prefix] if prefix is not None else [""] + [
        p for p in WRAPPERS if any(name.startswith(p) for name in source.tensors)]
    candidates = named or maps_in_order(model)
    for candidate_prefix in prefixes:
        selected = source.select(candidate_prefix)
        for candidate in candidates:
            if candidate.recognizes(selected):
                return candidate, candidate_prefix
    if named:
        return named[0], prefixes[0]
    sample = ", ".join(list(source.tensors)[:6])
    raise InputError(f"no name map for model {model!r} recognizes the names in {source.path} "
                     f"(they begin: {sample}); maps for it: "
                     f"{', '.join(m.name for m in maps_in_order(model)) or 'none'}; give --map "
                     f"RULES ('PATTERN=REPLACEMENT;...') or --prefix")


def _set(tree: dict, leaf: str, value) -> None:
    parts = leaf.split("/")[1:]
    for part in parts[:-1]:
        tree = tree[part if part in tree else int(part)]
    last = parts[-1]
    tree[last if last in tree else int(last)] = value


def _default_input_shape(model: str, config, source: Source) -> tuple[int, int, int]:
    recorded = source.info.get("auxtl_metadata")
    if isinstance(recorded, dict) and recorded.get("model") == model and recorded.get("input_shape"):
        return tuple(recorded["input_shape"])
    if source.info.get("input_shape"):
        return tuple(source.info["input_shape"])
    channels = config.in_channels
    if model in ("resnet18", "resnet50"):
        side = 224 if config.large_stem else 32
        return (side, side, channels)
    if model == "small_cnn":
        return (28, 28, channels)
    raise InputError(f"the input size of an imported {model!r} trunk is unknown; give "
                     f"input_shape (--input-shape H,W,C)")


def _default_normalization(chosen: NameMap, source: Source, channels: int):
    recorded = source.info.get("auxtl_metadata")
    if isinstance(recorded, dict) and isinstance(recorded.get("normalization"), dict):
        return Normalization.from_json(recorded["normalization"]), "recorded in the file"
    known = chosen.normalization
    if known is not None and len(known.mean) == channels:
        return known, f"the {chosen.name} convention"
    return (Normalization((0.0,) * channels, (1.0,) * channels),
            "none known: pixels in [0, 1] as given")


def compile_ignores(ignore: Sequence[str]) -> list[re.Pattern]:
    """The --ignore regexes compiled; InputError naming a bad one."""
    patterns = []
    for pattern in ignore:
        try:
            patterns.append(re.compile(pattern))
        except re.error as error:
            raise InputError(f"--ignore {pattern!r} is not a regular expression ({error})") from None
    return patterns


def as_leaf_array(array: np.ndarray, target, foreign: str, leaf: str) -> np.ndarray:
    """`array` cast to the leaf's dtype; InputError naming both when the source is not a
    real floating array or the cast leaves a non-finite value (overflow, NaN/Inf)."""
    if not jax.numpy.issubdtype(array.dtype, jax.numpy.floating):
        raise InputError(f"{foreign} holds {array.dtype} values; the leaf {leaf} holds "
                         f"{np.dtype(target.dtype)}: only floating arrays load into weights "
                         f"(--ignore {foreign!r} drops it)")
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        value = np.ascontiguousarray(array, dtype=target.dtype)
    if not np.isfinite(value).all():
        raise InputError(f"{foreign} ({array.dtype}) has values that are not finite as "
                         f"{np.dtype(target.dtype)} (NaN, Inf or out of range) for {leaf}")
    return value


def match_leaves(source: Source, chosen: NameMap, model: str, config, leaves: dict[str, Any],
                 layout: str, patterns: Sequence[re.Pattern], *, strict: bool,
                 outside: Sequence[tuple[str, tuple]] = (), prefix: str = ""):
    """({leaf: float array in the leaf's layout and dtype}, [LeafRecord]) for every foreign
    array and every leaf; one ImportMismatchError listing each problem when `strict` (or a
    shape mismatch, always)."""
    mapping = chosen.names(model, config, source)
    records, arrays, taken, expected = [], {}, {}, {}
    missing, unused, misshaped, other = [], [], [], []
    for foreign, leaf in mapping.items():
        expected.setdefault(leaf, foreign)
    for foreign, array in source.tensors.items():
        shape = tuple(array.shape)
        hit = next((p.pattern for p in patterns if p.search(foreign)), None)
        reason = f"--ignore {hit}" if hit else (None if foreign in mapping
                                                 else chosen.ignored(foreign))
        if reason:
            records.append(LeafRecord("ignored", source=foreign, source_shape=shape, note=reason))
            continue
        leaf = mapping.get(foreign)
        if leaf not in leaves:  # no name for it, or a name the trunk does not have
            note = "" if leaf in (None, foreign) else f"renamed {leaf!r}: no such leaf"
            unused.append(f"{foreign} {shape}" + (f" ({note})" if note else ""))
            records.append(LeafRecord("unused", source=foreign, source_shape=shape, note=note))
            continue
        if leaf in taken:
            other.append(f"{foreign} and {taken[leaf]} both map to {leaf}")
            continue
        taken[leaf] = foreign
        target = leaves[leaf]
        value = to_flax(array, layout, leaf)
        if tuple(value.shape) != tuple(target.shape):
            moved = f" (as {tuple(value.shape)} in flax layout)" if value.shape != array.shape else ""
            misshaped.append(f"{foreign} {shape}{moved} vs {leaf} {tuple(target.shape)}")
            continue
        notes = []
        if converted(shape, layout, leaf):
            notes.append("OIHW->HWIO" if array.ndim == 4 else "(out,in)->(in,out)")
        if value.dtype != target.dtype:
            notes.append(f"{value.dtype}->{np.dtype(target.dtype)}")
        arrays[leaf] = as_leaf_array(value, target, foreign, leaf)
        records.append(LeafRecord("converted" if notes else "loaded", leaf, tuple(target.shape),
                                  foreign, shape, ", ".join(notes)))
    for leaf, target in leaves.items():
        if leaf not in taken:
            hint = expected.get(leaf)
            missing.append(f"{leaf} {tuple(target.shape)}"
                           + (f" <- {hint}: not in the file" if hint else ": no name maps to it"))
            records.append(LeafRecord("missing", leaf, tuple(target.shape), hint,
                                      note="fresh initialisation"))
    records += [LeafRecord("ignored", source=name, source_shape=shape,
                           note=f"outside prefix {prefix!r}") for name, shape in outside]
    settings = ", ".join(f"{k}={v}" for k, v in config_to_json(config).items())
    error = mismatch_error(f"{source.path} into {model} (map {chosen.name}; config {settings}: "
                           f"--model-arg KEY=VALUE changes it)",
                           missing=missing if strict else [], unused=unused if strict else [],
                           misshaped=misshaped, other=other)
    if error is not None:
        raise error
    return arrays, records


def import_trunk(src, *, model: str, format: str | None = None, out=None,
                 name_map: str | NameMap | None = None, ignore: Sequence[str] = (),
                 prefix: str | None = None, model_args: Mapping[str, Any] | None = None,
                 layout: str | None = None, input_shape: Sequence[int] | None = None,
                 normalization: Normalization | None = None, strict: bool = True,
                 seed: int = 0, overwrite: bool = False) -> ImportResult:
    """Reads `src`, maps its arrays onto a `model` trunk, and (if `out`) saves the checkpoint.

    Args:
      src: the foreign file or folder. format: one of readers.FORMATS (from the name if None).
      model: an auxtl model name (built-in or registered, e.g. from --model-module).
      name_map: a registered map's name ("torchvision", "keras", "auxtl"), regex rules
        'PATTERN=REPLACEMENT;...' (or '@FILE'), or None to choose by the names.
      ignore: regexes of foreign names to drop (reported as ignored).
      prefix: keep only names under it, stripped (None: try "" and common WRAPPERS).
      model_args: config values that override what the file decides.
      layout: "torch" or "flax" to override the map's and the reader's.
      input_shape, normalization: recorded in the metadata (defaults: what the file
        records, else the model's usual size and the map's convention).
      strict: every leaf needs an array and every array a use or an ignore; with False,
        missing leaves keep a fresh initialisation from `seed`, unused arrays are reported.
      overwrite: replace a checkpoint at `out` (refused otherwise, before anything is read).
    Returns:
      ImportResult(trunk module, metadata, report, saved path or None).
    """
    if out is not None and not overwrite and (pathlib.Path(out).exists()
                                              or pathlib.Path(out).is_symlink()):
        raise InputError(f"{str(out)!r} exists; give overwrite=True (--overwrite) to replace it")
    model_entry(model)  # InputError naming the known models
    patterns = compile_ignores(ignore)
    source = read_source(src, format)
    auto_prefix = prefix is None
    chosen, prefix = choose_map(source, model, name_map, prefix)
    selected = source.select(prefix)
    if chosen.prepare is not None:
        selected = chosen.prepare(selected, model)
    outside = [(name, tuple(array.shape)) for name, array in source.tensors.items()
               if not name.startswith(prefix)] if prefix else []
    if outside and auto_prefix:
        shown = ", ".join(name for name, _ in outside[:4]) + (", ..." if len(outside) > 4 else "")
        warnings.warn(AuxtlWarning(f"{source.path}: using the arrays under {prefix!r}; {len(outside)}"
                                   f" array(s) outside it are ignored ({shown}); --prefix "
                                   f"chooses another"), stacklevel=2)
    layout = layout or chosen.layout or selected.layout
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    with warnings.catch_warnings(record=True) as caught:  # the map's assumptions
        warnings.simplefilter("always", AuxtlWarning)
        inferred = chosen.infer_config(model, selected)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    notes = [str(w.message) for w in caught if issubclass(w.category, AuxtlWarning)]
    notes += list(selected.info.get("notes", []))
    # What an auxtl export recorded wins over what the arrays suggest (padding, epsilon
    # cannot be read off arrays); --model-arg wins over both.
    values = {**inferred, **rule_maps.recorded_config(model, selected), **dict(model_args or {})}
    config = make_config(model, tuple(input_shape) if input_shape else None, **values)
    shape = tuple(input_shape) if input_shape else _default_input_shape(model, config, selected)
    if len(shape) != 3 or shape[-1] != config.in_channels:
        raise InputError(f"input shape {shape} does not fit the imported {model} trunk, which "
                         f"reads {config.in_channels} channel(s) (give H,W,C)")
    if normalization is None:
        normalization, why = _default_normalization(chosen, selected, shape[-1])
    elif len(normalization.mean) != shape[-1]:
        raise InputError(f"the normalisation has {len(normalization.mean)} channel(s), the "
                         f"trunk reads {shape[-1]}")
    else:
        why = "given"
    # Strict: every leaf comes from the file, so the module's structure is enough.
    build = lambda: build_trunk(model, config, rngs=nnx.Rngs(seed))  # noqa: E731
    trunk = nnx.eval_shape(build) if strict else build()
    graphdef, params, stats = nnx.split(trunk, nnx.Param, nnx.BatchStat)
    pure = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
    leaves = flat_leaves(pure["params"], pure["batch_stats"])
    arrays, records = match_leaves(selected, chosen, model, config, leaves, layout, patterns,
                                   strict=strict, outside=outside, prefix=prefix)
    records += [LeafRecord("ignored", source=name, note="not an array")
                for name in source.info.get("non_tensors", [])]
    for leaf, value in arrays.items():
        _set(pure[leaf.split("/")[0]], leaf, jax.numpy.asarray(value))
    nnx.replace_by_pure_dict(params, pure["params"])
    nnx.replace_by_pure_dict(stats, pure["batch_stats"])
    trunk = nnx.merge(graphdef, params, stats)
    report = ImportReport(str(src), source.format, file_sha256(src), model, chosen.name, prefix,
                          layout, strict, tuple(records))
    metadata = trunk_metadata(trunk, config_json=config_to_json(config), input_shape=shape,
                              normalization=normalization, tasks=[],
                              extra={"imported": {**report.to_json(), "normalization": why,
                                                  "notes": notes}})
    path = None
    if out is not None:
        path = save_trunk(out, trunk_params=pure["params"], trunk_batch_stats=pure["batch_stats"],
                          metadata=metadata)
    return ImportResult(trunk, metadata, report, path)
