"""Fine-tuning a transfer model through phases of freezing and unfreezing.

Each phase labels every parameter ('head', 'reused', 'frozen'), builds an
optax.partition optimizer from the labels and a step that differentiates only
the trainable leaves; when the next phase changes what is frozen, optimizer and
step are rebuilt here (compiled steps are cached by what they depend on) and the
optimizer state of groups whose leaves did not change (the head) carries over.
When the lowest layers are frozen and inputs are not augmented, their output
is computed once per phase and training runs on it. The best validation epoch
across all phases is kept (early stopping; "keep the unfreezing only if
validation improves").
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from auxtl import freezing
from auxtl.data import Normalization, batch_indices, normalize
from auxtl.errors import InputError
from auxtl.freezing import Phase
from auxtl.losses import classification
from auxtl.train import TrainState


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    phases: tuple[Phase, ...] = (Phase(epochs=40, train="head"),
                                 Phase(epochs=40, train="head+top2", lr_scale=0.1))
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    batch_size: int = 32
    cache_features: bool = True
    layer_decay: float | None = None   # discriminative fine-tuning of unfrozen reused layers
    seed: int = 0

    def __post_init__(self):
        phases = tuple(self.phases)
        if not phases:
            raise InputError("fine-tuning needs at least one phase (--phases), got none")
        bad = [p for p in phases if not isinstance(p, Phase)]
        if bad:
            raise InputError(f"phases must be auxtl.Phase objects, got {bad[0]!r}")
        object.__setattr__(self, "phases", phases)
        if (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, numbers.Integral)
                or self.batch_size < 1):
            raise InputError(f"batch size (--batch-size) must be a whole number >= 1, "
                             f"got {self.batch_size!r}")
        if not self.learning_rate > 0:
            raise InputError(f"learning rate (--lr) must be positive, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise InputError(f"weight decay (--weight-decay) must be >= 0, "
                             f"got {self.weight_decay!r}")
        if self.layer_decay is not None and not self.layer_decay > 0:
            raise InputError(f"layer_decay must be positive or None, got {self.layer_decay!r}")

    def to_json(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["phases"] = [p.to_json() for p in self.phases]
        return raw


@dataclasses.dataclass
class FinetuneResult:
    params: Any
    batch_stats: Any
    best_val_accuracy: float
    test_accuracy: float | None
    history: list[dict[str, Any]]
    steps: int


class StepCache:
    """Compiled steps keyed by everything they close over, reused across phases and seeds.

    `finetune` builds its steps without a normalization and passes the statistics as a
    traced argument (`norm_stats`), so one cache serves targets with different
    normalizations (every seed's own, channel counts included) with no stale closure.
    """

    def __init__(self):
        self._steps: dict[tuple, Any] = {}

    def get(self, key: tuple, build):
        if key not in self._steps:
            self._steps[key] = build()
        return self._steps[key]


class NormStats(NamedTuple):
    """A normalization's per-channel mean and std as arrays: a pytree jit traces, so
    compiled functions take it as an argument instead of closing over its values."""

    mean: Any
    std: Any


def norm_stats(normalization: Normalization | NormStats) -> NormStats:
    if isinstance(normalization, NormStats):
        return normalization
    return NormStats(np.asarray(normalization.mean, np.float32),
                     np.asarray(normalization.std, np.float32))


def _pick_norm(closed: Normalization | None, passed):
    """The normalization a compiled function uses: the one passed at the call, else the
    one it was built with."""
    if passed is not None:
        return passed
    if closed is None:
        raise TypeError("this function was built without a normalization; pass one "
                        "(norm_stats(normalization)) as its last argument")
    return closed


def make_finetune_step(graphdef, mask, frozen: tuple[str, ...], optimizer, start: int,
                       normalization: Normalization | None = None):
    """Jitted (state, inputs, labels[, norm]) -> (state, metrics); grads for trainable
    leaves only. `norm` (`norm_stats`) is traced; without it the step uses `normalization`."""
    return jax.jit(finetune_step_fn(graphdef, mask, frozen, optimizer, start, normalization),
                   donate_argnums=0)


def finetune_step_fn(graphdef, mask, frozen: tuple[str, ...], optimizer, start: int,
                     normalization: Normalization | None = None):
    """The pure (unjitted) fine-tuning step, for callers that vmap or scan it over seeds."""
    treedef = jax.tree.structure(mask)

    def step(state: TrainState, inputs, labels, norm: NormStats | None = None):
        trainable, frozen_leaves = freezing.split_trainable(state.params, mask)
        x = inputs if start else normalize(inputs, _pick_norm(normalization, norm))

        def loss_fn(trainable_leaves):
            params = freezing.merge_trainable(treedef, mask, trainable_leaves, frozen_leaves)
            model = nnx.merge(graphdef, params, state.batch_stats)
            logits = model.logits(x, start=start, train=True, frozen=frozen)
            loss, metrics = classification(logits, labels)
            return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

        grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(trainable)
        full_grads = freezing.merge_trainable(treedef, mask, grads,
                                              freezing.zeros_for(frozen_leaves))
        updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
        params = freezing.keep_frozen(state.params, optax.apply_updates(state.params, updates),
                                      mask)
        return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                             opt_state=opt_state), metrics

    return step


def make_logits_fn(graphdef, start: int, normalization: Normalization | None = None):
    """Jitted inference logits (params, batch_stats, inputs[, norm]) from layer `start`
    (BatchNorm in inference mode); `norm` as in `make_finetune_step`."""

    def logits(params, batch_stats, inputs, norm: NormStats | None = None):
        x = inputs if start else normalize(inputs, _pick_norm(normalization, norm))
        return nnx.merge(graphdef, params, batch_stats).logits(x, start=start)

    return jax.jit(logits)


def make_prefix_fn(graphdef, stop: int, normalization: Normalization | None = None):
    """Jitted output (params, batch_stats, images[, norm]) of the lowest `stop` layers in
    inference mode: the cacheable features; `norm` as in `make_finetune_step`."""

    def prefix(params, batch_stats, images, norm: NormStats | None = None):
        model = nnx.merge(graphdef, params, batch_stats)
        return model.trunk.apply_layers(normalize(images, _pick_norm(normalization, norm)),
                                        stop=stop)

    return jax.jit(prefix)


def in_chunks(fn, inputs, chunk: int = 500):
    return jnp.concatenate([fn(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)])


def accuracy(logits_fn, params, batch_stats, inputs, labels, norm: NormStats | None = None
             ) -> float:
    """Accuracy of `logits_fn`'s predictions; `norm` is passed on when given."""
    extra = () if norm is None else (norm,)
    logits = in_chunks(lambda x: logits_fn(params, batch_stats, x, *extra), inputs)
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)))


