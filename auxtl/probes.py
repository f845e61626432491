"""Cheap evaluations of frozen features: per-depth features, linear probes and k-NN,
each vectorised over seeds with jax.vmap (one compile, all seeds at once).

Inputs for S seeds share shapes: train features (S, n, d), train labels (S, n);
the test set is shared: (m, d), (m,).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from auxtl.data import Normalization, normalize
from auxtl.models.trunk import global_avg_pool


def depth_features(trunk, images: np.ndarray, normalization: Normalization, *,
                   batch_size: int = 500) -> list[np.ndarray]:
    """Globally pooled output of every layer (inference mode): a list of (N, d_k) arrays."""
    graphdef, state = nnx.split(trunk)

    @jax.jit
    def pooled(state, x):
        module = nnx.merge(graphdef, state)
        x = normalize(x, normalization)
        outputs = []
        for index in range(len(module.layers)):
            x = module.apply_layers(x, start=index, stop=index + 1)
            outputs.append(global_avg_pool(x))
        return outputs

    chunks = [jax.device_get(pooled(state, images[i:i + batch_size]))
              for i in range(0, len(images), batch_size)]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def _standardize(train, test):
    mean = train.mean(axis=0)
    std = train.std(axis=0) + 1e-6
    return (train - mean) / std, (test - mean) / std


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int,
                          steps: int = 300, learning_rate: float = 0.05,
                          l2: float = 1e-3) -> jax.Array:
    """Test accuracy of a softmax regression per seed (full-batch Adam on standardised
    features, L2 on the weights): train (S, n, d)/(S, n), test (m, d)/(m,) -> (S,)."""

    def one_seed(x, y):
        x, t = _standardize(x, test_x)
        params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
        optimizer = optax.adam(learning_rate)

        def loss(p):
            logits = x @ p["w"] + p["b"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + l2 * jnp.sum(p["w"] ** 2)

        def step(carry, _):
            p, s = carry
            updates, s = optimizer.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None,
                                      length=steps)
        return jnp.mean(jnp.argmax(t @ params["w"] + params["b"], -1) == test_y)

    return jax.vmap(one_seed)(train_x, train_y)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int, num_classes: int) -> jax.Array:
    """Cosine k-nearest-neighbour test accuracy per seed (majority vote, ties to the
    nearest): train (S, n, d)/(S, n), test (m, d)/(m,) -> (S,)."""

    def unit(v):
        return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)

    def one_seed(x, y):
        similarity = unit(test_x) @ unit(x).T                      # (m, n)
        top_sim, top_index = jax.lax.top_k(similarity, k)          # (m, k)
        votes = jax.nn.one_hot(y[top_index], num_classes)          # (m, k, C)
        weights = 1.0 + 1e-3 * top_sim[..., None]                  # break ties by nearness
        prediction = jnp.argmax(jnp.sum(votes * weights, axis=1), axis=-1)
        return jnp.mean(prediction == test_y)

    return jax.vmap(one_seed)(train_x, train_y)
