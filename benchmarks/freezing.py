"""What freezing saves: FLOPs (XLA cost analysis) and step time of the fine-tuning step.

On the default small_cnn trunk at 28 px, compares the step with everything
trainable, the step whose lowest 4 of 5 conv layers are frozen (gradients only
for conv5, fc and the head), and the cached-features step (the frozen prefix's
output computed once). The cases come from auxtl.bench.throughput_cases; this prints the
ratios to the full step. Runs unchanged on CPU, GPU and TPU.

    python benchmarks/freezing.py --batch-size 512 --steps 10
"""

from __future__ import annotations

import argparse
import json

import jax

from auxtl.bench.throughput_cases import BenchConfig
from auxtl.bench.throughput_measure import run_benchmark

KINDS = ("finetune_full", "frozen_prefix", "cached_features")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    rows = run_benchmark(BenchConfig(models=("small_cnn",), dtypes=("float32",), kinds=KINDS,
                                     batch_sizes={"small_cnn": args.batch_size},
                                     steps=args.steps, warmup=args.warmup),
                         log=lambda _: None)
    failed = [f"{row['kind']}: {row['error']}" for row in rows if "error" in row]
    if failed:
        raise SystemExit("freezing benchmark failed: " + "; ".join(failed))
    full = rows[0]
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"jax {jax.__version__}; small_cnn, batch {args.batch_size} at 28px, "
          f"median of {args.steps} steps")
    print(f"{'case':<16} {'GFLOP/step':>10} {'FLOP ratio':>10} {'median ms':>10} "
          f"{'time ratio':>10}")
    for row in rows:
        row["flop_ratio"] = row["flops_per_step"] / full["flops_per_step"]
        row["time_ratio"] = row["step_time_median_s"] / full["step_time_median_s"]
        print(f"{row['kind']:<16} {row['flops_per_step'] / 1e9:>10.2f} "
              f"{row['flop_ratio']:>10.3f} {row['step_time_median_s'] * 1e3:>10.1f} "
              f"{row['time_ratio']:>10.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
