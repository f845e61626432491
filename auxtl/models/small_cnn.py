"""The default 28x28 trunk: five 3x3 conv blocks and a dense layer (RotNet/NIN-lite).

conv 32-32, pool, 64-64, pool, 128, each with BatchNorm and ReLU, then global
average pool and dense 128: about 156k parameters with a 4-way head.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from auxtl.models.layers import ConvBlock, DenseBlock
from auxtl.models.trunk import Trunk


@dataclasses.dataclass(frozen=True)
class SmallCNNConfig:
    in_channels: int = 1
    widths: tuple[int, ...] = (32, 32, 64, 64, 128)
    pool_after: tuple[int, ...] = (2, 4)   # 1-based conv indices followed by 2x2 max-pool
    fc_dim: int = 128
    dtype: str = "float32"
    padding: str = "same"      # "torch": PyTorch's symmetric k//2 padding (imports set it)
    bn_epsilon: float = 1e-5   # Keras's BatchNormalization uses 1e-3 (imports set it)


def build_small_cnn(config: SmallCNNConfig, *, rngs: nnx.Rngs) -> Trunk:
    dtype = jnp.dtype(config.dtype)
    layers, names, channels = [], [], config.in_channels
    for index, width in enumerate(config.widths, start=1):
        layers.append(ConvBlock(channels, width, pool=index in config.pool_after,
                                dtype=dtype, rngs=rngs, padding=config.padding,
                                bn_epsilon=config.bn_epsilon))
        names.append(f"conv{index}")
        channels = width
    layers.append(DenseBlock(channels, config.fc_dim, dtype=dtype, rngs=rngs))
    names.append("fc")
    return Trunk(layers, names, feature_dim=config.fc_dim, model_name="small_cnn",
                 in_channels=config.in_channels)
