"""Label-efficiency sweep: how much each pretraining source helps at each label budget.

For each source (every registered task that accepts the images, a multi-task mix,
and two controls: `random`, a frozen randomly initialised trunk, and `scratch`,
the target architecture trained from random init with every layer trainable),
each label budget (labeled images per class, or `all`) and each evaluation mode,
over several seeds:

  linear  softmax regression on globally pooled features of every trunk depth
          (`auxtl.probes`); the table shows the top reused depth (fixed, never
          chosen by test accuracy), the JSON every depth
  knn     cosine k-NN on the top reused depth's pooled features
  head    the lowest `reuse` layers frozen, everything above them (the source
          architecture's upper layers, fresh, plus a linear classifier) trained
          on their cached output for `head_steps`
  staged  `head`, then the top `unfreeze` reused layers unfrozen at
          `staged_lr_scale` x the rate for `staged_steps` more (BatchNorm of the
          still-frozen layers in inference mode)

`scratch` is the `head`/`staged` target architecture with nothing frozen, trained
for head_steps + staged_steps; it is the paired reference of the trained modes and
`random` that of the probes. Every step budget is fixed: no early stopping and no
selection, so the test split is only ever used to score. Seeds of one cell share
shapes: probes run them under one `jax.vmap`, trained modes share one compiled step
(vmapped over seeds on accelerators, see `auxtl.seeds`).

    auxtl bench transfer                       # defaults: mnist5k, minutes on 2 CPU cores
    auxtl bench transfer --tiny --out /tmp/t   # smoke test
    auxtl bench transfer --full --data cifar10:PATH   # RotNet semi-supervised setting (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from auxtl import host_memory
from auxtl.bench import BenchError, throughput
from auxtl.optim import OptimizerConfig

ALL = "all"
MODES = ("linear", "knn", "head", "staged")
TRAINED_MODES = ("head", "staged")
RANDOM, SCRATCH = "random", "scratch"
MIX = "rotation+jigsaw"
# The default bench trunk: small_cnn at half width, pooling after conv1 and conv3 so
# only conv1 runs at 28 px (about 3.4 MFLOP per image instead of 11).
BENCH_TRUNKS = {"small_cnn": {"widths": (16, 16, 32, 32, 64), "fc_dim": 64,
                              "pool_after": (1, 3)}}
TINY_TRUNKS = {"small_cnn": {"widths": (8, 8, 16, 16, 16), "fc_dim": 16},
               "nin": {"width": 8}}
# Gidaris et al. 2018 (RotNet), CIFAR-10 semi-supervised, as tabulated by Qi and Luo:
# test accuracy (%) by labeled examples per class.
PUBLISHED_ROTNET = {"scratch": {20: 33.66, 100: 47.26, 400: 74.19, 1000: 83.47, 5000: 93.07},
                    "RotNet + conv": {20: 64.63, 100: 75.28, 400: 82.84, 1000: 86.43,
                                      5000: 91.95}}


@dataclasses.dataclass(frozen=True)
class TransferBenchConfig:
    """Everything that fixes a sweep; saved in transfer.json."""

    sources: tuple[str, ...] = ()          # () = every registered task + MIX + controls
    budgets: tuple[int | str, ...] = (1, 5, 10, 50, ALL)
    modes: tuple[str, ...] = MODES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    data: str = "mnist5k"
    model: str = "small_cnn"
    model_overrides: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(BENCH_TRUNKS["small_cnn"]))
    reuse: int = 4                          # lowest layers reused by head/staged (and probed)
    unfreeze: int = 2                       # staged: top reused layers unfrozen
    pretrain_steps: int = 200
    pretrain_batch_size: int = 32
    pretrain_seed: int = 0
    pretrain_optimizer: OptimizerConfig = OptimizerConfig()
    probe_steps: int = 300
    knn_k: int = 10                         # capped at the labels per class
    head_steps: int = 100
    staged_steps: int = 50
    staged_lr_scale: float = 0.1
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    out: str = "runs/bench_transfer"
    published: str | None = None            # "rotnet_cifar10": print Gidaris et al. beside ours
    vmap_seeds: bool | None = None          # None: vmap on accelerators, a loop on CPU
    progress: bool = False

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ---- data ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BenchData:
    """`pool`: unlabeled pretraining images and the labeled subsets' source; `test`: scored
    only. `pretrain`: what run_pretraining receives (it holds out its own 10%)."""

    pool: Any
    test: Any
    pretrain: Any
    test_origin: str


def load_bench_data(spec: str) -> BenchData:
    """The pretraining held-out split (SPLIT_SEED, 10%) is the test split, and the rest
    the pool; CIFAR-10 with a test_batch uses it as the test split and all training
    batches as the pool."""
    from auxtl.data import load_dataset
    from auxtl.splits import train_test_split
    from auxtl.pretrain import SPLIT_SEED
    dataset = load_dataset(spec)
    if dataset.labels is None:
        raise BenchError(f"the transfer benchmark needs labeled data; {spec!r} has no labels")
    kind, _, path = spec.partition(":")
    if kind == "cifar10" and (pathlib.Path(path).expanduser() / "test_batch").is_file():
        return BenchData(dataset, load_dataset(f"cifar10-test:{path}"), dataset,
                         "cifar10-test (test_batch)")
    pool, test = train_test_split(dataset, test_fraction=0.1, seed=SPLIT_SEED)
    return BenchData(pool, test, dataset, f"held-out 10% (SPLIT_SEED={SPLIT_SEED})")


def labeled_indices(labels: np.ndarray, budget: int | str, seed: int) -> np.ndarray:
    """Indices into the pool: `budget` examples of every class, drawn by
    `auxtl.transfer.per_class_indices` with this seed (one permutation per seed, so a
    seed's smaller budgets are subsets of its larger ones); `all` = the whole pool."""
    from auxtl.transfer import per_class_indices
    if budget == ALL:
        return np.arange(len(labels))
    return per_class_indices(labels, (int(budget),), seed=seed)[0]


def budget_x(budget: int | str, pool_labels: np.ndarray) -> float:
    """Labels per class on the plot's x axis (`all`: the pool's mean per class)."""
    if budget == ALL:
        return len(pool_labels) / len(np.unique(pool_labels))
    return float(budget)


# ---- sources -------------------------------------------------------------------------------

def expand_sources(names: Sequence[str]) -> tuple[str, ...]:
    """() -> every registered task, MIX, random, scratch; 'tasks' -> every registered task."""
    from auxtl.registry import list_tasks
    names = tuple(names) or ("tasks", MIX, RANDOM, SCRATCH)
    out: list[str] = []
    for name in names:
        out += list_tasks() if name == "tasks" else [name]
    return tuple(dict.fromkeys(out))


def source_tasks(name: str) -> tuple[str, ...]:
    """'rotation+jigsaw' -> ('rotation', 'jigsaw'); controls have none."""
    return () if name in (RANDOM, SCRATCH) else tuple(name.split("+"))


def refusal(name: str, image_shape) -> str | None:
    """Why a source cannot pretrain on these images (a task's validate), or None."""
    from auxtl.registry import get_task, list_tasks
    for task in source_tasks(name):
        if task not in list_tasks():
            raise BenchError(f"unknown source {name!r}: no task {task!r}; registered: "
                             f"{', '.join(list_tasks())}, plus {RANDOM!r} and {SCRATCH!r}")
        try:
            get_task(task).validate(tuple(image_shape))
        except ValueError as error:
            return str(error)
    return None


def pretrain_config(config: TransferBenchConfig, name: str, out: pathlib.Path):
    from auxtl.pretrain import PretrainConfig, TaskConfig
    return PretrainConfig(tasks=tuple(TaskConfig(t) for t in source_tasks(name)),
                          data=config.data, model=config.model,
                          model_overrides=dict(config.model_overrides),
                          steps=config.pretrain_steps, batch_size=config.pretrain_batch_size,
                          seed=config.pretrain_seed, optimizer=config.pretrain_optimizer,
                          log_every=max(1, min(25, config.pretrain_steps)),
                          out=str(out), progress=config.progress)


_IDENTITY_IGNORED = ("out", "progress", "resume", "overwrite", "keep", "log_every")


def _same_run(saved: dict, current: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in _IDENTITY_IGNORED}
    return strip(saved) == strip(current)


def pretrained_trunk(config: TransferBenchConfig, name: str, data: BenchData,
                     log: Callable[[str], None]) -> tuple[pathlib.Path, dict]:
    """out/sources/<name>/trunk, pretrained on the pool; reused when a finished run with
    the same settings is there. Returns (trunk path, info for the JSON)."""
    from auxtl.pretrain import run_pretraining
    out = pathlib.Path(config.out) / "sources" / name
    pre = pretrain_config(config, name, out)
    saved = out / "config.json"
    if ((out / "summary.json").is_file() and saved.is_file()
            and _same_run(json.loads(saved.read_text()), pre.to_json())):
        summary = json.loads((out / "summary.json").read_text())
        log(f"[transfer] source {name}: reusing {out / 'trunk'}")
        return out / "trunk", {"cached": True, "pretrain_s": 0.0, "eval": summary["eval"]}
    shutil.rmtree(out, ignore_errors=True)
    log(f"[transfer] source {name}: pretraining {config.pretrain_steps} steps "
        f"(batch {config.pretrain_batch_size}) ...")
    start = time.perf_counter()
    result = run_pretraining(pre, data.pretrain)
    seconds = time.perf_counter() - start
    log(f"[transfer] source {name}: pretrained in {seconds:.1f} s, held-out "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.eval_metrics.items()))
    return result.trunk_path, {"cached": False, "pretrain_s": seconds,
                               "eval": result.eval_metrics}


