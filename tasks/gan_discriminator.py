"""GAN discriminator (Radford et al. 2016, DCGAN): the trunk learns to tell real images from fakes.

DCGAN's "discriminator features" route: train a GAN whose discriminator body is
the trunk, then reuse that body. The generator and the discriminator's output
layer (Linear feature_dim -> 1) live in this task's head; the trunk is D's body.

auxtl trains everything with ONE optimizer on the summed loss, so the two
players' objectives are separated by stop-gradients inside `forward`:

  d_loss = BCE(D(real), 1) + BCE(D(stop_gradient(G(z))), 0)   -> trains only D
  g_loss = BCE(D_sg(G(z)), 1)   (non-saturating)              -> trains only G

D_sg is a copy of the trunk and output layer whose parameters went through
jax.lax.stop_gradient (nnx.split -> stop_gradient -> nnx.merge), so g_loss
reaches the generator through D's function without pulling D toward "fake is
real", and d_loss sees the fakes as constants. One gradient of d_loss + g_loss
is therefore exactly (grad_D d_loss, grad_G g_loss): simultaneous GAN updates.

BatchNorm, and why reals and fakes run as separate batches: the trunk is kept
for REAL images, and at inference its BatchNorm layers normalise with their
running statistics. If D saw one batch of reals and fakes together, those
statistics would describe the real+fake mixture; once D wins, the generator's
images drift far from the data (scale and offset), the mixture's variance is
dominated by the fakes, and real images at inference are normalised by
statistics that are not theirs: their features collapse to near-constant
values (most ReLUs off), which no probe or fine-tuning recovers. So, as in
DCGAN's reference code, D runs on the reals and on the fakes as two batches:
  - reals: the trunk itself, batch statistics in training (this pass alone
    updates the running statistics, which therefore describe real images
    only) and those running statistics in evaluation;
  - fakes: a copy of the trunk (same, differentiable, parameters; its own
    Variables, so its statistics updates are discarded) that always
    normalises the fakes by their own batch's statistics, in training and in
    evaluation alike, so the evaluation metrics score the game that trained;
  - D_sg scores the fakes exactly as the fake pass does (same batch, same mode).
The generator's output is mapped into the per-channel [min, max] range of the
real batch (a sigmoid, DCGAN's bounded tanh output for standardised data), so
fakes cannot escape the data's range however the game goes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import auxtl


def _copy(module: nnx.Module) -> nnx.Module:
    """The same module on the same (differentiable) values; its state updates stay its own.

    (nnx.merge of nnx.split's state would share the Variable objects, so a BatchNorm
    update in the copy would reach the original; mapping the state makes new ones.)
    """
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))


def _stop_gradient_copy(module: nnx.Module) -> nnx.Module:
    """The same module, its parameters and statistics wrapped in stop_gradient."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


def bce_with_logits(logits: jax.Array, label: float) -> jax.Array:
    """Mean binary cross-entropy of sigmoid(logits) against a constant 0/1 label."""
    logits = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.softplus(-logits) if label else jax.nn.softplus(logits))


def in_range_of(raw: jax.Array, real: jax.Array) -> jax.Array:
    """`raw` (N, H, W, C) squashed into each channel's [min, max] over the real batch.

    The range is a constant (stop_gradient): the generator learns where in it to go.
    """
    low = jax.lax.stop_gradient(jnp.min(real, axis=(0, 1, 2)))
    high = jax.lax.stop_gradient(jnp.max(real, axis=(0, 1, 2)))
    return low + (high - low) * jax.nn.sigmoid(raw)


