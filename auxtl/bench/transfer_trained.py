"""The trained modes of the transfer sweep: `head`, `staged`, `finetune` and the `scratch`
control, each an epoch-budgeted run of the fine-tuning engine
(`auxtl.finetune.finetune_seeds`) over every seed at once, validated after every epoch.

A source runs its recipes, each starting with `head_epochs` of the reused layers frozen:
`staged` then unfreezes the top `unfreeze` reused layers for `tune_epochs` at
`tune_lr_scale` x the rate, `finetune` all of them at each rate of `finetune_lr_scales`
(each seed keeps the rate validation prefers, as scratch does). `head` is the first phase's best validation
epoch of the staged run, `staged` and `finetune` their runs' best epochs (the engine keeps
the best epoch across phases: "keep the unfreezing only if validation improves"). The
`scratch` control trains the same target architecture, everything trainable, for
head_epochs + tune_epochs at each rate of `scratch_lr_scales` and keeps, per seed, the rate
whose best validation accuracy is highest. Every run uses the same augmentation, schedule
and epoch rule; test only scores the kept states.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from auxtl.bench.transfer_cells import cell
from auxtl.bench.transfer_config import AUTO, BEST, SCRATCH, TRAINED_MODES, TransferBenchConfig
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


def recipe(config: TransferBenchConfig, phases: tuple[Phase, ...], *,
           lr_scale: float = 1.0, head_init: str = "random") -> FinetuneConfig:
    """The sweep's fine-tuning settings around `phases` (one rule for every trained run)."""
    return FinetuneConfig(phases=phases, learning_rate=config.learning_rate * lr_scale,
                          head_init=head_init,
                          weight_decay=config.weight_decay, batch_size=config.batch_size,
                          augment=config.augment, schedule=config.schedule,
                          warmup=config.warmup, min_steps_per_epoch=config.min_steps_per_epoch,
                          max_steps_per_epoch=config.max_steps_per_epoch)


def source_runs(config: TransferBenchConfig) -> list[tuple[str, FinetuneConfig]]:
    """(run name, recipe) of a pretrained source: `staged` (which also yields `head`) and
    one `finetune@<scale>x` per rate of `finetune_lr_scales` (the `finetune` mode keeps,
    per seed, the one validation prefers), as far as `config.modes` asks for them."""
    head = Phase(epochs=config.head_epochs, train="head", patience=config.patience)
    tune = lambda train, scale=config.tune_lr_scale: Phase(  # noqa: E731
        epochs=config.tune_epochs, train=train, lr_scale=scale, patience=config.patience)
    runs = []
    if {"head", "staged"} & set(config.modes):
        runs.append(("staged", recipe(config, (head, tune(f"head+top{config.unfreeze}")),
                                      head_init=config.head_init)))
    if "finetune" in config.modes:
        runs += [(f"finetune@{scale:g}x", recipe(config, (head, tune("all", scale)),
                                                 head_init=config.head_init))
                 for scale in config.finetune_lr_scales]
    return runs


def scratch_runs(config: TransferBenchConfig) -> list[tuple[str, FinetuneConfig]]:
    """(run name, recipe) of the scratch control: one per learning-rate scale."""
    phase = Phase(epochs=config.head_epochs + config.tune_epochs, train="all",
                  patience=config.patience)
    return [(f"scratch@{scale:g}x", recipe(config, (phase,), lr_scale=scale))
            for scale in config.scratch_lr_scales]


def pick_on_validation(val: np.ndarray) -> np.ndarray:
    """(C, S) validation accuracies of C candidates -> (S,) the index each seed keeps: the
    best, ties to the earliest candidate (the simpler one, in the order given)."""
    val = np.asarray(val)
    return np.argmax(val >= val.max(axis=0, keepdims=True), axis=0)


def _outcome(results, phase: int | None = None) -> tuple[list[float], list[float]]:
    """(val, test) accuracies per seed: the run's kept epoch, or phase `phase`'s best."""
    if phase is None:
        return ([r.best_val_accuracy for r in results], [r.test_accuracy for r in results])
    return ([r.phase_best[phase]["val_accuracy"] for r in results],
            [r.phase_best[phase]["test_accuracy"] for r in results])