def random_trunk(config: TransferBenchConfig, data: BenchData) -> tuple[pathlib.Path, dict]:
    """The trunk every pretraining run starts from (same model, same seed), saved as a
    checkpoint with the pool's normalisation."""
    from flax import nnx

    from auxtl import checkpoints
    from auxtl.data import compute_normalization
    from auxtl.models import build_trunk, config_to_json, make_config
    shape = data.pool.image_shape
    model_config = make_config(config.model, shape, **config.model_overrides)
    trunk = build_trunk(config.model, model_config, rngs=nnx.Rngs(config.pretrain_seed))
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(model_config), input_shape=shape,
        normalization=compute_normalization(data.pool.images), tasks=[],
        extra={"data": config.data, "seed": config.pretrain_seed, "steps": 0})
    path = pathlib.Path(config.out).absolute() / "sources" / RANDOM / "trunk"
    checkpoints.save_trunk(path, trunk_params=nnx.to_pure_dict(nnx.state(trunk, nnx.Param)),
                           trunk_batch_stats=nnx.to_pure_dict(nnx.state(trunk, nnx.BatchStat)),
                           metadata=metadata)
    return path, {"cached": False, "pretrain_s": 0.0, "eval": None}


# ---- the evaluation modes --------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """A trunk checkpoint loaded once per sweep."""

    name: str
    metadata: dict
    params: Any
    batch_stats: Any


