"""The default recipes: what `auxtl pretrain` and `auxtl transfer` run when no flag says
otherwise, chosen on the transfer benchmark's validation splits (benchmarks/NOTES.md,
"Issue 16: the payoff").

Pretraining: contrastive views (SimCLR) for `PRETRAIN_EPOCHS` passes over the training
split at batch `PRETRAIN_BATCH_SIZE`, AdamW with a linear warmup and a cosine decay.
Fine-tuning: the new linear head starts as the frozen trunk's ridge probe (LP-FT,
`auxtl.head_init`) and trains on the frozen reused layers first, then every reused layer
unfrozen at a tenth of the rate (the best validation epoch of either phase is kept),
AdamW with a warmup + cosine schedule restarted per phase, random shifts of up to 10%
of the image size, an epoch of at least `MIN_STEPS_PER_EPOCH` steps so that a few
labeled images still get enough updates between validations.
"""

from __future__ import annotations

import dataclasses

from auxtl.finetune import FinetuneConfig
from auxtl.freezing import parse_phases
from auxtl.optim import OptimizerConfig

PRETRAIN_TASK = "contrastive"
PRETRAIN_EPOCHS = 40.0
PRETRAIN_BATCH_SIZE = 128
FINETUNE_PHASES = "head:10,all:10@0.1"
MIN_STEPS_PER_EPOCH = 20


def pretrain_optimizer() -> OptimizerConfig:
    """AdamW 1e-3, weight decay 1e-4 on kernels, 100 warmup steps, cosine to 0."""
    return OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=1e-4,
                           warmup_steps=100, schedule="cosine")


def finetune_recipe(**overrides) -> FinetuneConfig:
    """The default fine-tuning recipe (`FINETUNE_PHASES`, a ridge-probe head, AdamW 3e-3,
    batch 32, shifts, cosine with 10% warmup, `MIN_STEPS_PER_EPOCH`), with `overrides`
    on top."""
    recipe = FinetuneConfig(phases=parse_phases(FINETUNE_PHASES), learning_rate=3e-3,
                            weight_decay=1e-4, optimizer="adamw", batch_size=32,
                            augment="shift", schedule="cosine", warmup=0.1,
                            min_steps_per_epoch=MIN_STEPS_PER_EPOCH, head_init="ridge")
    return dataclasses.replace(recipe, **overrides)