def trained_cells(name: str, source: Source | None, data: BenchData, splits: dict,
                  config: TransferBenchConfig, trainer: Trainer, reference: Source,
                  log: Callable[[str], None]) -> list[dict]:
    """The trained cells of a source (head, staged, finetune and `best`, the mode each seed
    keeps on validation), or, for `scratch` (source None), its cell under every trained
    mode's name (it is their paired reference) with the rate each seed kept."""
    meta = (source or reference).metadata
    spec = TargetSpec(reuse=config.reuse, top=config.top)
    shape = data.pool.image_shape
    models = [build_transfer_model(meta, source and source.params, source and source.batch_stats,
                                   spec, num_classes=data.pool.num_classes,
                                   in_channels=shape[-1], seed=seed,
                                   transplant=source is not None)[0]
              for seed in config.seeds]
    runs = source_runs(config) if source is not None else scratch_runs(config)
    cells = []
    for budget, per_seed in splits.items():
        start_time = time.perf_counter()
        outcomes: dict[str, tuple[list[float], list[float]]] = {}
        steps: dict[str, list[int]] = {}
        val = (data.pool.images[per_seed[0].val], data.pool.labels[per_seed[0].val])
        for run, finetune in runs:
            results = finetune_seeds(models, config.reuse, finetune, images=data.pool.images,
                                     labels=data.pool.labels, subsets=[s.train for s in per_seed],
                                     seeds=config.seeds, normalization=meta.normalization,
                                     val=val, test=(data.test.images, data.test.labels),
                                     vmap=trainer.vmap, cache=trainer.cache)
            steps[run] = [r.steps for r in results]
            outcomes[run] = _outcome(results)
            if run == "staged" and "head" in config.modes:
                outcomes["head"] = _outcome(results, phase=0)
                steps["head"] = steps[run]
        rates = [r for r, _ in runs if r.startswith("finetune@")]
        if rates:   # the finetune mode: per seed, the rate validation prefers
            kept = pick_on_validation([outcomes[r][0] for r in rates])
            outcomes["finetune"] = tuple([outcomes[rates[k]][i][s] for s, k in enumerate(kept)]
                                         for i in (0, 1))
            steps["finetune"] = [steps[rates[k]][s] for s, k in enumerate(kept)]
            finetune_rates = [rates[k] for k in kept]
        if source is None:
            names = list(outcomes)
            kept = pick_on_validation([outcomes[n][0] for n in names])
            test = [outcomes[names[k]][1][s] for s, k in enumerate(kept)]
            chosen = [names[k] for k in kept]
            cells += [cell(SCRATCH, mode, budget, config.seeds, test,
                           val_accuracy=[outcomes[names[k]][0][s] for s, k in enumerate(kept)],
                           chosen=chosen) for mode in TRAINED_MODES + (BEST,)
                      if mode in config.modes or mode == BEST]
        else:
            modes = [m for m in TRAINED_MODES if m in outcomes and m in config.modes]
            for mode in modes:
                extra = {"chosen": finetune_rates} if mode == "finetune" else {}
                cells.append(cell(name, mode, budget, config.seeds, outcomes[mode][1],
                                  val_accuracy=outcomes[mode][0], steps=steps[mode], **extra))
            kept = pick_on_validation([outcomes[m][0] for m in modes])
            cells.append(cell(name, BEST, budget, config.seeds,
                              [outcomes[modes[k]][1][s] for s, k in enumerate(kept)],
                              val_accuracy=[outcomes[modes[k]][0][s]
                                            for s, k in enumerate(kept)],
                              chosen=[modes[k] for k in kept]))
        log(f"[transfer] {name}: {', '.join(r for r, _ in runs)} at {budget} labels/class in "
            f"{time.perf_counter() - start_time:.1f} s")
    return cells


def auto_cells(cells: list[dict], config: TransferBenchConfig) -> list[dict]:
    """`auto`: per budget and seed, the pretrained source and mode with the best validation
    accuracy (ties: the earlier source in the sweep's order), scored on test: the whole
    choice a user makes from this sweep, made on validation only."""
    out = []
    by_budget: dict = {}
    for c in cells:
        if c["mode"] == BEST and c["source"] != SCRATCH:
            by_budget.setdefault(c["budget"], []).append(c)
    for budget, candidates in by_budget.items():
        kept = pick_on_validation([c["val_accuracy"] for c in candidates])
        out.append(cell(AUTO, BEST, budget, config.seeds,
                        [candidates[k]["accuracy"][s] for s, k in enumerate(kept)],
                        val_accuracy=[candidates[k]["val_accuracy"][s]
                                      for s, k in enumerate(kept)],
                        chosen=[f"{candidates[k]['source']}/{candidates[k]['chosen'][s]}"
                                for s, k in enumerate(kept)]))
    return out


__all__ = ["Trainer", "auto_cells", "pick_on_validation", "recipe", "scratch_runs",
           "source_runs", "trained_cells", "vmap_seeds"]
