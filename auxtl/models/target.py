"""Target-model architecture: a source trunk's lowest k layers, the top dropped,
replaced or extended, and a new classification head.

Only architecture lives here; weights come from `auxtl.surgery`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import jax.numpy as jnp
from flax import nnx

from auxtl.errors import InputError
from auxtl.models import build_trunk
from auxtl.models.layers import DenseBlock
from auxtl.models.trunk import Trunk, global_avg_pool


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What to build on a source trunk.

    reuse: how many of the lowest layers come from the source (None: all).
    top: "drop" keeps only the reused layers (little data); "replace" keeps the
        source architecture's layers above `reuse`, freshly initialised (more data).
    add: widths of dense layers added on top (much data).
    """

    reuse: int | None = None
    top: str = "drop"
    add: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"reuse": self.reuse, "top": self.top, "add": list(self.add)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TargetSpec":
        return cls(reuse=raw.get("reuse"), top=raw.get("top", "drop"),
                   add=tuple(raw.get("add", ())))


def num_reused(spec: TargetSpec, source_layers: int) -> int:
    if spec.reuse is None:
        return source_layers
    if not 0 <= spec.reuse <= source_layers:
        raise InputError(f"reuse={spec.reuse} is outside 0..{source_layers}, the source "
                         f"trunk's number of layers")
    return spec.reuse


def trunk_compute_dtype(trunk: nnx.Module) -> jnp.dtype:
    """The compute dtype of a trunk's layers: that of the first Flax layer with a dtype
    set, float32 if none sets one."""
    for _, module in nnx.iter_modules(trunk):
        dtype = vars(module).get("dtype")
        if "param_dtype" in vars(module) and dtype is not None:
            return jnp.dtype(dtype)
    return jnp.dtype(jnp.float32)


def build_target_trunk(model: str, config, spec: TargetSpec, *, rngs: nnx.Rngs) -> Trunk:
    """The source architecture cut and extended as `spec` says (fresh weights); added
    layers compute in the source architecture's compute dtype (`trunk_compute_dtype`)."""
    if spec.top not in ("drop", "replace"):
        raise InputError(f"top must be 'drop' or 'replace', got {spec.top!r}")
    base = build_trunk(model, config, rngs=rngs)
    k = num_reused(spec, len(base.layers))
    count = k if spec.top == "drop" else len(base.layers)
    layers = list(base.layers)[:count]
    names = list(base.layer_names)[:count]
    if not layers and not spec.add:
        raise InputError("the target trunk would have no layers: reuse at least one or add some")
    dim = _output_width(base, count) if layers else None
    for index, width in enumerate(spec.add, start=1):
        if dim is None:
            raise InputError("added dense layers need at least one layer below them")
        layers.append(DenseBlock(dim, width, dtype=trunk_compute_dtype(base), rngs=rngs))
        names.append(f"added{index}")
        dim = width
    return Trunk(layers, names, feature_dim=dim, model_name=base.model_name,
                 in_channels=base.in_channels)


def _output_width(base: Trunk, count: int) -> int:
    """Feature width after the lowest `count` layers: the trunk's own at the top, else the
    layer's `out_dim` (part of the layer contract for models cut below their top)."""
    width = getattr(base.layers[count - 1], "out_dim", None)
    if width is None and count == len(base.layers):
        return base.feature_dim
    if width is None:
        raise InputError(f"layer {base.layer_names[count - 1]!r} of model "
                         f"{base.model_name!r} has no `out_dim` (its output width), which a "
                         f"target trunk ending at that layer needs")
    return width


class TransferModel(nnx.Module):
    """Target trunk + linear classification head. The head computes in `dtype` (None: the
    trunk's, `trunk_compute_dtype`); its parameters are float32 and the loss casts the
    logits to float32 (`auxtl.losses.classification`)."""

    def __init__(self, trunk: Trunk, num_classes: int, *, rngs: nnx.Rngs, dtype=None):
        self.trunk = trunk
        dtype = trunk_compute_dtype(trunk) if dtype is None else jnp.dtype(dtype)
        self.head = nnx.Linear(trunk.feature_dim, num_classes, dtype=dtype, rngs=rngs)

    def logits(self, x, *, start: int = 0, train: bool = False,
               frozen: Collection[str] = ()):
        """Runs trunk layers from `start` (0: normalised images; k: cached layer-k inputs)."""
        return self.head(global_avg_pool(
            self.trunk.apply_layers(x, start=start, train=train, frozen=frozen)))

    def __call__(self, x, *, train: bool = False, frozen: Collection[str] = ()):
        return self.logits(x, train=train, frozen=frozen)
