"""Throughput and MFU of auxtl's steps on CPU, GPU and TPU.

For each model x compute dtype x step kind: step time (median, min/max, IQR after
warm-up), examples/s, FLOPs per step from XLA's cost analysis of the compiled
step (plus auxtl's oneDNN convolutions, which it does not count), achieved FLOP/s
and MFU against the device's peak (`auxtl.bench.peaks`).

Step kinds:
  pretrain         full rotation pretraining step (`auxtl.train.make_train_step`);
                   every image yields 4 rotated examples
  frozen_prefix    fine-tuning step with the lowest layers frozen (small_cnn: conv1-4
                   of 5; resnets: all but the last stage), gradients for the rest only
  cached_features  the same with the frozen prefix's output precomputed (training
                   starts at the first trainable layer)
  inference        jitted forward, BatchNorm in inference mode
  finetune_full    (opt-in) fine-tuning step with everything trainable

Parameters stay float32; `--dtypes bfloat16` sets the model config's compute dtype.
Inputs are synthetic uint8 images already on the device: host input pipelines
are not measured.

    auxtl bench throughput --models small_cnn,resnet18 --steps 10
    python -m auxtl.bench.throughput --tiny --batch-size 8 --steps 2 --out runs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from auxtl import host_memory, onednn, winograd
from auxtl.bench import BenchError

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


# ---- building the cases -----------------------------------------------------------------

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
    from auxtl import parallel
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
    import auxtl
    from flax import nnx

    from auxtl import freezing
    from auxtl.data import compute_normalization
    from auxtl.finetune import make_finetune_step, make_logits_fn, make_prefix_fn
    from auxtl.freezing import Phase
    from auxtl.models import make_config
    from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
    from auxtl.train import TrainState, init_state, make_train_step, split_model

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
        tasks = [auxtl.WeightedTask("rotation", auxtl.get_task("rotation"))]
        graphdef, params, stats = split_model(
            auxtl.build_pretrain_model(model, config, tasks, shape, seed=seed))
        optimizer = auxtl.make_optimizer(auxtl.OptimizerConfig(), total_steps=1000)
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

        def finetune_case(kind: str) -> Case:
            trainable_top = len(names) if kind == "finetune_full" else len(names) - prefix
            phase = Phase(1, f"head+top{trainable_top}")
            labels_tree = freezing.phase_labels(params, names, len(names), phase)
            mask = freezing.trainable_mask(labels_tree)
            frozen = freezing.frozen_layer_names(names, len(names), phase)
            start = freezing.frozen_prefix_length(names, frozen) if kind == "cached_features" \
                else 0
            optimizer = freezing.partitioned_optimizer(
                labels_tree, {"head": 1e-3, "reused": 1e-3}, name="sgd")
            inputs = images
            if start:
                features = make_prefix_fn(graphdef, start, normalization)(params_dev,
                                                                         stats_dev, images)
                inputs = jax.device_put(features, sharded)
            step = make_finetune_step(graphdef, mask, frozen, optimizer, start, normalization)
            state = _fresh(
                TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=optimizer.init(params),
                           rng=jax.random.key_data(jax.random.key(seed))), replicated)
            trainable = _count([x for x, m in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(mask)) if m])
            return Case(step, (state, inputs, labels), True, batch_size, {
                **base_info, "task": f"{NUM_CLASSES}-way classification", "optimizer": "sgd",
                "params": total, "trainable_params": trainable, "frozen_layers": list(frozen),
                "start_layer": start,
                "cached_input_shape": list(inputs.shape) if start else None})

        for kind in finetune_kinds:
            if kind == "inference":
                logits = make_logits_fn(graphdef, 0, normalization)
                cases[kind] = Case(logits, (params_dev, stats_dev, images), False, batch_size, {
                    **base_info, "task": f"{NUM_CLASSES}-way logits", "optimizer": None,
                    "params": total, "trainable_params": 0, "frozen_layers": list(names),
                    "start_layer": 0})
            else:
                cases[kind] = finetune_case(kind)
    return {kind: cases[kind] for kind in kinds if kind in cases}


# ---- measuring ---------------------------------------------------------------------------

def cost_flops(analysis) -> float | None:
    """'flops' from a cost analysis that may be a dict, a list of dicts (older JAX) or None."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops and flops > 0 else None


