"""Throughput of auxtl's pretraining step: step time, images/s, examples/s, FLOPs.

Runs unchanged on CPU, GPU or TPU (jax.devices() decides). Times each step to
completion after warm-up and reports the median and spread.

    python benchmarks/throughput.py --model small_cnn --batch-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import auxtl
from auxtl import parallel
from auxtl.data import compute_normalization
from auxtl.train import init_state, make_train_step, split_model


def step_flops(step, state, images) -> float | None:
    """FLOPs of one compiled step from XLA's cost analysis (None if unavailable)."""
    try:
        analysis = step.lower(state, images).compile().cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def time_steps(step, state, images, *, warmup: int, steps: int) -> tuple[list[float], object]:
    for _ in range(warmup):
        state, _ = step(state, images)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, images)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times, state


def benchmark_pretrain_step(*, model: str, task: str, batch_size: int, image_size: int,
                            channels: int, warmup: int, steps: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, image_size, image_size, channels),
                          dtype=np.uint8)
    tasks = [auxtl.WeightedTask(task, auxtl.get_task(task))]
    input_shape = (image_size, image_size, channels)
    config = auxtl.make_config(model, input_shape)
    graphdef, params, batch_stats = split_model(
        auxtl.build_pretrain_model(model, config, tasks, input_shape, seed=seed))
    optimizer = auxtl.make_optimizer(auxtl.OptimizerConfig(), total_steps=1000)
    mesh = parallel.data_mesh()
    state = parallel.replicate(init_state(params, batch_stats, optimizer, seed), mesh)
    batch = parallel.put_batch(images, mesh)
    step = make_train_step(graphdef, tasks, optimizer, compute_normalization(images))
    inputs, _ = tasks[0].task.make_examples(jax.random.key(0), batch.astype(np.float32))
    flops = step_flops(step, state, batch)
    times, _ = time_steps(step, state, batch, warmup=warmup, steps=steps)
    median = statistics.median(times)
    device = jax.devices()[0]
    return {
        "model": model, "task": task, "batch_size": batch_size,
        "examples_per_step": int(inputs.shape[0]), "image_size": image_size,
        "channels": channels, "backend": jax.default_backend(),
        "device_kind": device.device_kind, "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "step_time_median_s": median, "step_time_min_s": min(times),
        "step_time_max_s": max(times), "timed_steps": steps, "warmup_steps": warmup,
        "images_per_s": batch_size / median,
        "examples_per_s": inputs.shape[0] / median,
        "flops_per_step": flops,
        "achieved_flops_per_s": (flops / median) if flops else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--task", default="rotation")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    result = benchmark_pretrain_step(
        model=args.model, task=args.task, batch_size=args.batch_size,
        image_size=args.image_size, channels=args.channels, warmup=args.warmup,
        steps=args.steps)
    print(f"backend: {result['backend']} ({result['device_kind']} x{result['device_count']}), "
          f"jax {result['jax_version']}")
    print(f"{args.model} + {args.task}, batch {args.batch_size} images "
          f"({result['examples_per_step']} examples) at {args.image_size}px")
    print(f"step time: median {result['step_time_median_s'] * 1e3:.1f} ms "
          f"(min {result['step_time_min_s'] * 1e3:.1f}, max {result['step_time_max_s'] * 1e3:.1f}; "
          f"{args.steps} steps after {args.warmup} warm-up)")
    print(f"throughput: {result['images_per_s']:.0f} images/s, "
          f"{result['examples_per_s']:.0f} examples/s")
    if result["flops_per_step"]:
        print(f"FLOPs/step: {result['flops_per_step'] / 1e9:.2f} G; achieved "
              f"{result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
