"""ResNet-18-style trunk for 28 px to 224 px inputs.

Layers: stem, then stage{s}_block{b} for 4 stages of 2 basic blocks. The stem is a
3x3/1 conv for images up to 64 px and a 7x7/2 conv + max-pool above that.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from auxtl.models.layers import BasicBlock, StemBlock
from auxtl.models.trunk import Trunk


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    in_channels: int = 3
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64
    large_stem: bool = False
    dtype: str = "float32"


def build_resnet(config: ResNetConfig, *, rngs: nnx.Rngs) -> Trunk:
    dtype = jnp.dtype(config.dtype)
    layers = [StemBlock(config.in_channels, config.width, large=config.large_stem,
                        dtype=dtype, rngs=rngs)]
    names = ["stem"]
    channels = config.width
    for stage, num_blocks in enumerate(config.stage_sizes, start=1):
        out_channels = config.width * 2 ** (stage - 1)
        for block in range(1, num_blocks + 1):
            stride = 2 if (stage > 1 and block == 1) else 1
            layers.append(BasicBlock(channels, out_channels, stride=stride, dtype=dtype,
                                     rngs=rngs))
            names.append(f"stage{stage}_block{block}")
            channels = out_channels
    return Trunk(layers, names, feature_dim=channels, model_name="resnet18",
                 in_channels=config.in_channels)
