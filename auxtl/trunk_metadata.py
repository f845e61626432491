"""Typed metadata of a trunk checkpoint (format "auxtl.trunk/1").

A checkpoint's `metadata` item is JSON; `TrunkMetadata.from_json` reads it into
typed fields (Normalization, SplitRecord, TargetSpec, tuples) and checks each,
so a missing field or a value of the wrong kind is one InputError naming the
checkpoint and the field, not a KeyError deep inside transfer. `to_json` writes
the same JSON back: for every checkpoint auxtl has written,
`from_json(j).to_json() == j` (keys it does not know are kept in `extra`, and
optional keys stored as null stay null).

Compatibility layer: scripts written when `auxtl.read_metadata` returned a dict
keep working, because TrunkMetadata is also a read-only `collections.abc.Mapping` over
its JSON form (`metadata["normalization"]`, `.get("split")`, `.keys()`, `dict(m)`,
`isinstance(m, Mapping)`). It is not a dict: `json.dumps(m.to_json())`, not
`json.dumps(m)`. New code reads the attributes.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

from flax import nnx

from auxtl.data import Normalization
from auxtl.errors import InputError
from auxtl.models import Trunk, build_trunk
from auxtl.models.target import TargetSpec, build_target_trunk
from auxtl.splits import SplitRecord
from auxtl.version import __version__

TRUNK_FORMAT = "auxtl.trunk/1"


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]} ...{text[-1]}"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Field kinds: a check on the JSON value, and the words an error uses for it.
_KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "a whole number"),
    "number": (_is_number, "a number"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "a list of strings"),
    "shape": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x > 0 for x in v),
              "a list of positive whole numbers"),
    "objects": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
                "a list of JSON objects"),
}


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """One pretraining task as the checkpoint records it: name, loss weight, parameters."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "params": dict(self.params),
                **self.extra}

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str = "trunk metadata") -> TaskRecord:
        field = f"tasks[{raw.get('name', '?')!r}]"
        for key, kind in (("name", "str"), ("weight", "number"), ("params", "object")):
            if key in raw and not _KINDS[kind][0](raw[key]):
                raise InputError(f"{where}: metadata field {field}.{key} must be "
                                 f"{_KINDS[kind][1]}, got {_shown(raw[key])}")
        if "name" not in raw:
            raise InputError(f"{where}: metadata field 'tasks' holds a task without a 'name'")
        return cls(raw["name"], raw.get("weight", 1.0), dict(raw.get("params", {})),
                   {k: v for k, v in raw.items() if k not in ("name", "weight", "params")})


# JSON key -> kind, in the order checkpoints write them. Required first.
_REQUIRED = {"format": "str", "model": "str", "config": "object", "layer_names": "names",
             "input_shape": "shape", "normalization": "object", "tasks": "objects",
             "auxtl_version": "str"}
_OPTIONAL = {"feature_dim": "int", "data": "str", "split": "object", "steps": "int",
             "seed": "int", "loss_weighting": "str", "eval": "object", "target": "object",
             "surgery_report": "objects", "source": "object", "finetune": "object",
             "test_accuracy": "number", "imported": "object"}
_ORDER = ("format", "model", "config", "layer_names", "feature_dim", "input_shape",
          "normalization", "tasks", "auxtl_version")


