"""Cheap evaluations of frozen features: per-depth features, probes (ridge regression,
weighted k-NN) whose hyper-parameters and depth are chosen on a validation split, each
vectorised over seeds with jax.vmap (one compile, all seeds at once).

Inputs for S seeds share shapes: train features (S, n, d), train labels (S, n);
the test set is shared: (m, d), (m,).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from auxtl.data import Normalization, normalize
from auxtl.errors import InputError
from auxtl.models.trunk import global_avg_pool


def depth_features(trunk, images: np.ndarray, normalization: Normalization, *,
                   batch_size: int = 500) -> list[np.ndarray]:
    """Globally pooled output of every layer (inference mode): a list of (N, d_k) arrays."""
    graphdef, state = nnx.split(trunk)

    @jax.jit
    def pooled(state, x):
        module = nnx.merge(graphdef, state)
        x = normalize(x, normalization)
        outputs = []
        for index in range(len(module.layers)):
            x = module.apply_layers(x, start=index, stop=index + 1)
            outputs.append(global_avg_pool(x))
        return outputs

    chunks = [jax.device_get(pooled(state, images[i:i + batch_size]))
              for i in range(0, len(images), batch_size)]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


# ---- probes that choose their hyper-parameter on a validation split -----------------------
#
# Shapes, for S seeds: train (S, n, d)/(S, n) and validation (S, v, d)/(S, v), one of each
# per seed; test shared, (m, d)/(m,). Every choice (L2 strength, k, depth) is made on the
# validation split; the test split is scored once, with the chosen value, and never read
# before.

# Ridge strengths alpha, ascending: lambda = alpha * ||X||_F^2 / n on the standardised
# train features X (= alpha x the number of varying features): from nearly least squares
# (interpolation when n <= d) to heavy shrinkage (weights ~ X^T Y_c / lambda, class-mean
# templates).
DEFAULT_L2_GRID = tuple(float(10.0 ** e) for e in np.arange(-3.0, 4.01, 0.5))
DEFAULT_K_GRID = (1, 3, 5, 10, 20)


def _precision():
    """Float32 matmuls everywhere: HIGHEST on accelerators (whose DEFAULT may round to
    TF32/bf16); DEFAULT on CPU, already float32 there, where HIGHEST takes a slower path."""
    return None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


def _dot(a, b):
    return jnp.matmul(a, b, precision=_precision())


class ProbeResult(NamedTuple):
    """One probe per seed: `test_accuracy` (S,) with the chosen hyper-parameter,
    `val_accuracy` (S,) the validation accuracy that chose it, and `hyperparameter` (S,)
    the chosen value (ridge: alpha from `l2_grid`; k-NN: the effective k, capped at n)."""
    test_accuracy: jax.Array
    val_accuracy: jax.Array
    hyperparameter: jax.Array


class RidgeFit(NamedTuple):
    """A fitted ridge classifier: logits = ((x - mean) / scale) @ weights + bias."""
    mean: jax.Array     # (d,)
    scale: jax.Array    # (d,)
    weights: jax.Array  # (d, C)
    bias: jax.Array     # (C,)


def _last_argmax(values: jax.Array) -> jax.Array:
    """Index of the largest value along the last axis, ties to the LAST such index."""
    return values.shape[-1] - 1 - jnp.argmax(values[..., ::-1], axis=-1)


def _standardizer(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Train-statistics standardisation (n, d) -> (mean, scale), both (d,). A feature equal
    on every train row carries nothing to fit: it gets that value as mean and an infinite
    scale, so it standardises to exactly 0 on train, validation and test alike (instead
    of rounding noise blown up to unit variance)."""
    constant = jnp.all(x == x[:1], axis=0)
    std = jnp.std(x, axis=0)
    mean = jnp.where(constant, x[0], jnp.mean(x, axis=0))
    return mean, jnp.where(constant | (std == 0), jnp.inf, std)


