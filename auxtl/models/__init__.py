"""Trunk registry: a model name maps to a config dataclass and a builder.

Checkpoints store (name, config dict); `build_trunk` rebuilds the module from
exactly that, so loading a checkpoint never runs code from the file. Models come
from three places, like tasks (auxtl.registry): the built-in trunks below,
installed packages that declare the entry-point group `auxtl.models`, and user
files loaded with `load_model_module(path)`. Each registers with
`register_model(name, config_cls, builder)`; a checkpoint of a user's model
loads once its file is loaded again.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from auxtl.errors import BadParameterError, InputError
from auxtl.models.nin import NINConfig, build_nin
from auxtl.models.resnet import ResNet50Config, ResNetConfig, build_resnet, build_resnet50
from auxtl.models.small_cnn import SmallCNNConfig, build_small_cnn
from auxtl.models.trunk import Trunk, global_avg_pool
from auxtl.registry import import_user_file, load_entry_points

__all__ = ["Trunk", "global_avg_pool", "SmallCNNConfig", "ResNetConfig",
           "ResNet50Config", "NINConfig", "MODELS", "register_model", "load_model_module",
           "model_entry", "make_config", "build_trunk", "list_models", "COMPUTE_DTYPES",
           "check_compute_dtype", "with_compute_dtype"]

ENTRY_POINT_GROUP = "auxtl.models"

# name -> (config class, builder): the registry (read it through the functions below).
MODELS: dict[str, tuple[type, Callable[..., Trunk]]] = {}
# name -> fit(input_shape) -> config values the input decides (default: in_channels).
_FITS: dict[str, Callable[[tuple[int, int, int]], dict[str, Any]]] = {}
_PLUGINS_LOADED = False


def _fit_channels(input_shape: tuple[int, int, int]) -> dict[str, Any]:
    return {"in_channels": input_shape[-1]}


def _origin(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def check_model_contract(name: str, config_cls, builder) -> None:
    """Refuses a registration that breaks the model contract, naming the problem: a
    config dataclass whose fields all have defaults, among them `in_channels` (transfer
    sets it to the target data's channel count), and a builder callable as
    `builder(config, rngs=nnx.Rngs)` that returns a `Trunk` (checked when it builds)."""
    label = f"model {name!r}"
    if not isinstance(config_cls, type) or not dataclasses.is_dataclass(config_cls):
        raise BadParameterError(f"{label}: the config must be a dataclass class, got "
                                f"{config_cls!r}")
    fields = dataclasses.fields(config_cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if required:
        raise BadParameterError(f"{label}: config {_origin(config_cls)} field(s) {required} "
                                f"have no default; make_config builds a config from defaults")
    if "in_channels" not in {f.name for f in fields}:
        raise BadParameterError(f"{label}: config {_origin(config_cls)} has no field "
                                f"'in_channels' (the input's channel count)")
    if not callable(builder):
        raise BadParameterError(f"{label}: the builder must be callable, got {builder!r}")
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return  # cannot be told (a builtin): checked when it builds
    try:
        signature.bind(object(), rngs=None)
    except TypeError as error:
        raise BadParameterError(f"{label}: builder {_origin(builder)}{signature} cannot be "
                                f"called as builder(config, rngs=...): {error}") from None


def register_model(name: str, config_cls: type, builder: Callable[..., Trunk] | None = None,
                   *, replace: bool = False,
                   fit: Callable[[tuple[int, int, int]], dict[str, Any]] | None = None):
    """Registers the trunk `name`: `config_cls` (a dataclass) and `builder(config, *, rngs)`
    returning a `Trunk` whose `model_name` is `name` (see `check_model_contract`); each
    layer should carry `out_dim` (its output width) so a target trunk can end at it.

    `fit(input_shape)` returns the config values an (H, W, C) input decides (default:
    in_channels only). A name registered already by another config or builder is
    refused unless `replace=True`. Without `builder` it is a decorator for one:
    `@register_model("mine", MyConfig)` above `def build_mine(config, *, rngs)`.
    """
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
        raise InputError(f"model name must be a non-empty identifier, got {name!r}")
    if builder is None:
        def decorator(function):
            register_model(name, config_cls, function, replace=replace, fit=fit)
            return function
        return decorator
    check_model_contract(name, config_cls, builder)
    if fit is not None and not callable(fit):
        raise BadParameterError(f"model {name!r}: fit must be callable, got {fit!r}")
    existing = MODELS.get(name)
    if existing is not None and not replace and (
            _origin(existing[0]), _origin(existing[1])) != (_origin(config_cls),
                                                            _origin(builder)):
        raise InputError(f"model {name!r} is already registered ({_origin(existing[0])}, "
                         f"{_origin(existing[1])}); cannot register {_origin(config_cls)}, "
                         f"{_origin(builder)} under the same name (replace=True replaces it)")
    MODELS[name] = (config_cls, builder)
    _FITS[name] = fit or _fit_channels
    return builder


def _fit_resnet(input_shape: tuple[int, int, int]) -> dict[str, Any]:
    height, width, channels = input_shape
    return {"in_channels": channels, "large_stem": min(height, width) > 64}


register_model("small_cnn", SmallCNNConfig, build_small_cnn)
register_model("resnet18", ResNetConfig, build_resnet, fit=_fit_resnet)
register_model("resnet50", ResNet50Config, build_resnet50, fit=_fit_resnet)
register_model("nin", NINConfig, build_nin)


def _load_plugins() -> None:
    """Imports the entry points of group `auxtl.models` once; one that fails to load is
    skipped with an AuxtlWarning (`auxtl.registry.load_entry_points`)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    load_entry_points(ENTRY_POINT_GROUP, "model")


def load_model_module(path) -> None:
    """Imports a user's model file so its `register_model` calls take effect."""
    import_user_file(path, kind="model", package="auxtl_user_models")


def list_models() -> list[str]:
    _load_plugins()
    return sorted(MODELS)


def model_entry(name: str) -> tuple[type, Callable[..., Trunk]]:
    """(config class, builder) of the registered model `name`; InputError naming the
    known models otherwise."""
    _load_plugins()
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MODELS[name]


def make_config(name: str, input_shape: tuple[int, int, int] | None = None,
                **overrides: Any):
    """The model's config dataclass: defaults, fitted to `input_shape` (H, W, C), then overrides.

    Unknown names or fields raise ValueError naming them and the valid choices.
    """
    config_cls, _ = model_entry(name)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"unknown config field(s) {unknown} for model {name!r}; "
                         f"valid fields: {sorted(fields)}")
    fitted = {} if input_shape is None else dict(_FITS.get(name, _fit_channels)(tuple(input_shape)))
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


