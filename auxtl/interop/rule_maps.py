"""Name maps that need no knowledge of a model: auxtl's own names, and regex rules.

- "auxtl": foreign names that already are auxtl leaf names ("params/layers/0/conv/kernel",
  "batch_stats/..."), as auxtl's safetensors/npz exports, an orbax trunk item selected by
  prefix, or any registered model's leaves write them. It serves every model, a user's
  too, and reads the config an auxtl export records in its header.
- rules: `--map 'PATTERN=REPLACEMENT;...'` (or a file of such lines, '#' comments): each
  foreign name goes through every rule in order (`re.sub`), as big_vision's and scenic's
  checkpoint loaders do; what comes out must be an auxtl leaf name.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

from auxtl.errors import InputError
from auxtl.interop.name_maps import NameMap, register_name_map
from auxtl.interop.source import Source


def _is_auxtl(source: Source) -> bool:
    """Some names are auxtl leaves (the others are then named as surplus, not guessed at)."""
    return any(name.startswith("params/") for name in source.tensors)


def recorded_config(model: str, source: Source) -> dict[str, Any]:
    """The config an auxtl export recorded, if it was of `model`."""
    if source.info.get("auxtl_model") == model and isinstance(source.info.get("auxtl_config"), dict):
        return dict(source.info["auxtl_config"])
    recorded = source.info.get("auxtl_metadata")
    if isinstance(recorded, dict) and recorded.get("model") == model:
        return dict(recorded.get("config") or {})
    return {}


AUXTL = register_name_map(NameMap(
    name="auxtl", models=("*",), recognizes=_is_auxtl, infer_config=recorded_config,
    names=lambda model, config, source: ({name: name for name in source.tensors}
                                         if source is not None else {})))


def parse_rules(text: str) -> list[tuple[re.Pattern, str]]:
    """'PATTERN=REPLACEMENT' rules separated by ';' or newlines, or '@FILE' naming a file
    of them; InputError naming a rule without '=' or with a bad regex."""
    if text.startswith("@"):
        try:
            text = pathlib.Path(text[1:]).read_text()
        except OSError as error:
            raise InputError(f"--map file {text[1:]!r} cannot be read ({error})") from error
    rules = []
    for line in re.split(r"[;\n]", text):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise InputError(f"--map rule {line!r} has no '=' (PATTERN=REPLACEMENT)")
        pattern, replacement = line.split("=", 1)
        try:
            rules.append((re.compile(pattern.strip()), replacement.strip()))
        except re.error as error:
            raise InputError(f"--map rule {line!r}: bad regex ({error})") from error
    if not rules:
        raise InputError(f"--map {text!r} holds no rules")
    return rules


def rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        name = pattern.sub(replacement, name)
    return name


def rule_map(text: str) -> NameMap:
    """A NameMap applying `text`'s rules to every foreign name; the config comes from
    --model-arg (and what an auxtl export recorded), the layout from the reader or
    --layout."""
    rules = parse_rules(text)

    def names(model, config, source):
        if source is None:
            raise InputError("a --map of regex rules cannot name leaves for export")
        return {name: rename(name, rules) for name in source.tensors}

    return NameMap(name=f"rules({text})", models=("*",), recognizes=lambda source: True,
                   infer_config=recorded_config, names=names)
