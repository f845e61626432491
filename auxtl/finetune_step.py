"""The compiled pieces of fine-tuning: the step, inference logits and the frozen prefix.

Each is built from a model's graphdef and a phase plan (`auxtl.freezing.plan_phase`);
a plan with augmentation (`plan.augment`) draws it inside the step, on device, on the
raw images (random shifts and/or horizontal flips, then normalisation);
the normalization is always a traced argument (`NormStats`), never closed over, so one
compiled function serves targets with different statistics (every seed's own, channel
counts included) and a `StepCache` can share it with no stale closure.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from auxtl import freezing, parallel
from auxtl.data import Normalization, normalize
from auxtl.errors import InputError
from auxtl.losses import classification
from auxtl.train_state import TrainState


class StepCache:
    """Compiled functions keyed by everything they close over (graphdef + `PhasePlan.key`
    for steps), reused across phases, seeds and calls; and the last `keep_features`
    frozen-prefix outputs of shared data (`features`); `layout` records how the compiled
    steps split their batch over the mesh (`auxtl.parallel.BatchLayout`)."""

    def __init__(self, keep_features: int = 4):
        self.layout = parallel.BatchLayout()
        self._steps: dict[tuple, Any] = {}
        self._features: collections.OrderedDict[tuple, tuple[Any, Any]] = (
            collections.OrderedDict())
        self._keep = keep_features

    def get(self, key: tuple, build):
        if key not in self._steps:
            self._steps[key] = build()
        return self._steps[key]

    def features(self, key: tuple, data, compute):
        """`compute(data)`, remembered for the most recent (key, data object) pairs.

        `key` must name everything the result depends on besides `data` (for a frozen
        prefix: graphdef, depth, a digest of its weights and of the normalization);
        `data` is identified by the object itself, which the cache holds.
        """
        slot = (key, id(data))
        if slot in self._features and self._features[slot][0] is data:
            self._features.move_to_end(slot)
            return self._features[slot][1]
        value = compute(data)
        self._features[slot] = (data, value)
        while len(self._features) > self._keep:
            self._features.popitem(last=False)
        return value


class NormStats(NamedTuple):
    """A normalization's per-channel mean and std as arrays: a pytree jit traces, so
    compiled functions take it as an argument instead of closing over its values."""

    mean: Any
    std: Any


def norm_stats(normalization: Normalization | NormStats) -> NormStats:
    if isinstance(normalization, NormStats):
        return normalization
    return NormStats(np.asarray(normalization.mean, np.float32),
                     np.asarray(normalization.std, np.float32))


AUGMENTS = ("none", "shift", "flip", "shift+flip")


def default_max_shift(height: int, width: int) -> int:
    """The shift bound when none is given: a tenth of the shorter side, at least 1 pixel."""
    return max(1, round(0.1 * min(height, width)))


def draw_shifts(key, count: int, max_shift: int):
    """(count, 2) integer (dy, dx) offsets, each uniform in [-max_shift, max_shift]."""
    return jax.random.randint(key, (count, 2), -max_shift, max_shift + 1)


def shift_images(images, shifts, max_shift: int):
    """NHWC `images` translated by per-image (dy, dx) `shifts` (|dy|, |dx| <= max_shift):
    padded by `max_shift` with each image's edge values, then each cropped back to (H, W)
    at (max_shift + dy, max_shift + dx): output[i, y, x] = padded[i, y + m + dy, x + m + dx]."""
    height, width = images.shape[1:3]
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad, mode="edge")

    def crop(image, shift):
        corner = (max_shift + shift[0], max_shift + shift[1], 0)
        return jax.lax.dynamic_slice(image, corner, (height, width, image.shape[-1]))

    return jax.vmap(crop)(padded, shifts)


def augment_images(key, images, augment: str, max_shift: int):
    """`images` (NHWC, raw) augmented as `augment` (one of `AUGMENTS`) says, with
    randomness from `key` alone: "shift" (`draw_shifts` + `shift_images`), "flip" (each
    image mirrored left-right with probability 1/2), both, or "none" (unchanged)."""
    if augment not in AUGMENTS:
        raise InputError(f"unknown augmentation {augment!r}; use one of {AUGMENTS}")
    shift_key, flip_key = jax.random.split(key)
    if "shift" in augment:
        images = shift_images(images, draw_shifts(shift_key, len(images), max_shift), max_shift)
    if "flip" in augment:
        flip = jax.random.bernoulli(flip_key, 0.5, (len(images),))
        images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return images


def augment_key(state: TrainState):
    """The key of a step's augmentation: the state's key (raw key data) folded with its
    step count, so a seed fixes every step's draw and seeds (vmapped or not) differ."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def finetune_step_fn(graphdef, plan: freezing.PhasePlan):
    """The pure (unjitted) step (state, inputs, labels, norm) -> (state, metrics): grads
    for the plan's trainable leaves only; `inputs` are images when `plan.start` is 0,
    else the output of the lowest `plan.start` layers (normalization then unused). With
    `plan.augment` (then `plan.start` is 0) the raw images are augmented
    (`augment_images`, key `augment_key(state)`) before normalisation."""
    mask, frozen, optimizer, start = plan.mask, plan.frozen, plan.optimizer, plan.start
    (augment, max_shift), treedef = plan.augment, jax.tree.structure(mask)
    if augment != "none" and start:
        raise InputError(f"augmentation {augment!r} changes the images every step: a "
                         f"cached frozen prefix (start={start}) cannot be used; plan with "
                         f"cache_prefix=False")

    def step(state: TrainState, inputs, labels, norm: NormStats):
        trainable, frozen_leaves = freezing.split_trainable(state.params, mask)
        if augment != "none":
            inputs = augment_images(augment_key(state), inputs, augment, max_shift)
        x = inputs if start else normalize(inputs, norm)

        def loss_fn(trainable_leaves):
            params = freezing.merge_trainable(treedef, mask, trainable_leaves, frozen_leaves)
            model = nnx.merge(graphdef, params, state.batch_stats)
            logits = model.logits(x, start=start, train=True, frozen=frozen)
            loss, metrics = classification(logits, labels)
            return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

        grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(trainable)
        full_grads = freezing.merge_trainable(treedef, mask, grads,
                                              freezing.zeros_for(frozen_leaves))
        updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
        params = freezing.keep_frozen(state.params, optax.apply_updates(state.params, updates),
                                      mask)
        return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                             opt_state=opt_state), metrics

    return step