@dataclasses.dataclass(frozen=True)
class TrunkMetadata(Mapping):
    """What a trunk checkpoint says about itself (see the module docstring).

    Required: model (registry name), config (the model config as JSON), layer_names
    (ordered), input_shape (H, W, C), normalization, tasks. Optional (None: not
    recorded): feature_dim; for pretrained trunks data, split, steps, seed,
    loss_weighting, eval; for fine-tuned target models target, surgery_report,
    source, finetune, test_accuracy; for imported trunks `imported` (the import report:
    file, hash, name map, every leaf's fate). `extra` holds keys this auxtl does not know.
    """

    model: str
    config: dict[str, Any]
    layer_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    normalization: Normalization
    tasks: tuple[TaskRecord, ...] = ()
    auxtl_version: str = __version__
    feature_dim: int | None = None
    data: str | None = None
    split: SplitRecord | None = None
    steps: int | None = None
    seed: int | None = None
    loss_weighting: str | None = None
    eval: dict[str, Any] | None = None
    target: TargetSpec | None = None
    surgery_report: list[dict[str, Any]] | None = None
    source: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    test_accuracy: float | None = None
    imported: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = TRUNK_FORMAT
    # Optional keys the JSON stored as null (written back as null, so JSON round-trips).
    nulls: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

    def __post_init__(self):
        object.__setattr__(self, "layer_names", tuple(self.layer_names))
        object.__setattr__(self, "input_shape", tuple(int(x) for x in self.input_shape))
        object.__setattr__(self, "tasks", tuple(
            t if isinstance(t, TaskRecord) else TaskRecord.from_json(t) for t in self.tasks))
        object.__setattr__(self, "nulls", frozenset(self.nulls))
        clash = sorted(set(self.extra) & ({*_REQUIRED, *_OPTIONAL}))
        if clash:
            raise InputError(f"TrunkMetadata.extra must not hold the typed field(s) {clash}; "
                             "set the fields instead")

    # ---- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The checkpoint's JSON (inverse of `from_json`)."""
        typed = {"normalization": self.normalization.to_json(),
                 "tasks": [t.to_json() for t in self.tasks],
                 "layer_names": list(self.layer_names), "input_shape": list(self.input_shape),
                 "split": self.split.to_json() if self.split else None,
                 "target": self.target.to_json() if self.target else None}
        out: dict[str, Any] = {}
        for key in (*_ORDER, *_OPTIONAL):
            value = typed[key] if key in typed else getattr(self, key)
            if value is not None or key in self.nulls:
                out[key] = value
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, raw: Any, where: str = "trunk metadata") -> TrunkMetadata:
        """Reads checkpoint JSON; InputError naming `where` (the checkpoint) and the field
        when a required field is missing or any field holds a value of the wrong kind."""
        if not isinstance(raw, Mapping):
            raise InputError(f"{where}: metadata must be a JSON object, got "
                             f"{type(raw).__name__}")
        if "format" in raw and raw["format"] != TRUNK_FORMAT:
            raise InputError(f"{where} has format {raw['format']!r}, expected {TRUNK_FORMAT!r}")
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise InputError(f"{where}: metadata lacks the field(s) {', '.join(missing)}")
        for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
            check, words = _KINDS[kind]
            if key in raw and not (raw[key] is None and key in _OPTIONAL) and not check(raw[key]):
                raise InputError(f"{where}: metadata field {key!r} must be {words}, got "
                                 f"{_shown(raw[key])}")
        fields = {key: raw[key] for key in (*_REQUIRED, *_OPTIONAL) if key in raw}
        fields["config"] = dict(raw["config"])
        for key, read in (("normalization", Normalization.from_json),
                          ("split", SplitRecord.from_json), ("target", TargetSpec.from_json)):
            if fields.get(key) is not None:
                try:
                    fields[key] = read(fields[key])
                except (InputError, KeyError, TypeError, ValueError) as e:
                    raise InputError(f"{where}: metadata field {key!r} is malformed "
                                     f"({type(e).__name__}: {e})") from e
        fields["tasks"] = tuple(TaskRecord.from_json(t, where) for t in raw["tasks"])
        return cls(**fields,
                   extra={k: v for k, v in raw.items() if k not in fields},
                   nulls=frozenset(k for k in _OPTIONAL if k in raw and raw[k] is None))

    def build_module(self, *, rngs: nnx.Rngs | None = None) -> Trunk:
        """A fresh module of this architecture (a cut/extended target trunk when `target`
        is set), built through the model registry by name and config: fresh weights."""
        rngs = rngs or nnx.Rngs(0)
        if self.target is not None:
            return build_target_trunk(self.model, self.config, self.target, rngs=rngs)
        return build_trunk(self.model, self.config, rngs=rngs)

    def replace(self, **changes: Any) -> TrunkMetadata:
        """A copy with fields changed (a field set to a value is no longer a stored null)."""
        nulls = self.nulls - {k for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes, nulls=nulls)

    # ---- read-only mapping over the JSON form (compatibility) -------------------------------

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def keys(self):
        return self.to_json().keys()

    def items(self):
        return self.to_json().items()

    def values(self):
        return self.to_json().values()

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def as_trunk_metadata(value: TrunkMetadata | Mapping[str, Any],
                      where: str = "trunk metadata") -> TrunkMetadata:
    """`value` itself, or the metadata a dict in the checkpoint's JSON form describes."""
    return value if isinstance(value, TrunkMetadata) else TrunkMetadata.from_json(value, where)
