"""The trained modes of the transfer sweep: `head`, `staged` and the `scratch` control.

Each (source, budget) is one run of the fine-tuning engine (`auxtl.finetune.finetune_seeds`)
over every seed at once, in its fixed-step mode: the phases count steps (the same budget
whatever the subset size), nothing is validated, and the test set scores each seed after
each phase (`head` after the first, `staged` after the second).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

from auxtl.bench.transfer_cells import cell
from auxtl.bench.transfer_config import TRAINED_MODES, TransferBenchConfig
from auxtl.bench.transfer_data import BenchData
from auxtl.bench.transfer_sources import Source
from auxtl.finetune import FinetuneConfig, StepCache, finetune_seeds
from auxtl.freezing import Phase
from auxtl.models.target import TargetSpec
from auxtl.transplant import build_transfer_model


def vmap_seeds(config: TransferBenchConfig) -> bool:
    """vmap the trained modes over seeds: on accelerators by default, not on CPU (see
    `auxtl.seeds.seed_runner`)."""
    if config.vmap_seeds is not None:
        return config.vmap_seeds
    return jax.default_backend() != "cpu"


class Trainer:
    """What every trained cell of a sweep shares: the compiled steps (one per phase plan)
    and the choice of vmapping seeds."""

    def __init__(self, config: TransferBenchConfig):
        self.config = config
        self.cache = StepCache()
        self.vmap = vmap_seeds(config)


def bench_phases(config: TransferBenchConfig, transplanted: bool) -> list[tuple[str, Phase]]:
    """(mode, fixed-step phase) pairs: head then staged for a source; for the scratch
    control every layer trainable for head_steps + staged_steps."""
    if not transplanted:
        return [("scratch", Phase(steps=config.head_steps + config.staged_steps, train="all"))]
    phases = [("head", Phase(steps=config.head_steps, train="head"))]
    if "staged" in config.modes:
        phases.append(("staged", Phase(steps=config.staged_steps,
                                       train=f"head+top{config.unfreeze}",
                                       lr_scale=config.staged_lr_scale)))
    return phases


def trained_cells(name: str, source: Source | None, data: BenchData, subsets: dict,
                  config: TransferBenchConfig, trainer: Trainer, reference: Source,
                  log: Callable[[str], None]) -> list[dict]:
    """head and staged for a source; for `scratch` (source None), the same target
    architecture with every layer trainable for head_steps + staged_steps."""
    meta = (source or reference).metadata
    spec = TargetSpec(reuse=config.reuse, top="replace")
    shape = data.pool.image_shape
    models = [build_transfer_model(meta, source and source.params, source and source.batch_stats,
                                   spec, num_classes=data.pool.num_classes,
                                   in_channels=shape[-1], seed=seed,
                                   transplant=source is not None)[0]
              for seed in config.seeds]
    phases = bench_phases(config, source is not None)
    finetune = FinetuneConfig(phases=tuple(p for _, p in phases),
                              learning_rate=config.learning_rate,
                              weight_decay=config.weight_decay, batch_size=config.batch_size)
    cells = []
    for budget, per_seed in subsets.items():
        start_time = time.perf_counter()
        results = finetune_seeds(models, config.reuse, finetune, images=data.pool.images,
                                 labels=data.pool.labels, subsets=per_seed, seeds=config.seeds,
                                 normalization=meta.normalization,
                                 test=(data.test.images, data.test.labels),
                                 vmap=trainer.vmap, cache=trainer.cache)
        for index, (mode, _) in enumerate(phases):
            accuracy = [r.history[index]["test_accuracy"] for r in results]
            modes = TRAINED_MODES if mode == "scratch" else (mode,)
            cells += [cell(name, m, budget, config.seeds, accuracy,
                           steps=results[0].history[index]["step"])
                      for m in modes if m in config.modes]
        log(f"[transfer] {name}: {'+'.join(m for m, _ in phases)} at {budget} labels/class "
            f"in {time.perf_counter() - start_time:.1f} s")
    return cells
