"""Parameter-tree surgery: move weights from a source tree into a target tree.

Trees are plain nested dicts as `nnx.to_pure_dict` returns them (list indices
are int keys), addressed by '/'-joined paths ("trunk/layers/2/conv/kernel").
Ordered `Rule`s decide, per target leaf, whether to copy the source's value or
keep the target's fresh one; `plan` is the dry run and `transplant` builds the
new tree. Both return a `SurgeryReport` saying what happened to every leaf and
why. Inputs are never mutated; leaves are shared, not copied. Nothing here knows
about models or training: callers pass combined trees such as
{"params": ..., "batch_stats": ...} so BatchNorm statistics travel with their
layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from auxtl.errors import InputError

__all__ = ["flatten", "unflatten", "layer_index", "Rule", "lower_layers_rules",
           "regex_rules", "ReportEntry", "SurgeryReport", "plan", "transplant",
           "adapt_input_channels"]

ACTIONS = ("copy", "keep", "reinit")
ON_MISSING = ("error", "reinit")
ON_MISMATCH = ("error", "reinit", "adapt_channels")
OUTCOMES = ("copied", "kept", "reinitialised", "adapted", "dropped")

_LAYER = re.compile(r"(?:^|/)layers/(\d+)(?:/|$)")


# --------------------------------------------------------------------------- paths

def _key_order(key) -> tuple:
    # ints numerically before strings, so "layers/10" sorts after "layers/2".
    return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


def flatten(tree: Mapping) -> dict[str, Any]:
    """Maps '/'-joined paths to leaves; keys sorted (ints numerically), so order is deterministic.

    Every non-mapping value is a leaf; empty sub-dicts have no leaves and vanish.
    Raises ValueError for a key containing '/' or two keys with the same path
    (e.g. 0 and "0").
    """
    flat: dict[str, Any] = {}

    def visit(node: Mapping, prefix: str) -> None:
        for key in sorted(node, key=_key_order):
            name = str(key)
            if "/" in name or name == "":
                raise InputError(f"key {key!r} under {prefix or '<root>'!r} cannot be "
                                 "part of a '/'-joined path")
            path = f"{prefix}/{name}" if prefix else name
            if path in flat:
                raise InputError(f"two keys map to the path {path!r}")
            value = node[key]
            if isinstance(value, Mapping):
                visit(value, path)
            else:
                flat[path] = value

    visit(tree, "")
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten`: nested dicts, all-digit path segments become int keys."""
    tree: dict = {}
    for path, leaf in flat.items():
        keys = [int(s) if s.isdigit() else s for s in path.split("/")]
        node = tree
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise InputError(f"{path!r} goes below the leaf "
                                 f"{'/'.join(map(str, keys[:depth + 1]))!r}")
        if keys[-1] in node:
            raise InputError(f"{path!r} is both a leaf and a subtree")
        node[keys[-1]] = leaf
    return tree


def layer_index(path: str) -> int | None:
    """The i of the first 'layers/<i>' segment pair in `path` (any prefix), else None."""
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- rules

@dataclasses.dataclass(frozen=True)
class Rule:
    """What to do with target leaves whose path `re.search`es `pattern`; first match wins.

    Attributes:
      pattern: regex searched in the TARGET path.
      action: "copy" (take the source's value), "keep" (keep the target's value)
        or "reinit" (keep it, reported as re-initialised).
      source: `re.sub` replacement (first match only) mapping the target path to
        the source path; None means the same path.
      on_missing: "error" or "reinit" when a copy's source path does not exist.
      on_mismatch: "error", "reinit" or "adapt_channels" (conv kernels whose
        input-channel axis differs, see `adapt_input_channels`) when shape or
        dtype differ.
      label: how reports name the rule; default the pattern.
    """

    pattern: str
    action: str
    source: str | None = None
    on_missing: str = "error"
    on_mismatch: str = "error"
    label: str = ""

    def __post_init__(self):
        for field, value, allowed in (("action", self.action, ACTIONS),
                                      ("on_missing", self.on_missing, ON_MISSING),
                                      ("on_mismatch", self.on_mismatch, ON_MISMATCH)):
            if value not in allowed:
                raise InputError(f"Rule {field} must be one of {allowed}, got {value!r}")
        re.compile(self.pattern)

    @property
    def name(self) -> str:
        return self.label or repr(self.pattern)

    def source_path(self, path: str) -> str:
        """The source path a copy of target `path` reads."""
        return path if self.source is None else re.sub(self.pattern, self.source, path,
                                                       count=1)


def _layers_below(k: int) -> str:
    """Regex matching exactly the paths whose `layer_index` is < k."""
    indices = "|".join(str(i) for i in range(k))
    # Prefix segments may not themselves be a 'layers/<i>' pair: the FIRST one counts.
    prefix = r"(?:(?!layers/\d+(?:/|$))[^/]+/)*?"
    return rf"^{prefix}layers/(?:{indices})(?:/|$)"


