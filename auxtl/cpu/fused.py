"""conv -> BatchNorm on running statistics [-> ReLU] [-> 2x2 max-pool] as one CPU call:
the `ops.conv_bn_inference` hook of auxtl.cpu.

With its running statistics, BatchNorm is a per-channel affine map after the
convolution: y = conv(x, k) * s + t, s = gamma / sqrt(var + eps), t = beta - mean * s.
`conv_bn` runs such a block as one `auxtl.cpu.winograd.conv` call (s folded into the
kernel; shift, ReLU and pool in its epilogue) where `applies` holds, else the plain
composition (`ops.plain_conv_bn_inference`). Differentiated (a block in inference
mode inside a loss), its custom_vjp runs the plain composition forward and backward,
so gradients are the unfused ones. GPU and TPU lower the plain composition
(`jax.lax.platform_dependent`). Measurements: benchmarks/NOTES.md, section 7a.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from auxtl.cpu import conv, winograd
from auxtl.models import ops


def applies(conv_module: nnx.Conv, bn: nnx.BatchNorm, x: jax.Array) -> bool:
    """Whether `conv_bn_inference` can fuse this pair: float32 throughout, a BatchNorm
    with scale and bias, and a convolution the Winograd kernel takes
    (`conv.use_winograd`)."""
    if not (x.ndim == 4 and conv_module.dtype in (None, jnp.float32)
            and bn.dtype in (None, jnp.float32) and bn.axis in (-1, 3)
            and bn.scale is not None and bn.bias is not None and conv_module.bias is None
            and conv_module.mask is None and conv_module.feature_group_count == 1
            and _ones(conv_module.input_dilation) and _ones(conv_module.kernel_dilation)
            and conv_module.conv_general_dilated is ops.conv_general_dilated):
        return False
    strides = conv_module.strides
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    return conv.use_winograd(x, conv_module.kernel[...], strides, padding_of(conv_module, x))


def _ones(values) -> bool:
    return values is None or values == 1 or all(v == 1 for v in values)


def padding_of(conv_module: nnx.Conv, x: jax.Array) -> tuple[tuple[int, int], ...]:
    padding = conv_module.padding
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x.shape[1:3], conv_module.kernel_size,
                                         conv_module.strides, padding))
    return tuple(tuple(p) for p in padding)


def conv_bn(conv_module: nnx.Conv, bn: nnx.BatchNorm, x: jax.Array, *,
            relu: bool, pool: bool = False) -> jax.Array:
    """The inference block of two modules: one fused call where `applies` holds, else
    `ops.plain_conv_bn_inference`."""
    if not applies(conv_module, bn, x):
        return ops.plain_conv_bn_inference(conv_module, bn, x, relu=relu, pool=pool)
    return conv_bn_inference(x, conv_module.kernel[...], bn.mean[...], bn.var[...],
                             bn.scale[...], bn.bias[...], bn.epsilon,
                             padding_of(conv_module, x), relu, pool)


def _plain(x, kernel, mean, var, scale, bias, epsilon, padding, relu, pool):
    """The unfused composition, with flax's BatchNorm formula."""
    y = conv.conv2d(x, kernel, (1, 1), padding)
    y = (y - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
    y = nnx.relu(y) if relu else y
    return ops.max_pool_2x2(y) if pool else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def conv_bn_inference(x, kernel, mean, var, scale, bias, epsilon: float, padding,
                      relu: bool, pool: bool) -> jax.Array:
    """pool(relu(BN(conv3x3(x, kernel)))) with BatchNorm on (mean, var); stride 1."""
    plain = functools.partial(_plain, epsilon=epsilon, padding=padding, relu=relu, pool=pool)

    def fused(x, kernel, mean, var, scale, bias):
        multiplier = lax.rsqrt(var + epsilon) * scale
        return winograd.conv(x, kernel, padding, scale=multiplier,
                             shift=bias - mean * multiplier, relu=relu, pool=pool)

    return lax.platform_dependent(x, kernel, mean, var, scale, bias, cpu=fused, default=plain)


def _fwd(x, kernel, mean, var, scale, bias, epsilon, padding, relu, pool):
    plain = functools.partial(_plain, epsilon=epsilon, padding=padding, relu=relu, pool=pool)
    return jax.vjp(plain, x, kernel, mean, var, scale, bias)


def _bwd(epsilon, padding, relu, pool, plain_vjp, dy):
    return plain_vjp(dy)


conv_bn_inference.defvjp(_fwd, _bwd)
