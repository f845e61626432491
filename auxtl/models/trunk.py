"""The trunk: an ordered sequence of named layers ending in a feature vector.

"The lowest k layers" is well defined because `layers` is ordered and every
layer has a name in `layer_names`. Each layer takes `train` and runs its
BatchNorm in batch-statistics mode only when `train` is true, so a frozen
layer can be run in inference mode while the rest trains.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from auxtl.errors import InputError


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC array; (N, D) passes through."""
    return jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x


class Trunk(nnx.Module):
    """Ordered, named layers; `__call__` returns pooled features (N, feature_dim)."""

    def __init__(self, layers: Sequence[nnx.Module], layer_names: Sequence[str],
                 *, feature_dim: int, model_name: str, in_channels: int):
        if len(layers) != len(layer_names):
            raise InputError(f"{len(layers)} layers but {len(layer_names)} names")
        if len(set(layer_names)) != len(layer_names):
            raise InputError(f"layer names must be unique, got {list(layer_names)}")
        self.layers = nnx.List(list(layers))
        self.layer_names = tuple(layer_names)
        self.feature_dim = feature_dim
        self.model_name = model_name
        self.in_channels = in_channels

    def apply_layers(self, x: jax.Array, *, start: int = 0, stop: int | None = None,
                     train: bool = False, frozen: Collection[str] = ()) -> jax.Array:
        """Runs layers[start:stop]; layers named in `frozen` use running BN statistics."""
        stop = len(self.layers) if stop is None else stop
        size = tuple(x.shape[1:3])
        for index in range(start, stop):
            name = self.layer_names[index]
            x = self.layers[index](x, train=train and name not in frozen)
            if x.ndim == 4 and 0 in x.shape[1:3]:  # static shapes: checked while tracing
                raise InputError(
                    f"{self.model_name}: a {size[0]}x{size[1]} px input is too small; layer "
                    f"{name!r} leaves {x.shape[1]}x{x.shape[2]} px")
        return x

    def __call__(self, x: jax.Array, *, train: bool = False,
                 frozen: Collection[str] = ()) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise InputError(
                f"{self.model_name} expects NHWC input with {self.in_channels} channel(s), "
                f"got shape {tuple(x.shape)}")
        return global_avg_pool(self.apply_layers(x, train=train, frozen=frozen))
