"""What fixes a transfer sweep: its constants, `TransferBenchConfig` and the presets
(the `--full` RotNet setting and the `--tiny` smoke-test overrides)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from auxtl import recipes
from auxtl.optim import OptimizerConfig
ALL = "all"
PROBE_MODES = ("linear", "knn")
TRAINED_MODES = ("head", "staged", "finetune")
MODES = PROBE_MODES + TRAINED_MODES
BEST = "best"                       # per seed, the trained mode with the best validation
RANDOM, SCRATCH = "random", "scratch"
AUTO = "auto"                       # per seed, the source and mode with the best validation
MIX = "rotation+jigsaw"
# The default bench trunk: small_cnn at half width, pooling after conv1 and conv3 so
# only conv1 runs at 28 px.
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
    """Everything that fixes a sweep; saved in transfer.json. The defaults are the CLI's
    recipes (`auxtl.recipes`), with a cap on the steps per epoch that bounds the `all`
    budget's cost.

    Pretraining: every source for `pretrain_epochs` passes over the pool's training
    split (or `pretrain_steps` when given), batch `pretrain_batch_size`.
    Validation: one draw (`auxtl.bench.transfer_data.VAL_SEED`) of `val_per_class`
    images per class (at least the budget, capped at `max_val_per_class`) shared by
    every seed of a budget, disjoint from the seeds' training subsets; every choice
    (probe strength, k, depth, epoch, mode, source, learning rates) is made on it,
    never on test.
    Trained modes: `head_epochs` with the reused layers frozen, then `tune_epochs` with
    the top `unfreeze` reused layers unfrozen at `tune_lr_scale` x the rate (staged) or
    all of them at each of `finetune_lr_scales` x the rate, the one validation prefers
    (finetune); the scratch control trains everything for
    head_epochs + tune_epochs at each rate of `scratch_lr_scales` x `learning_rate`
    and keeps the one validation prefers. An epoch is one pass over the labeled subset
    but at least `min_steps_per_epoch` and at most `max_steps_per_epoch` steps;
    `augment` applies to every trained run; a source's head starts as its ridge probe
    (`head_init`, LP-FT), scratch's at random. `top`: the source layers above `reuse` are
    dropped (a linear classifier on the pooled reused layers) or kept fresh ("replace").
    `trained_sources`: how many pretrained sources get the (costly) trained modes, the
    best by validation linear-probe accuracy (0: every source).
    """

    sources: tuple[str, ...] = ()          # () = every registered task + MIX + controls
    budgets: tuple[int | str, ...] = (1, 5, 10, 50, ALL)
    modes: tuple[str, ...] = MODES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    data: str = "mnist5k"
    model: str = "small_cnn"
    model_overrides: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(BENCH_TRUNKS["small_cnn"]))
    reuse: int = 5                          # lowest layers reused by the trained modes
    top: str = "drop"                       # the layers above them: dropped or fresh
    unfreeze: int = 2                       # staged: top reused layers unfrozen
    pretrain_epochs: float = recipes.PRETRAIN_EPOCHS
    pretrain_steps: int | None = None       # overrides pretrain_epochs when set
    pretrain_batch_size: int = recipes.PRETRAIN_BATCH_SIZE
    pretrain_seed: int = 0
    pretrain_optimizer: OptimizerConfig = dataclasses.field(
        default_factory=recipes.pretrain_optimizer)
    val_per_class: int = 5
    max_val_per_class: int = 20
    trained_sources: int = 3
    head_epochs: int = 10
    tune_epochs: int = 10
    patience: int | None = None
    min_steps_per_epoch: int = recipes.MIN_STEPS_PER_EPOCH
    max_steps_per_epoch: int | None = 40
    tune_lr_scale: float = 0.1
    finetune_lr_scales: tuple[float, ...] = (0.1, 1.0)
    scratch_lr_scales: tuple[float, ...] = (1.0, 3.0)
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    augment: str = "shift"
    head_init: str = "ridge"                # the sources' head starts as the ridge probe
    schedule: str = "cosine"
    warmup: float = 0.1
    knn_temperature: float = 0.07
    out: str = "runs/bench_transfer"
    published: str | None = None            # "rotnet_cifar10": print Gidaris et al. beside ours
    vmap_seeds: bool | None = None          # None: vmap on accelerators, a loop on CPU
    progress: bool = False

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def full_config() -> TransferBenchConfig:
    """Gidaris et al. 2018, semi-supervised CIFAR-10: a 4-block NIN RotNet on all training
    images (4 rotations each, SGD 0.1, wd 5e-4, batch 128, 100 epochs), then classifiers
    on the frozen 2nd block's maps (`head`: fresh blocks 3-4 + linear, our analogue of
    'RotNet + conv'), beside the same network trained from scratch."""
    return TransferBenchConfig(
        sources=("rotation", RANDOM, SCRATCH), budgets=(20, 100, 400, 1000, 5000),
        data="", model="nin", model_overrides={}, reuse=2, unfreeze=1,
        pretrain_epochs=100.0, pretrain_batch_size=128,
        pretrain_optimizer=OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9,
                                           weight_decay=5e-4, warmup_steps=500),
        top="replace", head_init="random", trained_sources=0, head_epochs=30, tune_epochs=30,
        min_steps_per_epoch=50, max_steps_per_epoch=None,
        batch_size=128, learning_rate=1e-3, weight_decay=5e-4, augment="shift+flip",
        max_val_per_class=100, out="runs/bench_transfer_full", published="rotnet_cifar10")


def tiny_overrides(config: TransferBenchConfig) -> dict[str, Any]:
    """`--tiny` on top of a preset: narrow trunk, a few steps, 2 seeds, budgets 1 and 5
    (the sources of a published preset are kept)."""
    return dict(sources=config.sources if config.published else
                ("rotation", "jigsaw", RANDOM, SCRATCH),
                budgets=(1, 5), seeds=(0, 1),
                model_overrides=dict(TINY_TRUNKS.get(config.model, {})),
                reuse=min(config.reuse, 4), pretrain_steps=6, pretrain_batch_size=16,
                trained_sources=0, head_epochs=2, tune_epochs=2, min_steps_per_epoch=2,
                batch_size=16, max_val_per_class=5)
