"""Training-mode BatchNorm (+ ReLU) as one op with a hand-written backward pass.

Same parameters, running statistics and values as `nnx.BatchNorm` (fast variance
E[x^2] - E[x]^2 clipped at 0, statistics in at least float32, gradients through the
batch statistics), but the backward pass is the textbook two sweeps over the
activation (one for the two per-channel sums, one for dx) instead of what autodiff
of the forward expression leaves to XLA: 1.6-3x faster for a conv block's BN + ReLU
on CPU (benchmarks/NOTES.md). Inference mode is nnx.BatchNorm itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def batch_norm(bn: nnx.BatchNorm, x: jax.Array, *, train: bool, relu: bool) -> jax.Array:
    """`bn(x)` (then ReLU if `relu`); in training updates `bn`'s running statistics
    exactly as nnx.BatchNorm does."""
    if not train:
        y = bn(x, use_running_average=True)
        return nnx.relu(y) if relu else y
    dtype = bn.dtype or x.dtype
    x = x.astype(dtype)
    mean, var = batch_statistics(lax.stop_gradient(x))   # the same reductions; XLA CSEs them
    bn.mean[...] = bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean
    bn.var[...] = bn.momentum * bn.var[...] + (1 - bn.momentum) * var
    return normalize_batch(x, bn.scale[...], bn.bias[...], bn.epsilon, relu).astype(dtype)


def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel (last axis) mean and fast variance, in at least float32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.maximum(0.0, jnp.mean(x * x, axis=axes) - mean * mean)
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_batch(x, scale, bias, epsilon: float, relu: bool) -> jax.Array:
    """(x - batch mean) / sqrt(batch var + eps) * scale + bias [then ReLU]."""
    return _normalize_fwd(x, scale, bias, epsilon, relu)[0]


def _normalize_fwd(x, scale, bias, epsilon, relu):
    mean, var = batch_statistics(x)
    inv_std = lax.rsqrt(var + epsilon)
    y = _affine(x, mean, inv_std, scale, bias)
    y = jnp.maximum(y, 0) if relu else y
    return y.astype(x.dtype), (x, mean, inv_std, scale, bias)


def _affine(x, mean, inv_std, scale, bias):
    return (x.astype(mean.dtype) - mean) * (inv_std * scale) + bias


def _normalize_bwd(epsilon, relu, residuals, dy):
    del epsilon
    x, mean, inv_std, scale, bias = residuals
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    x_hat = (x.astype(mean.dtype) - mean) * inv_std
    g = dy.astype(mean.dtype)
    if relu:
        g = jnp.where(x_hat * scale + bias > 0, g, 0)
    d_bias = jnp.sum(g, axis=axes)
    d_scale = jnp.sum(g * x_hat, axis=axes)
    dx = (scale * inv_std) * (g - d_bias / count - x_hat * (d_scale / count))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


normalize_batch.defvjp(_normalize_fwd, _normalize_bwd)
