import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxtl
from conftest import gamma, tiny_config


def _images(n=6, size=28, channels=2):
    # Nonzero everywhere (almost surely), so a zeroed pixel shows a mask.
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, size, size, channels)) + 3.0,
                       jnp.float32)


@pytest.mark.parametrize("params, patch, grid, masked", [
    ({}, 4, 7, 25),                                  # 0.5 * 49 = 24.5 -> 25
    ({"patch": 7, "mask_ratio": 0.75}, 7, 4, 12),
])
def test_exactly_the_masked_patches_are_zeroed(params, patch, grid, masked):
    task = auxtl.get_task("masked_inpainting", **params)
    images = _images()
    inputs, (target, mask) = jax.jit(task.make_examples)(jax.random.key(0), images)
    assert inputs.shape == images.shape and mask.shape == (6, 28, 28, 1)
    np.testing.assert_array_equal(target, images)
    mask = np.asarray(mask)[..., 0]
    assert set(np.unique(mask).tolist()) == {0.0, 1.0}
    blocks = mask.reshape(6, grid, patch, grid, patch)
    assert (blocks.min(axis=(2, 4)) == blocks.max(axis=(2, 4))).all()  # whole patches only
    assert blocks[:, :, 0, :, 0].sum(axis=(1, 2)).tolist() == [masked] * 6
    hidden = np.broadcast_to(mask[..., None] == 1, images.shape)
    assert (np.asarray(inputs)[hidden] == 0).all()
    np.testing.assert_array_equal(np.asarray(inputs)[~hidden], np.asarray(images)[~hidden])


def test_masks_vary_with_the_key_and_between_images():
    task = auxtl.get_task("masked_inpainting")
    images = _images()
    _, (_, first) = task.make_examples(jax.random.key(0), images)
    _, (_, again) = task.make_examples(jax.random.key(0), images)
    _, (_, other) = task.make_examples(jax.random.key(1), images)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len({np.asarray(m).tobytes() for m in first}) == len(images)


def test_the_loss_counts_masked_pixels_only():
    task = auxtl.get_task("masked_inpainting")
    images = _images()
    _, targets = task.make_examples(jax.random.key(3), images)
    mask = np.broadcast_to(np.asarray(targets[1]), images.shape)
    predicted = np.random.default_rng(1).normal(size=images.shape).astype(np.float32)
    loss, metrics = task.loss_and_metrics(jnp.asarray(predicted), targets)
    # By hand in float64: the mean squared error over the masked pixels only.
    error = np.square(predicted.astype(np.float64) - np.asarray(images, np.float64))
    expected = np.mean(error[mask == 1])
    # The float32 loss: subtract, square, times the 0/1 mask (exact), a sum of
    # n = images.size nonnegative terms (n - 1 additions), a division by the mask's sum (an
    # exact integer): at most n + 2 roundings per term and no cancellation, so a relative
    # error of at most gamma(n + 2) (conftest.gamma; float64's own error is far below).
    bound = gamma(images.size + 2) * expected
    assert abs(float(loss) - expected) <= bound
    assert abs(float(metrics["loss"]) - expected) <= bound

    visible_changed = np.where(mask == 0, predicted + 5.0, predicted)
    assert task.loss_and_metrics(jnp.asarray(visible_changed), targets)[0] == loss
    masked_changed = predicted.copy()
    pixel = tuple(np.argwhere(mask == 1)[0])
    masked_changed[pixel] += 5.0 * np.sign(predicted[pixel] - images[pixel])  # a larger error
    assert task.loss_and_metrics(jnp.asarray(masked_changed), targets)[0] > loss


def test_bad_sizes_and_ratios_are_refused():
    with pytest.raises(ValueError, match="divisible by patch 4, got 30x28"):
        auxtl.get_task("masked_inpainting").validate((30, 28, 1))
    with pytest.raises(ValueError, match="mask_ratio 0.01 masks 0 of 49 patches"):
        auxtl.get_task("masked_inpainting", mask_ratio=0.01).validate((28, 28, 1))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\), got 1.0"):
        auxtl.get_task("masked_inpainting", mask_ratio=1.0)
    with pytest.raises(ValueError, match="patch must be a positive integer, got 0"):
        auxtl.get_task("masked_inpainting", patch=0)


def _zero_predictor_loss(task, dataset):
    """Masked MSE of predicting 0 (the normalised mean) on the held-out split."""
    train, test = auxtl.train_test_split(dataset, test_fraction=0.1, seed=0)
    x = auxtl.normalize(test.images, auxtl.data.compute_normalization(train.images))
    _, targets = task.make_examples(jax.random.key(0), x)
    return float(task.loss_and_metrics(jnp.zeros_like(x), targets)[0])


@pytest.mark.slow
def test_training_lowers_the_masked_error_below_the_mean_predictor(mnist_small):
    trivial = _zero_predictor_loss(auxtl.get_task("masked_inpainting"), mnist_small)
    config = tiny_config(tasks=(auxtl.TaskConfig("masked_inpainting"),), steps=150,
                         batch_size=32, log_every=50,
                         optimizer=auxtl.OptimizerConfig(name="adamw", learning_rate=3e-3,
                                                         warmup_steps=5))
    loss = auxtl.run_pretraining(config, mnist_small).eval_metrics["masked_inpainting/loss"]
    assert 0.9 < trivial < 1.2       # unit-variance pixels
    assert loss < 0.8 * trivial      # reached 0.645 vs 1.03
