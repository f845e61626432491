"""Layer blocks shared by the trunks; each takes (x, *, train)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from auxtl.errors import BadParameterError
from auxtl.models import ops
from auxtl.models.ops import max_pool_2x2


def conv_bn(conv: nnx.Conv, bn: nnx.BatchNorm, x: jax.Array, *, train: bool, relu: bool,
            pool: bool = False) -> jax.Array:
    """conv -> BatchNorm [-> ReLU] [-> 2x2 max-pool]; not training, through the
    `ops.conv_bn_inference` hook."""
    if not train:
        return ops.conv_bn_inference(conv, bn, x, relu=relu, pool=pool)
    y = bn(conv(x), use_running_average=False)
    y = nnx.relu(y) if relu else y
    return max_pool_2x2(y) if pool else y


PADDINGS = ("same", "torch")


def conv_padding(kernel: int, padding: str) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """The `nnx.Conv` padding of a kxk window: "same" is XLA's SAME, which pads a strided
    window asymmetrically (the extra row at the bottom); "torch" pads k//2 on every side,
    as PyTorch's `Conv2d(padding=k // 2)` and `MaxPool2d(padding=k // 2)` do, so that a
    model imported from PyTorch computes what it computed there at every stride.
    BadParameterError naming the choices (PADDINGS) for anything else."""
    if padding not in PADDINGS:
        raise BadParameterError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    if padding == "same":
        return "SAME"
    return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int, dtype,
          rngs: nnx.Rngs, padding: str = "same") -> nnx.Conv:
    """kxk conv, `conv_padding`, no bias (a BatchNorm follows), through the `ops` hook."""
    return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=(stride, stride),
                    padding=conv_padding(kernel, padding), use_bias=False, dtype=dtype,
                    rngs=rngs, conv_general_dilated=ops.conv_general_dilated)


def _bn(channels: int, dtype, rngs: nnx.Rngs, epsilon: float = 1e-5, **kwargs) -> nnx.BatchNorm:
    if not epsilon > 0:
        raise BadParameterError(f"BatchNorm epsilon must be positive, got {epsilon!r}")
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=float(epsilon), dtype=dtype,
                         rngs=rngs, **kwargs)


class _Residual(nnx.Module):
    """Identity shortcut, or a 1x1 projection + BN when stride or channels change."""

    def _init_shortcut(self, in_channels: int, out_channels: int, stride: int, dtype,
                       rngs: nnx.Rngs, bn_epsilon: float = 1e-5) -> None:
        needs_projection = stride != 1 or in_channels != out_channels
        self.proj_conv = (_conv(in_channels, out_channels, 1, stride, dtype, rngs)
                          if needs_projection else None)
        self.proj_bn = _bn(out_channels, dtype, rngs, bn_epsilon) if needs_projection else None
        self.out_dim = out_channels

    def shortcut(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        if self.proj_conv is None:
            return x
        return self.proj_bn(self.proj_conv(x), use_running_average=use_running_average)


class ConvBlock(nnx.Module):
    """conv (no bias) -> BatchNorm -> ReLU [-> 2x2 max-pool]."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 stride: int = 1, pool: bool = False, dtype=jnp.float32, rngs: nnx.Rngs,
                 padding: str = "same", bn_epsilon: float = 1e-5):
        self.conv = _conv(in_channels, out_channels, kernel_size, stride, dtype, rngs, padding)
        self.bn = _bn(out_channels, dtype, rngs, bn_epsilon)
        self.pool = pool
        self.out_dim = out_channels

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return conv_bn(self.conv, self.bn, x, train=train, relu=True, pool=self.pool)


class DenseBlock(nnx.Module):
    """global-average-pool (if spatial) -> dense -> ReLU."""

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dense = nnx.Linear(in_features, out_features, dtype=dtype, rngs=rngs)
        self.out_dim = out_features

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        if x.ndim == 4:
            x = jnp.mean(x, axis=(1, 2))
        return nnx.relu(self.dense(x))


class StemBlock(nnx.Module):
    """ResNet stem: 3x3/1 conv for small images, 7x7/2 conv + 3x3/2 max-pool for large;
    `padding` ("same" or "torch", see `conv_padding`) applies to the conv and the pool."""

    def __init__(self, in_channels: int, out_channels: int, *, large: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs, padding: str = "same",
                 bn_epsilon: float = 1e-5):
        kernel, stride = (7, 2) if large else (3, 1)
        self.conv = _conv(in_channels, out_channels, kernel, stride, dtype, rngs, padding)
        self.bn = _bn(out_channels, dtype, rngs, bn_epsilon)
        self.large = large
        self.pool_padding = conv_padding(3, padding)
        self.out_dim = out_channels

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = conv_bn(self.conv, self.bn, x, train=train, relu=True)
        if self.large:  # max_pool pads with -inf, as torch's MaxPool2d does
            x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=self.pool_padding)
        return x


class BasicBlock(_Residual):
    """ResNet basic block: two 3x3 convs with BN, identity or 1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int,
                 dtype=jnp.float32, rngs: nnx.Rngs, padding: str = "same",
                 bn_epsilon: float = 1e-5):
        self.conv1 = _conv(in_channels, out_channels, 3, stride, dtype, rngs, padding)
        self.bn1 = _bn(out_channels, dtype, rngs, bn_epsilon)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, dtype, rngs, padding)
        self.bn2 = _bn(out_channels, dtype, rngs, bn_epsilon, scale_init=nnx.initializers.zeros)
        self._init_shortcut(in_channels, out_channels, stride, dtype, rngs, bn_epsilon)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = conv_bn(self.conv1, self.bn1, x, train=train, relu=True)
        y = conv_bn(self.conv2, self.bn2, y, train=train, relu=False)
        return nnx.relu(y + self.shortcut(x, not train))


class BottleneckBlock(_Residual):
    """ResNet bottleneck block (v1.5): 1x1 reduce, 3x3 (carries the stride), 1x1 expand,
    each with BN; identity or 1x1 projection shortcut; output `expansion * width` channels.

    The last BN's scale starts at zero so each residual branch starts as the identity
    (Goyal et al. 2017), as in BasicBlock.
    """

    def __init__(self, in_channels: int, width: int, *, stride: int, expansion: int = 4,
                 dtype=jnp.float32, rngs: nnx.Rngs, padding: str = "same",
                 bn_epsilon: float = 1e-5):
        out_channels = width * expansion
        self.conv1 = _conv(in_channels, width, 1, 1, dtype, rngs)
        self.bn1 = _bn(width, dtype, rngs, bn_epsilon)
        self.conv2 = _conv(width, width, 3, stride, dtype, rngs, padding)
        self.bn2 = _bn(width, dtype, rngs, bn_epsilon)
        self.conv3 = _conv(width, out_channels, 1, 1, dtype, rngs)
        self.bn3 = _bn(out_channels, dtype, rngs, bn_epsilon, scale_init=nnx.initializers.zeros)
        self._init_shortcut(in_channels, out_channels, stride, dtype, rngs, bn_epsilon)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = conv_bn(self.conv1, self.bn1, x, train=train, relu=True)
        y = conv_bn(self.conv2, self.bn2, y, train=train, relu=True)
        y = conv_bn(self.conv3, self.bn3, y, train=train, relu=False)
        return nnx.relu(y + self.shortcut(x, not train))
