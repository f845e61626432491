import jax
import jax.numpy as jnp
import numpy as np
import pytest

import auxtl


def _images():
    return jnp.asarray(np.random.default_rng(0).normal(size=(5, 6, 6, 2)), jnp.float32)


def test_all_rotations_rotate_back_to_the_input():
    task = auxtl.get_task("rotation")
    images = _images()
    inputs, labels = task.make_examples(jax.random.key(0), images)
    assert inputs.shape == (20, 6, 6, 2) and labels.shape == (20,)
    assert sorted(np.bincount(np.asarray(labels)).tolist()) == [5, 5, 5, 5]
    for i in range(20):
        back = jnp.rot90(inputs[i], k=-int(labels[i]), axes=(0, 1))
        np.testing.assert_array_equal(back, images[i % 5])


def test_random_rotation_labels_match_and_depend_on_the_key():
    task = auxtl.get_task("rotation", all_rotations=False)
    images = jnp.tile(_images(), (8, 1, 1, 1))  # 40 images
    inputs, labels = jax.jit(task.make_examples)(jax.random.key(1), images)
    assert inputs.shape == images.shape
    for i in range(len(images)):
        back = jnp.rot90(inputs[i], k=-int(labels[i]), axes=(0, 1))
        np.testing.assert_array_equal(back, images[i])
    assert len(set(np.asarray(labels).tolist())) == 4
    _, other = task.make_examples(jax.random.key(2), images)
    assert not np.array_equal(labels, other)


def test_a_rotated_image_is_not_the_original():
    # Guards against a no-op rotation passing the round-trip test.
    images = _images()
    inputs, _ = auxtl.get_task("rotation").make_examples(jax.random.key(0), images)
    assert not np.allclose(inputs[5], images[0])


def test_non_square_images_are_refused_with_both_sizes():
    with pytest.raises(ValueError, match="height 28 != width 20"):
        auxtl.get_task("rotation").validate((28, 20, 1))