def compiled_step_flops(compiled) -> tuple[float | None, float]:
    """(FLOPs per device of a compiled step, or None, and the part of them that is
    auxtl's oneDNN and Winograd convolutions): XLA counts no custom calls, so those are
    counted from the compiled HLO the way XLA counts a convolution and added."""
    text = compiled.as_text()
    custom = onednn.convolution_flops(text) + winograd.convolution_flops(text)
    flops = cost_flops(_safe(compiled.cost_analysis))
    return (None if flops is None else flops + custom), custom


def compile_case(case: Case) -> tuple[Any, float, dict[str, Any]]:
    """(compiled step, compile seconds, FLOP counts).

    The compiled executable's cost analysis is per device (the SPMD-partitioned
    module), so it is multiplied by the device count. The lowered (pre-optimisation,
    global) module's count is kept beside it as a cross-check, and used when the
    backend gives no compiled count. XLA counts no custom calls, so the FLOPs of
    auxtl's oneDNN convolutions are counted from the compiled HLO and added.
    """
    start = time.perf_counter()
    lowered = case.fn.lower(*case.args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    devices = len(jax.tree.leaves(case.args)[0].sharding.device_set)
    compiled_flops, custom_flops = compiled_step_flops(compiled)
    lowered_flops = cost_flops(_safe(lowered.cost_analysis))
    if compiled_flops is not None:
        flops, source = compiled_flops * devices, "xla compiled cost_analysis"
        if custom_flops:
            source += " + oneDNN/Winograd convolutions counted from the compiled HLO"
    elif lowered_flops is not None:
        flops, source = lowered_flops, "xla lowered cost_analysis"
    else:
        flops, source = None, None
    return compiled, seconds, {"flops_per_step": flops, "flops_source": source,
                               "flops_per_step_lowered": lowered_flops}


def _safe(call):
    try:
        return call()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return None


def timed_calls(compiled, case: Case, args: tuple, steps: int) -> tuple[tuple, list[float]]:
    """(the args for the next call, seconds per call) of `steps` calls, each run to
    completion; a state-threading step's returned state replaces its donated one."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        if case.threads_state:
            args = (out[0], *args[1:])
    return args, times


def time_case(compiled, case: Case, *, warmup: int, steps: int) -> list[float]:
    """Seconds per call, each call run to completion, after `warmup` untimed calls."""
    args, _ = timed_calls(compiled, case, case.args, warmup)
    return timed_calls(compiled, case, args, steps)[1]


def environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "device_platform": device.platform, "devices_available": jax.device_count(),
            "jax_version": jax.__version__, "jaxlib_version": _version("jaxlib"),
            "flax_version": _version("flax"), "python": platform.python_version(),
            "host": platform.node(), "cpu_count": os.cpu_count(),
            "default_matmul_precision": jax.config.jax_default_matmul_precision,
            "host_memory": host_memory.status(), "onednn_convolutions": onednn.status(),
            "winograd_convolutions": winograd.status()}


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001
        return None


def measure(model: str, dtype: str, kind: str, case: Case, *, batch_size: int,
            config: BenchConfig, peak) -> dict[str, Any]:
    """Every field of one row: timings, throughput, FLOPs, MFU and the environment."""
    compiled, compile_s, counts = compile_case(case)
    flops = counts["flops_per_step"]
    times = time_case(compiled, case, warmup=config.warmup, steps=config.steps)
    median = float(np.median(times))
    p25, p75 = (float(v) for v in np.percentile(times, [25, 75]))
    achieved = flops / median if flops else None
    total_peak = peak.flops_per_s * config.devices
    env = environment()
    return {
        "model": model, "kind": kind, "dtype": dtype,
        "image_shape": list(MODEL_INPUTS[model]), "batch_size": batch_size,
        "examples_per_step": case.examples_per_step,
        "devices": config.devices, "warmup_steps": config.warmup, "timed_steps": config.steps,
        "compile_s": compile_s,
        "step_time_median_s": median, "step_time_min_s": float(min(times)),
        "step_time_max_s": float(max(times)), "step_time_p25_s": p25,
        "step_time_p75_s": p75, "step_time_iqr_s": p75 - p25,
        "step_times_s": [float(t) for t in times],
        "examples_per_s": case.examples_per_step / median,
        "images_per_s": batch_size / median,
        **counts,
        "flops_per_example": flops / case.examples_per_step if flops else None,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": total_peak, "peak_flops_per_device": peak.flops_per_s,
        "peak_source": peak.source, "peak_detail": peak.detail,
        "peak_precision": peak.precision,
        "mfu": achieved / total_peak if achieved else None,
        **case.info,
        "device_kind": env["device_kind"], "backend": env["backend"],
        "jax_version": env["jax_version"],
    }


def run_benchmark(config: BenchConfig, *, log: Callable[[str], None] = print) -> list[dict]:
    """Rows for every model x dtype x kind of `config` (see `measure` for the fields)."""
    from auxtl.bench import peaks
    device = jax.devices()[0]
    peak_by_dtype = {dtype: peaks.device_peak(dtype, device, f32_peak=config.f32_peak,
                                              measure_size=config.peak_matmul_size)
                     for dtype in config.dtypes}
    rows = []
    for model in config.models:
        batch_size = batch_size_for(model, config.batch_sizes)
        for dtype in config.dtypes:
            log(f"[bench] {model} {dtype} batch {batch_size}: building "
                f"{', '.join(config.kinds)}")
            try:
                cases = build_cases(model, dtype, config.kinds, batch_size,
                                    overrides=config.model_args.get(model), seed=config.seed,
                                    num_devices=config.devices)
            except BenchError:
                raise
            except Exception as error:  # noqa: BLE001 - e.g. out of device memory
                cases = {kind: error for kind in config.kinds}
            for kind, case in cases.items():
                try:
                    if isinstance(case, Exception):
                        raise case
                    row = measure(model, dtype, kind, case, batch_size=batch_size,
                                  config=config, peak=peak_by_dtype[dtype])
                    log(f"[bench]   {kind:<16} {row['step_time_median_s'] * 1e3:9.2f} ms  "
                        f"{row['examples_per_s']:10.1f} ex/s")
                except BenchError:
                    raise
                except Exception as error:  # noqa: BLE001 - keep measuring the other cases
                    row = {"model": model, "kind": kind, "dtype": dtype,
                           "batch_size": batch_size, "devices": config.devices,
                           "error": f"{type(error).__name__}: {error}"[:2000],
                           **environment_brief()}
                    log(f"[bench]   {kind:<16} FAILED {row['error'].splitlines()[0][:160]}")
                rows.append(row)
            del cases
    return rows


def environment_brief() -> dict[str, str]:
    return {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax_version": jax.__version__}


def batch_size_for(model: str, batch_sizes: dict[str, int]) -> int:
    if model in batch_sizes:
        return batch_sizes[model]
    if "*" in batch_sizes:
        return batch_sizes["*"]
    defaults = CPU_BATCH if jax.default_backend() == "cpu" else ACCELERATOR_BATCH
    return defaults.get(model, 32)


# ---- reporting ---------------------------------------------------------------------------

COLUMNS = ("model", "dtype", "kind", "batch", "ex/step", "median ms", "min-max ms", "ex/s",
           "GFLOP/step", "TFLOP/s", "MFU %")


def _cells(row: dict) -> list[str]:
    flops, achieved, mfu = row["flops_per_step"], row["achieved_flops_per_s"], row["mfu"]
    return [row["model"], row["dtype"], row["kind"], str(row["batch_size"]),
            str(row["examples_per_step"]), f"{row['step_time_median_s'] * 1e3:.2f}",
            f"{row['step_time_min_s'] * 1e3:.1f}-{row['step_time_max_s'] * 1e3:.1f}",
            f"{row['examples_per_s']:.1f}",
            f"{flops / 1e9:.3f}" if flops else "n/a",
            f"{achieved / 1e12:.4f}" if achieved else "n/a",
            f"{mfu * 100:.2f}" if mfu is not None else "n/a"]


def ok_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def format_errors(rows: Sequence[dict]) -> list[str]:
    return [f"FAILED {r['model']} {r['dtype']} {r['kind']} (batch {r['batch_size']}): "
            f"{r['error'].splitlines()[0][:200]}" for r in rows if "error" in r]


def format_table(rows: Sequence[dict]) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in ok_rows(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for index, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + format_errors(rows))


def format_header(meta: dict) -> str:
    env = meta["environment"]
    lines = [f"backend: {env['backend']} ({env['device_kind']}, {meta['config']['devices']} of "
             f"{env['devices_available']} device(s)), jax {env['jax_version']}; median of "
             f"{meta['config']['steps']} steps after {meta['config']['warmup']} warm-up"]
    if env["backend"] == "cpu":
        lines.append(f"host memory: {env.get('host_memory')}; oneDNN convolutions: "
                     f"{env.get('onednn_convolutions')}; Winograd convolutions: "
                     f"{env.get('winograd_convolutions')}")
        if env.get("winograd_convolutions") == "available":
            lines.append("MFU counts model FLOPs (direct convolutions); Winograd does about "
                         "1/4 of a 3x3 convolution's multiply-adds, so MFU can pass 100%")
    for dtype, peak in meta["peaks"].items():
        lines.append(f"peak {dtype}: {peak['flops_per_s'] / 1e12:.3f} TFLOP/s per device "
                     f"({peak['source']}: {peak['detail']}; {peak['precision']})")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], meta: dict) -> str:
    lines = ["# auxtl throughput", "", "```", format_header(meta), "```", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in ok_rows(rows)]
    lines += [""] + [f"- {line}" for line in format_errors(rows)] if format_errors(rows) else []
    lines += ["", "ex/step: examples per step (pretrain: 4 rotations per image). FLOPs from "
              "XLA's cost analysis of the compiled step (oneDNN and Winograd convolutions counted "
              "alike, as the direct convolutions they compute: model FLOPs, so with Winograd's "
              "fewer multiply-adds MFU can pass 100%); MFU = achieved FLOP/s / peak."]
    return "\n".join(lines) + "\n"


def plot_examples_per_s(rows: Sequence[dict], path: pathlib.Path, title: str) -> None:
    """Horizontal bars of examples/s, one per row, grouped by model and dtype (log scale
    when the values span more than 30x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    groups = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    colors = plt.get_cmap("tab10")
    height = 0.8 / max(len(kinds), 1)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.28 * len(rows) + 0.2 * len(groups)))
    for k, kind in enumerate(kinds):
        ys, xs = [], []
        for g, (model, dtype) in enumerate(groups):
            for r in rows:
                if (r["model"], r["dtype"], r["kind"]) == (model, dtype, kind):
                    ys.append(g + (k - (len(kinds) - 1) / 2) * height)
                    xs.append(r["examples_per_s"])
        bars = ax.barh(ys, xs, height=height, color=colors(k), label=kind)
        ax.bar_label(bars, labels=[f"{x:,.0f}" for x in xs], fontsize=6, padding=2)
    values = [r["examples_per_s"] for r in rows]
    log_scale = max(values) / max(min(values), 1e-12) > 30
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([f"{m}\n{d}" for m, d in groups])
    ax.invert_yaxis()
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlim(right=max(values) * (3 if log_scale else 1.15))
    ax.set_xlabel("examples / s" + (" (log scale)" if log_scale else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------

def _parse_list(text: str, valid: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [x for x in items if x not in valid]
    if unknown or not items:
        raise BenchError(f"unknown {what} {unknown or text!r}; choose from {', '.join(valid)}")
    return items


def _parse_value(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return tuple(_parse_value(x) for x in text.split(",") if x)
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_model_args(items: Sequence[str], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """'[MODEL:]KEY=VALUE' items -> {model: {key: value}}; without MODEL, for every model
    whose config has that field (a field no chosen model has is an error)."""
    from auxtl.models import MODELS
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, assignment = item.rpartition(":") if ":" in item.split("=")[0] \
            else ("", "", item)
        key, eq, value = assignment.partition("=")
        if not eq or not key:
            raise BenchError(f"--model-arg {item!r} must look like [MODEL:]KEY=VALUE")
        chosen = [target] if target else list(models)
        applied = False
        for model in chosen:
            if model not in MODELS:
                raise BenchError(f"--model-arg {item!r}: unknown model {model!r}")
            fields = {f.name for f in dataclasses.fields(MODELS[model][0])}
            if key in fields:
                out.setdefault(model, {})[key] = _parse_value(value)
                applied = True
            elif target:
                raise BenchError(f"--model-arg {item!r}: {model} has no field {key!r}; "
                                 f"fields: {sorted(fields)}")
        if not applied:
            raise BenchError(f"--model-arg {item!r}: none of {chosen} has a field {key!r}")
    return out


def parse_batch_sizes(text: str | None) -> dict[str, int]:
    """'64' (every model) or 'small_cnn=256,resnet50=16' (per model)."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return {"*": int(text)}
        return {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p)}
    except ValueError as error:
        raise BenchError(f"--batch-size {text!r}: use N or MODEL=N,MODEL=N") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auxtl bench throughput",
        description="Step time, examples/s, XLA FLOPs and MFU of auxtl's pretraining, "
                    "frozen-prefix, cached-features and inference steps.")
    parser.add_argument("--models", default=None,
                        help=f"comma list of {', '.join(MODEL_INPUTS)} (inputs: small_cnn 28px "
                             f"x1, resnet18 32px x3, resnet50 224px x3); default: all on "
                             f"accelerators, {','.join(CPU_DEFAULT_MODELS)} on CPU (a resnet50 "
                             f"pretraining step at batch 8 takes tens of seconds on 2 cores)")
    parser.add_argument("--dtypes", default=None,
                        help=f"compute dtypes (parameters stay float32); default "
                             f"{','.join(DTYPES)}")
    parser.add_argument("--kinds", default=None,
                        help=f"step kinds: {', '.join(STEP_KINDS + EXTRA_KINDS)}; default "
                             f"{','.join(STEP_KINDS)}")
    parser.add_argument("--batch-size", default=None,
                        help=f"images per step: N for every model or MODEL=N,...; default per "
                             f"model, CPU {CPU_BATCH}, accelerators {ACCELERATOR_BATCH}")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per case (default: 5 on CPU, 20 on accelerators)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after compilation (default 3; on CPU the first steps "
                             "also grow the kept heap, benchmarks/NOTES.md section 5)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                        help="model config override, e.g. small_cnn:widths=8,8,16,16,16 or "
                             "width=8 (every chosen model with that field); repeatable")
    parser.add_argument("--tiny", action="store_true",
                        help=f"narrow models for smoke tests: {TINY_OVERRIDES}")
    parser.add_argument("--devices", default="1",
                        help="devices to shard the batch over: N or 'all' (default 1: per-chip "
                             "numbers)")
    parser.add_argument("--f32-peak", default="auto", choices=("auto", "tensor", "fp32"),
                        help="float32 MFU denominator on accelerators: 'tensor' = TF32 on "
                             "NVIDIA / 1-pass bf16 on TPU (JAX's default precision), 'fp32' = "
                             "true float32 (CUDA cores); 'auto' follows "
                             "jax_default_matmul_precision")
    parser.add_argument("--peak-matmul-size", type=int, default=None,
                        help="matmul size for measured peaks (CPU, unknown devices); "
                             "default 2048 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench",
                        help="folder for throughput.json, throughput.md and throughput.png")
    parser.add_argument("--json", default=None, help="JSON path (default OUT/throughput.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time the small_cnn float32 pretraining and frozen-prefix "
                             "steps in PyTorch (eager, channels-last, torch.compile) in paired "
                             "rounds with auxtl's and print auxtl/torch step time; without "
                             "--models/--dtypes/--kinds the table shows only those steps")
    parser.add_argument("--torch-python", default=None, metavar="PATH",
                        help="interpreter with torch for --compare-torch (default: this one, "
                             "if it can import torch)")
    parser.add_argument("--torch-batch-size", type=int, default=128,
                        help="images per step of the PyTorch comparison (pretraining: x4 "
                             "rotations)")
    parser.add_argument("--torch-rounds", type=int, default=5,
                        help="paired rounds of the PyTorch comparison, each --steps steps of "
                             "auxtl then of each torch mode")
    parser.add_argument("--show-peaks", action="store_true",
                        help="print the known-accelerator peak table and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    on_cpu = jax.default_backend() == "cpu"
    default_models = CPU_DEFAULT_MODELS if on_cpu else tuple(MODEL_INPUTS)
    default_dtypes, default_kinds = DTYPES, STEP_KINDS
    if args.compare_torch:   # only what the comparison runs, unless asked for more
        from auxtl.bench.torch_reference import TORCH_KINDS
        default_models, default_dtypes, default_kinds = ("small_cnn",), ("float32",), TORCH_KINDS
    models = _parse_list(args.models or ",".join(default_models), tuple(MODEL_INPUTS),
                         "model(s)")
    dtypes = _parse_list(args.dtypes or ",".join(default_dtypes), DTYPES, "dtype(s)")
    kinds = _parse_list(args.kinds or ",".join(default_kinds), STEP_KINDS + EXTRA_KINDS,
                        "step kind(s)")
    model_args = {m: dict(TINY_OVERRIDES[m]) for m in models} if args.tiny else {}
    for model, values in parse_model_args(args.model_arg, models).items():
        model_args.setdefault(model, {}).update(values)
    try:
        devices = jax.device_count() if args.devices == "all" else int(args.devices)
    except ValueError as error:
        raise BenchError(f"--devices {args.devices!r}: use a number or 'all'") from error
    steps = args.steps if args.steps is not None else (5 if on_cpu else 20)
    warmup = args.warmup if args.warmup is not None else 3
    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    return BenchConfig(models=models, dtypes=dtypes, kinds=kinds,
                       batch_sizes=parse_batch_sizes(args.batch_size), steps=steps,
                       warmup=warmup, model_args=model_args, devices=devices,
                       f32_peak=args.f32_peak, peak_matmul_size=args.peak_matmul_size,
                       seed=args.seed)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark from command-line arguments; returns everything written to JSON.

    Returns {"meta": {config, environment, peaks, outputs}, "results": [row, ...],
    "torch": comparison or None}. Raises BenchError on unusable arguments.
    """
    from auxtl.bench import peaks
    host_memory.keep_freed_memory()   # no-op when the CLI already did it
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.show_peaks:
        rows = peaks.table_rows()
        for r in rows:
            print(f"{r['name']:<22} bf16 {r['bf16'] / 1e12:7.1f}  f32(tensor) "
                  f"{r['tensor_f32'] / 1e12:7.1f}  fp32 {r['fp32'] / 1e12:7.1f} TFLOP/s  "
                  f"[{r['source']}]")
        return {"peak_table": rows}
    config = config_from_args(args)
    if args.compare_torch:
        from auxtl.bench import torch_reference
        if args.torch_rounds < 1:   # before the table, not after it
            raise BenchError(f"--torch-rounds must be >= 1, got {args.torch_rounds}")
    torch_python = (torch_reference.resolve_torch_python(args.torch_python)
                    if args.compare_torch else None)
    out_dir = pathlib.Path(args.out)
    json_path = pathlib.Path(args.json) if args.json else out_dir / "throughput.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)

    rows = run_benchmark(config, log=lambda text: print(text, file=sys.stderr, flush=True))
    device = jax.devices()[0]
    meta = {"config": dataclasses.asdict(config), "environment": environment(),
            "peaks": {d: peaks.device_peak(d, device, f32_peak=config.f32_peak,
                                           measure_size=config.peak_matmul_size).to_json()
                      for d in config.dtypes},
            "created_unix": time.time(),
            "outputs": {"json": str(json_path), "markdown": str(out_dir / "throughput.md"),
                        "plot": None if args.no_plot else str(out_dir / "throughput.png")}}
    print(format_header(meta))
    print(format_table(rows))
    comparison = None
    if torch_python:
        comparison = torch_reference.compare_torch(
            config, torch_python, batch_size=args.torch_batch_size, rounds=args.torch_rounds,
            log=lambda text: print(text, file=sys.stderr, flush=True))
        print()
        print(torch_reference.format_torch(comparison))
    result = _jsonable({"meta": meta, "results": rows, "torch": comparison})
    json_path.write_text(json.dumps(result, indent=2))
    markdown = markdown_table(rows, meta)
    if comparison:
        markdown += ("\n## PyTorch reference\n\n```\n"
                     + torch_reference.format_torch(comparison) + "\n```\n")
    (out_dir / "throughput.md").write_text(markdown)
    if not args.no_plot and ok_rows(rows):
        env = meta["environment"]
        plot_examples_per_s(ok_rows(rows), out_dir / "throughput.png",
                            f"auxtl throughput on {env['device_kind']} ({env['backend']}), "
                            f"jax {env['jax_version']}")
    print(f"wrote {json_path}, {out_dir / 'throughput.md'}"
          + ("" if args.no_plot else f", {out_dir / 'throughput.png'}"))
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as error:
        sys.exit(f"error: {error}")
