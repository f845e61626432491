"""ResNet-18-style and ResNet-50 trunks for 28 px to 224 px inputs.

Layers: stem, then stage{s}_block{b} for 4 stages of 2 basic blocks (resnet18) or
3, 4, 6, 3 bottleneck blocks (resnet50). The stem is a 3x3/1 conv for images up to
64 px and a 7x7/2 conv + max-pool above that.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from auxtl.models.layers import BasicBlock, BottleneckBlock, StemBlock
from auxtl.models.trunk import Trunk


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    in_channels: int = 3
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64
    large_stem: bool = False
    dtype: str = "float32"
    padding: str = "same"      # "torch": PyTorch's symmetric k//2 padding (imports set it)
    bn_epsilon: float = 1e-5
    stem_width: int | None = None   # the stem's channels, if not `width` (timm's reduced ResNets)


def _build_stages(config: ResNetConfig, block_cls, model_name: str, *,
                  rngs: nnx.Rngs) -> Trunk:
    """Stem (`stem_width` channels, `width` if None), then len(stage_sizes) stages; stage
    s has inner width width * 2**(s-1) and strides 2 in its first block (s > 1).
    `padding` and `bn_epsilon` apply to every conv and BatchNorm (see
    `layers.conv_padding`)."""
    dtype = jnp.dtype(config.dtype)
    options = {"padding": config.padding, "bn_epsilon": config.bn_epsilon}
    channels = config.stem_width or config.width
    layers = [StemBlock(config.in_channels, channels, large=config.large_stem,
                        dtype=dtype, rngs=rngs, **options)]
    names = ["stem"]
    for stage, num_blocks in enumerate(config.stage_sizes, start=1):
        width = config.width * 2 ** (stage - 1)
        for block in range(1, num_blocks + 1):
            stride = 2 if (stage > 1 and block == 1) else 1
            layers.append(block_cls(channels, width, stride=stride, dtype=dtype, rngs=rngs,
                                    **options))
            names.append(f"stage{stage}_block{block}")
            channels = layers[-1].out_dim
    return Trunk(layers, names, feature_dim=channels, model_name=model_name,
                 in_channels=config.in_channels)


def build_resnet(config: ResNetConfig, *, rngs: nnx.Rngs) -> Trunk:
    """ResNet-18-style (basic blocks)."""
    return _build_stages(config, BasicBlock, "resnet18", rngs=rngs)


@dataclasses.dataclass(frozen=True)
class ResNet50Config(ResNetConfig):
    """ResNet-50: bottleneck blocks; stage s has width * 2**(s-1) inner and 4x that out."""

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)


def build_resnet50(config: ResNet50Config, *, rngs: nnx.Rngs) -> Trunk:
    """Standard ResNet-50 (v1.5, stride in the 3x3 conv): ~23.5M parameters without a head."""
    return _build_stages(config, BottleneckBlock, "resnet50", rngs=rngs)
