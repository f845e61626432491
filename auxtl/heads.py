"""Reusable task heads: what several tasks put on top of the pooled trunk features."""

from __future__ import annotations

import jax
from flax import nnx


class MLP(nnx.Module):
    """features (N, D) -> Linear -> ReLU -> Linear (N, out): SimCLR's projection g, or a
    small classifier head. `dtype`: the compute dtype (None: promoted from the inputs and
    the float32 parameters; a bfloat16 pretraining sets it, `auxtl.pretrain_model`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs,
                 dtype=None):
        self.hidden = nnx.Linear(in_dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(hidden_dim, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(features)))


class PixelDecoder(nnx.Module):
    """A light decoder: pooled features (N, D) -> dense -> ReLU -> dense -> (N, H, W, C).

    The output layer starts at zero, so the untrained head predicts 0 everywhere:
    the normalised mean for reconstruction targets. `dtype` as in `MLP`; the pixels come
    out in it (`auxtl.losses.reconstruction` compares them in float32).
    """

    def __init__(self, feature_dim: int, hidden: int, out_shape: tuple[int, int, int], *,
                 rngs: nnx.Rngs, dtype=None):
        height, width, channels = out_shape
        self.hidden = nnx.Linear(feature_dim, hidden, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(hidden, height * width * channels, dtype=dtype,
                              kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.out_shape = tuple(out_shape)

    def __call__(self, features: jax.Array) -> jax.Array:
        pixels = self.out(nnx.relu(self.hidden(features)))
        return pixels.reshape(features.shape[0], *self.out_shape)
