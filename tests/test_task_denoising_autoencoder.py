import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxtl
from conftest import tiny_config


def _images(n=64, channels=3):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, 28, 28, channels)),
                       jnp.float32)


def test_corruption_has_the_asked_statistics_and_the_target_is_clean():
    task = auxtl.get_task("denoising_autoencoder", noise_std=0.4, drop_prob=0.3)
    images = _images()
    corrupted, target = jax.jit(task.make_examples)(jax.random.key(0), images)
    assert corrupted.shape == images.shape and target.shape == images.shape
    np.testing.assert_array_equal(target, images)
    corrupted, images = np.asarray(corrupted), np.asarray(images)
    dropped = (corrupted == 0).all(axis=-1)
    assert ((corrupted == 0).any(axis=-1) == dropped).all()   # whole pixels are dropped
    assert abs(dropped.mean() - 0.3) < 0.01                   # 50k pixels: std 0.002
    noise = (corrupted - images)[~dropped]
    assert abs(noise.std() - 0.4) < 0.01 and abs(noise.mean()) < 0.01
    other, _ = task.make_examples(jax.random.key(1), jnp.asarray(images))
    assert not np.array_equal(other, corrupted)


def test_each_corruption_alone():
    images = _images(n=8)
    noisy, _ = auxtl.get_task("denoising_autoencoder", noise_std=0.2,
                              drop_prob=0.0).make_examples(jax.random.key(0), images)
    assert not (np.asarray(noisy) == 0).any()
    assert abs(float(jnp.std(noisy - images)) - 0.2) < 0.01
    dropped, _ = auxtl.get_task("denoising_autoencoder", noise_std=0.0,
                                drop_prob=0.5).make_examples(jax.random.key(0), images)
    dropped, images = np.asarray(dropped), np.asarray(images)
    kept = (dropped != 0).all(axis=-1)
    np.testing.assert_array_equal(dropped[kept], images[kept])
    assert abs(1 - kept.mean() - 0.5) < 0.03


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="noise_std and drop_prob are both 0"):
        auxtl.get_task("denoising_autoencoder", noise_std=0.0, drop_prob=0.0)
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\), got 1.0"):
        auxtl.get_task("denoising_autoencoder", drop_prob=1.0)
    with pytest.raises(ValueError, match="noise_std must be >= 0, got -0.1"):
        auxtl.get_task("denoising_autoencoder", noise_std=-0.1)


@pytest.mark.slow
def test_training_lowers_the_error_below_the_mean_predictor(mnist_small):
    train, test = auxtl.train_test_split(mnist_small, test_fraction=0.1, seed=0)
    x = auxtl.normalize(test.images, auxtl.data.compute_normalization(train.images))
    trivial = float(jnp.mean(jnp.square(x)))   # MSE of predicting 0, the normalised mean
    config = tiny_config(tasks=(auxtl.TaskConfig("denoising_autoencoder"),), steps=100,
                         batch_size=32, log_every=50,
                         optimizer=auxtl.OptimizerConfig(name="adamw", learning_rate=3e-3,
                                                         warmup_steps=5))
    loss = auxtl.run_pretraining(config, mnist_small).eval_metrics["denoising_autoencoder/loss"]
    assert 0.9 < trivial < 1.2
    assert loss < 0.75 * trivial     # reached 0.59 vs 1.03