def load_source(name: str, path) -> Source:
    from auxtl import checkpoints
    params, stats, metadata = checkpoints.load_trunk_state(path)
    return Source(name, metadata, params, stats)


def probe_cells(source: Source, data: BenchData, subsets: dict, config: TransferBenchConfig,
                log: Callable[[str], None]) -> list[dict]:
    """linear (every depth) and knn (top reused depth) for every budget, seeds vmapped."""
    from flax import nnx

    from auxtl import checkpoints, probes
    from auxtl.data import Normalization
    trunk = checkpoints.build_checkpoint_trunk(source.metadata)
    nnx.update(trunk, source.params, source.batch_stats)
    norm = Normalization.from_json(source.metadata["normalization"])
    start = time.perf_counter()
    pool = probes.depth_features(trunk, data.pool.images, norm)
    test = probes.depth_features(trunk, data.test.images, norm)
    log(f"[transfer] {source.name}: features of {len(pool)} depths in "
        f"{time.perf_counter() - start:.1f} s")
    names, depth = trunk.layer_names, config.reuse - 1
    num_classes = data.pool.num_classes
    cells = []
    for budget, per_seed in subsets.items():
        start = time.perf_counter()
        # Identical subsets (budget 'all') give identical probes: compute one, repeat it.
        same = all(np.array_equal(per_seed[0], p) for p in per_seed[1:])
        rows = per_seed[:1] if same else per_seed
        spread = (lambda a: np.repeat(np.asarray(a), len(per_seed))) if same else np.asarray
        labels = np.stack([data.pool.labels[i] for i in rows])
        if "linear" in config.modes:
            for d, name in enumerate(names):
                x = np.stack([pool[d][i] for i in rows])
                accuracy = probes.linear_probe_accuracy(
                    x, labels, test[d], data.test.labels, num_classes=num_classes,
                    steps=config.probe_steps)
                cells.append(cell(source.name, "linear", budget, config.seeds, spread(accuracy),
                                  layer=name, table=d == depth))
        if "knn" in config.modes:
            x = np.stack([pool[depth][i] for i in rows])
            k = min(config.knn_k, len(per_seed[0]) // num_classes)
            accuracy = probes.knn_accuracy(x, labels, test[depth], data.test.labels, k=k,
                                           num_classes=num_classes)
            cells.append(cell(source.name, "knn", budget, config.seeds, spread(accuracy),
                              layer=names[depth], k=k))
        log(f"[transfer] {source.name}: probes at {budget} labels/class in "
            f"{time.perf_counter() - start:.1f} s")
    return cells


def vmap_seeds(config: TransferBenchConfig) -> bool:
    """vmap the trained modes over seeds: on accelerators by default, not on CPU (see
    `auxtl.seeds.seed_trainer`)."""
    if config.vmap_seeds is not None:
        return config.vmap_seeds
    return jax.default_backend() != "cpu"


class Trainer:
    """Builds and caches one compiled seed trainer per phase (jit caches per shape)."""

    def __init__(self, config: TransferBenchConfig):
        from auxtl.finetune import StepCache
        self.config = config
        self.cache = StepCache()
        self.vmap = vmap_seeds(config)

    def phase(self, graphdef, params, layer_names, k: int, phase, normalization):
        """(seed trainer, logits fn, frozen-prefix length, optimizer, labels) for one phase."""
        from auxtl import freezing, seeds
        from auxtl.finetune import finetune_step_fn, make_logits_fn
        labels = freezing.phase_labels(params, layer_names, k, phase)
        mask = freezing.trainable_mask(labels)
        frozen = freezing.frozen_layer_names(layer_names, k, phase)
        start = freezing.frozen_prefix_length(layer_names, frozen)
        rates = freezing.group_learning_rates(self.config.learning_rate, phase, layer_names[:k])
        optimizer = freezing.partitioned_optimizer(labels, rates,
                                                   weight_decay=self.config.weight_decay)
        key = (graphdef, tuple(jax.tree.leaves(labels)), frozen, start,
               tuple(sorted(rates.items())), self.config.weight_decay, normalization)
        run = self.cache.get(("train",) + key, lambda: seeds.seed_trainer(
            finetune_step_fn(graphdef, mask, frozen, optimizer, start, normalization),
            vmap=self.vmap))
        logits = self.cache.get(("logits", graphdef, start, normalization),
                                lambda: seeds.seed_logits(
                                    make_logits_fn(graphdef, start, normalization)))
        return run, logits, start, optimizer, labels

    def prefix(self, graphdef, params, batch_stats, images, stop: int, normalization):
        """Output of the lowest `stop` layers (inference mode) of one model: the cache
        every seed shares, since those layers are frozen source weights."""
        from auxtl.finetune import in_chunks, make_prefix_fn
        if stop == 0:
            return jnp.asarray(images)
        fn = self.cache.get(("prefix", graphdef, stop, normalization),
                            lambda: make_prefix_fn(graphdef, stop, normalization))
        return in_chunks(lambda x: fn(params, batch_stats, x), images)


def initial_states(models, optimizer, seeds_used: Sequence[int]):
    """Stacked TrainState of per-seed models: params, stats, optimizer state, step 0."""
    from flax import nnx

    from auxtl import seeds
    from auxtl.train import TrainState
    params = seeds.stack([nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in models])
    stats = seeds.stack([nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)) for m in models])
    return TrainState(step=jnp.zeros(len(models), jnp.int32), params=params, batch_stats=stats,
                      opt_state=jax.vmap(optimizer.init)(params),
                      rng=jnp.stack([jax.random.key_data(jax.random.key(s))
                                     for s in seeds_used]))