def lower_layers_rules(k: int, **copy_options: str) -> list[Rule]:
    """Copy every leaf whose `layer_index` is < k (params and BN stats alike), keep the rest.

    `copy_options` (on_missing, on_mismatch) go to the copy rule.
    """
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    rules = ([Rule(_layers_below(k), "copy", label=f"layer < {k}", **copy_options)]
             if k else [])
    return rules + [Rule(".*", "keep", label="rest")]


def regex_rules(patterns: Sequence[str], **copy_options: str) -> list[Rule]:
    """Copy leaves matching any of `patterns`, keep the rest."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return ([Rule(p, "copy", **copy_options) for p in patterns]
            + [Rule(".*", "keep", label="rest")])


# --------------------------------------------------------------------------- report

@dataclasses.dataclass(frozen=True)
class ReportEntry:
    """One leaf's fate. For "dropped", `path` and `source` are the unused source leaf."""

    path: str
    action: str              # one of OUTCOMES
    source: str | None
    shape: tuple
    source_shape: tuple | None
    reason: str


def _fmt_shape(shape) -> str:
    return str(tuple(shape))


@dataclasses.dataclass(frozen=True)
class SurgeryReport:
    """One entry per path: every target leaf (in flatten order), then the dropped ones.

    "dropped" lists source leaves that no copy used and that the target does not
    have; an unused source leaf at a target path is covered by that path's
    kept/reinitialised entry.
    """

    entries: tuple[ReportEntry, ...]

    def counts(self) -> dict[str, int]:
        """Number of leaves per outcome, all outcomes present."""
        counts = dict.fromkeys(OUTCOMES, 0)
        for entry in self.entries:
            counts[entry.action] += 1
        return counts

    def num_params(self, *actions: str) -> int:
        """Parameters (array elements) in target leaves with the given outcomes."""
        return sum(int(np.prod(e.shape, dtype=np.int64)) for e in self.entries
                   if e.action in actions)

    def table(self) -> str:
        """Aligned text table, one row per leaf, then a totals line."""
        header = ("path", "action", "shape", "from", "reason")
        rows = [header]
        for e in self.entries:
            origin = []
            if e.source is not None and e.source != e.path:
                origin.append(e.source)
            if e.source_shape is not None and tuple(e.source_shape) != tuple(e.shape):
                origin.append(_fmt_shape(e.source_shape))
            rows.append((e.path, e.action, _fmt_shape(e.shape), " ".join(origin) or "-",
                         e.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                 for r in rows]
        counts = self.counts()
        transferred = self.num_params("copied", "adapted")
        total = self.num_params("copied", "adapted", "kept", "reinitialised")
        lines.append("total: " + ", ".join(f"{n} {a}" for a, n in counts.items())
                     + f"; {transferred} of {total} target parameters copied")
        return "\n".join(lines)

    def to_json(self) -> list[dict]:
        """JSON-ready list of entries (shapes as lists)."""
        return [{**dataclasses.asdict(e), "shape": list(e.shape),
                 "source_shape": None if e.source_shape is None else list(e.source_shape)}
                for e in self.entries]

    __str__ = table


# --------------------------------------------------------------------------- surgery

def _shape(x) -> tuple:
    return tuple(int(d) for d in np.shape(x))


def _dtype(x):
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _first_rule(path: str, rules: Sequence[Rule]) -> Rule | None:
    return next((r for r in rules if re.search(r.pattern, path)), None)


def _adaptable(target_shape: tuple, source_shape: tuple) -> bool:
    return (len(target_shape) == len(source_shape) == 4
            and target_shape[:2] == source_shape[:2] and target_shape[3] == source_shape[3])


def _decide_copy(path: str, leaf, rule: Rule, src_flat: Mapping[str, Any]
                 ) -> ReportEntry | str:
    """The entry for a copy rule on target `path`, or an error message."""
    src_path = rule.source_path(path)
    shape = _shape(leaf)
    via = "" if src_path == path else f" (source path {src_path!r})"
    if src_path not in src_flat:
        if rule.on_missing == "reinit":
            return ReportEntry(path, "reinitialised", src_path, shape, None,
                               f"source path {src_path!r} missing")
        return f"{path}: source path {src_path!r} not found in the source tree"
    src = src_flat[src_path]
    src_shape = _shape(src)
    dtype, src_dtype = _dtype(leaf), _dtype(src)
    if shape == src_shape and dtype == src_dtype:
        return ReportEntry(path, "copied", src_path, shape, src_shape,
                           f"rule {rule.name}")
    problems = []
    if shape != src_shape:
        problems.append(f"target shape {shape} != source shape {src_shape}")
    if dtype != src_dtype:
        problems.append(f"target dtype {dtype} != source dtype {src_dtype}")
    problem = "; ".join(problems)
    if rule.on_mismatch == "reinit":
        return ReportEntry(path, "reinitialised", src_path, shape, src_shape, problem)
    if rule.on_mismatch == "adapt_channels":
        if dtype == src_dtype and _adaptable(shape, src_shape):
            return ReportEntry(path, "adapted", src_path, shape, src_shape,
                               f"input channels {src_shape[2]} -> {shape[2]}")
        problem += " (adapt_channels needs equal dtypes and HWIO kernels differing in I only)"
    return f"{path}: {problem}{via}"


def _decide(source: Mapping, target: Mapping, rules: Sequence[Rule]
            ) -> tuple[SurgeryReport, dict[str, Any]]:
    """Every decision, plus the flat source; raises one ValueError listing all problems."""
    src_flat, tgt_flat = flatten(source), flatten(target)
    entries, errors, used = [], [], set()
    for path, leaf in tgt_flat.items():
        rule = _first_rule(path, rules)
        if rule is None:
            errors.append(f"no rule covers {path}")
            continue
        if rule.action == "copy":
            entry = _decide_copy(path, leaf, rule, src_flat)
            if isinstance(entry, str):
                errors.append(entry)
                continue
            if entry.action in ("copied", "adapted"):
                used.add(entry.source)
        else:
            outcome = "kept" if rule.action == "keep" else "reinitialised"
            entry = ReportEntry(path, outcome, None, _shape(leaf), None,
                                f"rule {rule.name}: {rule.action}")
        entries.append(entry)
    if errors:
        raise InputError("surgery failed:\n  " + "\n  ".join(errors)
                         if len(errors) > 1 else errors[0])
    for path, leaf in src_flat.items():
        if path not in used and path not in tgt_flat:
            entries.append(ReportEntry(path, "dropped", path, _shape(leaf), _shape(leaf),
                                       "not used by the target"))
    return SurgeryReport(tuple(entries)), src_flat


def plan(source: Mapping, target: Mapping, rules: Sequence[Rule]) -> SurgeryReport:
    """Dry run of `transplant`: same report, same errors, builds nothing.

    Only shapes and dtypes are read, so `jax.ShapeDtypeStruct` leaves work too.
    """
    return _decide(source, target, rules)[0]


def _rebuild(node: Mapping, values: Mapping[str, Any], prefix: str = "") -> dict:
    """A new dict tree shaped like `node` (same key types) with leaves from `values`."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out[key] = (_rebuild(value, values, path) if isinstance(value, Mapping)
                    else values[path])
    return out


def transplant(source: Mapping, target: Mapping, rules: Sequence[Rule]
               ) -> tuple[dict, SurgeryReport]:
    """A new tree shaped like `target` with leaves taken from `source` per `rules`.

    Args:
      source: tree to copy from (e.g. a pretrained trunk's params and batch stats).
      target: freshly initialised tree of the same layout.
      rules: ordered `Rule`s; the first whose pattern matches a target path decides.

    Returns:
      (new tree, report). Raises ValueError, listing every problem, if a target
      leaf has no rule, a copy's source is missing, or shapes/dtypes mismatch
      (unless the rule says to re-initialise or adapt).
    """
    report, src_flat = _decide(source, target, rules)
    values = {}
    for e in report.entries:
        if e.action == "copied":
            values[e.path] = src_flat[e.source]
        elif e.action == "adapted":
            values[e.path] = adapt_input_channels(src_flat[e.source], e.shape[-2])
    tgt_flat = flatten(target)
    values = {path: values.get(path, leaf) for path, leaf in tgt_flat.items()}
    return _rebuild(target, values), report


def adapt_input_channels(kernel, new_channels: int):
    """An HWIO conv kernel for C input channels rewritten for `new_channels` (C').

    Each new input channel gets the sum over the old channels divided by C', so
    1 -> 3 repeats and divides by 3, 3 -> 1 sums. A grey image replicated over C'
    channels then gives exactly the activation the old kernel gave on that grey
    image replicated over C channels. Numpy in, numpy out; jax in, jax out.
    """
    if np.ndim(kernel) != 4:
        raise InputError(f"expected an HWIO conv kernel (rank 4), got shape {_shape(kernel)}")
    if new_channels < 1:
        raise InputError(f"new_channels must be >= 1, got {new_channels}")
    xp = np if isinstance(kernel, np.ndarray) else jnp
    dtype = kernel.dtype
    acc = xp.promote_types(dtype, xp.float32)  # sum bf16/f16 kernels in float32
    mean = xp.sum(kernel.astype(acc), axis=2, keepdims=True) / new_channels
    shape = (*kernel.shape[:2], new_channels, kernel.shape[3])
    return xp.broadcast_to(mean, shape).astype(dtype)
