"""Rotation prediction (Gidaris et al. 2018, RotNet): predict k of a k*90-degree rotation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import auxtl


def rotate(images: jax.Array, k: int) -> jax.Array:
    """Rotates NHWC images counter-clockwise by k*90 degrees."""
    return jnp.rot90(images, k=k, axes=(1, 2))


@auxtl.register_task("rotation")
@dataclasses.dataclass(frozen=True)
class Rotation(auxtl.TaskBase):
    """Each image yields all four rotations (RotNet's recipe) or one random rotation."""

    summary = "predict the rotation (0/90/180/270 degrees) applied to an image"
    needs = "square images (H == W)"
    predicts = "4-way class: k of a k*90-degree counter-clockwise rotation"

    all_rotations: bool = True

    def validate(self, image_shape):
        height, width, _ = image_shape
        if height != width:
            raise ValueError(f"rotation needs square images, got height {height} != width {width}")

    def make_examples(self, key, images):
        batch = images.shape[0]
        rotated = jnp.concatenate([rotate(images, k) for k in range(4)], axis=0)
        labels = jnp.repeat(jnp.arange(4, dtype=jnp.int32), batch)
        if self.all_rotations:
            return rotated, labels
        k = jax.random.randint(key, (batch,), 0, 4, dtype=jnp.int32)
        return rotated[k * batch + jnp.arange(batch)], k

    def make_head(self, feature_dim, *, image_shape, rngs):
        return nnx.Linear(feature_dim, 4, rngs=rngs)

    def loss_and_metrics(self, logits, labels):
        return auxtl.losses.classification(logits, labels)
