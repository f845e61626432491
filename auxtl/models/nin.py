"""Network-in-Network trunk as in RotNet (Gidaris et al. 2018) for 32 px images.

Each layer of the trunk is one NIN block: a kxk conv then two 1x1 convs, each with
BatchNorm and ReLU. Block 1: 5x5 192, 1x1 160, 1x1 96, 3x3/2 max-pool; block 2:
5x5 192, 1x1 192, 1x1 192, 3x3/2 average-pool; blocks 3 and up: 3x3 192, 1x1 192,
1x1 192. RotNet's CIFAR-10 model has 4 blocks (`num_blocks`); widths scale with
`width` / 192 so tests can build a narrow one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from auxtl.errors import InputError
from auxtl.models.layers import ConvBlock
from auxtl.models.trunk import Trunk


@dataclasses.dataclass(frozen=True)
class NINConfig:
    in_channels: int = 3
    num_blocks: int = 4
    width: int = 192
    dtype: str = "float32"


def _pool(x: jax.Array, kind: str | None) -> jax.Array:
    if kind == "max":
        return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    if kind == "avg":
        return nnx.avg_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    return x


class NINBlock(nnx.Module):
    """kxk conv, 1x1 conv, 1x1 conv (each conv -> BN -> ReLU), then an optional 3x3/2 pool."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int], *, kernel_size: int,
                 pool: str | None, dtype=jnp.float32, rngs: nnx.Rngs):
        sizes = (kernel_size, 1, 1)
        channels = (in_channels,) + tuple(widths)
        self.convs = nnx.List([ConvBlock(channels[i], channels[i + 1], kernel_size=sizes[i],
                                         dtype=dtype, rngs=rngs) for i in range(3)])
        self.pool = pool
        self.out_dim = widths[-1]

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for conv in self.convs:
            x = conv(x, train=train)
        return _pool(x, self.pool)


def build_nin(config: NINConfig, *, rngs: nnx.Rngs) -> Trunk:
    if config.num_blocks < 1:
        raise InputError(f"nin needs at least one block, got num_blocks={config.num_blocks}")
    dtype = jnp.dtype(config.dtype)
    scaled = lambda c: max(1, round(c * config.width / 192))
    specs = [((192, 160, 96), 5, "max"), ((192, 192, 192), 5, "avg")]
    specs += [((192, 192, 192), 3, None)] * max(config.num_blocks - 2, 0)
    layers, names, channels = [], [], config.in_channels
    for index, (widths, kernel, pool) in enumerate(specs[:config.num_blocks], start=1):
        widths = tuple(scaled(w) for w in widths)
        layers.append(NINBlock(channels, widths, kernel_size=kernel, pool=pool, dtype=dtype,
                               rngs=rngs))
        names.append(f"block{index}")
        channels = widths[-1]
    return Trunk(layers, names, feature_dim=channels, model_name="nin",
                 in_channels=config.in_channels)
