"""The throughput benchmark's cases: its configuration, and one ready-to-compile step
per model x compute dtype x step kind, with synthetic inputs already on the device."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from auxtl import freezing, parallel
from auxtl.bench import BenchError
from auxtl.data import compute_normalization
from auxtl.finetune import make_finetune_step, make_logits_fn, make_prefix_fn, norm_stats
from auxtl.freezing import Phase
from auxtl.models import make_config
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
from auxtl.optim import OptimizerConfig, make_optimizer
from auxtl.pretrain_model import WeightedTask, build_pretrain_model
from auxtl.registry import get_task
from auxtl.pretrain_step import init_state, make_train_step, split_model
from auxtl.train_state import TrainState
MODEL_INPUTS: dict[str, tuple[int, int, int]] = {
    "small_cnn": (28, 28, 1),
    "resnet18": (32, 32, 3),
    "resnet50": (224, 224, 3),   # large stem (7x7/2 conv + max-pool) via make_config
}
# Images per step (the pretraining step sees 4x as many examples).
CPU_BATCH = {"small_cnn": 128, "resnet18": 32, "resnet50": 8}
ACCELERATOR_BATCH = {"small_cnn": 512, "resnet18": 256, "resnet50": 64}
TINY_OVERRIDES = {"small_cnn": {"widths": (8, 8, 16, 16, 16), "fc_dim": 16},
                  "resnet18": {"width": 8}, "resnet50": {"width": 8}}
CPU_DEFAULT_MODELS = ("small_cnn", "resnet18")
STEP_KINDS = ("pretrain", "frozen_prefix", "cached_features", "inference")
EXTRA_KINDS = ("finetune_full",)
DTYPES = ("float32", "bfloat16")
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything that fixes a throughput run (saved in throughput.json's meta):
    models x dtypes x kinds, per-model batch sizes, timed and warm-up steps, model
    config overrides, devices, how the peak FLOP/s is found, and the input pipeline's
    data (`throughput_input.input_source`)."""

    models: tuple[str, ...] = ("small_cnn", "resnet18", "resnet50")
    dtypes: tuple[str, ...] = DTYPES
    kinds: tuple[str, ...] = STEP_KINDS
    batch_sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # per model
    steps: int = 10
    warmup: int = 2
    model_args: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    devices: int = 1
    f32_peak: str = "auto"
    peak_matmul_size: int | None = None
    seed: int = 0
    data: str = "synthetic"      # the input measurement's images ("none": not measured)
    input_images: int = 1024     # synthetic images to gather from


def layers_to_freeze(layer_names: Sequence[str]) -> int:
    """How many of the lowest layers the frozen-prefix cases freeze.

    ResNets (stem, stage{s}_block{b}): everything below the last stage. Conv trunks
    (conv1..convN, fc): every conv but the last (small_cnn: 4 of 5).
    """
    stages = [int(n[5:].split("_")[0]) for n in layer_names if n.startswith("stage")]
    if stages:
        last = f"stage{max(stages)}_"
        return next(i for i, n in enumerate(layer_names) if n.startswith(last))
    convs = [i for i, n in enumerate(layer_names) if n.startswith("conv")]
    if len(convs) >= 2:
        return convs[-1]
    return max(len(layer_names) - 1, 0)


@dataclasses.dataclass
class Case:
    """One compiled-to-be step: `fn(*args)`; `threads_state` steps return (state, metrics)."""

    fn: Callable
    args: tuple
    threads_state: bool
    examples_per_step: int
    info: dict[str, Any]


def _count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _dtypes(tree) -> str:
    """The parameters' dtype(s), e.g. 'float32' (comma-joined if mixed)."""
    return ",".join(sorted({str(x.dtype) for x in jax.tree.leaves(tree)}))


def _fresh(tree, sharding):
    """Own device buffers for `tree` (device_put alone may alias arrays already there, and
    a donated step would then delete buffers other cases still use)."""
    return jax.device_put(jax.device_get(tree), sharding)


def _placement(num_devices: int):
    available = jax.devices()
    if num_devices < 1 or num_devices > len(available):
        raise BenchError(f"--devices {num_devices}: this host has {len(available)} "
                         f"{jax.default_backend()} device(s)")
    mesh = parallel.data_mesh(available[:num_devices])
    return parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)


