import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxtl
from auxtl.tasks.contrastive import nt_xent, random_rotation
from auxtl.pretrain_step import evaluate, make_eval_step, split_model
from conftest import tiny_config


def _images(n=6, size=12):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, size, size, 1)), jnp.float32)


def _nt_xent_reference(z1, z2, temperature):
    """NT-Xent with plain loops: view k's positive is view (k + B) mod 2B."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    n = len(z)
    loss, hits = 0.0, 0
    for k in range(n):
        positive = (k + n // 2) % n
        sims = {j: float(z[k] @ z[j]) / (np.linalg.norm(z[k]) * np.linalg.norm(z[j]))
                for j in range(n) if j != k}
        denominator = sum(math.exp(s / temperature) for s in sims.values())
        loss += -math.log(math.exp(sims[positive] / temperature) / denominator)
        hits += max(sims, key=sims.get) == positive
    return loss / n, hits / n


def test_nt_xent_matches_a_hand_computed_value():
    z1 = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], np.float32)
    z2 = np.array([[2.0, 0.5], [1.0, 1.0], [-0.5, 1.0]], np.float32)  # image 2's views disagree
    for temperature in (0.5, 0.1):
        expected_loss, expected_accuracy = _nt_xent_reference(z1, z2, temperature)
        loss, accuracy = nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature)
        np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
        assert float(accuracy) == pytest.approx(expected_accuracy)
    assert 0 < expected_accuracy < 1   # the example has both hits and misses


def test_the_two_views_differ_and_depend_on_the_key():
    task = auxtl.get_task("contrastive")
    images = _images()
    views, _ = jax.jit(task.make_examples)(jax.random.key(0), images)
    assert views.shape == (12, 12, 12, 1)
    first, second = np.asarray(views[:6]), np.asarray(views[6:])
    for i in range(6):
        assert not np.allclose(first[i], second[i], atol=1e-3)
    again, _ = task.make_examples(jax.random.key(0), images)
    other, _ = task.make_examples(jax.random.key(1), images)
    np.testing.assert_allclose(np.asarray(again), np.asarray(views), atol=1e-5)
    assert not np.allclose(np.asarray(other), np.asarray(views), atol=1e-3)


def test_views_are_crops_of_their_own_image():
    # Without noise each view is a resized crop, so it correlates with its own image.
    task = auxtl.get_task("contrastive", noise_std=0.0, min_scale=0.8)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(6, 12, 12, 1)), jnp.float32)
    images = jax.image.resize(images, (6, 24, 24, 1), "linear")   # smooth, so crops correlate
    views, _ = task.make_examples(jax.random.key(3), images)
    flat = lambda a: np.asarray(a).reshape(len(a), -1)
    corr = np.corrcoef(flat(views), flat(images))[:12, 12:]
    assert (np.argmax(corr, axis=1) == np.tile(np.arange(6), 2)).all()


def test_flip_mirrors_some_views():
    ramp = jnp.tile(jnp.arange(8.0)[None, None, :, None], (16, 8, 1, 1))
    task = auxtl.get_task("contrastive", flip=True, noise_std=0.0, min_scale=1.0)
    views, _ = task.make_examples(jax.random.key(0), ramp)
    slope = np.sign(np.asarray(views[:, 4, -1, 0] - views[:, 4, 0, 0]))
    assert set(slope.tolist()) == {-1.0, 1.0}


def test_bad_inputs_and_parameters_are_named():
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        auxtl.get_task("contrastive", temperature=0)
    with pytest.raises(ValueError, match=r"min_scale must be in \(0, 1\], got 1.5"):
        auxtl.get_task("contrastive", min_scale=1.5)


def _initial_eval(config, dataset):
    """Held-out metrics of the untrained model that `config` starts from."""
    train_set, test_set = auxtl.train_test_split(dataset, test_fraction=config.test_fraction,
                                                 seed=0)
    tasks = [auxtl.WeightedTask("contrastive", auxtl.get_task("contrastive"))]
    shape = train_set.image_shape
    model = auxtl.build_pretrain_model(
        config.model, auxtl.make_config(config.model, shape, **config.model_overrides),
        tasks, shape, seed=config.seed)
    graphdef, params, stats = split_model(model)
    step = make_eval_step(graphdef, tasks, auxtl.data.compute_normalization(train_set.images))
    return evaluate(step, params, stats, test_set.images, batch_size=config.eval_batch_size)


@pytest.mark.slow
def test_training_retrieves_the_other_view(mnist_small):
    config = tiny_config(tasks=(auxtl.TaskConfig("contrastive"),), steps=150, batch_size=32,
                         log_every=50, eval_batch_size=60,
                         optimizer=auxtl.OptimizerConfig(learning_rate=0.1, warmup_steps=5))
    before = _initial_eval(config, mnist_small)
    after = auxtl.run_pretraining(config, mnist_small).eval_metrics
    # 120 views per eval batch: chance is 1/119 = 0.008; measured 0.10 -> 0.61, loss 4.68 -> 3.19
    chance = 1 / (2 * config.eval_batch_size - 1)
    assert after["contrastive/loss"] < before["contrastive/loss"] - 0.5
    assert after["contrastive/accuracy"] > max(20 * chance, before["contrastive/accuracy"] + 0.25)


def test_random_rotation_turns_about_the_centre_within_its_range():
    """A vanishing range is the identity (bilinear at the grid points); the centre pixel
    stays at any angle; the draw follows the key."""
    images = jax.random.uniform(jax.random.key(0), (3, 9, 9, 2))
    same = random_rotation(jax.random.key(1), images, max_degrees=1e-6)
    np.testing.assert_allclose(same, images, atol=1e-5)
    turned = random_rotation(jax.random.key(2), images, max_degrees=30.0)
    assert turned.shape == images.shape and turned.dtype == images.dtype
    again = random_rotation(jax.random.key(2), images, max_degrees=30.0)
    np.testing.assert_array_equal(turned, again)
    assert not np.allclose(turned, random_rotation(jax.random.key(3), images, max_degrees=30.0))
    # the centre pixel of an odd-sized image stays where it is at any angle
    np.testing.assert_allclose(turned[:, 4, 4], images[:, 4, 4], atol=1e-5)