def _spectral(x: jax.Array, targets: jax.Array):
    """(basis (d, r), eigenvalues (r,), coef (r, C)) with the ridge solution
    (X^T X + lam I)^-1 X^T Y = basis diag(1 / (eig + lam)) coef for EVERY lam, from one
    eigendecomposition of the smaller Gram (r = min(n, d)): X X^T (dual, n <= d) or X^T X
    (primal). Eigenvalues below 0 (rounding) are clipped to 0, so eig + lam >= lam > 0."""
    n, d = x.shape
    if n <= d:
        eig, q = jnp.linalg.eigh(_dot(x, x.T))
        basis, coef = _dot(x.T, q), _dot(q.T, targets)
    else:
        eig, basis = jnp.linalg.eigh(_dot(x.T, x))
        coef = _dot(basis.T, _dot(x.T, targets))
    return basis, jnp.maximum(eig, 0.0), coef


def _lambda_unit(x: jax.Array) -> jax.Array:
    """||X||_F^2 / n of standardised features (the number of varying features); 1 when no
    feature varies (then the weights are 0 and the probe predicts the train majority)."""
    unit = jnp.sum(x * x) / x.shape[0]
    return jnp.where(unit > 0, unit, 1.0)


def _ridge_parts(x, y, num_classes):
    mean, scale = _standardizer(x)
    xs = (x - mean) / scale
    onehot = jax.nn.one_hot(y, num_classes)
    bias = jnp.mean(onehot, axis=0)      # the unregularised bias: X is centred
    basis, eig, coef = _spectral(xs, onehot - bias)
    return mean, scale, bias, basis, eig, coef, _lambda_unit(xs)


def _weights(basis, eig, coef, lam):
    return _dot(basis, coef / (eig + lam)[:, None])


@functools.partial(jax.jit, static_argnames=("num_classes",))
def ridge_fit(train_x, train_y, *, num_classes: int, l2) -> RidgeFit:
    """One seed's ridge classifier, train (n, d)/(n,): one-hot targets centred on the train
    class frequencies (the unregularised bias), features standardised with the train mean
    and std, weights (X^T X + lam I)^-1 X^T Y_c with lam = l2 * ||X||_F^2 / n."""
    mean, scale, bias, basis, eig, coef, unit = _ridge_parts(train_x, train_y, num_classes)
    return RidgeFit(mean, scale, _weights(basis, eig, coef, l2 * unit), bias)


def _accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels, axis=-1)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _ridge_probe(train_x, train_y, val_x, val_y, test_x, test_y, grid, *, num_classes):
    def one_seed(x, y, vx, vy):
        mean, scale, bias, basis, eig, coef, unit = _ridge_parts(x, y, num_classes)
        projected = _dot((vx - mean) / scale, basis)                              # (v, r)
        inverse = 1.0 / (eig[None, :] + grid[:, None] * unit)                     # (L, r)
        logits = jnp.einsum("vr,lr,rc->lvc", projected, inverse, coef,
                            precision=_precision()) + bias
        curve = _accuracy(logits, vy)                                              # (L,)
        best = _last_argmax(curve)
        weights = _weights(basis, eig, coef, grid[best] * unit)
        test_logits = _dot((test_x - mean) / scale, weights)
        return ProbeResult(_accuracy(test_logits + bias, test_y), curve[best], grid[best])

    return jax.vmap(one_seed)(train_x, train_y, val_x, val_y)


def ridge_probe(train_x, train_y, val_x, val_y, test_x, test_y, *, num_classes: int,
                l2_grid=DEFAULT_L2_GRID) -> ProbeResult:
    """Closed-form multi-class ridge regression probe (big_vision's few-shot evaluator),
    its L2 strength chosen per seed on validation; seeds vmapped, one compile per shape.

    Per seed: features standardised with the TRAIN mean and std (a feature constant on
    train standardises to 0 everywhere: ignored), one-hot targets centred (so the bias, the train class
    frequencies, is unregularised), lambda = alpha * ||X||_F^2 / n for every alpha in
    `l2_grid` (the grid is scaled by trace(X^T X) / n, which after standardisation is the
    number of varying features: alpha is dimensionless for any n and d). All strengths
    come from one eigendecomposition of the smaller Gram (n x n when n <= d, else d x d),
    in float32 (HIGHEST matmul precision on accelerators), eigenvalues clipped at 0 so
    every solve has eig + lambda >= lambda > 0. The alpha with the best validation
    accuracy is chosen, ties to the LARGER alpha (the simpler model); only that alpha's
    classifier is applied to the test set.

    Args: train (S, n, d)/(S, n); val (S, v, d)/(S, v); test (m, d)/(m,); integer labels
    in [0, num_classes); `l2_grid` positive, strictly increasing.
    Returns: ProbeResult, `hyperparameter` the chosen alpha.
    """
    _check_inputs(train_x, train_y, val_x, val_y, test_x, test_y, num_classes)
    grid = _check_grid(l2_grid, "l2_grid", integer=False)
    return _ridge_probe(*map(jnp.asarray, (train_x, train_y, val_x, val_y, test_x, test_y)),
                        jnp.asarray(grid, jnp.float32), num_classes=num_classes)