def build_cases(model: str, dtype: str, kinds: Sequence[str], batch_size: int, *,
                overrides: dict[str, Any] | None = None, num_devices: int = 1,
                seed: int = 0) -> dict[str, Case]:
    """The step kinds of one model and compute dtype, with their inputs on device."""

    if model not in MODEL_INPUTS:
        raise BenchError(f"no benchmark input shape for model {model!r}; "
                         f"known: {', '.join(MODEL_INPUTS)}")
    if batch_size % num_devices:
        raise BenchError(f"batch size {batch_size} of {model} is not divisible by "
                         f"{num_devices} devices")
    shape = MODEL_INPUTS[model]
    try:
        config = make_config(model, shape, **{**(overrides or {}), "dtype": dtype})
    except ValueError as error:
        raise BenchError(str(error)) from error
    replicated, sharded = _placement(num_devices)
    rng = np.random.default_rng(seed)
    images_host = rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8)
    normalization = compute_normalization(images_host)
    images = jax.device_put(images_host, sharded)
    labels = jax.device_put(rng.integers(0, NUM_CLASSES, (batch_size,), dtype=np.int32),
                            sharded)
    base_info: dict[str, Any] = {"model_config": {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}}
    cases: dict[str, Case] = {}

    if "pretrain" in kinds:
        tasks = [WeightedTask("rotation", get_task("rotation"))]
        graphdef, params, stats = split_model(
            build_pretrain_model(model, config, tasks, shape, seed=seed))
        optimizer = make_optimizer(OptimizerConfig(), total_steps=1000)
        state = _fresh(init_state(params, stats, optimizer, seed), replicated)
        step = make_train_step(graphdef, tasks, optimizer, normalization)
        count = _count(params)
        cases["pretrain"] = Case(step, (state, images), True, 4 * batch_size, {
            **base_info, "param_dtype": _dtypes(params),
            "task": "rotation (4 rotations per image)", "optimizer": "sgd",
            "params": count, "trainable_params": count, "frozen_layers": [],
            "start_layer": 0})

    finetune_kinds = [k for k in kinds if k in ("frozen_prefix", "cached_features",
                                                "finetune_full", "inference")]
    if finetune_kinds:
        transfer = TransferModel(build_target_trunk(model, config, TargetSpec(),
                                                    rngs=nnx.Rngs(seed)),
                                 NUM_CLASSES, rngs=nnx.Rngs(seed))
        graphdef, params, stats = nnx.split(transfer, nnx.Param, nnx.BatchStat)
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        names = transfer.trunk.layer_names
        prefix = layers_to_freeze(names)
        total = _count(params)
        base_info["param_dtype"] = _dtypes(params)
        params_dev, stats_dev = _fresh((params, stats), replicated)
        norm = jax.device_put(norm_stats(normalization), replicated)   # on device once

        def finetune_case(kind: str) -> Case:
            trainable_top = len(names) if kind == "finetune_full" else len(names) - prefix
            phase = Phase(1, f"head+top{trainable_top}")
            plan = freezing.plan_phase(params, names, len(names), phase, learning_rate=1e-3,
                                       weight_decay=1e-4, optimizer="sgd",
                                       cache_prefix=kind == "cached_features")
            mask, frozen, start = plan.mask, plan.frozen, plan.start
            inputs = images
            if start:
                features = make_prefix_fn(graphdef, start)(params_dev, stats_dev, images, norm)
                inputs = jax.device_put(features, sharded)
            step = make_finetune_step(graphdef, plan)
            state = _fresh(
                TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=plan.optimizer.init(params),
                           rng=jax.random.key_data(jax.random.key(seed))), replicated)
            trainable = _count([x for x, m in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(mask)) if m])
            return Case(step, (state, inputs, labels, norm), True, batch_size, {
                **base_info, "task": f"{NUM_CLASSES}-way classification", "optimizer": "sgd",
                "params": total, "trainable_params": trainable, "frozen_layers": list(frozen),
                "start_layer": start,
                "cached_input_shape": list(inputs.shape) if start else None})

        for kind in finetune_kinds:
            if kind == "inference":
                logits = make_logits_fn(graphdef, 0)
                cases[kind] = Case(logits, (params_dev, stats_dev, images, norm), False,
                                   batch_size, {
                    **base_info, "task": f"{NUM_CLASSES}-way logits", "optimizer": None,
                    "params": total, "trainable_params": 0, "frozen_layers": list(names),
                    "start_layer": 0})
            else:
                cases[kind] = finetune_case(kind)
    return {kind: cases[kind] for kind in kinds if kind in cases}


def batch_size_for(model: str, batch_sizes: dict[str, int]) -> int:
    """Images per step for `model`: its own entry, else the "*" entry, else the
    backend's default (CPU_BATCH or ACCELERATOR_BATCH; 32 for a model in neither)."""
    if model in batch_sizes:
        return batch_sizes[model]
    if "*" in batch_sizes:
        return batch_sizes["*"]
    defaults = CPU_BATCH if jax.default_backend() == "cpu" else ACCELERATOR_BATCH
    return defaults.get(model, 32)
