"""What fixes a transfer sweep: its constants, `TransferBenchConfig` and the presets
(the `--full` RotNet setting and the `--tiny` smoke-test overrides)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

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
    """`--tiny` on top of a preset: narrow trunk, a few steps, 2 seeds, budgets 1 and 5
    (the sources of a published preset are kept)."""
    return dict(sources=config.sources if config.published else
                ("rotation", "jigsaw", RANDOM, SCRATCH),
                budgets=(1, 5), seeds=(0, 1),
                model_overrides=dict(TINY_TRUNKS.get(config.model, {})),
                pretrain_steps=6, pretrain_batch_size=16, probe_steps=30, head_steps=8,
                staged_steps=4, batch_size=16, knn_k=3)
