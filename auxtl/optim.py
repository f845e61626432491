"""Optimizer construction from a small typed config; any optax transformation also works."""

from __future__ import annotations

import dataclasses

import jax
import optax

from auxtl.errors import InputError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"             # "sgd" (momentum, nesterov) or "adamw"
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4    # applied to conv/dense kernels only
    warmup_steps: int = 50
    schedule: str = "cosine"      # "cosine" or "constant"


def kernel_mask(params):
    """True for conv/dense kernels (decayed), False for biases and BatchNorm scale/offset."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _warmup_then(rate: float, schedule: str, warmup_steps: int,
                 total_steps: int) -> optax.Schedule:
    """From 0 up to `rate` over `warmup_steps`, then "constant" (held) or "cosine" (down to
    0 at `total_steps`): the one schedule rule of pretraining and fine-tuning phases."""
    if schedule == "constant":
        return (optax.linear_schedule(0.0, rate, warmup_steps) if warmup_steps
                else optax.constant_schedule(rate))
    if schedule != "cosine":
        raise InputError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(0.0, rate, warmup_steps,
                                              max(total_steps, warmup_steps + 1))


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The pretraining rate: `config.warmup_steps` (at most total_steps - 1) of warmup,
    then `config.schedule` over `total_steps`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return _warmup_then(config.learning_rate, config.schedule, warmup, total_steps)


FINETUNE_SCHEDULES = ("constant", "cosine")


def phase_schedule(rate: float, schedule: str, warmup: float,
                   total_steps: int) -> float | optax.Schedule:
    """One fine-tuning group's rate over a phase of `total_steps` steps: "constant" (the
    float `rate` itself when `warmup` is 0: no schedule, no state) or "cosine"
    (`optax.warmup_cosine_decay_schedule`: from 0 up to `rate` over the first
    floor(warmup * total_steps) steps, then cosine down to 0 at step `total_steps`,
    the count the phase ends on; its last step runs at schedule(total_steps - 1)).
    A "constant" with warmup rises linearly from 0 over those steps, then holds `rate`."""
    if schedule not in FINETUNE_SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; use one of {FINETUNE_SCHEDULES}")
    if not 0.0 <= warmup < 1.0:
        raise InputError(f"warmup must be a fraction of the phase's steps in [0, 1), "
                         f"got {warmup!r}")
    if total_steps < 1:
        raise InputError(f"a scheduled phase needs at least one step, got {total_steps}")
    warmup_steps = int(warmup * total_steps)
    if schedule == "constant" and not warmup_steps:
        return rate
    return _warmup_then(rate, schedule, warmup_steps, total_steps)


def restart_schedules(opt_state):
    """`opt_state` with every schedule's step count (`optax.ScaleByScheduleState`) set to
    0 and all else (moments, Adam's bias-correction count) kept: a state carried into a
    new phase restarts that phase's schedule from its first value. A state without a
    schedule comes back as the same object."""
    scheduled = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
    if not any(map(scheduled, jax.tree.leaves(opt_state, is_leaf=scheduled))):
        return opt_state
    return jax.tree.map(
        lambda node: node._replace(count=jax.numpy.zeros_like(node.count))
        if scheduled(node) else node, opt_state, is_leaf=scheduled)


def build_optimizer(name: str, learning_rate: float | optax.Schedule, *, weight_decay: float,
                    momentum: float = 0.9) -> optax.GradientTransformation:
    """The one optimizer builder: "sgd" (momentum, Nesterov) or "adamw", weight decay on
    conv/dense kernels only (`kernel_mask`); `learning_rate` a float or an optax schedule.
    Pretraining (`make_optimizer`) and each fine-tuning parameter group
    (`auxtl.freezing.partitioned_optimizer`) both build theirs here."""
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=kernel_mask),
                           optax.sgd(learning_rate, momentum=momentum, nesterov=True))
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=kernel_mask)
    raise InputError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The pretraining optimizer: `config.name` on `learning_rate_schedule`."""
    return build_optimizer(config.name, learning_rate_schedule(config, total_steps),
                           weight_decay=config.weight_decay, momentum=config.momentum)