def _unit(v):
    return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)


def _knn_votes(x, y, queries, ks, temperature, num_classes):
    """Weighted votes (q, len(ks), C) of each query's k nearest train points for every k in
    `ks` (ascending, <= n): weight exp((cos - cos_nearest) / temperature), which is
    exp(cos / temperature) up to a per-query factor (the argmax is the same) but cannot
    overflow: the nearest weighs 1. (The nearest similarity is taken as the row max, not
    top_sim[:, :1]: XLA on CPU fuses that slice into top_k and recomputes it per element.)"""
    similarity = _dot(_unit(queries), _unit(x).T)                               # (q, n)
    top_sim, top_index = jax.lax.top_k(similarity, ks[-1])                      # (q, K)
    nearest = jnp.max(similarity, axis=1, keepdims=True)
    weights = jnp.exp((top_sim - nearest) / temperature)
    votes = jax.nn.one_hot(y[top_index], num_classes) * weights[..., None]     # (q, K, C)
    return jnp.cumsum(votes, axis=1)[:, np.asarray(ks) - 1]


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _knn_probe(train_x, train_y, val_x, val_y, test_x, test_y, temperature, *, ks,
               num_classes):
    def one_seed(x, y, vx, vy):
        votes = _knn_votes(x, y, vx, ks, temperature, num_classes)             # (v, K, C)
        curve = jnp.mean(jnp.argmax(votes, axis=-1) == vy[:, None], axis=0)      # (K,)
        best = _last_argmax(curve)
        votes = _knn_votes(x, y, test_x, ks, temperature, num_classes)[:, best]
        return ProbeResult(_accuracy(votes, test_y), curve[best], jnp.asarray(ks)[best])

    return jax.vmap(one_seed)(train_x, train_y, val_x, val_y)