class Generator(nnx.Module):
    """DCGAN-style: dense -> (H/4, W/4) map -> 2x upsample + conv, twice -> (H, W, C).

    BatchNorm and ReLU inside; the output is linear: the task squashes it into the
    real batch's range (`in_range_of`), since real inputs are per-channel
    standardised, not scaled to [-1, 1] as DCGAN's tanh output assumes.
    """

    def __init__(self, latent_dim: int, width: int, image_shape, *, rngs: nnx.Rngs):
        height, image_width, channels = image_shape
        self.image_shape = tuple(image_shape)
        self.start = (math.ceil(height / 4), math.ceil(image_width / 4), 2 * width)
        self.middle = (math.ceil(height / 2), math.ceil(image_width / 2))
        self.dense = nnx.Linear(latent_dim, math.prod(self.start), rngs=rngs)
        self.bn0 = nnx.BatchNorm(2 * width, momentum=0.9, rngs=rngs)
        self.conv1 = nnx.Conv(2 * width, width, (3, 3), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(width, channels, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
        batch = z.shape[0]
        x = self.dense(z).reshape(batch, *self.start)
        x = nnx.relu(self.bn0(x, use_running_average=not train))
        x = jax.image.resize(x, (batch, *self.middle, x.shape[-1]), "nearest")
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        x = jax.image.resize(x, (batch, *self.image_shape[:2], x.shape[-1]), "nearest")
        return self.conv2(x)


class GANHead(nnx.Module):
    """The generator and the discriminator's output layer (the trunk is D's body)."""

    def __init__(self, feature_dim: int, latent_dim: int, width: int, image_shape, *,
                 rngs: nnx.Rngs):
        self.generator = Generator(latent_dim, width, image_shape, rngs=rngs)
        self.critic = nnx.Linear(feature_dim, 1, rngs=rngs)


@auxtl.register_task("gan_discriminator")
@dataclasses.dataclass(frozen=True)
class GANDiscriminator(auxtl.TaskBase):
    """A GAN trained in one loss; metrics d_loss, g_loss and D's real/fake accuracy."""

    summary = "tell real images from a jointly trained generator's fakes (DCGAN discriminator)"
    needs = "any NHWC images the trunk can take"
    predicts = "1 logit: real (vs generated)"

    latent_dim: int = 64       # size of the generator's Gaussian input z
    generator_width: int = 32  # channels of the generator's last hidden map (2x before)

    def make_examples(self, key, images):
        z = jax.random.normal(key, (images.shape[0], self.latent_dim), images.dtype)
        return (images, z), None   # no targets: real vs fake is known by construction

    def make_head(self, feature_dim, *, image_shape, rngs):
        return GANHead(feature_dim, self.latent_dim, self.generator_width, image_shape,
                       rngs=rngs)

    def forward(self, trunk, head, inputs, *, train, frozen=()):
        real, z = inputs
        fake = in_range_of(head.generator(z, train=train), real)
        # Copies taken before any pass: their BatchNorm updates never reach `trunk`.
        trunk_fake, trunk_sg = _copy(trunk), _stop_gradient_copy(trunk)
        critic_sg = _stop_gradient_copy(head.critic)
        d_real = head.critic(trunk(real, train=train, frozen=frozen))
        # Fakes: their own batch statistics in both modes (frozen layers: running ones).
        d_fake = head.critic(trunk_fake(jax.lax.stop_gradient(fake), train=True, frozen=frozen))
        g_fake = critic_sg(trunk_sg(fake, train=True, frozen=frozen))
        return {"d_real": d_real[:, 0], "d_fake": d_fake[:, 0], "g_fake": g_fake[:, 0]}

    def loss_and_metrics(self, logits, targets):
        del targets
        d_loss = bce_with_logits(logits["d_real"], 1) + bce_with_logits(logits["d_fake"], 0)
        g_loss = bce_with_logits(logits["g_fake"], 1)
        accuracy = 0.5 * (jnp.mean(logits["d_real"] > 0) + jnp.mean(logits["d_fake"] < 0))
        loss = d_loss + g_loss
        return loss, {"loss": loss, "d_loss": d_loss, "g_loss": g_loss, "accuracy": accuracy}