def trained_cells(name: str, source: Source | None, data: BenchData, subsets: dict,
                  config: TransferBenchConfig, trainer: Trainer, reference: Source,
                  log: Callable[[str], None]) -> list[dict]:
    """head and staged for a source; for `scratch` (source None), the same target
    architecture with every layer trainable for head_steps + staged_steps."""
    from flax import nnx

    from auxtl import seeds
    from auxtl.data import Normalization
    from auxtl.freezing import Phase, carry_over_state
    from auxtl.models.target import TargetSpec
    from auxtl.transfer import build_transfer_model
    meta = (source or reference).metadata
    spec = TargetSpec(reuse=config.reuse, top="replace")
    norm = Normalization.from_json(meta["normalization"])
    shape = data.pool.image_shape
    models = [build_transfer_model(meta, source and source.params, source and source.batch_stats,
                                   spec, num_classes=data.pool.num_classes,
                                   in_channels=shape[-1], seed=seed,
                                   transplant=source is not None)[0]
              for seed in config.seeds]
    graphdef, params0, stats0 = nnx.split(models[0], nnx.Param, nnx.BatchStat)
    params0, stats0 = nnx.to_pure_dict(params0), nnx.to_pure_dict(stats0)
    layer_names = models[0].trunk.layer_names
    k = config.reuse
    # Phase.epochs counts steps here: every step budget is fixed, whatever the subset size.
    if source is None:
        phases = [("scratch", Phase(config.head_steps + config.staged_steps, "all"))]
    else:
        phases = [("head", Phase(config.head_steps, "head"))]
        if "staged" in config.modes:
            phases.append(("staged", Phase(config.staged_steps, f"head+top{config.unfreeze}",
                                           lr_scale=config.staged_lr_scale)))
    cells, features = [], {}
    for budget, per_seed in subsets.items():
        start_time, states, old_labels, step = time.perf_counter(), None, None, 0
        for mode, phase in phases:
            run, logits, start, optimizer, labels = trainer.phase(
                graphdef, params0, layer_names, k, phase, norm)
            if states is None:
                states = initial_states(models, optimizer, config.seeds)
            else:
                states = states.replace(opt_state=carry_over_state(
                    states.opt_state, old_labels, jax.vmap(optimizer.init)(states.params),
                    labels))
            if start not in features:
                features[start] = tuple(trainer.prefix(graphdef, params0, stats0, images,
                                                       start, norm)
                                        for images in (data.pool.images, data.test.images))
            pool_x, test_x = features[start]
            schedule = seeds.batch_schedule(per_seed, config.batch_size, phase.epochs,
                                            seeds=config.seeds, start=step)
            states = run(states, pool_x, jnp.asarray(data.pool.labels), jnp.asarray(schedule))
            step, old_labels = step + phase.epochs, labels
            accuracy = seeds.seed_accuracies(logits, states.params, states.batch_stats,
                                             test_x, data.test.labels)
            modes = TRAINED_MODES if mode == "scratch" else (mode,)
            cells += [cell(name, m, budget, config.seeds, accuracy, steps=step)
                      for m in modes if m in config.modes]
        log(f"[transfer] {name}: {'+'.join(m for m, _ in phases)} at {budget} labels/class "
            f"in {time.perf_counter() - start_time:.1f} s")
    return cells


