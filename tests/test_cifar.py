"""CIFAR-10 python-pickle batches: layout, labels, class names, and no code execution."""

import pickle

import numpy as np
import pytest

import auxtl


def write_batch(path, images, labels):
    """Writes images (N, 32, 32, 3) the way CIFAR-10's python version stores them."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    with open(path, "wb") as handle:
        pickle.dump({b"batch_label": b"tiny", b"labels": list(map(int, labels)),
                     b"data": data, b"filenames": [b"x.png"] * len(images)}, handle)


@pytest.fixture
def cifar_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(30) % 10
    write_batch(tmp_path / "data_batch_1", images[:20], labels[:20])
    write_batch(tmp_path / "data_batch_2", images[20:25], labels[20:25])
    write_batch(tmp_path / "test_batch", images[25:], labels[25:])
    with open(tmp_path / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, handle)
    return tmp_path, images, labels


def test_training_and_test_batches_load_as_nhwc(cifar_folder):
    folder, images, labels = cifar_folder
    train = auxtl.load_dataset(f"cifar10:{folder}")
    np.testing.assert_array_equal(train.images, images[:25])
    np.testing.assert_array_equal(train.labels, labels[:25])
    assert train.class_names[3] == "class3" and train.image_shape == (32, 32, 3)
    test = auxtl.load_dataset(f"cifar10-test:{folder}")
    np.testing.assert_array_equal(test.images, images[25:])


def test_pixel_layout_is_red_then_green_then_blue(tmp_path):
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 0, 1, 0], image[0, 2, 0, 2] = 7, 9   # red at row 0 col 1, blue at row 2 col 0
    write_batch(tmp_path / "data_batch_1", image, [0])
    raw = pickle.load(open(tmp_path / "data_batch_1", "rb"))[b"data"][0]
    assert raw[1] == 7 and raw[2048 + 64] == 9
    np.testing.assert_array_equal(auxtl.load_dataset(f"cifar10:{tmp_path}").images, image)


def test_a_batch_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": []}, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        auxtl.load_dataset(f"cifar10:{tmp_path}")


def test_missing_batches_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        auxtl.load_dataset(f"cifar10:{tmp_path}")


def test_a_truncated_batch_is_named(cifar_folder):
    folder, _, _ = cifar_folder
    batch = folder / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(auxtl.InputError, match="data_batch_2' is not a readable CIFAR-10 batch"):
        auxtl.load_dataset(f"cifar10:{folder}")
