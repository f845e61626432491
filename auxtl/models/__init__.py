"""Trunk registry: a model name maps to a config dataclass and a builder.

Checkpoints store (name, config dict); `build_trunk` rebuilds the module from
exactly that, so loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from auxtl.errors import InputError
from auxtl.models.nin import NINConfig, build_nin
from auxtl.models.resnet import ResNet50Config, ResNetConfig, build_resnet, build_resnet50
from auxtl.models.small_cnn import SmallCNNConfig, build_small_cnn
from auxtl.models.trunk import Trunk, global_avg_pool

__all__ = ["Trunk", "global_avg_pool", "SmallCNNConfig", "ResNetConfig",
           "ResNet50Config", "NINConfig", "MODELS",
           "make_config", "build_trunk", "list_models"]

MODELS: dict[str, tuple[type, Callable[..., Trunk]]] = {
    "small_cnn": (SmallCNNConfig, build_small_cnn),
    "resnet18": (ResNetConfig, build_resnet),
    "resnet50": (ResNet50Config, build_resnet50),
    "nin": (NINConfig, build_nin),
}


def list_models() -> list[str]:
    return sorted(MODELS)


def make_config(name: str, input_shape: tuple[int, int, int] | None = None,
                **overrides: Any):
    """The model's config dataclass: defaults, fitted to `input_shape` (H, W, C), then overrides.

    Unknown names or fields raise ValueError naming them and the valid choices.
    """
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    config_cls, _ = MODELS[name]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"unknown config field(s) {unknown} for model {name!r}; "
                         f"valid fields: {sorted(fields)}")
    fitted: dict[str, Any] = {}
    if input_shape is not None:
        height, width, channels = input_shape
        fitted["in_channels"] = channels
        if issubclass(config_cls, ResNetConfig):
            fitted["large_stem"] = min(height, width) > 64
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for key, value in overrides.items():
        _check_override(name, key, defaults[key], value)
    values = {**fitted, **overrides}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return config_cls(**values)


def _check_override(model: str, key: str, default: Any, value: Any) -> None:
    """A --model-arg value of the field's kind (from its default), else InputError."""
    if default is None or default is dataclasses.MISSING:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list)) and all(
            isinstance(v, type(default[0])) for v in value) if default else True
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise InputError(f"model {model!r}: field {key!r} must be like its default "
                         f"{default!r} ({type(default).__name__}), got {value!r}")


def config_to_json(config) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}


def build_trunk(name: str, config=None, *, rngs: nnx.Rngs,
                input_shape: tuple[int, int, int] | None = None, **overrides: Any) -> Trunk:
    """Builds the trunk `name` from a config dataclass or mapping (defaults if None)."""
    if config is None:
        config = make_config(name, input_shape, **overrides)
    elif isinstance(config, Mapping):
        config = make_config(name, None, **dict(config))
    _, builder = MODELS[name]
    return builder(config, rngs=rngs)
