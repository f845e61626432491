"""Colorization (Zhang et al. 2016, simplified): predict an image's colour from its luminance.

For RGB inputs only. The input is the ITU-R BT.601 luma Y = 0.299 R + 0.587 G +
0.114 B, computed on the normalised channels (tasks only ever see per-channel
standardised images), repeated over the three channels the trunk was built
for. The target is the chroma the input lacks, U = B - Y and V = R - Y (unscaled,
normalised units): with Y it gives back R, G and B exactly. Zhang et al. classify
into quantised ab bins to avoid desaturated averages; here a light MLP decoder on
the pooled features regresses (U, V) per pixel with a mean squared error, which
is simpler and enough to make the trunk recognise what it colours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import auxtl

BT601 = (0.299, 0.587, 0.114)  # R, G, B weights of luma


def luma_and_chroma(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NHWC RGB -> (Y of shape (N, H, W, 1), (U, V) = (B - Y, R - Y) of shape (N, H, W, 2))."""
    luma = jnp.sum(images * jnp.asarray(BT601, images.dtype), axis=-1, keepdims=True)
    chroma = jnp.concatenate([images[..., 2:3] - luma, images[..., 0:1] - luma], axis=-1)
    return luma, chroma


def rgb_from_luma_chroma(luma: jax.Array, chroma: jax.Array) -> jax.Array:
    """Inverse of `luma_and_chroma`: (Y, (U, V)) -> RGB."""
    blue, red = luma + chroma[..., 0:1], luma + chroma[..., 1:2]
    green = (luma - BT601[0] * red - BT601[2] * blue) / BT601[1]
    return jnp.concatenate([red, green, blue], axis=-1)


@auxtl.register_task("colorization")
@dataclasses.dataclass(frozen=True)
class Colorization(auxtl.TaskBase):
    """Grey (luma) in, per-pixel chroma out."""

    summary = "predict the colour (chroma) of an image from its luminance"
    needs = "RGB images (C == 3)"
    predicts = "per-pixel chroma (B - Y, R - Y), H x W x 2; MSE"

    hidden: int = 128

    def __post_init__(self):
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")

    def validate(self, image_shape):
        channels = image_shape[2]
        if channels != 3:
            raise ValueError(f"colorization needs RGB images with 3 channels, got {channels} "
                             f"channel(s) (image shape {tuple(image_shape)})")

    def make_examples(self, key, images):
        del key  # the labels are a fixed function of the image
        luma, chroma = luma_and_chroma(images)
        return jnp.repeat(luma, 3, axis=-1), chroma

    def make_head(self, feature_dim, *, image_shape, rngs):
        height, width, _ = image_shape
        return auxtl.heads.PixelDecoder(feature_dim, self.hidden, (height, width, 2), rngs=rngs)

    def loss_and_metrics(self, predicted, chroma):
        return auxtl.losses.reconstruction(predicted, chroma)
