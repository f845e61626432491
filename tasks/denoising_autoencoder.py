"""Denoising autoencoder (Vincent et al. 2008): reconstruct the clean image from a corrupted one.

Corruption, made on device from the step's key, in normalised units: additive
Gaussian noise of std `noise_std` on every value, then masking noise that sets
each pixel (all its channels) to 0, the normalised mean, with probability
`drop_prob`. A light MLP decoder on the trunk's pooled features predicts the
clean image; the loss is the mean squared error over all pixels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import auxtl


def corrupt(key: jax.Array, images: jax.Array, *, noise_std: float,
            drop_prob: float) -> jax.Array:
    """images + N(0, noise_std^2), then each pixel zeroed with probability drop_prob."""
    noise_key, drop_key = jax.random.split(key)
    corrupted = images
    if noise_std > 0:
        corrupted = corrupted + noise_std * jax.random.normal(noise_key, images.shape,
                                                              images.dtype)
    if drop_prob > 0:
        keep = jax.random.bernoulli(drop_key, 1.0 - drop_prob, (*images.shape[:-1], 1))
        corrupted = jnp.where(keep, corrupted, 0.0)
    return corrupted


@auxtl.register_task("denoising_autoencoder")
@dataclasses.dataclass(frozen=True)
class DenoisingAutoencoder(auxtl.TaskBase):
    """Gaussian and/or masking noise in, the clean image out."""

    summary = "reconstruct the clean image from a noisy, partly dropped copy"
    needs = "any NHWC images"
    predicts = "pixels (H x W x C); MSE on all pixels"

    noise_std: float = 0.5
    drop_prob: float = 0.25
    hidden: int = 128

    def __post_init__(self):
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.noise_std == 0 and self.drop_prob == 0:
            raise ValueError("denoising_autoencoder needs some corruption: noise_std and "
                             "drop_prob are both 0")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")

    def make_examples(self, key, images):
        corrupted = corrupt(key, images, noise_std=self.noise_std, drop_prob=self.drop_prob)
        return corrupted, images

    def make_head(self, feature_dim, *, image_shape, rngs):
        return auxtl.heads.PixelDecoder(feature_dim, self.hidden, image_shape, rngs=rngs)

    def loss_and_metrics(self, predicted, clean):
        return auxtl.losses.reconstruction(predicted, clean)