def make_finetune_step(graphdef, plan: freezing.PhasePlan):
    """`finetune_step_fn` jitted, the state's buffers donated."""
    return jax.jit(finetune_step_fn(graphdef, plan), donate_argnums=0)


def logits_fn(graphdef, start: int):
    """The pure inference logits (params, batch_stats, inputs, norm) from layer `start`
    (BatchNorm in inference mode); inputs as in `finetune_step_fn`."""

    def logits(params, batch_stats, inputs, norm: NormStats):
        x = inputs if start else normalize(inputs, norm)
        return nnx.merge(graphdef, params, batch_stats).logits(x, start=start)

    return logits


def make_logits_fn(graphdef, start: int):
    """`logits_fn` jitted."""
    return jax.jit(logits_fn(graphdef, start))


def make_prefix_fn(graphdef, stop: int):
    """Jitted output (params, batch_stats, images, norm) of the lowest `stop` layers in
    inference mode: the features a phase whose prefix is frozen trains on."""

    def prefix(params, batch_stats, images, norm: NormStats):
        model = nnx.merge(graphdef, params, batch_stats)
        return model.trunk.apply_layers(normalize(images, norm), stop=stop)

    return jax.jit(prefix)


def in_chunks(fn, inputs, chunk: int = 500):
    """fn over `inputs` in chunks of `chunk` rows, concatenated (bounded device memory)."""
    return jnp.concatenate([fn(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)])
