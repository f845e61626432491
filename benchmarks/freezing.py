"""What freezing saves: FLOPs (XLA cost analysis) and step time of the fine-tuning step.

Compares, on the default small_cnn trunk at 28 px, the full step (everything
trainable) with the step whose lowest 4 of 5 conv layers are frozen (gradients
only for conv5, fc and the head), and with the cached-features step (the frozen
prefix's output computed once, training starts at conv5). Runs unchanged on
CPU, GPU and TPU.

    python benchmarks/freezing.py --batch-size 512 --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from auxtl import freezing
from auxtl.data import compute_normalization
from auxtl.finetune import make_finetune_step, make_prefix_fn
from auxtl.freezing import Phase
from auxtl.models import make_config
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
from auxtl.train import TrainState

CASES = {"full": (Phase(1, "all"), False),
         "frozen_prefix_4": (Phase(1, "head+re:^(conv5|fc)$"), False),
         "cached_features_4": (Phase(1, "head+re:^(conv5|fc)$"), True)}


def build_case(phase: Phase, cached: bool, batch_size: int, seed: int = 0):
    config = make_config("small_cnn", (28, 28, 1))
    model = TransferModel(build_target_trunk("small_cnn", config, TargetSpec(),
                                             rngs=nnx.Rngs(seed)), 10, rngs=nnx.Rngs(seed))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    names = model.trunk.layer_names
    labels = freezing.phase_labels(params, names, len(names), phase)
    frozen = freezing.frozen_layer_names(names, len(names), phase)
    start = freezing.frozen_prefix_length(names, frozen) if cached else 0
    optimizer = freezing.partitioned_optimizer(labels, {"head": 1e-3, "reused": 1e-3})
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8)
    normalization = compute_normalization(images)
    inputs = images
    if start:
        inputs = make_prefix_fn(graphdef, start, normalization)(params, stats, images)
    step = make_finetune_step(graphdef, freezing.trainable_mask(labels), frozen, optimizer,
                              start, normalization)
    state = TrainState(step=np.int32(0), params=params, batch_stats=stats,
                       opt_state=optimizer.init(params),
                       rng=np.asarray(jax.random.key_data(jax.random.key(seed))))
    targets = rng.integers(0, 10, (batch_size,), dtype=np.int32)
    return step, state, jax.device_put(inputs), jax.device_put(targets)


def measure(name: str, batch_size: int, warmup: int, steps: int) -> dict:
    phase, cached = CASES[name]
    step, state, inputs, targets = build_case(phase, cached, batch_size)
    analysis = step.lower(state, inputs, targets).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    for _ in range(warmup):
        state, _ = step(state, inputs, targets)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, inputs, targets)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return {"case": name, "flops": float(analysis["flops"]),
            "step_time_median_s": statistics.median(times), "step_time_min_s": min(times),
            "step_time_max_s": max(times)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    results = [measure(name, args.batch_size, args.warmup, args.steps) for name in CASES]
    full = results[0]
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
          f"small_cnn, batch {args.batch_size} at 28px, median of {args.steps} steps")
    print(f"{'case':<20} {'GFLOP/step':>10} {'FLOP ratio':>10} {'median ms':>10} {'time ratio':>10}")
    for r in results:
        r["flop_ratio"] = r["flops"] / full["flops"]
        r["time_ratio"] = r["step_time_median_s"] / full["step_time_median_s"]
        print(f"{r['case']:<20} {r['flops'] / 1e9:>10.2f} {r['flop_ratio']:>10.3f} "
              f"{r['step_time_median_s'] * 1e3:>10.1f} {r['time_ratio']:>10.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"batch_size": args.batch_size, "backend": jax.default_backend(),
                       "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
