"""The torchvision (and timm) ResNet naming scheme, as a `NameMap` for resnet18 and resnet50.

torchvision and timm name a ResNet's trunk `conv1`, `bn1`, then `layer{s}.{b}.conv{i}`,
`.bn{i}` and the shortcut `.downsample.0` (1x1 conv) / `.downsample.1` (BatchNorm);
`fc` is the classifier head. auxtl's trunk holds the same layers as `layers/0` (the
stem: conv, bn) and `layers/{n}` (one per block, in order: conv{i}, bn{i}, proj_conv,
proj_bn). The correspondence is generated from the model config alone, so export can
use it without a source file. Arrays under these names have PyTorch's layout.

Not representable, refused by name: timm's deep stems (`conv1.0.weight`, resnet*d) and
average-pool downsampling (`downsample.1` a conv). A file whose blocks are of the other
kind than the model asked for (bottleneck `conv3` for resnet18, none for resnet50) is
refused naming both.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from auxtl.data import Normalization
from auxtl.errors import InputError
from auxtl.interop.name_maps import NameMap, register_name_map
from auxtl.interop.source import Source
from auxtl.models import make_config

MODELS = ("resnet18", "resnet50")
_CONVS = {"resnet18": 2, "resnet50": 3}      # convs (and BatchNorms) per block
_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")
_BN_LEAVES = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))


def _conv_names(torch_module: str, auxtl_module: str) -> dict[str, str]:
    return {f"{torch_module}.weight": f"params/{auxtl_module}/kernel"}


def _bn_names(torch_module: str, auxtl_module: str) -> dict[str, str]:
    return {f"{torch_module}.{field}": f"{collection}/{auxtl_module}/{leaf}"
            for field, collection, leaf in _BN_LEAVES}


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise InputError(f"the torchvision name map maps {', '.join(MODELS)}, not {model!r}")


def _config_values(model: str, config: Any) -> Any:
    """`config` as the model's config dataclass (a mapping is completed with defaults)."""
    return make_config(model, None, **dict(config)) if isinstance(config, Mapping) else config


def _needs_projection(model: str, stage: int, block: int, in_channels: int,
                      width: int) -> bool:
    """The rule of `layers._Residual`: a projection where stride or channels change."""
    out_channels = width * (4 if model == "resnet50" else 1)
    return (stage > 1 and block == 0) or in_channels != out_channels


def names(model: str, config: Any, source: Source | None = None) -> dict[str, str]:
    """{torchvision name: auxtl leaf} for every leaf of the `model` trunk built from
    `config` (a config dataclass or mapping); `source` is not consulted."""
    _check_model(model)
    config = _config_values(model, config)
    mapping = {**_conv_names("conv1", "layers/0/conv"), **_bn_names("bn1", "layers/0/bn")}
    channels = config.stem_width or config.width
    index = 1
    for stage, count in enumerate(config.stage_sizes, start=1):
        width = config.width * 2 ** (stage - 1)
        for block in range(count):
            torch_block, auxtl_block = f"layer{stage}.{block}", f"layers/{index}"
            for i in range(1, _CONVS[model] + 1):
                mapping.update(_conv_names(f"{torch_block}.conv{i}", f"{auxtl_block}/conv{i}"))
                mapping.update(_bn_names(f"{torch_block}.bn{i}", f"{auxtl_block}/bn{i}"))
            if _needs_projection(model, stage, block, channels, width):
                mapping.update(_conv_names(f"{torch_block}.downsample.0",
                                           f"{auxtl_block}/proj_conv"))
                mapping.update(_bn_names(f"{torch_block}.downsample.1",
                                         f"{auxtl_block}/proj_bn"))
            channels = width * (4 if model == "resnet50" else 1)
            index += 1
    return mapping


def recognizes(source: Source) -> bool:
    """A torchvision/timm ResNet state dict: a `conv1.weight` and some `layer1.0.` name."""
    return "conv1.weight" in source.tensors and any(
        name.startswith("layer1.0.") for name in source.tensors)


def _array_shape(source: Source, name: str) -> tuple[int, ...]:
    if name not in source.tensors:
        raise InputError(f"{source.path}: no array {name!r}, which a torchvision ResNet has "
                         f"(names begin: {', '.join(list(source.tensors)[:5])})")
    shape = tuple(source.tensors[name].shape)
    if len(shape) != 4:
        raise InputError(f"{source.path}: {name!r} should be a conv weight (out, in, kh, kw), "
                         f"got shape {shape}")
    return shape