def _snapshot(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def finetune(model, num_reused: int, config: FinetuneConfig, *, train, val, test=None,
             normalization: Normalization, cache: StepCache | None = None,
             progress: bool = False, desc: str = "finetune") -> FinetuneResult:
    """Runs `config.phases` on (images, labels) pairs `train` and `val`; evaluates `test`.

    `model` is a TransferModel; its lowest `num_reused` trunk layers are the reused ones.
    """
    cache = cache or StepCache()
    norm = norm_stats(normalization)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
    layer_names = model.trunk.layer_names
    freezing.check_phases(config.phases, layer_names[:num_reused])
    train_images, train_labels = train
    count = len(train_images)
    batch = min(config.batch_size, count)
    steps_per_epoch = max(count // batch, 1)
    rng = jax.random.key_data(jax.random.key(config.seed))
    opt_state, old_labels, global_step = None, None, 0
    best = {"accuracy": -1.0, "params": _snapshot(params), "batch_stats": _snapshot(batch_stats)}
    history: list[dict[str, Any]] = []
    total_epochs = sum(p.epochs for p in config.phases)
    bar = tqdm(total=total_epochs, disable=not progress, desc=desc, unit="epoch",
               dynamic_ncols=True, leave=False)
    for phase_index, phase in enumerate(config.phases):
        labels = freezing.phase_labels(params, layer_names, num_reused, phase,
                                       per_layer=config.layer_decay is not None)
        mask = freezing.trainable_mask(labels)
        frozen = freezing.frozen_layer_names(layer_names, num_reused, phase)
        rates = freezing.group_learning_rates(config.learning_rate, phase,
                                              layer_names[:num_reused],
                                              layer_decay=config.layer_decay)
        optimizer = freezing.partitioned_optimizer(labels, rates, name=config.optimizer,
                                                   weight_decay=config.weight_decay)
        opt_state = freezing.carry_over_state(opt_state, old_labels, optimizer.init(params),
                                              labels)
        start = freezing.frozen_prefix_length(layer_names, frozen) if config.cache_features else 0
        key = (graphdef, tuple(jax.tree.leaves(labels)), frozen, start, tuple(rates.items()),
               config.optimizer, config.weight_decay)
        # Built without a normalization: it is passed (traced) at every call.
        step = cache.get(("step",) + key, lambda: make_finetune_step(
            graphdef, mask, frozen, optimizer, start))
        logits_fn = cache.get(("logits", graphdef, start),
                              lambda: make_logits_fn(graphdef, start))
        if start:
            prefix = cache.get(("prefix", graphdef, start),
                               lambda: make_prefix_fn(graphdef, start))
            features = lambda images: in_chunks(
                lambda x: prefix(params, batch_stats, x, norm), images)
            train_inputs, val_inputs = features(train_images), features(val[0])
        else:
            train_inputs, val_inputs = train_images, val[0]
        state = TrainState(step=jnp.asarray(global_step, jnp.int32), params=params,
                           batch_stats=batch_stats, opt_state=opt_state, rng=rng)
        since_best = 0
        for epoch in range(phase.epochs):
            pending = []
            for _ in range(steps_per_epoch):
                index = batch_indices(count, batch, seed=config.seed, step=global_step)
                state, metrics = step(state, train_inputs[index], train_labels[index], norm)
                pending.append(metrics)
                global_step += 1
            val_accuracy = accuracy(logits_fn, state.params, state.batch_stats, val_inputs,
                                    val[1], norm)
            train_metrics = jax.device_get(pending)
            record = {"phase": phase_index, "train": phase.train, "epoch": epoch + 1,
                      "step": global_step, "val_accuracy": val_accuracy,
                      "train_loss": float(np.mean([m["loss"] for m in train_metrics]))}
            history.append(record)
            bar.set_postfix(phase=phase.train, val=f"{val_accuracy:.3f}", refresh=False)
            bar.update(1)
            if val_accuracy > best["accuracy"]:
                best = {"accuracy": val_accuracy, "params": _snapshot(state.params),
                        "batch_stats": _snapshot(state.batch_stats)}
                since_best = 0
            else:
                since_best += 1
            if phase.patience and since_best >= phase.patience:
                break
        params, batch_stats, opt_state, rng = (state.params, state.batch_stats,
                                               state.opt_state, state.rng)
        old_labels = labels
    bar.close()
    test_accuracy = None
    if test is not None:
        logits_fn = cache.get(("logits", graphdef, 0), lambda: make_logits_fn(graphdef, 0))
        test_accuracy = accuracy(logits_fn, best["params"], best["batch_stats"], *test, norm)
    return FinetuneResult(best["params"], best["batch_stats"], best["accuracy"], test_accuracy,
                          history, global_step)


def score(model, result: FinetuneResult, images, labels, *,
                  normalization: Normalization, cache: StepCache | None = None) -> float:
    """Accuracy of a fine-tuned result's parameters on any labeled images."""
    graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    cache = cache or StepCache()
    logits_fn = cache.get(("logits", graphdef, 0), lambda: make_logits_fn(graphdef, 0))
    return accuracy(logits_fn, result.params, result.batch_stats, images, labels,
                    norm_stats(normalization))
