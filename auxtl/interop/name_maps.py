"""Name maps: which foreign array becomes which leaf of an auxtl trunk.

An auxtl leaf is named by its collection and its path in the trunk's pure dict,
'/'-joined: "params/layers/0/conv/kernel", "batch_stats/layers/3/bn1/mean". A
`NameMap` knows one naming scheme (torchvision/timm ResNets, Keras small CNNs, auxtl's
own) and gives, for a model and its config, the whole correspondence foreign name ->
auxtl leaf; the importer checks it against both sides, strictly. Maps register here;
`--map RULES` builds one from regex rules instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from auxtl.data import Normalization
from auxtl.errors import InputError, UnknownNameError
from auxtl.interop.source import LAYOUTS, Source


@dataclasses.dataclass(frozen=True)
class NameMap:
    """One foreign naming scheme.

    Attributes:
      name: how `--map NAME` selects it.
      models: the auxtl models it maps.
      recognizes: recognizes(source) -> whether the source's names are this scheme's
        (used to choose a map when none is named).
      infer_config: infer_config(model, source) -> the model config values the source
        decides (widths, block counts, padding, bn_epsilon, ...); --model-arg overrides.
      names: names(model, config, source) -> {foreign name: auxtl leaf} covering every
        leaf of the trunk built from `config`; `source` may be None (export).
      layout: the layout (source.LAYOUTS) of arrays under these names, or None to keep
        the reader's.
      ignore: regexes of foreign names the scheme drops by design (a classifier head,
        num_batches_tracked), each with the reason shown in the report.
      prepare: prepare(source, model) -> Source, exact rewrites before matching (a Keras
        conv bias folded into the BatchNorm mean after it), each stated in
        info["notes"]; None: none.
      normalization: the input normalisation weights of this scheme are trained with, by
        convention (torchvision's: ImageNet statistics), the import's default; None: none.
    """

    name: str
    models: tuple[str, ...]
    recognizes: Callable[[Source], bool]
    infer_config: Callable[[str, Source], dict[str, Any]]
    names: Callable[[str, Any, Source | None], dict[str, str]]
    layout: str | None = None
    ignore: tuple[tuple[str, str], ...] = ()
    prepare: Callable[[Source, str], Source] | None = None
    normalization: Normalization | None = None

    def __post_init__(self):
        if self.layout is not None and self.layout not in LAYOUTS:
            raise InputError(f"name map {self.name!r}: layout must be one of {LAYOUTS} or "
                             f"None, got {self.layout!r}")

    def ignored(self, foreign: str) -> str | None:
        """The reason the scheme drops `foreign`, or None."""
        for pattern, reason in self.ignore:
            if re.search(pattern, foreign):
                return reason
        return None


NAME_MAPS: dict[str, NameMap] = {}


def register_name_map(name_map: NameMap) -> NameMap:
    NAME_MAPS[name_map.name] = name_map
    return name_map


def get_name_map(name: str) -> NameMap:
    if name not in NAME_MAPS:
        raise UnknownNameError(f"unknown name map {name!r}; known: {', '.join(sorted(NAME_MAPS))}"
                               f" (or regex rules 'PATTERN=REPLACEMENT;...')")
    return NAME_MAPS[name]


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'/'-joined path: leaf} of nested mappings (and lists/tuples, by index), in the
    tree's order; None leaves are dropped (orbax's empty nodes)."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {} if tree is None else {prefix.rstrip("/"): tree}
    out: dict[str, Any] = {}
    for key, child in items:
        out.update(flatten_tree(child, f"{prefix}{key}/"))
    return out


def flat_leaves(params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> dict[str, Any]:
    """{auxtl leaf name: value} of a trunk's pure-dict params and batch stats (the values as
    they are: arrays, or ShapeDtypeStructs of an abstract trunk), in the trees' order."""
    return {**flatten_tree(params, "params/"), **flatten_tree(batch_stats, "batch_stats/")}


def maps_for(model: str) -> list[NameMap]:
    return [m for m in NAME_MAPS.values() if model in m.models or "*" in m.models]
