"""The jitted pretraining step and evaluation step over plain pytrees.

The step takes (state, raw images) and returns (new state, metrics). The state
holds params, batch statistics, optimizer state, the step count and the base
PRNG key; the step's key is fold_in(base key, step), so a run is fixed by its
seed and a resumed run continues exactly. Auxiliary labels are made inside the
step from that key; the host only feeds raw images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from auxtl.data import Normalization, normalize
from auxtl.errors import InputError
from auxtl.pretrain_model import WeightedTask
from auxtl.train_state import TrainState


def split_model(model: nnx.Module):
    """(graphdef, params, batch_stats) with params and stats as plain nested dicts."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def init_state(params, batch_stats, optimizer: optax.GradientTransformation,
               seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


# The train step's metrics carry, under this key, what the host needs to stop a run
# that diverged: each task's weighted loss term and whether the new state is finite.
HEALTH = "_health"


def all_finite(tree) -> jax.Array:
    """One boolean: every floating-point leaf of `tree` is free of NaN and Inf."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def task_losses(model, tasks: Sequence[WeightedTask], images: jax.Array, key: jax.Array,
                *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of task losses and per-task metrics named 'task/metric'."""
    total, metrics, _ = _task_losses(model, tasks, images, key, train=train)
    return total, metrics


def _task_losses(model, tasks, images, key, *, train):
    """task_losses, plus each task's term of the total (for the finiteness check)."""
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    terms: dict[str, jax.Array] = {}
    for index, weighted in enumerate(tasks):
        task_key = jax.random.fold_in(key, index)
        inputs, targets = weighted.task.make_examples(task_key, images)
        outputs = weighted.task.forward(model.trunk, model.heads[weighted.name], inputs,
                                        train=train)
        loss, task_metrics = weighted.task.loss_and_metrics(outputs, targets)
        metrics.update({f"{weighted.name}/{k}": v for k, v in task_metrics.items()})
        if getattr(model, "log_vars", None) is not None:
            log_var = model.log_vars[weighted.name][...]
            loss = jnp.exp(-log_var) * loss + log_var
            metrics[f"{weighted.name}/learned_weight"] = jnp.exp(-log_var)
        terms[weighted.name] = weighted.weight * loss
        total = total + terms[weighted.name]
    metrics["loss"] = total
    return total, metrics, terms


def make_train_step(graphdef, tasks: Sequence[WeightedTask],
                    optimizer: optax.GradientTransformation,
                    normalization: Normalization, *, health: bool = False) -> Callable:
    """The jitted step (state, images) -> (state, metrics); the state's buffers are donated.

    With `health`, metrics[HEALTH] holds {"losses": {task: its weighted loss term},
    "state_finite": bool}, computed on device so the host can check finiteness when it
    next syncs (the pretraining run's NaN/Inf stop); otherwise metrics are flat scalars.
    """
    tasks = tuple(tasks)

    def step(state: TrainState, images: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        x = normalize(images, normalization)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.batch_stats)
            loss, metrics, terms = _task_losses(model, tasks, x, key, train=True)
            new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
            return loss, (metrics, terms, new_stats)

        grads, (metrics, terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=batch_stats, opt_state=opt_state)
        if health:
            metrics[HEALTH] = {"losses": terms,
                               "state_finite": all_finite((params, batch_stats, opt_state))}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef, tasks: Sequence[WeightedTask],
                   normalization: Normalization) -> Callable:
    """Jitted (params, batch_stats, images, key) -> metrics, BatchNorm in inference mode."""
    tasks = tuple(tasks)

    def eval_step(params, batch_stats, images, key):
        model = nnx.merge(graphdef, params, batch_stats)
        _, metrics = task_losses(model, tasks, normalize(images, normalization), key,
                                 train=False)
        return metrics

    return jax.jit(eval_step)


def evaluate(eval_step: Callable, params, batch_stats, images, *, batch_size: int,
             seed: int = 0) -> dict[str, float]:
    """Example-weighted mean of each metric over `images` in batches (host numpy in)."""
    if len(images) == 0:
        raise InputError("cannot evaluate on an empty set of images")
    key = jax.random.key(seed)
    starts = range(0, len(images), batch_size)
    per_chunk = jax.device_get([  # dispatch every chunk, then one transfer to the host
        eval_step(params, batch_stats, images[s:s + batch_size], jax.random.fold_in(key, i))
        for i, s in enumerate(starts)])
    sizes = [min(batch_size, len(images) - s) for s in starts]  # (lazy images: no re-read)
    return {name: sum(float(m[name]) * n for m, n in zip(per_chunk, sizes)) / len(images)
            for name in per_chunk[0]}