# ---- cells and statistics ------------------------------------------------------------------------

def cell(source: str, mode: str, budget, seeds: Sequence[int], accuracy, **extra) -> dict:
    """One (source, mode, budget): per-seed test accuracies, mean and 95% t-interval."""
    from auxtl.stats import mean_interval
    values = [float(a) for a in np.asarray(accuracy)]
    mean, low, high = mean_interval(values)
    return {"source": source, "mode": mode, "budget": budget, "seeds": list(seeds),
            "accuracy": values, "mean": mean, "low": low, "high": high, **extra}


def reference_for(mode: str) -> str:
    return SCRATCH if mode in TRAINED_MODES else RANDOM


def add_differences(cells: list[dict]) -> None:
    """Each cell's paired difference to its reference (same seed, same labeled subset):
    scratch for head/staged, the random trunk for linear/knn."""
    from auxtl.stats import paired_difference
    index = {(c["source"], c["mode"], c["budget"], c.get("layer")): c for c in cells}
    for c in cells:
        ref_name = reference_for(c["mode"])
        layer = c.get("layer") if c["mode"] in ("linear", "knn") else None
        ref = index.get((ref_name, c["mode"], c["budget"], layer))
        c["reference"] = ref_name if ref is not None and c["source"] != ref_name else None
        c["difference"] = None
        if c["reference"]:
            per_seed = [a - b for a, b in zip(c["accuracy"], ref["accuracy"])]
            mean, low, high = paired_difference(c["accuracy"], ref["accuracy"])
            c["difference"] = {"mean": mean, "low": low, "high": high, "per_seed": per_seed}


