"""Jigsaw puzzles (Noroozi & Favaro 2016): predict which permutation shuffled an image's tiles.

Each image is cut into a grid x grid set of tiles, the tiles are reordered by one
of a fixed set of permutations, and the network predicts that permutation's index.
The trunk sees each tile alone (tiles are folded into the batch axis); the head
sees the tile features concatenated in shuffled order.

The permutation set is built by a deterministic greedy max-min Hamming distance
rule (`permutation_set`), so it is the same on every host and run and needs no
storage in checkpoints: (grid, num_permutations) recreates it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import auxtl

DEFAULT_PERMUTATIONS = {2: 24, 3: 64}   # grid -> default count; 2x2: all 4! permutations
_MAX_ENUMERATED = math.factorial(9)     # grids up to 3x3 search every permutation
_SAMPLED_CANDIDATES = 20_000            # larger grids search a seeded random sample


@functools.lru_cache(maxsize=None)
def permutation_set(grid: int, count: int) -> np.ndarray:
    """`count` distinct permutations of grid*grid tiles, spread out in Hamming distance.

    Greedy farthest-point selection: start from the identity, then repeatedly add
    the candidate whose smallest Hamming distance to the chosen set is largest
    (ties: the first in lexicographic order). Candidates are all permutations for
    grids up to 3x3, else a sample drawn by `np.random.default_rng(0)`. The set's
    minimum pairwise distance is the last pick's distance; for 2x2/24 it is 2 (all
    permutations), for 3x3/64 it is 7 (3x3/100: 6). Cached per (grid, count).

    Returns:
      int32 array (count, grid*grid); row k maps shuffled position i to the
      original tile index row[i]. Read-only.
    """
    n = grid * grid
    if math.factorial(n) <= _MAX_ENUMERATED:
        flat = itertools.chain.from_iterable(itertools.permutations(range(n)))
        candidates = np.fromiter(flat, np.int8).reshape(-1, n)
    else:
        rng = np.random.default_rng(0)
        sample = np.argsort(rng.random((_SAMPLED_CANDIDATES, n)), axis=1)
        candidates = np.unique(np.concatenate([np.arange(n)[None], sample]), axis=0)
    if not 1 <= count <= len(candidates):
        raise ValueError(f"num_permutations must be in [1, {len(candidates)}] for a "
                         f"{grid}x{grid} grid, got {count}")
    chosen = [0]                                     # the identity sorts first
    nearest = np.sum(candidates != candidates[0], axis=1)
    for _ in range(count - 1):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.sum(candidates != candidates[pick], axis=1))
    result = candidates[chosen].astype(np.int32)
    result.flags.writeable = False
    return result


def to_tiles(images: jax.Array, grid: int) -> jax.Array:
    """(N, H, W, C) -> (N, grid*grid, H/grid, W/grid, C), tiles in row-major order."""
    n, h, w, c = images.shape
    tiles = images.reshape(n, grid, h // grid, grid, w // grid, c)
    return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, h // grid, w // grid, c)


@auxtl.register_task("jigsaw")
@dataclasses.dataclass(frozen=True)
class Jigsaw(auxtl.TaskBase):
    """One shuffled puzzle per image; the head is an MLP (`hidden` units, 0: linear)."""

    summary = "predict which of a fixed set of permutations shuffled the image's tiles"
    needs = "H and W divisible by grid (tiles the trunk can take)"
    predicts = "num_permutations-way class: index of the tile permutation"

    grid: int = 2
    num_permutations: int | None = None   # None: 24 for 2x2, 64 for 3x3
    hidden: int = 128

    def __post_init__(self):
        if self.grid < 2:
            raise ValueError(f"jigsaw grid must be >= 2, got {self.grid}")
        if self.num_permutations is None:
            default = DEFAULT_PERMUTATIONS.get(self.grid, 100)
            object.__setattr__(self, "num_permutations", default)
        permutation_set(self.grid, self.num_permutations)  # validates the count, warms the cache

    @property
    def permutations(self) -> np.ndarray:
        return permutation_set(self.grid, self.num_permutations)

    def validate(self, image_shape):
        height, width, _ = image_shape
        for axis, size in (("height", height), ("width", width)):
            if size % self.grid:
                raise ValueError(f"jigsaw grid {self.grid} needs the image {axis} divisible "
                                 f"by {self.grid}, got {size}")

    def make_examples(self, key, images):
        """Returns (shuffled tiles (N, grid*grid, h, w, C), permutation index (N,))."""
        labels = jax.random.randint(key, (images.shape[0],), 0, self.num_permutations,
                                    dtype=jnp.int32)
        order = jnp.asarray(self.permutations)[labels]           # (N, T)
        tiles = to_tiles(images, self.grid)
        shuffled = jnp.take_along_axis(tiles, order[:, :, None, None, None], axis=1)
        return shuffled, labels

    def make_head(self, feature_dim, *, image_shape, rngs):
        width = self.grid * self.grid * feature_dim
        if not self.hidden:
            return nnx.Linear(width, self.num_permutations, rngs=rngs)
        return auxtl.heads.MLP(width, self.hidden, self.num_permutations, rngs=rngs)

    def forward(self, trunk, head, inputs, *, train, frozen=()):
        n, t = inputs.shape[:2]
        features = trunk(inputs.reshape(n * t, *inputs.shape[2:]), train=train, frozen=frozen)
        return head(features.reshape(n, t * features.shape[-1]))

    def loss_and_metrics(self, logits, labels):
        return auxtl.losses.classification(logits, labels)