# The compute dtypes a run may ask for (--compute-dtype). Parameters, optimizer state and
# BatchNorm statistics stay float32 whatever is chosen ("master weights"); float16 is
# left out: without loss scaling its gradients underflow.
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(value: Any, flag: str = "--compute-dtype") -> str:
    """`value` if it is one of COMPUTE_DTYPES, else InputError naming `flag` and them."""
    if not isinstance(value, str) or value not in COMPUTE_DTYPES:
        raise InputError(f"compute dtype ({flag}) must be one of {', '.join(COMPUTE_DTYPES)}, "
                         f"got {value!r}")
    return value


def with_compute_dtype(name: str, compute_dtype: str,
                       overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`overrides` (config values) with the model config's `dtype` (its compute dtype) set
    to `compute_dtype`. A model whose config has no `dtype` field computes as its own
    code says: float32 is then accepted as is (nothing set), bfloat16 refused. A `dtype`
    already in `overrides` (--model-arg dtype=...) that disagrees is refused, naming
    both. InputError for each."""
    check_compute_dtype(compute_dtype)
    overrides = dict(overrides or {})
    given = overrides.get("dtype", compute_dtype)
    if given != compute_dtype:
        raise InputError(f"--model-arg dtype={given} disagrees with --compute-dtype "
                         f"{compute_dtype}; set the compute dtype with --compute-dtype alone")
    config_cls, _ = model_entry(name)
    if "dtype" in {f.name for f in dataclasses.fields(config_cls)}:
        return {**overrides, "dtype": compute_dtype}
    if compute_dtype != "float32":
        raise InputError(f"model {name!r}: its config ({_origin(config_cls)}) has no `dtype` "
                         f"field, so it cannot compute in {compute_dtype}; add a `dtype: str` "
                         f"field its builder passes to its layers")
    return overrides


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
    _, builder = model_entry(name)
    trunk = builder(config, rngs=rngs)
    if not isinstance(trunk, Trunk) or trunk.model_name != name:
        got = (f"a Trunk named {trunk.model_name!r}" if isinstance(trunk, Trunk)
               else type(trunk).__name__)
        raise BadParameterError(f"model {name!r}: its builder must return an auxtl Trunk "
                                f"with model_name={name!r} (checkpoints name the model by "
                                f"it), got {got}")
    return trunk
