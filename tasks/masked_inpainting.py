"""Masked-patch inpainting (He et al. 2021, MAE; Pathak et al. 2016, context encoders).

The image is cut into `patch` x `patch` squares; exactly round(mask_ratio * patches)
of them, chosen afresh per image from the step's key, are set to 0 (the
normalised mean) in the input. A light MLP decoder on the trunk's pooled
features predicts every pixel; the loss is the mean squared error over the
masked pixels only, so the trunk must infer what it cannot see. The default
ratio, 0.5, is below MAE's 0.75 (chosen for ViTs on large images): on 28x28
digits it leaves half of the strokes as context.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import auxtl


def random_patch_mask(key: jax.Array, batch: int, grid: tuple[int, int],
                      num_masked: int) -> jax.Array:
    """(batch, gh, gw) bool with exactly `num_masked` True per image (argsort of noise)."""
    noise = jax.random.uniform(key, (batch, grid[0] * grid[1]))
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return (ranks < num_masked).reshape(batch, *grid)


@auxtl.register_task("masked_inpainting")
@dataclasses.dataclass(frozen=True)
class MaskedInpainting(auxtl.TaskBase):
    """Zero out a random fraction of square patches; reconstruct the pixels under them."""

    summary = "reconstruct randomly masked square patches of the image (MAE-style)"
    needs = "height and width divisible by `patch`"
    predicts = "pixels (H x W x C); MSE on the masked pixels only"

    patch: int = 4
    mask_ratio: float = 0.5
    hidden: int = 128

    def __post_init__(self):
        if not isinstance(self.patch, int) or self.patch < 1:
            raise ValueError(f"patch must be a positive integer, got {self.patch!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")

    def num_masked(self, num_patches: int) -> int:
        """round(mask_ratio * num_patches), halves rounded up."""
        return int(self.mask_ratio * num_patches + 0.5)

    def validate(self, image_shape):
        height, width, _ = image_shape
        if height % self.patch or width % self.patch:
            raise ValueError(f"masked_inpainting needs height and width divisible by patch "
                             f"{self.patch}, got {height}x{width}")
        num_patches = (height // self.patch) * (width // self.patch)
        masked = self.num_masked(num_patches)
        if not 0 < masked < num_patches:
            raise ValueError(f"mask_ratio {self.mask_ratio} masks {masked} of {num_patches} "
                             f"patches of {height}x{width} images; at least one patch must be "
                             "masked and one visible")

    def make_examples(self, key, images):
        batch, height, width, _ = images.shape
        grid = (height // self.patch, width // self.patch)
        patches = random_patch_mask(key, batch, grid, self.num_masked(grid[0] * grid[1]))
        mask = jnp.repeat(jnp.repeat(patches, self.patch, axis=1), self.patch, axis=2)
        mask = mask[..., None].astype(jnp.float32)           # (N, H, W, 1), 1 = masked
        return images * (1.0 - mask), (images, mask)

    def make_head(self, feature_dim, *, image_shape, rngs):
        return auxtl.heads.PixelDecoder(feature_dim, self.hidden, image_shape, rngs=rngs)

    def loss_and_metrics(self, predicted, targets):
        images, mask = targets
        return auxtl.losses.reconstruction(predicted, images, weights=mask)