def _refuse_unrepresentable(model: str, source: Source) -> None:
    """Deep stems and average-pool downsampling have no auxtl counterpart."""
    if "conv1.0.weight" in source.tensors:
        raise InputError(f"{source.path}: a deep stem (conv1.0.weight, timm's resnet*d) has "
                         f"no counterpart in auxtl's {model}; only a single-conv stem imports")
    for name, array in source.tensors.items():
        if re.search(r"\.downsample\.1\.weight$", name) and array.ndim == 4:
            raise InputError(f"{source.path}: {name!r} is a conv (shape {tuple(array.shape)}):"
                             f" average-pool downsampling (timm's avg_down) has no "
                             f"counterpart in auxtl's {model}")


def _block_counts(source: Source) -> tuple[int, ...]:
    """Blocks per stage, from the `layer{s}.{b}.` names; stages numbered 1, 2, ... in turn."""
    blocks: dict[int, set[int]] = {}
    for name in source.tensors:
        match = _BLOCK.match(name)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)):
        raise InputError(f"{source.path}: the ResNet stages are numbered {stages}, not "
                         f"layer1, layer2, ... in turn")
    for stage in stages:
        if sorted(blocks[stage]) != list(range(len(blocks[stage]))):
            raise InputError(f"{source.path}: layer{stage}'s blocks are numbered "
                             f"{sorted(blocks[stage])}, not 0, 1, ... in turn")
    return tuple(len(blocks[stage]) for stage in stages)


def _check_block_kind(model: str, source: Source) -> None:
    bottleneck = "layer1.0.conv3.weight" in source.tensors
    if bottleneck != (model == "resnet50"):
        held = ("bottleneck blocks (layer1.0.conv3.weight): a resnet50-style network"
                if bottleneck else "basic blocks (no layer1.0.conv3.weight): a "
                                   "resnet18-style network")
        wanted = "bottleneck" if model == "resnet50" else "basic"
        raise InputError(f"{source.path}: model {model!r} has {wanted} blocks but the file "
                         f"holds {held}; choose the other model")


def infer_config(model: str, source: Source) -> dict[str, Any]:
    """The config values a torchvision/timm ResNet state dict decides: in_channels,
    stem_width (None if it equals width), width, large_stem, stage_sizes, and PyTorch's
    padding="torch" and bn_epsilon=1e-5. InputError for the other block kind than
    `model`'s, a deep stem, avg-pool downsampling, or a stem neither 7x7 nor 3x3."""
    _check_model(model)
    _refuse_unrepresentable(model, source)
    _check_block_kind(model, source)
    stem_out, in_channels, kernel, _ = _array_shape(source, "conv1.weight")
    width = _array_shape(source, "layer1.0.conv1.weight")[0]
    if kernel not in (3, 7):
        raise InputError(f"{source.path}: conv1.weight is {kernel}x{kernel}; auxtl's stems "
                         f"are 7x7 (large_stem) or 3x3")
    return {"in_channels": in_channels, "stem_width": None if stem_out == width else stem_out,
            "width": width, "large_stem": kernel == 7, "stage_sizes": _block_counts(source),
            "padding": "torch", "bn_epsilon": 1e-5}


# torchvision.models.resnet18() / resnet50(): what their state dicts' shapes need.
STOCK = {"in_channels": 3, "width": 64, "stem_width": (None, 64), "large_stem": True}
STOCK_STAGES = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


def stock_differences(model: str, config: Any) -> list[str]:
    """The config values under which `torchvision.models.<model>()` cannot load these
    weights (it would refuse the shapes): 'key=value' for each, empty if none."""
    values = dataclasses.asdict(_config_values(model, config))
    found = []
    for key, stock in {**STOCK, "stage_sizes": STOCK_STAGES[model]}.items():
        value = tuple(values[key]) if isinstance(values[key], list) else values[key]
        if value not in (stock if isinstance(stock, tuple) and key == "stem_width" else (stock,)):
            found.append(f"{key}={value!r}")
    return found


# What torchvision's (and timm's ResNet) weights are trained on: ImageNet's statistics.
IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

TORCHVISION = register_name_map(NameMap(
    name="torchvision", models=MODELS, recognizes=recognizes, infer_config=infer_config,
    names=names, layout="torch",
    ignore=((r"(^|\.)num_batches_tracked$", "BatchNorm's step counter: auxtl keeps none"),
            (r"^fc\.", "the classifier head: not part of the trunk")),
    normalization=IMAGENET))
