import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxtl
from conftest import tiny_config

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _images(n=5, channels=3):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, 12, 10, channels)), jnp.float32)


def test_input_is_repeated_luma_and_target_gives_back_the_colour():
    images = _images()
    inputs, chroma = jax.jit(auxtl.get_task("colorization").make_examples)(jax.random.key(0),
                                                                          images)
    assert inputs.shape == images.shape and chroma.shape == (5, 12, 10, 2)
    luma = np.asarray(images) @ LUMA
    for c in range(3):
        np.testing.assert_allclose(inputs[..., c], luma, atol=1e-6)
    # (B - Y, R - Y) and Y determine R, G, B.
    red, blue = luma + chroma[..., 1], luma + chroma[..., 0]
    green = (luma - LUMA[0] * red - LUMA[2] * blue) / LUMA[1]
    np.testing.assert_allclose(np.stack([red, green, blue], -1), images, atol=1e-5)


def test_the_input_carries_no_colour():
    # b differs from a only along a direction of zero luma: same grey, other hue.
    a = _images()
    shift = np.random.default_rng(1).normal(size=a.shape[:-1] + (1,)) * np.array([0.587, -0.299, 0])
    b = a + jnp.asarray(shift, jnp.float32)
    task = auxtl.get_task("colorization")
    inputs_a, chroma_a = task.make_examples(jax.random.key(0), a)
    inputs_b, chroma_b = task.make_examples(jax.random.key(0), b)
    np.testing.assert_allclose(inputs_a, inputs_b, atol=1e-5)
    assert np.abs(np.asarray(chroma_a) - np.asarray(chroma_b)).max() > 0.1


def test_grey_images_are_refused_with_the_channel_count(mnist_small):
    task = auxtl.get_task("colorization")
    with pytest.raises(ValueError, match="3 channels, got 4 channel"):
        task.validate((28, 28, 4))
    task.validate((28, 28, 3))
    with pytest.raises(ValueError, match="colorization needs RGB images with 3 channels, got 1"):
        auxtl.run_pretraining(tiny_config(tasks=(auxtl.TaskConfig("colorization"),)),
                              mnist_small)


def colour_digits(dataset: auxtl.Dataset) -> np.ndarray:
    """Strokes coloured with a class-dependent hue (+ small jitter) at equal luma; dark ground.

    Each class k gets chroma 0.25 * (cos, sin)(2 pi k / 10 + jitter) around luma 0.5, so
    the stroke colour is predictable from the digit's shape, not from its brightness.
    """
    rng = np.random.default_rng(0)
    angle = 2 * np.pi * dataset.labels / 10 + rng.normal(0, 0.15, len(dataset))
    luma, u, v = 0.5, 0.25 * np.cos(angle), 0.25 * np.sin(angle)
    red, blue = luma + v, luma + u
    green = (luma - LUMA[0] * red - LUMA[2] * blue) / LUMA[1]
    colour = np.stack([red, green, blue], -1)[:, None, None, :]
    strokes = dataset.images.astype(np.float64) / 255.0
    return np.round(strokes * colour * 255).astype(np.uint8)


@pytest.mark.slow
def test_training_predicts_colour_from_shape(tmp_path, mnist):
    path = tmp_path / "colour_mnist.npz"
    np.savez(path, images=colour_digits(mnist), labels=mnist.labels)
    data = f"npz:{path}"
    train, test = auxtl.train_test_split(auxtl.load_dataset(data), test_fraction=0.1, seed=0)
    norm = auxtl.data.compute_normalization(train.images)
    task = auxtl.get_task("colorization")
    chroma_train = np.asarray(task.make_examples(None, auxtl.normalize(train.images, norm))[1])
    chroma_test = np.asarray(task.make_examples(None, auxtl.normalize(test.images, norm))[1])
    # Trivial predictors: grey (no chroma), and the mean chroma map of the training split.
    trivial = min(np.mean(chroma_test ** 2),
                  np.mean((chroma_test - chroma_train.mean(axis=0)) ** 2))

    config = tiny_config(tasks=(auxtl.TaskConfig("colorization"),), data=data, steps=150,
                         batch_size=32, log_every=50,
                         optimizer=auxtl.OptimizerConfig(name="adamw", learning_rate=3e-3,
                                                         warmup_steps=5))
    loss = auxtl.run_pretraining(config).eval_metrics["colorization/loss"]
    assert loss < 0.8 * trivial      # reached 0.083 vs 0.128 (class-mean oracle: 0.064)
