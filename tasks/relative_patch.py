"""Relative patch position (Doersch, Gupta & Efros 2015): where does the second patch sit?

From each image a centre patch and one of its 8 neighbours in a 3x3 arrangement
are cut, with a gap between patches and each patch jittered independently, so
that lines continuing across the border are no giveaway. The network predicts
the neighbour's position (8 classes). The trunk sees each patch alone (patches
folded into the batch axis); the head sees both features concatenated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import auxtl

# Label k -> (row, column) step of the neighbour from the centre, row-major without (0, 0).
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def arrangement_size(patch: int, gap: int, jitter: int) -> int:
    """Pixels the jittered 3x3 arrangement spans along each axis."""
    return 3 * patch + 2 * gap + 2 * jitter


def patch_positions(key: jax.Array, batch: int, image_hw: tuple[int, int], *, patch: int,
                    gap: int, jitter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples labels and the top-left corners of both patches, all from `key`.

    The arrangement is placed uniformly at random where it fits in the image; the
    centre patch sits in its middle cell, the neighbour `patch + gap` px away per
    step in NEIGHBOURS[label]; each patch then moves by up to `jitter` px per axis.

    Returns:
      labels (N,) int32 in [0, 8), centre (N, 2) and neighbour (N, 2) int32 (y, x).
    """
    place_key, label_key, jitter_key = jax.random.split(key, 3)
    size = arrangement_size(patch, gap, jitter)
    room = jnp.asarray(image_hw, jnp.int32) - size + 1
    origin = jax.random.randint(place_key, (batch, 2), 0, room, dtype=jnp.int32)
    centre = origin + jitter + patch + gap
    labels = jax.random.randint(label_key, (batch,), 0, 8, dtype=jnp.int32)
    neighbour = centre + jnp.asarray(NEIGHBOURS, jnp.int32)[labels] * (patch + gap)
    shifts = jax.random.randint(jitter_key, (2, batch, 2), -jitter, jitter + 1, dtype=jnp.int32)
    return labels, centre + shifts[0], neighbour + shifts[1]


def crop(images: jax.Array, corners: jax.Array, size: int) -> jax.Array:
    """Per-image size x size crops at (y, x) `corners`, by on-device dynamic slicing."""
    channels = images.shape[-1]
    one = lambda image, yx: jax.lax.dynamic_slice(image, (yx[0], yx[1], 0),
                                                  (size, size, channels))
    return jax.vmap(one)(images, corners)


@auxtl.register_task("relative_patch")
@dataclasses.dataclass(frozen=True)
class RelativePatch(auxtl.TaskBase):
    """One (centre, neighbour) pair per image; the head is an MLP (`hidden` units, 0: linear).

    Defaults fit 28x28: 3*7 + 2*2 + 2*1 = 27 px. `gap >= 2 * jitter`, so jittered
    patches never overlap.
    """

    summary = "predict where a patch sits relative to a centre patch (3x3 arrangement)"
    needs = "H and W >= 3*patch + 2*gap + 2*jitter"
    predicts = "8-way class: position of the neighbour patch around the centre patch"

    patch: int = 7
    gap: int = 2
    jitter: int = 1
    hidden: int = 128

    def __post_init__(self):
        if self.patch < 1:
            raise ValueError(f"relative_patch patch must be >= 1 px, got {self.patch}")
        if self.jitter < 0 or self.gap < 2 * self.jitter:
            raise ValueError(f"relative_patch needs 0 <= 2 * jitter <= gap so patches never "
                             f"overlap, got gap {self.gap}, jitter {self.jitter}")

    def validate(self, image_shape):
        height, width, _ = image_shape
        size = arrangement_size(self.patch, self.gap, self.jitter)
        if min(height, width) < size:
            raise ValueError(
                f"relative_patch needs images at least {size}x{size} px (3*patch {self.patch} "
                f"+ 2*gap {self.gap} + 2*jitter {self.jitter}), got {height}x{width}")

    def make_examples(self, key, images):
        """Returns (patches (N, 2, patch, patch, C): centre then neighbour, labels (N,))."""
        labels, centre, neighbour = patch_positions(
            key, images.shape[0], images.shape[1:3], patch=self.patch, gap=self.gap,
            jitter=self.jitter)
        patches = jnp.stack([crop(images, centre, self.patch),
                             crop(images, neighbour, self.patch)], axis=1)
        return patches, labels

    def make_head(self, feature_dim, *, image_shape, rngs):
        if not self.hidden:
            return nnx.Linear(2 * feature_dim, 8, rngs=rngs)
        return auxtl.heads.MLP(2 * feature_dim, self.hidden, 8, rngs=rngs)

    def forward(self, trunk, head, inputs, *, train, frozen=()):
        n = inputs.shape[0]
        features = trunk(inputs.reshape(2 * n, *inputs.shape[2:]), train=train, frozen=frozen)
        return head(features.reshape(n, 2 * features.shape[-1]))

    def loss_and_metrics(self, logits, labels):
        return auxtl.losses.classification(logits, labels)
