"""Streamed pretraining on a generated folder of small PNGs: bounded memory, rates, saves.

Generates N PNGs of mixed sizes (16..48 px, a third grey, the rest RGB; seeded) in a
temporary folder, then measures
  - the input pipeline alone (grain, `workers` decode processes): images/s;
  - the training step alone (the same trunk and batch on in-memory images): images/s;
  - streamed pretraining end to end (pipeline + device prefetch + step): images/s;
  - how long each asynchronous checkpoint save held the loop (seconds);
  - peak RSS of this process and of its largest child (grain workers), from
    resource.getrusage, before and after the streamed run, beside the decoded size of
    the whole set (the run holds the file listing, not the images).

    python benchmarks/streaming.py             # 20,000 files, 300 steps
    python benchmarks/streaming.py --small     # 600 files, 30 steps: a quick check
    python benchmarks/streaming.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import statistics
import tempfile
import time

import numpy as np

import auxtl
from auxtl.reporting import read_metrics
from auxtl.streaming import default_workers, pipeline_images_per_s

TINY = {"widths": [8, 8, 16, 16, 16], "fc_dim": 16}


def generate_folder(root: pathlib.Path, count: int, *, seed: int = 0) -> int:
    """`count` PNGs of mixed sizes under `root`; returns their decoded bytes in total."""
    from PIL import Image  # noqa: PLC0415 (only this benchmark writes images)
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        h, w = (int(v) for v in rng.integers(16, 49, size=2))
        grey = i % 3 == 0
        pixels = rng.integers(0, 256, size=(h, w) if grey else (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:06d}.png")
        total += pixels.nbytes
    return total


def peak_rss_mib() -> dict[str, float]:
    """Peak resident set (MiB): this process, and the largest waited-for child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": own, "largest_child": child}


def loop_images_per_s(out: pathlib.Path, batch_size: int) -> float:
    """Median training-loop rate over the logged windows after the first (compile)."""
    rates = [r["steps_per_s"] for r in read_metrics(out / "metrics.jsonl")
             if r.get("split") == "train"][1:]
    return statistics.median(rates) * batch_size if rates else float("nan")


def config(**overrides) -> auxtl.PretrainConfig:
    values = dict(model_overrides=dict(TINY), progress=False, log_every=10,
                  optimizer=auxtl.OptimizerConfig(learning_rate=0.05, warmup_steps=5))
    return auxtl.PretrainConfig(**{**values, **overrides})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="600 files, 30 steps")
    parser.add_argument("--files", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", default="32,32")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    files = args.files or (600 if args.small else 20_000)
    steps = args.steps or (30 if args.small else 300)
    size = tuple(int(v) for v in args.image_size.split(","))
    results: dict = {"machine": f"{platform.machine()} {platform.processor()} "
                                f"cpus={__import__('os').cpu_count()}",
                     "files": files, "steps": steps, "batch_size": args.batch_size,
                     "image_size": list(size), "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="auxtl-stream-bench-") as tmp:
        root = pathlib.Path(tmp) / "images"
        root.mkdir()
        start = time.perf_counter()
        decoded = generate_folder(root, files)
        results["generate_s"] = time.perf_counter() - start
        results["decoded_mib"] = decoded / 2**20
        spec = f"folder:{root}"
        results["pipeline_images_per_s"] = pipeline_images_per_s(
            spec, batch_size=args.batch_size, steps=min(steps, 100), workers=args.workers,
            image_size=size)
        results["peak_rss_mib_before_stream_run"] = peak_rss_mib()  # generation + pipeline
        out = pathlib.Path(tmp) / "run"
        start = time.perf_counter()
        auxtl.run_pretraining(config(
            data=spec, stream=True, image_size=size, workers=args.workers, steps=steps,
            batch_size=args.batch_size, checkpoint_every=max(1, steps // 4),
            eval_examples=1000, out=str(out)))
        results["stream_run_s"] = time.perf_counter() - start
        results["stream_loop_images_per_s"] = loop_images_per_s(out, args.batch_size)
        summary = json.loads((out / "summary.json").read_text())
        results["save_blocked_s"] = summary["checkpoint_save_blocked_s"]
        results["peak_rss_mib_after_stream"] = peak_rss_mib()
        memory = auxtl.Dataset("synthetic", np.random.default_rng(1).integers(
            0, 256, (max(args.batch_size * 8, 1000), *size, 3), dtype=np.uint8))
        out_mem = pathlib.Path(tmp) / "run-mem"
        auxtl.run_pretraining(config(steps=steps, batch_size=args.batch_size, out=str(out_mem)),
                              memory)
        results["step_alone_images_per_s"] = loop_images_per_s(out_mem, args.batch_size)
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
