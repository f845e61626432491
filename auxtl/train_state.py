"""The state a jitted training step carries: used by pretraining and fine-tuning alike."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """step count, params and BatchNorm statistics (plain nested dicts), optimizer state,
    and the base PRNG key as raw uint32 key data (checkpoint friendly)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
