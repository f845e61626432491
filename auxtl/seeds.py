"""Many seeds of one configuration: per-seed trees stacked on a leading axis, advanced by
one compiled step (vmapped over seeds where that pays) on a precomputed schedule.

Seeds of one configuration share every shape (same architecture, same batch size),
so S seeds cost one compile. The data is shared: each seed's schedule holds indices
into it, so a seed's labeled subset is whatever its schedule draws from. These are the
fine-tuning engine's (`auxtl.finetune.finetune_seeds`) seed-stacking helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from auxtl import parallel
from auxtl.data import batch_indices


def stack(trees: Sequence):
    """Per-seed pytrees -> one pytree with a leading seed axis (one compiled call, not
    one per leaf: the engine stacks and unstacks its states every epoch)."""
    return _stack(list(trees))


def unstack(tree, index: int):
    """Seed `index` of a stacked pytree (one compiled call)."""
    return _unstack(tree, index)


@jax.jit
def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@jax.jit
def _unstack(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


def batch_schedule(subsets: Sequence[np.ndarray], batch_size: int, steps: int, *,
                   seeds: Sequence[int], start: int | Sequence[int] = 0) -> np.ndarray:
    """(S, steps, B) indices into the shared data: seed s walks its own subset in the
    order `auxtl.data.batch_indices(len(subset), B, seed=s, step=t)` gives for t from its
    `start` (one for all seeds, or one each), the rule `auxtl.finetune.finetune` has
    always used. B = min(batch_size, smallest subset)."""
    batch = min(batch_size, min(len(s) for s in subsets))
    starts = [start] * len(subsets) if isinstance(start, (int, np.integer)) else list(start)
    return np.stack([np.stack([subset[batch_indices(len(subset), batch, seed=seed, step=t)]
                               for t in range(first, first + steps)])
                     for subset, seed, first in zip(subsets, seeds, starts)])


def seed_runner(step_fn, *, vmap: bool, mesh=None, layout: parallel.BatchLayout | None = None):
    """(states[S], inputs, labels, schedule[S, T, B], active[S], norm) -> (states after T
    steps of each active seed, losses): inactive seeds' states come back exactly as they
    went in; losses[s] holds seed s's T per-step losses (an (S, T) device array with
    `vmap`, where an inactive seed's row is meaningless; else per-seed lists of device
    scalars, empty for an inactive seed): read them after `jax.device_get`.

    `step_fn(state, inputs, labels, norm) -> (state, metrics)` is one seed's pure step;
    `inputs`/`labels` are shared by all seeds and indexed by the schedule inside the
    compiled step. With `vmap`, one jitted step advances every seed at once
    (accelerators); without, one jitted step runs seed after seed: on XLA's CPU backend
    a conv vmapped over weights becomes a grouped conv, slower than S separate steps,
    and a lax.scan over steps slower than dispatching each step (benchmarks/NOTES.md,
    "Seeds on CPU"). Either way one compile per shape, and the host never waits between steps.

    `mesh` (a `auxtl.parallel.data_mesh`): the states and shared data are expected
    replicated on it (global arrays); the gathered batch is split over its devices
    (`parallel.constrain_batch`; a batch they do not divide runs replicated, with a
    warning) and `layout` records the split the compiled step really has.
    """
    def place(x):
        return x if mesh is None else parallel.constrain_batch(x, mesh)

    def gather(inputs, index):
        return place(inputs[index])

    def indexed(state, inputs, labels, index, norm):
        state, metrics = step_fn(state, gather(inputs, index), place(labels[index]), norm)
        return state, metrics["loss"]

    inspected = set()

    def inspect(inputs, index):
        """Compiles the step's own gather + placement once per batch shape and records
        the output sharding XLA gave it (an inspection inside the step itself, an
        effect, would cost every step the slow dispatch path)."""
        if layout is None or (index.shape, vmap) in inspected:
            return
        inspected.add((index.shape, vmap))
        fn = jax.vmap(gather, in_axes=(None, 0)) if vmap else gather
        compiled = jax.jit(fn).lower(inputs, index).compile()
        layout.note(compiled.output_shardings, int(index.shape[-1]), 1 if vmap else 0)

    if vmap:
        def guarded(state, inputs, labels, index, active, norm):
            new, loss = indexed(state, inputs, labels, index, norm)
            return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state), loss

        step = jax.jit(jax.vmap(guarded, in_axes=(0, None, None, 0, 0, None)),
                       donate_argnums=0)

        def run(states, inputs, labels, schedule, active, norm):
            losses, active = [], np.asarray(active)
            inspect(inputs, schedule[:, 0])
            for t in range(schedule.shape[1]):
                states, loss = step(states, inputs, labels, schedule[:, t], active, norm)
                losses.append(loss)
            return states, jnp.stack(losses, axis=1)   # (S, T): one array, one transfer
    else:
        step = jax.jit(indexed, donate_argnums=0)

        def run(states, inputs, labels, schedule, active, norm):
            out, losses = [], []
            inspect(inputs, schedule[0, 0])
            for s in range(schedule.shape[0]):
                state, seed_losses = unstack(states, s), []
                for t in range(schedule.shape[1] if active[s] else 0):
                    state, loss = step(state, inputs, labels, schedule[s, t], norm)
                    seed_losses.append(loss)
                out.append(state)
                losses.append(seed_losses)
            return stack(out), losses

    return run


def seed_logits(logits_fn):
    """Jitted (params[S], batch_stats[S], inputs, norm) -> logits (S, N, C), inputs shared."""
    return jax.jit(jax.vmap(logits_fn, in_axes=(0, 0, None, None)))


def seed_correct(logits, params, batch_stats, inputs, labels, norm, *, vmap: bool,
                 chunk: int = 500) -> np.ndarray:
    """(S,) count of each stacked seed's correct predictions on shared (inputs, labels),
    in chunks: `logits` is `seed_logits(...)` with `vmap`, else one seed's jitted
    (params, batch_stats, inputs, norm) -> logits, called seed after seed."""
    labels = jnp.asarray(labels)
    if vmap:
        per_seed = [lambda x: logits(params, batch_stats, x, norm)]
    else:
        trees = [(unstack(params, s), unstack(batch_stats, s))
                 for s in range(len(jax.tree.leaves(params)[0]))]
        per_seed = [lambda x, p=p, b=b: logits(p, b, x, norm)[None] for p, b in trees]
    correct = []
    for fn in per_seed:
        total = 0
        for i in range(0, len(inputs), chunk):
            total = total + jnp.sum(jnp.argmax(fn(inputs[i:i + chunk]), -1)
                                    == labels[i:i + chunk], axis=-1)
        correct.append(total)
    return np.concatenate([np.atleast_1d(np.asarray(c)) for c in jax.device_get(correct)])
