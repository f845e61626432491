import re

import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import probes
from auxtl.data import compute_normalization
from conftest import U32, gamma


def blobs(seed, n_per_class, d=5, classes=3, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, d) * 3.0
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + spread * rng.normal(size=(len(y), d))).astype(np.float32), y


def stacked(seeds, n):
    xs, ys = zip(*(blobs(s, n) for s in seeds))
    return np.stack(xs), np.stack(ys)


def test_depth_features_pool_every_layer(mnist_small):
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(0), input_shape=(28, 28, 1),
                              widths=(4, 4, 8, 8, 8), fc_dim=6)
    images = mnist_small.images[:40]
    features = probes.depth_features(trunk, images, compute_normalization(images),
                                     batch_size=16)
    assert [f.shape for f in features] == [(40, 4), (40, 4), (40, 8), (40, 8), (40, 8), (40, 6)]
    final = trunk(auxtl.normalize(images, compute_normalization(images)))
    np.testing.assert_allclose(features[-1], np.asarray(final), rtol=1e-5, atol=1e-6)


# ---- probes that choose on validation -----------------------------------------------------

def split(seed, seeds, n_train, n_val, n_test=30, d=5, classes=3, spread=0.8):
    """Blobs (S, n, d) train and val per seed and a shared test set."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 1.5

    def draw(shape):
        y = rng.integers(0, classes, size=shape)
        return (centres[y] + spread * rng.normal(size=shape + (d,))).astype(np.float32), y

    (tx, ty), (vx, vy), (ex, ey) = draw((seeds, n_train)), draw((seeds, n_val)), draw((n_test,))
    return tx, ty, vx, vy, ex, ey


PROBES = [(probes.ridge_probe, "l2_grid", (1e-3, 1e-1, 1.0, 10.0, 1e3)),
          (probes.knn_probe, "k_grid", (1, 3, 5, 10))]


def balanced_signs(rng, n, d, classes):
    """+-1 features, each column exactly half +1, and balanced labels: with an integer
    offset and a power-of-two scale per column, float32 standardisation, the Gram and
    X^T Y_c are exact (integers and quarters far below 2**24), so the only roundings left
    are the eigendecomposition's and the products after it."""
    signs = np.stack([rng.permutation(np.repeat([1.0, -1.0], n // 2)) for _ in range(d)], 1)
    offset = rng.integers(-3, 4, size=d).astype(np.float64)
    scale = 2.0 ** rng.integers(-2, 3, size=d)
    x = (offset + scale * signs).astype(np.float32)
    return x, signs, offset, scale, rng.permutation(np.repeat(np.arange(classes), n // classes))


def spectral_bound(m, rhs, lam, outer=None):
    """Bound on ||W_hat - W||_F for W = outer (M + lam I)^-1 rhs (outer: X^T in the dual
    form, else the identity), computed as probes._spectral does from an exact M and rhs:
    eigh, P^T rhs, a division by (mu + lam), then P (or X^T P) times it.
    Assumed of the eigensolver (LAPACK Users' Guide 4.7.1, normwise backward stability,
    taking its 'modestly growing function' p(r) = r): the computed (mu, P) are exact for
    M + E with ||E||_2 <= r u ||M||_2, and P is within r u of an orthogonal matrix;
    clipping mu at 0 moves it by at most as much again (e = 2 r u ||M||). Then
    (M + E + lam I)^-1 rhs differs from Z = (M + lam I)^-1 rhs by <= e ||Z|| / lam_eff,
    lam_eff = mu_min + lam - e; P's non-orthogonality adds <= (2f + f^2) ||rhs|| / lam_eff
    (f = r u); each r-term product rounds by gamma(r) |P| |.|, ||P||_F <= sqrt(r)(1 + f);
    the division two roundings. The product of the first-order terms' (1 + .) covers
    their cross terms. The dual form's outer X^T (n-term sums) adds gamma(n) |X^T| |P|."""
    r = m.shape[0]
    norm_m, mu_min = np.linalg.norm(m, 2), np.linalg.eigvalsh(m).min()
    e, f = 2 * r * U32 * norm_m, r * U32
    lam_eff = mu_min + lam - e
    assert lam_eff > 0
    z = np.linalg.solve(m + lam * np.eye(r), rhs)
    product = gamma(r) * np.sqrt(r) * (1 + f)
    first = 2 * f + f * f + 2 * product + gamma(2)
    z_err = e * np.linalg.norm(z) / lam_eff + np.linalg.norm(rhs) / lam_eff * first * (1 + first)
    if outer is None:
        return z_err
    z_size = np.linalg.norm(rhs) / lam_eff * (1 + first)
    basis_err = gamma(outer.shape[1]) * np.linalg.norm(outer) * np.sqrt(r) * (1 + f)
    return np.linalg.norm(outer, 2) * z_err + (basis_err + product * np.linalg.norm(outer, 2)
                                               * np.sqrt(r) * (1 + f)) * z_size


@pytest.mark.parametrize("n, d", [(40, 12), (8, 24)])   # primal (n > d) and dual (n <= d)
def test_ridge_fit_matches_float64_normal_equations(n, d):
    classes, alpha = 4, 0.5
    x, signs, offset, scale, y = balanced_signs(np.random.default_rng(n), n, d, classes)
    fit = probes.ridge_fit(x, y, num_classes=classes, l2=alpha)
    # Train statistics, exact here (see balanced_signs); bias = class frequencies.
    np.testing.assert_array_equal(np.asarray(fit.mean), offset.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fit.scale), scale.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fit.bias), np.full(classes, 1 / classes))
    # float64 reference: the normal equations, lam = alpha ||X||_F^2 / n = alpha d.
    targets = np.eye(classes)[y] - 1 / classes
    lam = alpha * np.sum(signs ** 2) / n
    want = np.linalg.solve(signs.T @ signs + lam * np.eye(d), signs.T @ targets)
    if n > d:
        bound = spectral_bound(signs.T @ signs, signs.T @ targets, lam)
    else:
        bound = spectral_bound(signs @ signs.T, targets, lam, outer=signs.T)
    assert bound < 1e-3 * np.linalg.norm(want)            # the check is not vacuous
    error = np.linalg.norm(np.asarray(fit.weights, np.float64) - want)
    assert error <= bound, (error, bound)


@pytest.mark.parametrize("n_per_class", [6, 1])                # primal and dual
def test_a_feature_constant_on_train_is_ignored(n_per_class):
    x, y = blobs(0, n_per_class)
    x[:, 2] = 0.1   # constant on train (0.1 is inexact in float32: its mean would not be)
    fit = probes.ridge_fit(x, y, num_classes=3, l2=1.0)
    assert float(fit.mean[2]) == np.float32(0.1) and float(fit.scale[2]) == np.inf
    test_x = blobs(1, 4)[0]
    varied = test_x.copy()
    varied[:, 2] = np.linspace(-5, 5, len(varied))
    logits = [np.asarray(((t - fit.mean) / fit.scale) @ fit.weights + fit.bias)
              for t in (test_x, varied)]
    np.testing.assert_array_equal(logits[0], logits[1])


@pytest.mark.parametrize("probe, grid_name, grid", PROBES)
def test_choice_is_the_validation_argmax_ties_to_the_larger_value(probe, grid_name, grid):
    data = split(0, 4, 12, 15)
    full = probe(*data, num_classes=3, **{grid_name: grid})
    single = [probe(*data, num_classes=3, **{grid_name: (g,)}) for g in grid]
    curve = np.stack([np.asarray(s.val_accuracy) for s in single])         # (L, S)
    test = np.stack([np.asarray(s.test_accuracy) for s in single])
    for s in range(4):
        best = max(np.flatnonzero(curve[:, s] == curve[:, s].max()))      # ties: the last
        assert float(full.hyperparameter[s]) == pytest.approx(grid[best], rel=1e-6)
        assert float(full.val_accuracy[s]) == curve[best, s]
        assert float(full.test_accuracy[s]) == test[best, s]


@pytest.mark.parametrize("probe, grid_name, grid", PROBES)
def test_all_tied_validation_picks_the_largest_value(probe, grid_name, grid):
    train_x, train_y = stacked([0], 8)
    val_x, val_y = train_x[:, ::4], train_y[:, ::4]     # clear points every value gets right
    test_x, test_y = blobs(7, 5)
    result = probe(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=3,
                   **{grid_name: grid})
    assert float(result.val_accuracy[0]) == 1.0
    assert float(result.hyperparameter[0]) == pytest.approx(grid[-1], rel=1e-6)


@pytest.mark.parametrize("probe, grid_name, grid", PROBES)
def test_the_test_split_never_changes_the_choice(probe, grid_name, grid):
    tx, ty, vx, vy, ex, ey = split(1, 3, 10, 12)
    kwargs = {"num_classes": 3, grid_name: grid}
    base = probe(tx, ty, vx, vy, ex, ey, **kwargs)
    permuted = probe(tx, ty, vx, vy, ex, np.random.default_rng(0).permutation(ey), **kwargs)
    other_x, other_y = split(9, 1, 2, 2, n_test=17)[4:]
    replaced = probe(tx, ty, vx, vy, other_x, other_y, **kwargs)
    for result in (permuted, replaced):
        np.testing.assert_array_equal(result.hyperparameter, base.hyperparameter)
        np.testing.assert_array_equal(result.val_accuracy, base.val_accuracy)


@pytest.mark.parametrize("probe, grid_name, grid", PROBES)
def test_vmapped_seeds_equal_one_seed_calls(probe, grid_name, grid):
    tx, ty, vx, vy, ex, ey = split(2, 3, 9, 11)
    together = probe(tx, ty, vx, vy, ex, ey, num_classes=3, **{grid_name: grid})
    for s in range(3):
        alone = probe(tx[s:s + 1], ty[s:s + 1], vx[s:s + 1], vy[s:s + 1], ex, ey,
                      num_classes=3, **{grid_name: grid})
        for a, b in zip(alone, together):
            assert float(a[0]) == float(b[s])


def test_knn_vote_is_majority_at_large_temperature_and_nearest_at_small():
    # On the unit circle around the query (angle 0): the nearest point (0.1) is class 0,
    # the next four are three of class 1 and one of class 0: 5-NN majority says 1.
    angles = np.array([0.1, 0.3, -0.3, 0.35, 0.5, 2.5, 3.0])
    labels = np.array([0, 1, 1, 1, 0, 0, 0])
    train = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)[None]
    query = np.array([[1.0, 0.0]], np.float32)

    def predicts(temperature, label):
        result = probes.knn_probe(train, labels[None], query[None], np.array([[label]]),
                                  query, np.array([label]), num_classes=2, k_grid=(5,),
                                  temperature=temperature)
        return float(result.val_accuracy[0]) == 1.0 and float(result.test_accuracy[0]) == 1.0

    assert predicts(1e4, 1) and not predicts(1e4, 0)       # majority vote
    assert predicts(1e-3, 0) and not predicts(1e-3, 1)     # 1-NN (no overflow)


def test_knn_k_is_capped_at_the_train_size():
    tx, ty, vx, vy, ex, ey = split(3, 2, 4, 6)
    capped = probes.knn_probe(tx, ty, vx, vy, ex, ey, num_classes=3, k_grid=(10, 20))
    exact = probes.knn_probe(tx, ty, vx, vy, ex, ey, num_classes=3, k_grid=(4,))
    np.testing.assert_array_equal(capped.hyperparameter, [4, 4])
    for a, b in zip(capped, exact):
        np.testing.assert_array_equal(a, b)


def test_choose_depth_is_the_validation_argmax_ties_to_the_deeper():
    val = np.array([[0.5, 0.9, 0.7], [0.8, 0.9, 0.6], [0.8, 0.2, 0.7]])   # (D=3, S=3)
    np.testing.assert_array_equal(probes.choose_depth(val), [2, 1, 2])


def test_probe_depths_runs_every_depth_and_reports_the_chosen_one():
    tx, ty, vx, vy, ex, ey = split(4, 3, 10, 12)
    shallow = (tx[..., :2], vx[..., :2], ex[:, :2])      # depths of different widths
    noise = np.random.default_rng(0)
    useless = tuple(noise.normal(size=a.shape).astype(np.float32) for a in (tx, vx, ex))
    depths = [shallow, (tx, vx, ex), useless]
    result = probes.probe_depths(probes.ridge_probe, [d[0] for d in depths], ty,
                                 [d[1] for d in depths], vy, [d[2] for d in depths], ey,
                                 num_classes=3)
    for i, (x, v, t) in enumerate(depths):
        direct = probes.ridge_probe(x, ty, v, vy, t, ey, num_classes=3)
        for a, b in zip(result.per_depth, direct):
            np.testing.assert_array_equal(a[i], b)
    np.testing.assert_array_equal(result.depth, probes.choose_depth(result.per_depth.val_accuracy))
    seeds = np.arange(3)
    np.testing.assert_array_equal(result.test_accuracy,
                                  result.per_depth.test_accuracy[result.depth, seeds])
    np.testing.assert_array_equal(result.hyperparameter,
                                  result.per_depth.hyperparameter[result.depth, seeds])


@pytest.mark.parametrize("argument, change, shape", [
    ("train_x", lambda a: a[0], "(6, 5)"),
    ("train_y", lambda a: a[:, :-1], "(2, 5)"),
    ("val_x", lambda a: a[..., :4], "(2, 7, 4)"),
    ("val_x", lambda a: a[:1], "(1, 7, 5)"),
    ("val_y", lambda a: a[0], "(7,)"),
    ("test_x", lambda a: a[:, :3], "(8, 3)"),
    ("test_y", lambda a: a[:-2], "(6,)"),
])
@pytest.mark.parametrize("probe", [probes.ridge_probe, probes.knn_probe])
def test_bad_shapes_raise_input_error_naming_the_argument(probe, argument, change, shape):
    data = dict(zip(["train_x", "train_y", "val_x", "val_y", "test_x", "test_y"],
                    split(5, 2, 6, 7, n_test=8)))
    data[argument] = change(data[argument])
    with pytest.raises(auxtl.InputError, match=rf"{argument}.*{re.escape(shape)}"):
        probe(**data, num_classes=3)


def test_bad_grids_labels_and_features_raise_input_error():
    data = split(6, 1, 6, 6)
    with pytest.raises(auxtl.InputError, match="l2_grid"):
        probes.ridge_probe(*data, num_classes=3, l2_grid=(1.0, 0.1))
    with pytest.raises(auxtl.InputError, match="k_grid"):
        probes.knn_probe(*data, num_classes=3, k_grid=(0, 3))
    with pytest.raises(auxtl.InputError, match="val_y"):
        probes.ridge_probe(*data[:3], data[3] + 3, *data[4:], num_classes=3)
    nan = data[0].copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(auxtl.InputError, match="train_x.*non-finite"):
        probes.knn_probe(nan, *data[1:], num_classes=3)
