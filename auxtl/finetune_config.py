"""What a fine-tuning run is given and gives back: `FinetuneConfig` (the recipe: phases,
optimizer, augmentation, schedule, epoch rule, head start) and `FinetuneResult` (one
seed's outcome). The engine that runs them is `auxtl.finetune`; its docstring says how
each setting acts. `compute_dtype` acts where the target model is built
(`auxtl.transplant.build_transfer_model`, which transfer and search pass it to): the
engine trains whatever model it is given, in that model's compute dtype.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from auxtl.errors import InputError
from auxtl.finetune_step import AUGMENTS
from auxtl.freezing import Phase
from auxtl.models import check_compute_dtype
from auxtl.optim import FINETUNE_SCHEDULES


HEAD_INITS = ("random", "ridge")


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
    augment: str = "none"              # "none", "shift", "flip" or "shift+flip" (training only)
    max_shift: int | None = None       # pixels; None: default_max_shift(H, W)
    schedule: str = "constant"         # each phase's rates: "constant" or "cosine"
    warmup: float = 0.0                # fraction of each phase's steps, rising from 0
    min_steps_per_epoch: int = 1       # an epoch: one pass over the subset, at least this
    max_steps_per_epoch: int | None = None   # ... and at most this (None: no cap)
    head_init: str = "random"          # "ridge": LP-FT, the head starts as the ridge probe
    compute_dtype: str = "float32"     # or "bfloat16": the target model's compute dtype
                                       # (params, optimizer state, statistics stay float32)

    def __post_init__(self):
        phases = tuple(self.phases)
        if not phases:
            raise InputError("fine-tuning needs at least one phase (--phases), got none")
        bad = [p for p in phases if not isinstance(p, Phase)]
        if bad:
            raise InputError(f"phases must be auxtl.Phase objects, got {bad[0]!r}")
        object.__setattr__(self, "phases", phases)
        if not _whole(self.batch_size) or self.batch_size < 1:
            raise InputError(f"batch size (--batch-size) must be a whole number >= 1, "
                             f"got {self.batch_size!r}")
        if not self.learning_rate > 0:
            raise InputError(f"learning rate (--lr) must be positive, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise InputError(f"weight decay (--weight-decay) must be >= 0, "
                             f"got {self.weight_decay!r}")
        if self.layer_decay is not None and not self.layer_decay > 0:
            raise InputError(f"layer_decay must be positive or None, got {self.layer_decay!r}")
        if self.augment not in AUGMENTS:
            raise InputError(f"augmentation (--augment) must be one of {AUGMENTS}, "
                             f"got {self.augment!r}")
        if self.max_shift is not None and not (_whole(self.max_shift) and self.max_shift >= 1):
            raise InputError(f"max_shift must be a whole number of pixels >= 1 or None, "
                             f"got {self.max_shift!r}")
        if self.schedule not in FINETUNE_SCHEDULES:
            raise InputError(f"schedule (--schedule) must be one of {FINETUNE_SCHEDULES}, "
                             f"got {self.schedule!r}")
        if not (isinstance(self.warmup, numbers.Real) and 0.0 <= self.warmup < 1.0):
            raise InputError(f"warmup (--warmup) must be a fraction in [0, 1), "
                             f"got {self.warmup!r}")
        if not (_whole(self.min_steps_per_epoch) and self.min_steps_per_epoch >= 1):
            raise InputError(f"min_steps_per_epoch (--min-steps-per-epoch) must be a whole "
                             f"number >= 1, got {self.min_steps_per_epoch!r}")
        if self.head_init not in HEAD_INITS:
            raise InputError(f"head_init (--head-init) must be one of {', '.join(HEAD_INITS)}, "
                             f"got {self.head_init!r}")
        check_compute_dtype(self.compute_dtype)
        cap = self.max_steps_per_epoch
        if cap is not None and not (_whole(cap) and cap >= self.min_steps_per_epoch):
            raise InputError(f"max_steps_per_epoch (--max-steps-per-epoch) must be None or a "
                             f"whole number >= min_steps_per_epoch "
                             f"({self.min_steps_per_epoch}), got {cap!r}")

    def to_json(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["phases"] = [p.to_json() for p in self.phases]
        return raw


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass
class FinetuneResult:
    """One seed's outcome: the kept params and statistics (the best validation epoch, or
    the end of a fixed-step run), its validation (None without epochs) and test accuracy,
    one history record per epoch (or per fixed-step phase) and the steps it took.
    `phase_best` (epoch phases): per phase, its best validation epoch within the phase
    ({"phase", "epoch", "val_accuracy", "test_accuracy"}; epoch 0 is the ridge-probe start
    of `head_init="ridge"`; test_accuracy is None without test or with one phase, where
    the run's own test_accuracy says it), so that a run of phases also
    tells what stopping after an earlier phase would have given (the benchmark's `head`
    mode is the first phase of its `staged` run)."""

    params: Any
    batch_stats: Any
    best_val_accuracy: float | None
    test_accuracy: float | None
    history: list[dict[str, Any]]
    steps: int
    phase_best: list[dict[str, Any]] = dataclasses.field(default_factory=list)
