"""Seed-parallel training: vmapped or seed after seed, it equals each seed's own steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from auxtl import freezing, seeds
from auxtl.data import batch_indices, compute_normalization
from auxtl.finetune import finetune_step_fn, make_finetune_step, make_logits_fn
from auxtl.freezing import Phase
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
from auxtl.train_state import TrainState

from conftest import TINY_TRUNK


def test_batch_schedule_walks_each_seeds_subset_like_finetune():
    subsets = [np.array([3, 5, 7, 9, 11]), np.array([0, 2, 4, 6, 8, 10])]
    schedule = seeds.batch_schedule(subsets, 4, 6, seeds=(0, 1), start=2)
    assert schedule.shape == (2, 6, 4)
    for s, subset in enumerate(subsets):
        assert set(schedule[s].ravel()) <= set(subset)
        for t in range(6):
            np.testing.assert_array_equal(
                schedule[s, t], subset[batch_indices(len(subset), 4, seed=s, step=t + 2)])


def test_vmapped_scan_equals_sequential_steps_per_seed(mnist_small):
    images, labels = mnist_small.images[:64], mnist_small.labels[:64]
    norm = compute_normalization(images)
    models = [TransferModel(build_target_trunk("small_cnn", {"in_channels": 1, **TINY_TRUNK},
                                               TargetSpec(reuse=4, top="replace"),
                                               rngs=nnx.Rngs(s)), 10, rngs=nnx.Rngs(s))
              for s in (0, 1)]
    graphdef, params, stats = nnx.split(models[0], nnx.Param, nnx.BatchStat)
    names = models[0].trunk.layer_names
    phase = Phase(3, "head+top1")
    group_labels = freezing.phase_labels(nnx.to_pure_dict(params), names, 4, phase)
    mask = freezing.trainable_mask(group_labels)
    frozen = freezing.frozen_layer_names(names, 4, phase)
    optimizer = freezing.partitioned_optimizer(
        group_labels, freezing.group_learning_rates(1e-2, phase, names[:4]))
    subsets = [np.arange(0, 40), np.arange(20, 64)]
    schedule = seeds.batch_schedule(subsets, 8, 3, seeds=(0, 1))

    def state_of(model, seed):   # copies: the sequential step donates its state
        p = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return TrainState(step=jnp.asarray(0, jnp.int32), params=p,
                          batch_stats=jax.tree.map(jnp.copy, nnx.to_pure_dict(
                              nnx.state(model, nnx.BatchStat))),
                          opt_state=optimizer.init(p),
                          rng=jax.random.key_data(jax.random.key(seed)))

    fn = finetune_step_fn(graphdef, mask, frozen, optimizer, 0, norm)
    together, in_turn = (seeds.seed_trainer(fn, vmap=vmap)(
        seeds.stack([state_of(m, s) for s, m in enumerate(models)]), jnp.asarray(images),
        jnp.asarray(labels), jnp.asarray(schedule)) for vmap in (True, False))

    step = make_finetune_step(graphdef, mask, frozen, optimizer, 0, norm)
    for s, model in enumerate(models):
        state = state_of(model, s)
        for t in range(3):
            state, _ = step(state, images[schedule[s, t]], labels[schedule[s, t]])
        for run in (together, in_turn):
            alone = seeds.unstack(run, s)
            assert int(alone.step) == 3
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.params)):
                np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        frozen_kernel = state.params["trunk"]["layers"][0]["conv"]["kernel"]
        np.testing.assert_array_equal(frozen_kernel, nnx.to_pure_dict(nnx.state(
            model, nnx.Param))["trunk"]["layers"][0]["conv"]["kernel"])

    logits = seeds.seed_logits(make_logits_fn(graphdef, 0, norm))
    accuracy = seeds.seed_accuracies(logits, together.params, together.batch_stats, images,
                                     labels, chunk=24)
    for s in range(2):
        alone = seeds.unstack(together, s)
        predicted = np.argmax(make_logits_fn(graphdef, 0, norm)(
            alone.params, alone.batch_stats, images), -1)
        assert accuracy[s] == np.mean(predicted == labels)
