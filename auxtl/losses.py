"""Loss-and-metric helpers for tasks: each returns (scalar loss, metrics dict)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def classification(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Softmax cross-entropy and accuracy, computed in float32."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, {"loss": loss, "accuracy": accuracy}


def reconstruction(predicted: jax.Array, target: jax.Array,
                   weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Mean squared error, optionally weighted per element (e.g. a mask)."""
    error = jnp.square(predicted.astype(jnp.float32) - target.astype(jnp.float32))
    if weights is None:
        loss = error.mean()
    else:
        weights = jnp.broadcast_to(weights, error.shape).astype(jnp.float32)
        loss = jnp.sum(error * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return loss, {"loss": loss}
