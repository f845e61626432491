"""Fine-tuning transfer models through phases of freezing and unfreezing: the one engine.

Each phase is planned once (`auxtl.freezing.plan_phase`: labels, mask, frozen layers,
frozen prefix, group rates, partitioned optimizer) and compiled once (steps are cached
by the graphdef and the plan's key); the optimizer state of groups whose leaves did not
change between phases (the head) carries over. The engine (`finetune_seeds`) runs S >= 1
seeds of one configuration together: per-seed models stacked on a leading axis, shared
images and per-seed subsets, one compiled step vmapped over seeds or looped seed after
seed (`auxtl.seeds.seed_runner`). When the lowest layers are frozen (and identical in
every seed) their output is computed once per phase and training runs on it.

A phase's budget is either epochs, with validation after each (the best epoch across
all phases is kept per seed, "keep the unfreezing only if validation improves", and
`patience` stops a seed's phase early), or a fixed number of steps with no validation
(the test set, when given, scores after each phase). `finetune` is the engine for one
model.

Recipe settings (`FinetuneConfig`): `augment` ("none", "shift", "flip", "shift+flip")
augments each training batch inside the compiled step (`finetune_step.augment_images`;
validation and test never), which rules out the cached frozen prefix (the frozen
layers still get no gradient and run in inference mode); `schedule` ("constant",
"cosine") with `warmup` (a fraction of each phase's steps) shapes every group's rate
over each phase's full budget (epochs x steps per epoch, or steps; a seed that
`patience` stops ends before its schedule does), restarting at each phase (a carried
group keeps its moments, not its schedule count); `min_steps_per_epoch` makes an epoch at least
that many steps (one pass over the labeled subset, continued in the same batch order
when the subset is too small: 10 labeled images would otherwise be one step an epoch),
with validation after each such epoch; `max_steps_per_epoch` (None: no cap) makes it at
most that many (a large labeled set is then validated, and its schedule counted, every
that many steps; the batch order continues across epochs). `head_init="ridge"` starts
the new head as the frozen trunk's ridge probe, its L2 chosen on validation (LP-FT,
`auxtl.head_init`).

Every seed runs on one mesh (`auxtl.parallel.data_mesh`, the pretraining mesh: all
devices of all processes): the labeled data and the states are replicated on it (every
process holds the same small labeled set) and each step's gathered batch is split over
its "data" axis, so XLA runs each device on its share of the global batch.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from auxtl import freezing, parallel
from auxtl.data import Normalization
from auxtl.errors import AuxtlWarning, InputError
from auxtl.finetune_config import HEAD_INITS, FinetuneConfig, FinetuneResult
from auxtl.finetune_step import (NormStats, StepCache, default_max_shift, finetune_step_fn,
                                 in_chunks, logits_fn, make_finetune_step, make_logits_fn,
                                 make_prefix_fn, norm_stats)
from auxtl.freezing import Phase
from auxtl.head_init import init_heads, pooled_features_fn
from auxtl.seeds import batch_schedule, seed_correct, seed_logits, seed_runner, stack, unstack
from auxtl.train_state import TrainState

__all__ = ["HEAD_INITS", "FinetuneConfig", "FinetuneResult", "NormStats", "StepCache", "finetune",
           "finetune_seeds", "in_chunks", "make_finetune_step", "make_logits_fn",
           "make_prefix_fn", "norm_stats", "score"]


def _snapshot(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def _model_trees(models):
    """(graphdef, per-seed params, per-seed batch stats) as plain dicts; one architecture."""
    splits = [nnx.split(m, nnx.Param, nnx.BatchStat) for m in models]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _, _ in splits[1:]):
        raise InputError("the seeds' models must share one architecture (graphdef)")
    return (graphdef, [nnx.to_pure_dict(p) for _, p, _ in splits],
            [nnx.to_pure_dict(b) for _, _, b in splits])


def _prefix_leaves(params, batch_stats, start: int):
    """(path, leaf) of the params and statistics in the lowest `start` trunk layers."""
    heads = tuple(f"trunk/layers/{i}/" for i in range(start))
    for tree in (params, batch_stats):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = freezing.path_str(path)
            if name.startswith(heads):
                yield name, leaf


def _prefix_shared(states: TrainState, start: int) -> bool:
    """Whether every seed holds bit-identical params and statistics in the lowest `start`
    trunk layers (then one prefix output serves them all)."""
    for _, leaf in _prefix_leaves(states.params, states.batch_stats, start):
        values = np.asarray(leaf)
        if not all(np.array_equal(values[0], v) for v in values[1:]):
            return False
    return True


def _prefix_digest(params, batch_stats, start: int, norm: NormStats) -> str:
    """sha256 of one model's lowest `start` trunk layers (params and statistics) and of
    the normalization: what, besides the data, their output depends on."""
    digest = hashlib.sha256()
    for name, leaf in [*_prefix_leaves(params, batch_stats, start), *norm._asdict().items()]:
        value = np.asarray(leaf)
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _check_budgets(phases: Sequence[Phase], sizes: list[int], val) -> bool:
    """True for epoch budgets (validated), False for fixed steps; refuses a mix."""
    by_epochs = {p.steps is None for p in phases}
    if len(by_epochs) > 1:
        raise InputError("phases must all count epochs or all count steps, got "
                         f"{[p.to_json() for p in phases]}")
    epochs = by_epochs.pop()
    if epochs and val is None:
        raise InputError("epoch phases validate after every epoch: pass val=(images, labels)")
    if epochs and len(set(sizes)) > 1:
        raise InputError(f"an epoch must be the same number of steps for every seed; "
                         f"subset sizes differ: {sizes}")
    return epochs


def finetune_seeds(models: Sequence, num_reused: int, config: FinetuneConfig, *, images,
                   labels, subsets: Sequence[np.ndarray], seeds: Sequence[int],
                   normalization: Normalization | NormStats, val=None, test=None,
                   vmap: bool | None = None, cache: StepCache | None = None,
                   progress: bool = False, desc: str = "finetune",
                   mesh=None) -> list[FinetuneResult]:
    """Runs `config.phases` on S seeds of one configuration; one FinetuneResult per seed.

    `models`: S TransferModels of one architecture (their lowest `num_reused` trunk layers
    reused). Seed s trains on `images[subsets[s]]` (images and labels shared), its
    batches drawn by `auxtl.data.batch_indices(len(subsets[s]), B, seeds[s], step)`, its
    PRNG key from `seeds[s]`; B = min(config.batch_size, smallest subset). `val` and
    `test` are shared (images, labels). Epoch phases validate on `val` after every epoch
    (each seed keeps its best epoch; a stopped seed's state is left exactly as it was);
    step phases score `test` after each phase. `vmap`: one step vmapped over seeds
    (default: off the CPU backend), else seed after seed (the results then equal S
    one-seed runs bit for bit). `cache` shares compiled steps across calls (and records
    the batch layouts its steps compiled to: `cache.layout`). `mesh`: the devices to run
    on (default `auxtl.parallel.data_mesh()`, every device of every process).
    """
    count = len(models)
    if not count or len(subsets) != count or len(seeds) != count:
        raise InputError(f"one subset and one seed per model: {count} models, "
                         f"{len(subsets)} subsets, {len(seeds)} seeds")
    vmap = jax.default_backend() != "cpu" if vmap is None else vmap
    cache = cache or StepCache()
    mesh = parallel.data_mesh() if mesh is None else mesh
    put = lambda x: parallel.replicate(np.asarray(x), mesh)  # noqa: E731
    norm = norm_stats(normalization)
    graphdef, params, batch_stats = _model_trees(models)
    layer_names = models[0].trunk.layer_names
    freezing.check_phases(config.phases, layer_names[:num_reused])
    sizes = [len(s) for s in subsets]
    by_epochs = _check_budgets(config.phases, sizes, val)
    batch = min(config.batch_size, min(sizes))
    steps_per_epoch = max(sizes[0] // batch, config.min_steps_per_epoch)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    max_shift = config.max_shift or default_max_shift(*np.shape(images)[1:3])
    ridge = config.head_init == "ridge"
    if ridge and len(layer_names) > num_reused:
        warnings.warn(AuxtlWarning(
            f"head_init='ridge' needs the head to read the reused layers directly, but "
            f"{len(layer_names) - num_reused} fresh layer(s) ({', '.join(layer_names[num_reused:])}"
            f") sit above them and train from scratch: the head starts random instead"),
            stacklevel=2)
        ridge = False
    if ridge:
        if val is None:
            raise InputError("head_init='ridge' chooses the probe's L2 on validation: give "
                             "`val` (and epoch phases)")
        pooled = cache.get(("pooled", graphdef), lambda: pooled_features_fn(graphdef))
        params, _ = init_heads(pooled, params, batch_stats, images=images, labels=labels,
                               subsets=subsets, val=val, norm=norm,
                               num_classes=int(np.shape(params[0]["head"]["bias"])[-1]))
    template = params[0]
    states = parallel.replicate(TrainState(
        step=jnp.zeros(count, jnp.int32), params=stack(params), batch_stats=stack(batch_stats),
        opt_state=None, rng=stack([jax.random.key_data(jax.random.key(s)) for s in seeds])),
        mesh)
    labels = put(labels)   # the evaluated sets' labels too: everything global on the mesh
    val = None if val is None else (val[0], put(val[1]))
    test = None if test is None else (test[0], put(test[1]))
    global_steps = np.zeros(count, np.int64)
    best = [{"accuracy": -1.0, "params": _snapshot(p), "batch_stats": _snapshot(b)}
            for p, b in zip(params, batch_stats)]
    phase_best: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    start_val = None
    if ridge:   # the probe-initialised model is a candidate too (epoch 0 of phase 0)
        logits0 = cache.get(("logits", graphdef, 0, vmap), lambda: (
            seed_logits(logits_fn(graphdef, 0)) if vmap else make_logits_fn(graphdef, 0)))
        start_val = seed_correct(logits0, states.params, states.batch_stats, val[0], val[1],
                                 norm, vmap=vmap) / len(val[1])
        for s, b in enumerate(best):
            b["accuracy"] = float(start_val[s])
    del params, batch_stats
    history: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    test_accuracy: list[float | None] = [None] * count
    old_labels = None
    bar = tqdm(total=sum(p.epochs or 1 for p in config.phases), disable=not progress,
               desc=desc, unit="epoch" if by_epochs else "phase", dynamic_ncols=True,
               leave=False)
    for phase_index, phase in enumerate(config.phases):
        planned = lambda cache_prefix: freezing.plan_phase(  # noqa: E731
            template, layer_names, num_reused, phase, learning_rate=config.learning_rate,
            weight_decay=config.weight_decay, optimizer=config.optimizer,
            layer_decay=config.layer_decay, cache_prefix=cache_prefix,
            schedule=config.schedule, warmup=config.warmup,
            total_steps=phase.epochs * steps_per_epoch if by_epochs else phase.steps,
            augment=config.augment, max_shift=max_shift)
        plan = planned(config.cache_features)
        if plan.start and count > 1 and not _prefix_shared(states, plan.start):
            plan = planned(False)
        states = parallel.replicate(states.replace(opt_state=freezing.carry_over_state(
            states.opt_state, old_labels, jax.vmap(plan.optimizer.init)(states.params),
            plan.labels)), mesh)
        old_labels = plan.labels
        run = cache.get(("run", graphdef, plan.key, vmap, mesh), lambda: seeds_runner(
            graphdef, plan, vmap, mesh=mesh, layout=cache.layout))
        logits = cache.get(("logits", graphdef, plan.start, vmap), lambda: (
            seed_logits(logits_fn(graphdef, plan.start)) if vmap
            else make_logits_fn(graphdef, plan.start)))
        features = put
        if plan.start:
            prefix = cache.get(("prefix", graphdef, plan.start),
                               lambda: make_prefix_fn(graphdef, plan.start))
            first = unstack(states.params, 0), unstack(states.batch_stats, 0)
            key = ("features", graphdef, plan.start, _prefix_digest(*first, plan.start, norm))
            features = lambda x: cache.features(key, x, lambda data: in_chunks(  # noqa: E731
                lambda c: prefix(*first, c, norm), put(data)))
        inputs = features(images)
        scored = val if by_epochs else test
        scored_inputs = None if scored is None else features(scored[0])
        active, since_best = np.ones(count, bool), np.zeros(count, np.int64)
        for s in range(count):
            phase_best[s].append(
                {**best[s], "epoch": 0} if phase_index == 0 and start_val is not None
                else {"accuracy": -1.0, "epoch": None})
        for epoch in range(phase.epochs or 1):
            length = steps_per_epoch if by_epochs else phase.steps
            schedule = batch_schedule(subsets, batch, length, seeds=seeds,
                                            start=global_steps)
            was_active = active.copy()
            states, losses = run(states, inputs, labels, schedule, active, norm)
            global_steps[was_active] += length
            accuracies = [None] * count
            if scored is not None:
                accuracies = seed_correct(logits, states.params, states.batch_stats,
                                          scored_inputs, scored[1], norm, vmap=vmap
                                          ) / len(scored[1])
            losses = jax.device_get(losses)
            for s in np.flatnonzero(was_active):
                record = {"phase": phase_index, "train": phase.train,
                          **({"epoch": epoch + 1} if by_epochs else {}),
                          "step": int(global_steps[s]),
                          **({"val_accuracy": float(accuracies[s])} if by_epochs else {}),
                          "train_loss": float(np.mean(np.asarray(losses[s])))}
                if by_epochs:
                    # the run's best is never below this phase's, so a new run best is a
                    # new phase best too: one snapshot serves both
                    since_best[s] += 1
                    if accuracies[s] > phase_best[s][-1]["accuracy"]:
                        kept = {"accuracy": float(accuracies[s]),
                                "params": _snapshot(unstack(states.params, s)),
                                "batch_stats": _snapshot(unstack(states.batch_stats, s))}
                        phase_best[s][-1] = {**kept, "epoch": epoch + 1}
                        if accuracies[s] > best[s]["accuracy"]:
                            best[s], since_best[s] = kept, 0
                    if phase.patience and since_best[s] >= phase.patience:
                        active[s] = False
                elif test is not None:
                    test_accuracy[s] = record["test_accuracy"] = float(accuracies[s])
                history[s].append(record)
            bar.set_postfix(phase=phase.train, refresh=False)
            bar.update(1)
            if not active.any():
                break
    bar.close()
    if not by_epochs:
        return [FinetuneResult(_snapshot(unstack(states.params, s)),
                               _snapshot(unstack(states.batch_stats, s)), None,
                               test_accuracy[s], history[s], int(global_steps[s]))
                for s in range(count)]
    phase_test: list[list[float | None]] = [[None] * len(config.phases) for _ in range(count)]
    if test is not None:
        logits = cache.get(("logits", graphdef, 0, vmap), lambda: (
            seed_logits(logits_fn(graphdef, 0)) if vmap else make_logits_fn(graphdef, 0)))

        def test_of(kept):
            kept_params, kept_stats = parallel.replicate(
                (stack([k["params"] for k in kept]), stack([k["batch_stats"] for k in kept])),
                mesh)
            return list(seed_correct(logits, kept_params, kept_stats, test[0], test[1],
                                     norm, vmap=vmap) / len(test[1]))

        test_accuracy = test_of(best)
        for p in range(len(config.phases)):
            ran = [s for s in range(count) if p < len(phase_best[s])
                   and phase_best[s][p]["epoch"] is not None]
            if len(config.phases) > 1 and len(ran) == count:
                for s, value in enumerate(test_of([phase_best[s][p] for s in range(count)])):
                    phase_test[s][p] = float(value)
    summaries = [[{"phase": p, "epoch": b["epoch"], "val_accuracy": b["accuracy"],
                   "test_accuracy": phase_test[s][p]} for p, b in enumerate(phase_best[s])]
                 for s in range(count)]
    return [FinetuneResult(b["params"], b["batch_stats"], b["accuracy"],
                           None if a is None else float(a), h, int(n), phase)
            for b, a, h, n, phase in zip(best, test_accuracy, history, global_steps, summaries)]


def seeds_runner(graphdef, plan: freezing.PhasePlan, vmap: bool, *, mesh=None,
                 layout: parallel.BatchLayout | None = None):
    """The seed runner (`auxtl.seeds.seed_runner`) of one phase plan on `mesh`."""
    return seed_runner(finetune_step_fn(graphdef, plan), vmap=vmap, mesh=mesh, layout=layout)


def finetune(model, num_reused: int, config: FinetuneConfig, *, train, val, test=None,
             normalization: Normalization, cache: StepCache | None = None,
             progress: bool = False, desc: str = "finetune", mesh=None) -> FinetuneResult:
    """Runs `config.phases` on (images, labels) pairs `train` and `val`; evaluates `test`.

    `model` is a TransferModel; its lowest `num_reused` trunk layers are the reused ones.
    The engine (`finetune_seeds`) for one seed, `config.seed`, on all of `train`.
    """
    return finetune_seeds([model], num_reused, config, images=train[0], labels=train[1],
                          subsets=[np.arange(len(train[0]))], seeds=[config.seed],
                          normalization=normalization, val=val, test=test, vmap=False,
                          cache=cache, progress=progress, desc=desc, mesh=mesh)[0]


def score(model, result: FinetuneResult, images, labels, *,
          normalization: Normalization, cache: StepCache | None = None) -> float:
    """Accuracy of a fine-tuned result's parameters on any labeled images."""
    graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    cache = cache or StepCache()
    logits = cache.get(("logits", graphdef, 0, False), lambda: make_logits_fn(graphdef, 0))
    correct = seed_correct(logits, stack([result.params]), stack([result.batch_stats]), images,
                           labels, norm_stats(normalization), vmap=False)
    return float(correct[0] / len(labels))
