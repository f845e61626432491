import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import probes
from auxtl.data import compute_normalization


def blobs(seed, n_per_class, d=5, classes=3, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, d) * 3.0
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + spread * rng.normal(size=(len(y), d))).astype(np.float32), y


def stacked(seeds, n):
    xs, ys = zip(*(blobs(s, n) for s in seeds))
    return np.stack(xs), np.stack(ys)


def test_linear_probe_separates_blobs_for_every_seed_and_fails_on_shuffled_labels():
    train_x, train_y = stacked([0, 1, 2], 10)
    test_x, test_y = blobs(99, 50)
    accuracy = probes.linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=3)
    assert accuracy.shape == (3,) and float(accuracy.min()) > 0.95
    shuffled = np.stack([np.random.default_rng(s).permutation(y) for s, y in enumerate(train_y)])
    chance = probes.linear_probe_accuracy(train_x, shuffled, test_x, test_y, num_classes=3)
    assert float(chance.mean()) < 0.7


def test_knn_matches_a_numpy_reference():
    train_x, train_y = stacked([0, 1], 4)
    test_x, test_y = blobs(5, 6, spread=1.5)
    got = np.asarray(probes.knn_accuracy(train_x, train_y, test_x, test_y, k=3, num_classes=3))
    for s in range(2):
        a = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
        b = train_x[s] / np.linalg.norm(train_x[s], axis=1, keepdims=True)
        nearest = np.argsort(-(a @ b.T), axis=1)[:, :3]
        predicted = []
        for row in nearest:
            counts = np.bincount(train_y[s][row], minlength=3)
            best = np.flatnonzero(counts == counts.max())
            predicted.append(next(train_y[s][i] for i in row if train_y[s][i] in best))
        assert got[s] == pytest.approx(np.mean(np.asarray(predicted) == test_y))


def test_depth_features_pool_every_layer(mnist_small):
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(0), input_shape=(28, 28, 1),
                              widths=(4, 4, 8, 8, 8), fc_dim=6)
    images = mnist_small.images[:40]
    features = probes.depth_features(trunk, images, compute_normalization(images),
                                     batch_size=16)
    assert [f.shape for f in features] == [(40, 4), (40, 4), (40, 8), (40, 8), (40, 8), (40, 6)]
    final = trunk(auxtl.normalize(images, compute_normalization(images)))
    np.testing.assert_allclose(features[-1], np.asarray(final), rtol=1e-5, atol=1e-6)
