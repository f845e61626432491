"""Seed-parallel training: seed after seed it equals each seed's own steps bit for bit;
vmapped, a seed marked inactive comes back exactly as it went in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from auxtl import freezing, seeds
from auxtl.data import batch_indices, compute_normalization
from auxtl.finetune import make_finetune_step, make_logits_fn, norm_stats
from auxtl.finetune_step import finetune_step_fn, logits_fn
from auxtl.freezing import Phase
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
from auxtl.train_state import TrainState

from conftest import TINY_TRUNK, leaves_equal


def test_batch_schedule_walks_each_seeds_subset_like_finetune():
    subsets = [np.array([3, 5, 7, 9, 11]), np.array([0, 2, 4, 6, 8, 10])]
    schedule = seeds.batch_schedule(subsets, 4, 6, seeds=(0, 1), start=2)
    assert schedule.shape == (2, 6, 4)
    for s, subset in enumerate(subsets):
        assert set(schedule[s].ravel()) <= set(subset)
        for t in range(6):
            np.testing.assert_array_equal(
                schedule[s, t], subset[batch_indices(len(subset), 4, seed=s, step=t + 2)])
    per_seed = seeds.batch_schedule(subsets, 4, 2, seeds=(0, 1), start=[1, 5])
    np.testing.assert_array_equal(per_seed[0], np.stack(
        [subsets[0][batch_indices(5, 4, seed=0, step=t)] for t in (1, 2)]))
    np.testing.assert_array_equal(per_seed[1], schedule[1, 3:5])


def setup(mnist_small):
    images, labels = mnist_small.images[:64], mnist_small.labels[:64]
    norm = norm_stats(compute_normalization(images))
    models = [TransferModel(build_target_trunk("small_cnn", {"in_channels": 1, **TINY_TRUNK},
                                               TargetSpec(reuse=4, top="replace"),
                                               rngs=nnx.Rngs(s)), 10, rngs=nnx.Rngs(s))
              for s in (0, 1)]
    graphdef, params, _ = nnx.split(models[0], nnx.Param, nnx.BatchStat)
    plan = freezing.plan_phase(nnx.to_pure_dict(params), models[0].trunk.layer_names, 4,
                               Phase(3, "head+top1"), learning_rate=1e-2, weight_decay=1e-4,
                               cache_prefix=False)

    def state_of(model, seed):   # copies: the steps donate their state
        p = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return TrainState(step=jnp.asarray(0, jnp.int32), params=p,
                          batch_stats=jax.tree.map(jnp.copy, nnx.to_pure_dict(
                              nnx.state(model, nnx.BatchStat))),
                          opt_state=plan.optimizer.init(p),
                          rng=jax.random.key_data(jax.random.key(seed)))

    return images, labels, norm, models, graphdef, plan, state_of


def test_seed_after_seed_equals_each_seeds_own_steps(mnist_small):
    images, labels, norm, models, graphdef, plan, state_of = setup(mnist_small)
    schedule = seeds.batch_schedule([np.arange(0, 40), np.arange(20, 60)], 8, 3, seeds=(0, 1))
    run = seeds.seed_runner(finetune_step_fn(graphdef, plan), vmap=False)
    in_turn, losses = run(seeds.stack([state_of(m, s) for s, m in enumerate(models)]),
                          jnp.asarray(images), jnp.asarray(labels), schedule,
                          np.array([True, True]), norm)
    step = make_finetune_step(graphdef, plan)
    for s, model in enumerate(models):
        state = state_of(model, s)
        for t in range(3):
            state, metrics = step(state, images[schedule[s, t]], labels[schedule[s, t]], norm)
            assert float(metrics["loss"]) == float(losses[s][t])
        alone = seeds.unstack(in_turn, s)
        assert int(alone.step) == 3
        assert leaves_equal(state.params, alone.params)
        assert leaves_equal(state.batch_stats, alone.batch_stats)
        frozen_kernel = state.params["trunk"]["layers"][0]["conv"]["kernel"]
        np.testing.assert_array_equal(frozen_kernel, nnx.to_pure_dict(nnx.state(
            model, nnx.Param))["trunk"]["layers"][0]["conv"]["kernel"])

    correct = seeds.seed_correct(make_logits_fn(graphdef, 0), in_turn.params,
                                 in_turn.batch_stats, images, labels, norm, vmap=False, chunk=24)
    for s in range(2):
        alone = seeds.unstack(in_turn, s)
        predicted = np.argmax(make_logits_fn(graphdef, 0)(alone.params, alone.batch_stats,
                                                          images, norm), -1)
        assert correct[s] == np.sum(predicted == labels)


def test_vmapped_runner_leaves_an_inactive_seed_exactly_as_it_was(mnist_small):
    images, labels, norm, models, graphdef, plan, state_of = setup(mnist_small)
    schedule = seeds.batch_schedule([np.arange(0, 40), np.arange(20, 60)], 8, 2, seeds=(0, 1))
    before = jax.tree.map(np.array, seeds.stack([state_of(m, s) for s, m in enumerate(models)]))
    run = seeds.seed_runner(finetune_step_fn(graphdef, plan), vmap=True)
    after, losses = run(jax.tree.map(jnp.asarray, before), jnp.asarray(images),
                        jnp.asarray(labels), schedule, np.array([False, True]), norm)
    assert leaves_equal(seeds.unstack(after, 0), seeds.unstack(before, 0))
    assert not leaves_equal(seeds.unstack(after, 1).params, seeds.unstack(before, 1).params)
    assert np.shape(jax.device_get(losses)) == (2, 2)   # (seeds, steps)
    assert np.isfinite(jax.device_get(losses)[1]).all()
    assert list(np.asarray(after.step)) == [0, 2]
    logits = seeds.seed_logits(logits_fn(graphdef, 0))
    correct = seeds.seed_correct(logits, after.params, after.batch_stats, images, labels, norm,
                                 vmap=True, chunk=24)
    assert correct.shape == (2,) and 0 <= correct.min() and correct.max() <= len(labels)
