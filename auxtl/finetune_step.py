"""The compiled pieces of fine-tuning: the step, inference logits and the frozen prefix.

Each is built from a model's graphdef and a phase plan (`auxtl.freezing.plan_phase`);
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

from auxtl import freezing
from auxtl.data import Normalization, normalize
from auxtl.losses import classification
from auxtl.train_state import TrainState


class StepCache:
    """Compiled functions keyed by everything they close over (graphdef + `PhasePlan.key`
    for steps), reused across phases, seeds and calls; and the last `keep_features`
    frozen-prefix outputs of shared data (`features`)."""

    def __init__(self, keep_features: int = 4):
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


def finetune_step_fn(graphdef, plan: freezing.PhasePlan):
    """The pure (unjitted) step (state, inputs, labels, norm) -> (state, metrics): grads
    for the plan's trainable leaves only; `inputs` are images when `plan.start` is 0,
    else the output of the lowest `plan.start` layers (normalization then unused)."""
    mask, frozen, optimizer, start = plan.mask, plan.frozen, plan.optimizer, plan.start
    treedef = jax.tree.structure(mask)

    def step(state: TrainState, inputs, labels, norm: NormStats):
        trainable, frozen_leaves = freezing.split_trainable(state.params, mask)
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
