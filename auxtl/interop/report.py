"""The import report: what happened to every leaf, and the one error a strict import raises.

Each `LeafRecord` pairs an auxtl leaf with the foreign array it came from (either side
may be absent) and says what was done: loaded (as stored), converted (axes moved or
dtype cast; `note` says how), ignored (a foreign array dropped on purpose; `note` says
by what), missing (a leaf with no array: fresh initialisation, allowed only when not
strict) or unused (a foreign array neither used nor ignored: allowed only when not
strict). The report goes into the checkpoint's metadata (`imported`) and on screen.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from auxtl.errors import InputError

ACTIONS = ("loaded", "converted", "ignored", "missing", "unused")


def _shape(shape) -> str:
    return "-" if shape is None else str(tuple(shape))


@dataclasses.dataclass(frozen=True)
class LeafRecord:
    action: str
    leaf: str | None = None
    shape: tuple[int, ...] | None = None
    source: str | None = None
    source_shape: tuple[int, ...] | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "leaf": self.leaf,
                "shape": None if self.shape is None else list(self.shape),
                "source": self.source,
                "source_shape": None if self.source_shape is None else list(self.source_shape),
                "note": self.note}


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """Every leaf's fate, and where the arrays came from."""

    path: str
    format: str
    sha256: str
    model: str
    name_map: str
    prefix: str
    layout: str
    strict: bool
    leaves: tuple[LeafRecord, ...]

    def counts(self) -> dict[str, int]:
        counter = Counter(record.action for record in self.leaves)
        return {action: counter.get(action, 0) for action in ACTIONS}

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "sha256": self.sha256,
                "model": self.model, "name_map": self.name_map, "prefix": self.prefix,
                "layout": self.layout, "strict": self.strict, "counts": self.counts(),
                "leaves": [record.to_json() for record in self.leaves]}

    def summary(self) -> str:
        counts = ", ".join(f"{n} {action}" for action, n in self.counts().items() if n)
        prefix = f", prefix {self.prefix!r}" if self.prefix else ""
        return (f"imported {self.path} ({self.format}, map {self.name_map}{prefix}, "
                f"{self.layout} layout) into {self.model}: {counts}")

    def table(self) -> str:
        """One line per record: action, auxtl leaf and shape, <- foreign name and shape, note."""
        rows = [(r.action, r.leaf or "-", _shape(r.shape), r.source or "-",
                 _shape(r.source_shape), r.note) for r in self.leaves]
        widths = [max(len(row[i]) for row in rows) for i in range(5)] if rows else [0] * 5
        return "\n".join(
            f"  {a:<{widths[0]}}  {leaf:<{widths[1]}} {shape:<{widths[2]}}  <- "
            f"{src:<{widths[3]}} {sshape:<{widths[4]}}  {note}".rstrip()
            for a, leaf, shape, src, sshape, note in rows)


class ImportMismatchError(InputError):
    """A strict import whose two sides do not match; the message lists every problem."""


_LIMIT = 20


def _lines(title: str, items: list[str]) -> list[str]:
    shown = [f"    {item}" for item in items[:_LIMIT]]
    if len(items) > _LIMIT:
        shown.append(f"    ... and {len(items) - _LIMIT} more")
    return [f"  {title}:"] + shown


def mismatch_error(where: str, *, missing: list[str], unused: list[str],
                   misshaped: list[str], other: list[str]) -> ImportMismatchError | None:
    """One error listing each kind of problem with both sides' names and shapes, or None."""
    parts: list[str] = []
    if missing:
        parts += _lines(f"{len(missing)} auxtl leaf/leaves have no array in the file "
                        "(--no-strict keeps their fresh initialisation)", missing)
    if unused:
        parts += _lines(f"{len(unused)} array(s) in the file are neither used nor ignored "
                        "(--ignore REGEX drops them)", unused)
    if misshaped:
        parts += _lines(f"{len(misshaped)} array(s) do not fit their leaf's shape", misshaped)
    if other:
        parts += _lines("name map problems", other)
    if not parts:
        return None
    return ImportMismatchError("\n".join([f"cannot import {where}:"] + parts))
