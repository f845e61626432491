"""The pretraining model: one shared trunk and one head per task."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from auxtl.errors import InputError
from auxtl.models import Trunk, build_trunk
from auxtl.registry import Task


@dataclasses.dataclass(frozen=True)
class WeightedTask:
    """A task in a pretraining mix: its registry name, instance and loss weight."""

    name: str
    task: Task
    weight: float = 1.0


LOSS_WEIGHTINGS = ("fixed", "uncertainty")


class PretrainModel(nnx.Module):
    """Shared trunk, one head per task, and (for uncertainty weighting) one learned
    log-variance s per task: the task's loss enters as exp(-s) * loss + s
    (Kendall, Gal & Cipolla 2018), times its fixed weight."""

    def __init__(self, trunk: Trunk, heads: Mapping[str, nnx.Module], *,
                 loss_weighting: str = "fixed"):
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise InputError(f"loss weighting {loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        self.trunk = trunk
        self.heads = nnx.Dict(dict(heads))
        self.log_vars = (nnx.Dict({name: nnx.Param(jnp.zeros((), jnp.float32)) for name in heads})
                         if loss_weighting == "uncertainty" else None)


def compute_in(module: nnx.Module, dtype) -> nnx.Module:
    """Sets the compute dtype of every layer in `module` that left it unset (`dtype=None`:
    promote from inputs and parameters, which for float32 parameters is float32) to
    `dtype`; layers given a dtype keep it. Parameters stay as they are (float32).
    Returns `module`, changed in place (before it is split or traced)."""
    dtype = jnp.dtype(dtype)
    for _, sub in nnx.iter_modules(module):
        if "param_dtype" in vars(sub) and vars(sub).get("dtype", dtype) is None:
            sub.dtype = dtype
    return module


def build_pretrain_model(model_name: str, model_config, tasks: Sequence[WeightedTask],
                         input_shape: tuple[int, int, int], *, seed: int,
                         loss_weighting: str = "fixed") -> PretrainModel:
    """Trunk from (name, config) plus each task's head; validates each task's input needs.

    The heads compute in the trunk's compute dtype (`model_config.dtype`; float32 for a
    config without one): below float32, `compute_in` sets it on every head layer that
    leaves its dtype unset, so a task needs no dtype argument; the losses cast outputs
    up to float32 (`auxtl.losses`)."""
    names = [t.name for t in tasks]
    if not tasks:
        raise InputError("at least one task is needed")
    if len(set(names)) != len(names):
        raise InputError(f"each task may appear once in a mix, got {names}")
    for weighted in tasks:
        try:  # a task (built-in or a user's file) says why it cannot take these images
            weighted.task.validate(tuple(input_shape))
        except ValueError as error:
            raise InputError(f"task {weighted.name!r}: {error}") from error
    rngs = nnx.Rngs(seed)
    trunk = build_trunk(model_name, model_config, rngs=rngs, input_shape=tuple(input_shape))
    heads = {t.name: t.task.make_head(trunk.feature_dim, image_shape=tuple(input_shape),
                                      rngs=rngs) for t in tasks}
    compute_dtype = jnp.dtype(getattr(model_config, "dtype", "float32"))
    if compute_dtype != jnp.float32:   # float32: the heads stay exactly as the task built them
        heads = {name: compute_in(head, compute_dtype) for name, head in heads.items()}
    model = PretrainModel(trunk, heads, loss_weighting=loss_weighting)
    for weighted in tasks:
        check_task_fits(model, weighted, tuple(input_shape))
    return model


def check_task_fits(model: PretrainModel, weighted: WeightedTask,
                    input_shape: tuple[int, int, int]) -> None:
    """Traces the task's examples and forward (shapes only, nothing runs), so inputs the
    trunk cannot take (too small after its tiles/patches/pooling) fail here, named."""
    graphdef, state = nnx.split(model)

    def forward():
        traced = nnx.merge(graphdef, state)
        inputs, _ = weighted.task.make_examples(jax.random.key(0),
                                                jnp.zeros((2, *input_shape), jnp.float32))
        return weighted.task.forward(traced.trunk, traced.heads[weighted.name], inputs,
                                     train=False)

    try:
        jax.eval_shape(forward)
    except ValueError as error:
        raise InputError(f"task {weighted.name!r} on {input_shape[0]}x{input_shape[1]} "
                         f"images: {error}") from error


def task_json(tasks: Sequence[WeightedTask]) -> list[dict[str, Any]]:
    out = []
    for t in tasks:
        params = t.task.params() if hasattr(t.task, "params") else {}
        out.append({"name": t.name, "weight": t.weight, "params": params})
    return out
