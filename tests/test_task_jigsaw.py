import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxtl
from auxtl.tasks.jigsaw import permutation_set
from conftest import tiny_config


def _images(n=6, size=12, channels=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, channels)),
                       jnp.float32)


def _stitch(tiles, grid):
    """Places tiles[k] at row k // grid, column k % grid (numpy, independent of the task)."""
    rows = [np.concatenate(list(tiles[r * grid:(r + 1) * grid]), axis=1) for r in range(grid)]
    return np.concatenate(rows, axis=0)


@pytest.mark.parametrize("grid", [2, 3])
def test_unshuffling_by_the_labels_permutation_gives_back_the_image(grid):
    task = auxtl.get_task("jigsaw", grid=grid)
    images = _images(n=40)
    tiles, labels = task.make_examples(jax.random.key(0), images)
    tiles, labels = np.asarray(tiles), np.asarray(labels)
    assert tiles.shape == (40, grid * grid, 12 // grid, 12 // grid, 2)
    changed = 0
    for i in range(len(images)):
        order = task.permutations[labels[i]]
        original = np.empty_like(tiles[i])
        original[order] = tiles[i]          # shuffled position k holds original tile order[k]
        np.testing.assert_array_equal(_stitch(original, grid), images[i])
        changed += not np.array_equal(_stitch(tiles[i], grid), images[i])
    # Guards against a no-op shuffle: only the identity (label 0) leaves the image intact.
    assert changed == np.sum(labels != 0) > 30
    assert len(set(labels.tolist())) > 15


def test_labels_depend_on_the_key():
    task = auxtl.get_task("jigsaw")
    _, first = task.make_examples(jax.random.key(1), _images(n=32))
    _, second = task.make_examples(jax.random.key(2), _images(n=32))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("grid,count,min_distance", [(2, 24, 2), (2, 6, 3), (3, 64, 7),
                                                     (3, 100, 6), (4, 12, 15)])
def test_permutation_set_is_distinct_and_spread_out(grid, count, min_distance):
    perms = permutation_set(grid, count)
    n = grid * grid
    assert perms.shape == (count, n)
    assert np.array_equal(perms[0], np.arange(n))
    assert all(sorted(p.tolist()) == list(range(n)) for p in perms)
    assert len({tuple(p) for p in perms}) == count
    distances = [np.sum(a != b) for a, b in itertools.combinations(perms, 2)]
    assert min(distances) == min_distance


def test_permutation_set_is_deterministic_and_read_only():
    permutation_set.cache_clear()
    first = permutation_set(3, 64).copy()
    permutation_set.cache_clear()
    np.testing.assert_array_equal(permutation_set(3, 64), first)
    with pytest.raises(ValueError):
        permutation_set(3, 64)[0, 0] = 5


def test_defaults_are_resolved_and_saved():
    assert auxtl.get_task("jigsaw").params() == {"grid": 2, "num_permutations": 24,
                                                 "hidden": 128}
    assert auxtl.get_task("jigsaw", grid=3).params()["num_permutations"] == 64


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match=r"num_permutations must be in \[1, 24\].*got 25"):
        auxtl.get_task("jigsaw", num_permutations=25)
    with pytest.raises(ValueError, match="grid must be >= 2, got 1"):
        auxtl.get_task("jigsaw", grid=1)


def test_tiles_too_small_for_the_trunk_are_refused_at_build_time():
    tasks = [auxtl.WeightedTask("jigsaw", auxtl.get_task("jigsaw", grid=3))]
    config = auxtl.make_config("small_cnn", (9, 9, 1), widths=(4, 4, 4, 4, 4), fc_dim=4)
    with pytest.raises(ValueError, match="a 3x3 px input is too small; layer 'conv4' leaves 0x0"):
        auxtl.build_pretrain_model("small_cnn", config, tasks, (9, 9, 1), seed=0)


def test_validate_names_the_size_that_does_not_fit():
    with pytest.raises(ValueError, match="height divisible by 3, got 28"):
        auxtl.get_task("jigsaw", grid=3).validate((28, 27, 1))
    with pytest.raises(ValueError, match="width divisible by 2, got 27"):
        auxtl.get_task("jigsaw").validate((28, 27, 1))
    auxtl.get_task("jigsaw", grid=3).validate((27, 27, 1))


def test_jitted_examples_have_static_shapes():
    task = auxtl.get_task("jigsaw")
    tiles, labels = jax.jit(task.make_examples)(jax.random.key(0), jnp.zeros((5, 28, 28, 1)))
    assert tiles.shape == (5, 4, 14, 14, 1) and tiles.dtype == jnp.float32
    assert labels.shape == (5,) and labels.dtype == jnp.int32


def test_forward_folds_tiles_into_the_batch_and_keeps_their_order():
    task = auxtl.get_task("jigsaw", grid=3)
    tiles, _ = task.make_examples(jax.random.key(0), _images(n=3, size=27))
    seen = {}

    def trunk(x, *, train, frozen):   # features: each tile's top-left pixel, both channels
        seen.update(shape=x.shape, train=train, frozen=frozen)
        return x[:, 0, 0, :]

    features = task.forward(trunk, lambda f: f, tiles, train=True, frozen=("conv1",))
    assert seen == {"shape": (27, 9, 9, 2), "train": True, "frozen": ("conv1",)}
    np.testing.assert_array_equal(features, np.asarray(tiles)[:, :, 0, 0, :].reshape(3, 18))


@pytest.mark.slow  # ~15-24 s alone on 2 loaded cores, most of it first-use compilation
def test_training_solves_2x2_puzzles_on_mnist(mnist):
    config = tiny_config(tasks=(auxtl.TaskConfig("jigsaw"),), steps=80, batch_size=32,
                         log_every=40)
    metrics = auxtl.run_pretraining(config, mnist).eval_metrics
    # chance for 24 permutations: accuracy 0.042, loss ln 24 = 3.18
    assert metrics["jigsaw/accuracy"] > 0.5
    assert metrics["jigsaw/loss"] < 0.5 * math.log(24)
