"""Many seeds of one configuration: per-seed trees stacked on a leading axis, trained
by one compiled step (vmapped over seeds where that pays) on a precomputed schedule.

Seeds of one configuration share every shape (same architecture, same batch size),
so S seeds cost one compile. The data is shared: each seed's schedule holds
indices into it, so a seed's labeled subset is whatever its schedule draws from.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from auxtl.data import batch_indices


def stack(trees: Sequence):
    """Per-seed pytrees -> one pytree with a leading seed axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree, index: int):
    """Seed `index` of a stacked pytree."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def batch_schedule(subsets: Sequence[np.ndarray], batch_size: int, steps: int, *,
                   seeds: Sequence[int], start: int = 0) -> np.ndarray:
    """(S, steps, B) indices into the shared data: seed s walks its own subset in the
    order `auxtl.data.batch_indices(len(subset), B, seed=s, step=t)` gives, the same
    rule `auxtl.finetune` uses. B = min(batch_size, smallest subset)."""
    batch = min(batch_size, min(len(s) for s in subsets))
    return np.stack([np.stack([subset[batch_indices(len(subset), batch, seed=seed, step=t)]
                               for t in range(start, start + steps)])
                     for subset, seed in zip(subsets, seeds)])


def seed_trainer(step_fn, *, vmap: bool):
    """(states[S], inputs, labels, schedule[S, T, B]) -> states after T steps per seed.

    `step_fn(state, inputs, labels) -> (state, metrics)` is one seed's pure step;
    `inputs`/`labels` are shared by all seeds and indexed by the schedule. With
    `vmap`, one jitted step advances every seed at once (accelerators); without,
    one jitted step runs seed after seed: on XLA's CPU backend a conv vmapped over
    weights becomes a grouped conv, measured 2-4x slower than S separate steps, and
    a lax.scan over steps 2-5x slower than dispatching each step. Either way one
    compile per shape, and the host never waits between steps.
    """

    def indexed(state, inputs, labels, index):
        return step_fn(state, inputs[index], labels[index])[0]

    if vmap:
        step = jax.jit(jax.vmap(indexed, in_axes=(0, None, None, 0)), donate_argnums=0)

        def run(states, inputs, labels, schedule):
            for t in range(schedule.shape[1]):
                states = step(states, inputs, labels, schedule[:, t])
            return states
    else:
        step = jax.jit(indexed, donate_argnums=0)

        def run(states, inputs, labels, schedule):
            out = []
            for s in range(schedule.shape[0]):
                state = unstack(states, s)
                for t in range(schedule.shape[1]):
                    state = step(state, inputs, labels, schedule[s, t])
                out.append(state)
            return stack(out)

    return run


def seed_logits(logits_fn):
    """Jitted (params[S], batch_stats[S], inputs) -> logits (S, N, C), inputs shared."""
    return jax.jit(jax.vmap(logits_fn, in_axes=(0, 0, None)))


def seed_accuracies(logits, params, batch_stats, inputs, labels, *,
                    chunk: int = 1000) -> np.ndarray:
    """(S,) accuracy of each seed's model on shared (inputs, labels), in chunks."""
    correct = 0
    for i in range(0, len(inputs), chunk):
        predicted = jnp.argmax(logits(params, batch_stats, inputs[i:i + chunk]), -1)
        correct = correct + jnp.sum(predicted == jnp.asarray(labels[i:i + chunk]), axis=-1)
    return np.asarray(jax.device_get(correct)) / len(inputs)
