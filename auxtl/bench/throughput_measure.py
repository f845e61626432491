"""One throughput row per case (timings, throughput, FLOPs, MFU, the input pipeline's
rate beside the step's and which bounds), and the loop over every model x dtype x kind
of a `BenchConfig` that keeps measuring past a failing case."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from auxtl.bench import BenchError, peaks
from auxtl.bench.machine import environment, environment_brief
from auxtl.bench.throughput_cases import (MODEL_INPUTS, BenchConfig, Case, batch_size_for,
                                          build_cases)
from auxtl.bench.throughput_input import (NO_INPUT, STREAM, SYNTHETIC, bound, input_source,
                                          measure_input, measure_streamed)
from auxtl.bench.throughput_timing import compile_case, time_case

# Step kinds whose input is the batch of images (cached_features starts from features).
IMAGE_INPUT_KINDS = ("pretrain", "frozen_prefix", "finetune_full", "inference")


def with_input(row: dict[str, Any], input_row: dict[str, Any] | None) -> dict[str, Any]:
    """`row` with the input pipeline's fields beside the step's: `step_images_per_s`
    and, when measured, the input rate (or `input_error`) and `bound` ("input" or
    "step"; None for a step that does not consume images, or with no rate)."""
    row = {**row, "step_images_per_s": row.get("images_per_s")}
    if input_row is None:
        return {**row, "input_images_per_s": None, "bound": None}
    row.update(input_row)
    if "image_shape" in row and input_row.get("input_shape") not in (None, row["image_shape"]):
        row["input_note"] = (f"input images {input_row['input_shape']} differ from the step's "
                             f"{row['image_shape']}: the rates move different bytes")
    consumes_images = row.get("kind") in IMAGE_INPUT_KINDS
    row["bound"] = (bound(row["step_images_per_s"], row.get("input_images_per_s"))
                    if consumes_images else None)
    return row


def model_input(config: BenchConfig, model: str, batch_size: int, sources: dict,
                log: Callable[[str], None]) -> dict[str, Any] | None:
    """The in-memory input pipeline's fields for `model` (None with --data none); a
    failure is recorded as `input_error`, not raised."""
    if config.data == NO_INPUT:
        return None
    try:
        if config.data.startswith(STREAM):
            result = measure_streamed(config.data.removeprefix(STREAM), MODEL_INPUTS[model],
                                      batch_size, devices=config.devices,
                                      warmup=max(config.warmup, 4), steps=max(config.steps, 20),
                                      seed=config.seed)
            log(f"[bench] {model} streamed input batch {batch_size}: "
                f"{result['input_images_per_s']:10.1f} img/s ({result['input_source']})")
            return result
        key = config.data if config.data != SYNTHETIC else (SYNTHETIC, MODEL_INPUTS[model])
        if key not in sources:
            sources[key] = input_source(config.data, MODEL_INPUTS[model],
                                        num_images=max(config.input_images, batch_size),
                                        seed=config.seed)
        result = measure_input(sources[key], batch_size, devices=config.devices,
                               warmup=config.warmup, steps=max(config.steps, 5),
                               seed=config.seed)
        log(f"[bench] {model} input pipeline batch {batch_size}: "
            f"{result['input_images_per_s']:10.1f} img/s ({result['input_source']})")
        return result
    except BenchError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. out of host memory: keep the steps
        log(f"[bench] {model} input pipeline FAILED {error}")
        return {"input_images_per_s": None,
                "input_error": f"{type(error).__name__}: {error}"[:2000]}
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
    """Rows for every model x dtype x kind of `config` (see `measure` for the fields),
    each with the input pipeline's rate for that model's batch (`with_input`),
    measured once per model: it does not depend on the compute dtype."""
    device = jax.devices()[0]
    peak_by_dtype = {dtype: peaks.device_peak(dtype, device, f32_peak=config.f32_peak,
                                              measure_size=config.peak_matmul_size)
                     for dtype in config.dtypes}
    rows = []
    sources: dict = {}
    for model in config.models:
        batch_size = batch_size_for(model, config.batch_sizes)
        input_row = model_input(config, model, batch_size, sources, log)
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
                rows.append(with_input(row, input_row))
            del cases
    return rows
