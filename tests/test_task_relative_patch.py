import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxtl
from auxtl.tasks.relative_patch import patch_positions
from conftest import tiny_config


def _images(n=64, size=28, channels=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, channels)),
                       jnp.float32)


def _step(label):
    """Label k -> (dy, dx): the k-th cell of the 3x3 grid in row-major order, centre skipped."""
    cell = label if label < 4 else label + 1
    return np.array([cell // 3 - 1, cell % 3 - 1])


def _positions(task, key, images):
    labels, centre, neighbour = patch_positions(
        key, images.shape[0], images.shape[1:3], patch=task.patch, gap=task.gap,
        jitter=task.jitter)
    return np.asarray(labels), np.asarray(centre), np.asarray(neighbour)


@pytest.mark.parametrize("params,size", [({}, 28), ({"patch": 5, "gap": 4, "jitter": 2}, 40)])
def test_patches_are_the_crops_at_the_offsets_the_label_implies(params, size):
    task = auxtl.get_task("relative_patch", **params)
    images = _images(size=size)
    key = jax.random.key(0)
    patches, labels = task.make_examples(key, images)
    same_labels, centre, neighbour = _positions(task, key, images)
    np.testing.assert_array_equal(labels, same_labels)
    p, stride, jitter = task.patch, task.patch + task.gap, task.jitter
    assert patches.shape == (64, 2, p, p, 3)
    for i in range(len(images)):
        for corner in (centre[i], neighbour[i]):
            assert corner.min() >= 0 and corner.max() + p <= size   # no clamped slice
        (cy, cx), (ny, nx) = centre[i], neighbour[i]
        image = np.asarray(images[i])
        np.testing.assert_array_equal(patches[i, 0], image[cy:cy + p, cx:cx + p])
        np.testing.assert_array_equal(patches[i, 1], image[ny:ny + p, nx:nx + p])
        residual = neighbour[i] - centre[i] - _step(labels[i]) * stride
        assert np.all(np.abs(residual) <= 2 * jitter), (i, labels[i], residual)


def test_labels_cover_all_eight_positions():
    labels, _, _ = _positions(auxtl.get_task("relative_patch"), jax.random.key(3),
                              _images(n=256, channels=1))
    assert np.bincount(labels, minlength=8).min() > 10


def test_jitter_moves_patches_and_depends_on_the_key():
    images = _images(n=256, channels=1)
    task = auxtl.get_task("relative_patch")
    stride = task.patch + task.gap
    labels, centre, neighbour = _positions(task, jax.random.key(0), images)
    steps = np.stack([_step(k) for k in labels])
    residuals = neighbour - centre - steps * stride
    assert set(np.unique(residuals).tolist()) == {-2, -1, 0, 1, 2}
    _, other_centre, _ = _positions(task, jax.random.key(1), images)
    assert not np.array_equal(centre, other_centre)
    still = auxtl.get_task("relative_patch", jitter=0)
    labels, centre, neighbour = _positions(still, jax.random.key(0), images)
    steps = np.stack([_step(k) for k in labels])
    np.testing.assert_array_equal(neighbour - centre, steps * stride)


def test_validate_says_what_size_is_needed():
    task = auxtl.get_task("relative_patch")
    task.validate((27, 27, 1))
    with pytest.raises(ValueError, match=r"at least 27x27 px .*got 26x28"):
        task.validate((26, 28, 1))
    with pytest.raises(ValueError, match=r"at least 32x32 px"):
        auxtl.get_task("relative_patch", patch=8, gap=3).validate((28, 28, 1))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="got gap 1, jitter 1"):
        auxtl.get_task("relative_patch", gap=1)
    with pytest.raises(ValueError, match="patch must be >= 1 px, got 0"):
        auxtl.get_task("relative_patch", patch=0)


def test_jitted_examples_have_static_shapes():
    task = auxtl.get_task("relative_patch")
    patches, labels = jax.jit(task.make_examples)(jax.random.key(0), jnp.zeros((5, 28, 28, 1)))
    assert patches.shape == (5, 2, 7, 7, 1) and patches.dtype == jnp.float32
    assert labels.shape == (5,) and labels.dtype == jnp.int32


def test_forward_folds_patches_into_the_batch_and_keeps_their_order():
    task = auxtl.get_task("relative_patch")
    patches, _ = task.make_examples(jax.random.key(0), _images(n=4))
    seen = {}

    def trunk(x, *, train, frozen):   # features: each patch's top-left pixel, three channels
        seen.update(shape=x.shape, train=train, frozen=frozen)
        return x[:, 0, 0, :]

    features = task.forward(trunk, lambda f: f, patches, train=False, frozen=("fc",))
    assert seen == {"shape": (8, 7, 7, 3), "train": False, "frozen": ("fc",)}
    np.testing.assert_array_equal(features, np.asarray(patches)[:, :, 0, 0, :].reshape(4, 6))


@pytest.mark.slow  # ~15-24 s alone on 2 loaded cores, most of it first-use compilation
def test_training_beats_chance_on_mnist(mnist):
    config = tiny_config(tasks=(auxtl.TaskConfig("relative_patch"),), steps=200, batch_size=32,
                         log_every=100)
    metrics = auxtl.run_pretraining(config, mnist).eval_metrics
    # chance for 8 positions: accuracy 0.125, loss ln 8 = 2.08
    assert metrics["relative_patch/accuracy"] > 0.3
    assert metrics["relative_patch/loss"] < 1.7