def knn_probe(train_x, train_y, val_x, val_y, test_x, test_y, *, num_classes: int,
              k_grid=DEFAULT_K_GRID, temperature: float = 0.07) -> ProbeResult:
    """Weighted k-nearest-neighbour probe (Wu et al. 2018; DINO's k-NN), k chosen per seed
    on validation; seeds vmapped.

    Features L2-normalised, cosine similarity; each of a query's k nearest train points
    votes for its label with weight exp(cos / temperature) (large temperature: majority
    vote; temperature -> 0: 1-NN). Every k in `k_grid` is capped at n (duplicates after
    capping count once); the k with the best validation accuracy is chosen, ties to the
    LARGER k; only that k's vote is scored on the test set.

    Args: as `ridge_probe`; `k_grid` positive integers, strictly increasing;
    `temperature` > 0.
    Returns: ProbeResult, `hyperparameter` the chosen (capped) k.
    """
    _check_inputs(train_x, train_y, val_x, val_y, test_x, test_y, num_classes)
    grid = _check_grid(k_grid, "k_grid", integer=True)
    if not (np.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be positive and finite, got {temperature!r}")
    n = np.shape(train_x)[1]
    ks = tuple(sorted({min(int(k), n) for k in grid}))
    return _knn_probe(*map(jnp.asarray, (train_x, train_y, val_x, val_y, test_x, test_y)),
                      jnp.float32(temperature), ks=ks, num_classes=num_classes)


# ---- the depth, chosen on validation ------------------------------------------------------

def choose_depth(val_accuracy) -> np.ndarray:
    """(D, S) validation accuracies of D depths (shallow to deep) -> (S,) chosen depth index
    per seed: the best validation accuracy, ties to the DEEPER depth (the default reuse
    point: more of the trunk reused for the same evidence)."""
    val_accuracy = np.asarray(val_accuracy)
    if val_accuracy.ndim != 2 or val_accuracy.shape[0] == 0:
        raise InputError(f"val_accuracy must be (depths, seeds), got shape {val_accuracy.shape}")
    return np.asarray(_last_argmax(jnp.asarray(val_accuracy.T)))


class DepthProbe(NamedTuple):
    """A probe at every depth and the depth chosen on validation.

    `per_depth`: ProbeResult whose arrays are (D, S); `depth`: (S,) chosen depth index
    (`choose_depth`); `test_accuracy`, `val_accuracy`, `hyperparameter`: (S,) at that depth."""
    per_depth: ProbeResult
    depth: np.ndarray
    test_accuracy: np.ndarray
    val_accuracy: np.ndarray
    hyperparameter: np.ndarray


def probe_depths(probe: Callable[..., ProbeResult], train_x: Sequence, train_y, val_x: Sequence,
                 val_y, test_x: Sequence, test_y, **probe_kwargs) -> DepthProbe:
    """Run `probe` (ridge_probe, knn_probe) at every depth and choose the depth per seed on
    validation. `train_x`, `val_x`, `test_x`: one array per depth, same order (the widths
    may differ), shaped as `probe` takes them; the labels are shared by every depth;
    `probe_kwargs` go to every call (num_classes, grids)."""
    if not (len(train_x) == len(val_x) == len(test_x) > 0):
        raise InputError(f"train_x, val_x, test_x must list the same depths, got "
                         f"{len(train_x)}, {len(val_x)}, {len(test_x)}")
    results = [probe(x, train_y, v, val_y, t, test_y, **probe_kwargs)
               for x, v, t in zip(train_x, val_x, test_x)]
    per_depth = ProbeResult(*(np.stack([np.asarray(r[i]) for r in results])
                              for i in range(len(ProbeResult._fields))))
    depth = choose_depth(per_depth.val_accuracy)
    seeds = np.arange(depth.shape[0])
    return DepthProbe(per_depth, depth, *(a[depth, seeds] for a in per_depth))


# ---- input checks ------------------------------------------------------------------------

def _check_grid(grid, name: str, *, integer: bool) -> np.ndarray:
    values = np.asarray(grid, dtype=np.float64)
    ok = (values.ndim == 1 and values.size > 0 and np.all(np.isfinite(values))
          and np.all(values > 0) and np.all(np.diff(values) > 0)
          and (not integer or np.all(values == np.round(values))))
    if not ok:
        kind = "integers" if integer else "values"
        raise InputError(f"{name} must be positive {kind}, strictly increasing, "
                         f"got {tuple(np.ravel(values))}")
    return values


def _check_inputs(train_x, train_y, val_x, val_y, test_x, test_y, num_classes) -> None:
    """Shapes (naming the argument and its shape), finite features, labels in range."""
    shapes = {name: np.shape(a) for name, a in (
        ("train_x", train_x), ("train_y", train_y), ("val_x", val_x), ("val_y", val_y),
        ("test_x", test_x), ("test_y", test_y))}
    want = {"train_x": 3, "train_y": 2, "val_x": 3, "val_y": 2, "test_x": 2, "test_y": 1}
    for name, ndim in want.items():
        if len(shapes[name]) != ndim or 0 in shapes[name]:
            raise InputError(f"{name} must be a non-empty {ndim}-d array, got shape "
                             f"{shapes[name]}")
    seeds, n, d = shapes["train_x"]
    expected = {"train_y": (seeds, n), "val_x": (seeds, shapes["val_x"][1], d),
                "val_y": shapes["val_x"][:2], "test_x": (shapes["test_x"][0], d),
                "test_y": shapes["test_x"][:1]}
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise InputError(f"{name} has shape {shapes[name]}, expected {shape} "
                             f"(train_x is {shapes['train_x']}: seeds, n, d)")
    if not (isinstance(num_classes, int) and num_classes > 0):
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    for name, a in (("train_x", train_x), ("val_x", val_x), ("test_x", test_x)):
        if not np.all(np.isfinite(np.asarray(a))):
            raise InputError(f"{name} (shape {shapes[name]}) has non-finite features")
    for name, a in (("train_y", train_y), ("val_y", val_y), ("test_y", test_y)):
        labels = np.asarray(a)
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 \
                or labels.max() >= num_classes:
            raise InputError(f"{name} (shape {shapes[name]}) must hold integer labels in "
                             f"[0, {num_classes}), got dtype {labels.dtype}, range "
                             f"[{labels.min()}, {labels.max()}]")
