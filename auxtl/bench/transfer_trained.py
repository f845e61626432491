"""The trained modes of the transfer sweep: `head`, `staged` and the `scratch` control,
every seed of a cell sharing one compiled step per phase."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from auxtl import freezing, seeds
from auxtl.bench.transfer_cells import cell
from auxtl.bench.transfer_config import TRAINED_MODES, TransferBenchConfig
from auxtl.bench.transfer_data import BenchData
from auxtl.bench.transfer_sources import Source
from auxtl.data import Normalization
from auxtl.finetune import (StepCache, finetune_step_fn, in_chunks, make_logits_fn,
                            make_prefix_fn)
from auxtl.freezing import Phase, carry_over_state
from auxtl.models.target import TargetSpec
from auxtl.train import TrainState
from auxtl.transfer import build_transfer_model
def vmap_seeds(config: TransferBenchConfig) -> bool:
    """vmap the trained modes over seeds: on accelerators by default, not on CPU (see
    `auxtl.seeds.seed_trainer`)."""
    if config.vmap_seeds is not None:
        return config.vmap_seeds
    return jax.default_backend() != "cpu"


class Trainer:
    """Builds and caches one compiled seed trainer per phase (jit caches per shape)."""

    def __init__(self, config: TransferBenchConfig):
        self.config = config
        self.cache = StepCache()
        self.vmap = vmap_seeds(config)

    def phase(self, graphdef, params, layer_names, k: int, phase, normalization):
        """(seed trainer, logits fn, frozen-prefix length, optimizer, labels) for one phase."""
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
        if stop == 0:
            return jnp.asarray(images)
        fn = self.cache.get(("prefix", graphdef, stop, normalization),
                            lambda: make_prefix_fn(graphdef, stop, normalization))
        return in_chunks(lambda x: fn(params, batch_stats, x), images)


def initial_states(models, optimizer, seeds_used: Sequence[int]):
    """Stacked TrainState of per-seed models: params, stats, optimizer state, step 0."""
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