# ---- the sweep ---------------------------------------------------------------------------------

def run_sweep(config: TransferBenchConfig, *, log: Callable[[str], None] = print) -> dict:
    """Pretrains (or reuses) every source, evaluates every mode, budget and seed."""
    total_start = time.perf_counter()
    unknown = [m for m in config.modes if m not in MODES]
    if unknown or not config.modes:
        raise BenchError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if len(config.seeds) < 2:
        raise BenchError("a 95% interval needs at least 2 seeds")
    data = load_bench_data(config.data)
    shape = data.pool.image_shape
    log(f"[transfer] data {config.data}: pool {len(data.pool)}, test {len(data.test)} "
        f"({data.test_origin}), {data.pool.num_classes} classes, images {shape}")
    subsets = {b: [labeled_indices(data.pool.labels, b, s) for s in config.seeds]
               for b in config.budgets}
    names = expand_sources(config.sources)
    sources: dict[str, dict] = {}
    paths: dict[str, pathlib.Path] = {}
    for name in names:
        reason = refusal(name, shape)
        if reason:
            log(f"[transfer] source {name}: skipped ({reason})")
            sources[name] = {"status": "skipped", "reason": reason, "tasks": source_tasks(name)}
            continue
        if name == SCRATCH:
            sources[name] = {"status": "ok", "tasks": (), "kind": "control"}
            continue
        path, info = (random_trunk(config, data) if name == RANDOM
                      else pretrained_trunk(config, name, data, log))
        paths[name] = path
        sources[name] = {"status": "ok", "tasks": source_tasks(name), "trunk": str(path),
                         "kind": "control" if name == RANDOM else "pretrained", **info}
    cells: list[dict] = []
    timings: dict[str, float] = {}
    trainer = Trainer(config)
    reference = None
    for name, path in paths.items():
        source = load_source(name, path)
        reference = reference or source
        start = time.perf_counter()
        if {"linear", "knn"} & set(config.modes):
            cells += probe_cells(source, data, subsets, config, log)
        if set(TRAINED_MODES) & set(config.modes):
            cells += trained_cells(name, source, data, subsets, config, trainer, source, log)
        timings[name] = time.perf_counter() - start
    if SCRATCH in sources and set(TRAINED_MODES) & set(config.modes):
        if reference is None:   # scratch alone: its architecture comes from the random trunk
            reference = load_source(RANDOM, random_trunk(config, data)[0])
        start = time.perf_counter()
        cells += trained_cells(SCRATCH, None, data, subsets, config, trainer, reference, log)
        timings[SCRATCH] = time.perf_counter() - start
    add_differences(cells)
    pool_labels = data.pool.labels
    return {
        "config": config.to_json(),
        "environment": throughput.environment(),
        "trained_seeds": "vmapped" if trainer.vmap else "one after another, one compiled step",
        "data": {"spec": config.data, "pool_size": len(data.pool), "test_size": len(data.test),
                 "test_split": data.test_origin, "num_classes": data.pool.num_classes,
                 "image_shape": list(shape)},
        "subsets": {str(b): {"x": budget_x(b, pool_labels),
                             "sizes": [len(i) for i in per_seed],
                             "per_class": [np.bincount(pool_labels[i]).tolist()
                                           for i in per_seed]}
                    for b, per_seed in subsets.items()},
        "sources": sources,
        "cells": [c for c in cells if c["mode"] != "linear" or c.get("table")],
        "linear_by_depth": [c for c in cells if c["mode"] == "linear"],
        "timings_s": {"evaluation": timings,
                      "pretraining": {n: s.get("pretrain_s", 0.0) for n, s in sources.items()},
                      "total": time.perf_counter() - total_start},
    }


