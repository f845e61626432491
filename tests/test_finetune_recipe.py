"""Fine-tuning recipes: augmentation inside the compiled step, per-phase schedules that
restart, and a minimum number of steps per epoch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from auxtl import cli, recipes
from auxtl import finetune as ft
from auxtl import freezing, optim
from auxtl.errors import InputError
from auxtl.finetune_step import (augment_images, augment_key, default_max_shift, draw_shifts,
                                 finetune_step_fn, norm_stats, shift_images)
from auxtl.freezing import Phase
from auxtl.train_state import TrainState
from conftest import leaves_equal
import test_finetune
from test_finetune import small_model, snapshot

data = test_finetune.data   # the same module-scoped fixture: 300 MNIST images split three ways



def images(count=6, size=8, channels=3):
    return np.asarray(jax.random.uniform(jax.random.key(9), (count, size, size, channels)),
                      np.float32)


def numpy_shift(image, dy, dx, m):
    padded = np.pad(image, ((m, m), (m, m), (0, 0)), mode="edge")
    return padded[m + dy:m + dy + image.shape[0], m + dx:m + dx + image.shape[1]]


# ---- augmentation ---------------------------------------------------------------------

def test_default_max_shift_is_a_tenth_of_the_shorter_side_at_least_one():
    assert default_max_shift(28, 28) == 3 and default_max_shift(32, 40) == 3
    assert default_max_shift(8, 8) == 1 and default_max_shift(4, 4) == 1


def test_shifts_stay_within_max_shift_and_cover_it():
    shifts = np.asarray(draw_shifts(jax.random.key(0), 2000, 3))
    assert shifts.shape == (2000, 2) and np.abs(shifts).max() == 3
    assert set(np.unique(shifts)) == set(range(-3, 4))


@pytest.mark.parametrize("m", [1, 2, 3])
def test_shifted_images_equal_a_numpy_pad_and_crop_of_the_drawn_offsets(m):
    x = images()
    key = jax.random.key(m)
    out = np.asarray(augment_images(key, x, "shift", m))
    shifts = np.asarray(draw_shifts(jax.random.split(key)[0], len(x), m))
    assert out.shape == x.shape and out.dtype == x.dtype
    for i, (dy, dx) in enumerate(shifts):     # image i stays at index i: its label is kept
        assert np.array_equal(out[i], numpy_shift(x[i], dy, dx, m)), (i, dy, dx)
    assert np.array_equal(np.asarray(shift_images(x, jnp.zeros((len(x), 2), jnp.int32), m)), x)


def test_flips_mirror_some_images_and_keep_the_others_in_place():
    x = images(count=64)
    out = np.asarray(augment_images(jax.random.key(1), x, "flip", 1))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)
    assert np.array_equal(np.asarray(augment_images(jax.random.key(1), x, "none", 1)), x)
    both = np.asarray(augment_images(jax.random.key(1), x, "shift+flip", 2))
    assert both.shape == x.shape


def test_integer_images_are_augmented_as_integers():
    x = (images() * 255).astype(np.uint8)
    out = augment_images(jax.random.key(2), x, "shift+flip", 1)
    assert out.dtype == np.uint8 and out.shape == x.shape


def test_augmentation_keys_follow_the_seed_and_the_step():
    x = images()
    states = [TrainState(step=jnp.int32(t), params=None, batch_stats=None, opt_state=None,
                         rng=jax.random.key_data(jax.random.key(s))) for s, t in
              [(0, 0), (0, 0), (1, 0), (0, 1)]]
    outs = [np.asarray(augment_images(augment_key(s), x, "shift+flip", 2)) for s in states]
    assert np.array_equal(outs[0], outs[1])                  # same seed, same step
    assert not np.array_equal(outs[0], outs[2])              # another seed
    assert not np.array_equal(outs[0], outs[3])              # the next step
    stacked = jax.tree.map(lambda *v: jnp.stack(v), states[0], states[2])
    vmapped = np.asarray(jax.vmap(lambda s: augment_images(augment_key(s), x, "shift+flip",
                                                           2))(stacked))
    assert np.array_equal(vmapped[0], outs[0]) and np.array_equal(vmapped[1], outs[2])


def test_unknown_augmentation_is_refused():
    with pytest.raises(InputError, match="--augment"):
        ft.FinetuneConfig(augment="rotate")
    with pytest.raises(InputError, match="max_shift"):
        ft.FinetuneConfig(augment="shift", max_shift=0)


def plan(model, phase=Phase(1, "head"), **kwargs):
    graphdef, params, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    defaults = dict(learning_rate=1e-2, weight_decay=1e-4)
    return graphdef, freezing.plan_phase(nnx.to_pure_dict(params), model.trunk.layer_names, 6,
                                         phase, **{**defaults, **kwargs})


def test_augmentation_plans_without_the_frozen_prefix_cache():
    model = small_model()
    _, cached = plan(model)
    _, augmented = plan(model, augment="shift", max_shift=2)
    assert cached.start == 6 and augmented.start == 0   # every trunk layer frozen
    assert augmented.augment == ("shift", 2) and cached.augment == ("none", 0)
    assert augmented.frozen == cached.frozen     # the same layers stay frozen
    with pytest.raises(InputError, match="cache_prefix=False"):
        finetune_step_fn(plan(model)[0], dataclasses.replace(cached, augment=("flip", 0)))


def test_the_step_trains_on_augmented_images_drawn_from_its_key(data):
    model = small_model()
    graphdef, augmented = plan(model, augment="shift+flip", max_shift=3)
    _, plain = plan(model, cache_prefix=False)
    params, stats = snapshot(model)
    x, y = data["train"][0][:16], data["train"][1][:16]
    norm = norm_stats(data["normalization"])

    def state(seed):
        return TrainState(step=jnp.int32(0), params=params, batch_stats=stats,
                          opt_state=augmented.optimizer.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)))

    step = jax.jit(finetune_step_fn(graphdef, augmented))
    reference = jax.jit(finetune_step_fn(graphdef, plain))
    a, b, c = (step(state(s), x, y, norm)[0].params for s in (0, 0, 1))
    assert leaves_equal(a, b) and not leaves_equal(a, c)
    by_hand = augment_images(augment_key(state(0)), x, "shift+flip", 3)
    assert leaves_equal(a, reference(state(0), by_hand, y, norm)[0].params)


def test_augmented_runs_repeat_by_seed_keep_frozen_layers_and_validate_plainly(data):
    config = ft.FinetuneConfig(phases=(Phase(2, "head"), Phase(1, "head+top2", 0.1)),
                               batch_size=20, augment="shift+flip")
    params0, stats0 = snapshot(small_model())
    first = ft.finetune(small_model(), 6, config, **data)
    again = ft.finetune(small_model(), 6, config, **data)
    other = ft.finetune(small_model(), 6, dataclasses.replace(config, seed=1), **data)
    plain = ft.finetune(small_model(), 6, dataclasses.replace(config, augment="none"), **data)
    assert leaves_equal(first.params, again.params) and first.history == again.history
    assert not leaves_equal(first.params, other.params)
    assert not leaves_equal(first.params, plain.params)
    for i in range(4):       # conv1..conv4 frozen throughout: untouched, statistics too
        assert leaves_equal(first.params["trunk"]["layers"][i], params0["trunk"]["layers"][i])
        assert leaves_equal(first.batch_stats["trunk"]["layers"][i],
                            stats0["trunk"]["layers"][i])
    # validation and test score the kept parameters on the images as they are
    model = small_model()
    for split, got in (("val", first.best_val_accuracy), ("test", first.test_accuracy)):
        assert got == ft.score(model, first, *data[split],
                               normalization=data["normalization"])


# ---- schedules ------------------------------------------------------------------------

def test_phase_schedule_warms_up_then_reaches_zero_at_the_phase_end():
    schedule = optim.phase_schedule(0.1, "cosine", 0.2, 10)
    values = np.array([float(schedule(t)) for t in range(11)])
    assert values[0] == 0.0 and values[2] == pytest.approx(0.1)
    assert np.all(np.diff(values[:3]) > 0) and np.all(np.diff(values[2:]) < 0)
    assert values[9] > 0 and values[10] == 0.0
    assert optim.phase_schedule(0.1, "constant", 0.0, 10) == 0.1   # a float: no state
    constant = optim.phase_schedule(0.1, "constant", 0.5, 10)
    assert float(constant(0)) == 0.0
    assert float(constant(5)) == float(constant(9)) == np.float32(0.1)
    with pytest.raises(InputError, match="warmup"):
        optim.phase_schedule(0.1, "cosine", 1.0, 10)
    with pytest.raises(InputError, match="schedule"):
        optim.phase_schedule(0.1, "step", 0.0, 10)


def test_a_cosine_phase_ends_at_zero_and_the_next_phase_restarts():
    """Updates along two phases of T steps: the rate at count T (the phase's end) is 0,
    so an update there is exactly zero; the head's state carried into the next phase
    restarts its schedule (a non-zero first update) while Adam's moments carry over."""
    model = small_model()
    params, _ = snapshot(model)
    grads = jax.tree.map(np.ones_like, params)
    total = 5
    _, first = plan(model, Phase(1, "head"), schedule="cosine", total_steps=total)
    state = first.optimizer.init(params)
    for _ in range(total):
        updates, state = first.optimizer.update(grads, state, params)
    assert any(np.any(u != 0) for u in jax.tree.leaves(updates["head"]))  # last step: > 0
    head = state.inner_states["head"]
    counts = [s.count for s in jax.tree.leaves(
        head, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
        if isinstance(s, optax.ScaleByScheduleState)]
    assert counts and all(int(c) == total for c in counts)
    past_end, _ = first.optimizer.update(grads, state, params)
    assert all(np.all(u == 0) for u in jax.tree.leaves(past_end["head"]))  # end value 0
    _, second = plan(model, Phase(1, "head+top2", 0.1), schedule="cosine", total_steps=3)
    carried = freezing.carry_over_state(state, first.labels,
                                        second.optimizer.init(params), second.labels)
    adam = carried.inner_states["head"].inner_state[0]
    assert int(adam.count) == total            # moments and bias correction carried
    assert leaves_equal(adam.mu, state.inner_states["head"].inner_state[0].mu)
    restarted, _ = second.optimizer.update(grads, carried, params)
    assert all(np.all(u != 0) for u in jax.tree.leaves(restarted["head"]))


def test_phase_plan_keys_name_the_schedule_and_the_augmentation():
    model = small_model()
    key = lambda **kw: plan(model, **kw)[1].key  # noqa: E731
    base = key()
    assert key(total_steps=9) == base      # a constant rate does not depend on the length
    keys = [base, key(schedule="cosine", total_steps=9), key(schedule="cosine", total_steps=8),
            key(schedule="cosine", total_steps=9, warmup=0.1), key(warmup=0.1, total_steps=9),
            key(augment="flip"), key(augment="shift", max_shift=1),
            key(augment="shift", max_shift=2)]
    assert len(set(keys)) == len(keys)


# ---- the engine: phase lengths and epochs ---------------------------------------------

def recorded_plans(monkeypatch):
    calls = []
    real = freezing.plan_phase

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(freezing, "plan_phase", recording)
    return calls


def test_min_steps_per_epoch_sets_the_epoch_and_the_phase_schedule_length(data, monkeypatch):
    calls = recorded_plans(monkeypatch)
    x, y = data["train"]
    small = (x[:10], y[:10])     # 10 labeled images: one batch, one step an epoch by default
    config = ft.FinetuneConfig(phases=(Phase(2, "head"), Phase(3, "head+top2", 0.1)),
                               batch_size=32, min_steps_per_epoch=4, schedule="cosine",
                               warmup=0.25)
    result = ft.finetune(small_model(), 6, config, train=small, val=data["val"],
                         normalization=data["normalization"])
    assert [h["step"] for h in result.history] == [4, 8, 12, 16, 20]   # validated each epoch
    assert [c["total_steps"] for c in calls] == [8, 12]
    assert all((c["schedule"], c["warmup"]) == ("cosine", 0.25) for c in calls)
    default = ft.finetune(small_model(), 6, dataclasses.replace(config, min_steps_per_epoch=1),
                          train=small, val=data["val"], normalization=data["normalization"])
    assert [h["step"] for h in default.history] == [1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="--min-steps-per-epoch"):
        ft.FinetuneConfig(min_steps_per_epoch=0)


def test_step_phases_schedule_over_their_steps(data, monkeypatch):
    calls = recorded_plans(monkeypatch)
    config = ft.FinetuneConfig(phases=(Phase(steps=3), Phase(steps=2, train="head+top2")),
                               batch_size=20, schedule="cosine", augment="flip")
    ft.finetune_seeds([small_model(0), small_model(1)], 6, config, images=data["train"][0],
                      labels=data["train"][1], subsets=[np.arange(50), np.arange(50, 100)],
                      seeds=[0, 1], normalization=data["normalization"], vmap=True)
    assert [c["total_steps"] for c in calls] == [3, 2]
    assert all(c["augment"] == "flip" and c["max_shift"] == 3 for c in calls)


def test_transfer_flags_reach_the_finetune_config():
    parse = lambda *flags: cli.transfer_config_from_args(  # noqa: E731
        cli.build_parser().parse_args(["transfer", "--trunk", "t", *flags])).finetune
    config = parse("--augment", "shift+flip", "--schedule", "cosine", "--warmup", "0.1",
                   "--min-steps-per-epoch", "4")
    assert (config.augment, config.schedule, config.warmup, config.min_steps_per_epoch) == (
        "shift+flip", "cosine", 0.1, 4)
    defaults = parse()
    assert defaults == dataclasses.replace(recipes.finetune_recipe(), cache_features=True)
    assert (defaults.augment, defaults.schedule, defaults.head_init) == ("shift", "cosine",
                                                                          "ridge")
    assert parse("--head-init", "random", "--max-steps-per-epoch", "30").head_init == "random"
    with pytest.raises(InputError, match="--warmup"):
        parse("--warmup", "1.5")
