"""auxtl.models.batchnorm: the fused training BatchNorm (+ ReLU) equals nnx.BatchNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from auxtl.models.batchnorm import batch_norm


def reference(bn, x, train, relu):
    y = bn(x, use_running_average=not train)
    return nnx.relu(y) if relu else y


def make_bn(channels: int, seed: int = 0, dtype=jnp.float32) -> nnx.BatchNorm:
    bn = nnx.BatchNorm(channels, momentum=0.9, dtype=dtype, rngs=nnx.Rngs(seed))
    keys = jax.random.split(jax.random.key(seed), 4)
    bn.scale[...] = 1 + 0.3 * jax.random.normal(keys[0], (channels,))
    bn.bias[...] = 0.2 * jax.random.normal(keys[1], (channels,))
    bn.mean[...] = 0.1 * jax.random.normal(keys[2], (channels,))
    bn.var[...] = 1 + 0.2 * jax.random.uniform(keys[3], (channels,))
    return bn


def loss_and_grads(fn, bn, x, weights, train, relu):
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def loss(params, x):
        module = nnx.merge(graphdef, params, stats)
        y = fn(module, x, train, relu)
        new_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
        return jnp.sum(weights * jnp.sin(y)), (y, new_stats)

    (value, (y, new_stats)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, y, new_stats, grads


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (16, 3)])
def test_values_statistics_and_gradients_match_nnx(shape, train, relu):
    x = 2.0 + 1.5 * jax.random.normal(jax.random.key(1), shape)
    weights = jax.random.normal(jax.random.key(2), shape)
    ours = loss_and_grads(lambda m, x, t, r: batch_norm(m, x, train=t, relu=r),
                          make_bn(shape[-1]), x, weights, train, relu)
    want = loss_and_grads(reference, make_bn(shape[-1]), x, weights, train, relu)
    assert rel(ours[1], want[1]) <= 1e-6                      # outputs
    for ours_leaf, want_leaf in zip(jax.tree.leaves(ours[2]), jax.tree.leaves(want[2])):
        assert rel(ours_leaf, want_leaf) <= 1e-6              # running mean and var
    for ours_leaf, want_leaf in zip(jax.tree.leaves(ours[3]), jax.tree.leaves(want[3])):
        assert rel(ours_leaf, want_leaf) <= 1e-5              # d/dscale, d/dbias, d/dx


def test_inference_mode_leaves_running_statistics_alone():
    bn = make_bn(4)
    before = jax.tree.map(np.asarray, nnx.state(bn, nnx.BatchStat))
    batch_norm(bn, jnp.ones((3, 4)) * 7, train=False, relu=True)
    after = nnx.state(bn, nnx.BatchStat)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                     jax.tree.leaves(after)))


def test_bfloat16_compute_keeps_the_dtype_and_float32_statistics():
    bn = make_bn(8, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(3), (4, 5, 5, 8)).astype(jnp.bfloat16)
    y = batch_norm(bn, x, train=True, relu=True)
    assert y.dtype == jnp.bfloat16
    assert bn.mean[...].dtype == jnp.float32
    want = reference(make_bn(8, dtype=jnp.bfloat16), x, True, True)
    assert rel(y.astype(jnp.float32), want.astype(jnp.float32)) < 1e-2


def test_constant_channels_do_not_make_nans():
    x = jnp.ones((4, 3, 3, 2)) * 5.0
    grads = jax.grad(lambda x: jnp.sum(batch_norm(make_bn(2), x, train=True, relu=True) ** 2))(x)
    assert np.isfinite(np.asarray(grads)).all()