# ---- command line ------------------------------------------------------------------------------

def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_budgets(text: str) -> tuple[int | str, ...]:
    budgets: list[int | str] = []
    for item in _split(text):
        if item == ALL:
            budgets.append(ALL)
            continue
        try:
            value = int(item)
        except ValueError as error:
            raise BenchError(f"--budgets {text!r}: {item!r} is neither a number nor "
                             f"'all'") from error
        if value < 1:
            raise BenchError(f"--budgets {text!r}: labels per class must be >= 1")
        budgets.append(value)
    if not budgets:
        raise BenchError(f"--budgets {text!r} names no budget")
    return tuple(dict.fromkeys(budgets))


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(_split(text)))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise BenchError(f"--modes {text!r}: choose from {', '.join(MODES)}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auxtl bench transfer",
        description="Label-efficiency sweep: test accuracy by pretraining source, labels per "
                    "class and evaluation mode over seeds, with 95%% intervals and paired "
                    "differences to scratch (trained modes) or a random trunk (probes).")
    parser.add_argument("--data", default=None,
                        help="mnist5k (default) | digits | npz:PATH | folder:PATH | cifar10:PATH")
    parser.add_argument("--sources", default=None,
                        help="comma list of task names, A+B mixes, random, scratch, or 'tasks' "
                             f"(every registered task); default: tasks,{MIX},random,scratch")
    parser.add_argument("--budgets", default=None, help="labels per class, e.g. 1,5,10,50,all")
    parser.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--head-steps", type=int, default=None)
    parser.add_argument("--staged-steps", type=int, default=None)
    parser.add_argument("--probe-steps", type=int, default=None)
    parser.add_argument("--reuse", type=int, default=None,
                        help="lowest trunk layers reused (head/staged) and probed (table)")
    parser.add_argument("--model", default=None, help="trunk architecture (auxtl models)")
    parser.add_argument("--out", default=None, help="output folder (default runs/bench_transfer)")
    parser.add_argument("--json", default=None, help="JSON path (default OUT/transfer.json)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: narrow trunk, a few steps, 2 seeds, budgets 1,5")
    parser.add_argument("--full", action="store_true",
                        help="RotNet's CIFAR-10 semi-supervised setting (NIN trunk, rotation, "
                             "20/100/400/1000/5000 labels per class); needs --data cifar10:PATH")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--progress", action="store_true", help="pretraining progress bars")
    return parser


