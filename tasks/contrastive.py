"""Contrastive views (Chen et al. 2020, SimCLR): tell an image's other view from all the rest.

Each image yields two views augmented on device from the step's key (random
resized crop, optional horizontal flip, Gaussian noise). The trunk runs once on
the 2B views, a projection MLP maps the pooled features to embeddings, and the
NT-Xent loss asks each view's embedding to be most cosine-similar to the other
view of its image among the 2B - 1 other views.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

import auxtl


def random_resized_crop(key: jax.Array, images: jax.Array, *, min_scale: float,
                        max_ratio: float = 4 / 3) -> jax.Array:
    """Crops a random box per image and resizes it back to (H, W) bilinearly.

    The box covers a uniform fraction in [min_scale, 1] of the image's area, with
    an aspect ratio log-uniform in [1/max_ratio, max_ratio] (clipped to the image).
    """
    batch, height, width, _ = images.shape
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (batch,), minval=min_scale, maxval=1.0) * height * width
    log_ratio = jnp.log(max_ratio)
    ratio = jnp.exp(jax.random.uniform(k_ratio, (batch,), minval=-log_ratio, maxval=log_ratio))
    crop_h = jnp.clip(jnp.sqrt(area / ratio), 1.0, height)
    crop_w = jnp.clip(jnp.sqrt(area * ratio), 1.0, width)
    top = jax.random.uniform(k_y, (batch,)) * (height - crop_h)
    left = jax.random.uniform(k_x, (batch,)) * (width - crop_w)
    scale = jnp.stack([height / crop_h, width / crop_w], axis=-1)
    translation = -jnp.stack([top, left], axis=-1) * scale

    def one(image, s, t):
        return jax.image.scale_and_translate(image, image.shape, (0, 1), s, t,
                                             method="linear", antialias=False)

    return jax.vmap(one)(images, scale, translation)


def random_rotation(key: jax.Array, images: jax.Array, *, max_degrees: float) -> jax.Array:
    """Rotates each image about its centre by an angle uniform in [-max_degrees,
    max_degrees] (bilinear; points outside the image take the nearest edge value)."""
    batch, height, width, channels = images.shape
    angle = jnp.deg2rad(jax.random.uniform(key, (batch,), minval=-max_degrees,
                                           maxval=max_degrees))
    cy, cx = (height - 1) / 2, (width - 1) / 2
    y, x = jnp.meshgrid(jnp.arange(height) - cy, jnp.arange(width) - cx, indexing="ij")

    def one(image, a):
        cos, sin = jnp.cos(a), jnp.sin(a)
        coords = [cos * y - sin * x + cy, sin * y + cos * x + cx]
        return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], coords, order=1,
                                                            mode="nearest")
                          for c in range(channels)], axis=-1)

    return jax.vmap(one)(images, angle)


def augment(key: jax.Array, images: jax.Array, *, min_scale: float, flip: bool,
            noise_std: float, max_degrees: float = 0.0) -> jax.Array:
    """One random view of each image: crop-and-resize, [rotate], [mirror], add Gaussian
    noise."""
    k_crop, k_flip, k_noise, k_rotate = jax.random.split(key, 4)
    views = random_resized_crop(k_crop, images, min_scale=min_scale)
    if max_degrees > 0:
        views = random_rotation(k_rotate, views, max_degrees=max_degrees)
    if flip:
        mirrored = jax.random.bernoulli(k_flip, 0.5, (images.shape[0], 1, 1, 1))
        views = jnp.where(mirrored, views[:, :, ::-1, :], views)
    if noise_std > 0:
        views = views + noise_std * jax.random.normal(k_noise, views.shape, views.dtype)
    return views


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """NT-Xent over the 2B views (z1[i] and z2[i] are the two views of image i).

    Args:
      z1, z2: (B, D) embeddings of the first and second views.
      temperature: divides the cosine similarities before the softmax.

    Returns:
      (loss, accuracy): the mean over all 2B views of the cross-entropy of picking
      the positive among the 2B - 1 other views, and the fraction of views whose
      most similar other view is the positive (top-1 positive retrieval).
    """
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    n = z.shape[0]
    logits = (z @ z.T) / temperature
    logits = jnp.where(jnp.eye(n, dtype=bool), -1e9, logits)  # a view is not its own pair
    positives = (jnp.arange(n) + n // 2) % n
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == positives)
    return loss, accuracy


@auxtl.register_task("contrastive")
@dataclasses.dataclass(frozen=True)
class Contrastive(auxtl.TaskBase):
    """SimCLR on one trunk pass over both views.

    flip defaults to False because the default data are digits, whose mirror
    images are not digits; set it for natural images. min_scale=0.5 (SimCLR's
    ImageNet recipe uses 0.08) keeps most of a 28x28 digit in every crop.
    """

    summary = "tell each image's other augmented view from all other views (SimCLR, NT-Xent)"
    needs = "any NHWC images the trunk can take"
    predicts = "embedding whose nearest other view is the same image's second view"

    temperature: float = 0.5
    min_scale: float = 0.5      # smallest crop, as a fraction of the image area
    flip: bool = False          # random horizontal mirroring of each view
    noise_std: float = 0.1      # Gaussian noise, in units of the normalised pixels
    hidden_dim: int = 128
    out_dim: int = 64
    max_degrees: float = 0.0    # random rotation of each view, in degrees either way

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    def make_examples(self, key, images):
        keys = jax.random.split(key, 2)
        views = [augment(k, images, min_scale=self.min_scale, flip=self.flip,
                         noise_std=self.noise_std, max_degrees=self.max_degrees)
                 for k in keys]
        return jnp.concatenate(views, axis=0), None   # no targets: the pairing is the order

    def make_head(self, feature_dim, *, image_shape, rngs):
        return auxtl.heads.MLP(feature_dim, self.hidden_dim, self.out_dim, rngs=rngs)

    def loss_and_metrics(self, embeddings, targets):
        del targets
        z1, z2 = jnp.split(embeddings, 2, axis=0)
        loss, accuracy = nt_xent(z1, z2, self.temperature)
        return loss, {"loss": loss, "accuracy": accuracy}