def full_config() -> TransferBenchConfig:
    """Gidaris et al. 2018, semi-supervised CIFAR-10: a 4-block NIN RotNet on all training
    images (4 rotations each, SGD 0.1, wd 5e-4, batch 128, 100 epochs), then classifiers
    on the frozen 2nd block's maps (`head`: fresh blocks 3-4 + linear, our analogue of
    'RotNet + conv'), beside the same network trained from scratch."""
    return TransferBenchConfig(
        sources=("rotation", RANDOM, SCRATCH), budgets=(20, 100, 400, 1000, 5000),
        data="", model="nin", model_overrides={}, reuse=2, unfreeze=1,
        pretrain_steps=39_100, pretrain_batch_size=128,
        pretrain_optimizer=OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9,
                                           weight_decay=5e-4, warmup_steps=500),
        probe_steps=1000, knn_k=20, head_steps=6000, staged_steps=3000, batch_size=128,
        learning_rate=1e-3, weight_decay=5e-4, out="runs/bench_transfer_full",
        published="rotnet_cifar10")


def tiny_overrides(config: TransferBenchConfig) -> dict[str, Any]:
    return dict(sources=config.sources if config.published else
                ("rotation", "jigsaw", RANDOM, SCRATCH),
                budgets=(1, 5), seeds=(0, 1),
                model_overrides=dict(TINY_TRUNKS.get(config.model, {})),
                pretrain_steps=6, pretrain_batch_size=16, probe_steps=30, head_steps=8,
                staged_steps=4, batch_size=16, knn_k=3)


def config_from_args(args: argparse.Namespace) -> TransferBenchConfig:
    """Preset (defaults, --full, then --tiny), then explicit flags on top."""
    config = full_config() if args.full else TransferBenchConfig()
    if args.tiny:
        config = dataclasses.replace(config, **tiny_overrides(config))
    explicit: dict[str, Any] = {}
    if args.data:
        explicit["data"] = args.data
    elif args.full:
        raise BenchError("--full needs --data cifar10:PATH (the CIFAR-10 python batches)")
    if args.sources:
        explicit["sources"] = tuple(dict.fromkeys(_split(args.sources)))
    if args.budgets:
        explicit["budgets"] = parse_budgets(args.budgets)
    if args.modes:
        explicit["modes"] = parse_modes(args.modes)
    if args.seeds is not None:
        explicit["seeds"] = tuple(range(args.seeds))
    for flag in ("pretrain_steps", "head_steps", "staged_steps", "probe_steps", "reuse"):
        if getattr(args, flag) is not None:
            if getattr(args, flag) < 1:
                raise BenchError(f"--{flag.replace('_', '-')} must be >= 1")
            explicit[flag] = getattr(args, flag)
    if args.model and args.model != config.model:
        explicit["model"] = args.model
        explicit["model_overrides"] = dict((TINY_TRUNKS if args.tiny else BENCH_TRUNKS)
                                           .get(args.model, {}))
    if args.out:
        explicit["out"] = args.out
    explicit["progress"] = args.progress
    config = dataclasses.replace(config, **explicit)
    if config.unfreeze > config.reuse:
        config = dataclasses.replace(config, unfreeze=config.reuse)
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep from command-line arguments; writes and returns transfer.json's content."""
    from auxtl.bench import transfer_report as report
    host_memory.keep_freed_memory()   # no-op when the CLI already did it
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    config = config_from_args(args)
    out = pathlib.Path(config.out)
    json_path = pathlib.Path(args.json) if args.json else out / "transfer.json"
    out.mkdir(parents=True, exist_ok=True)
    result = run_sweep(config, log=lambda text: print(text, file=sys.stderr, flush=True))
    result["outputs"] = {"json": str(json_path), "markdown": str(out / "transfer.md"),
                         "plot": None if args.no_plot else str(out / "transfer.png")}
    markdown = report.markdown(result)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    (out / "transfer.md").write_text(markdown)
    if not args.no_plot:
        report.plot(result, out / "transfer.png")
    print(markdown)
    print(f"wrote {json_path}, {out / 'transfer.md'}"
          + ("" if args.no_plot else f", {out / 'transfer.png'}"))
    return result
