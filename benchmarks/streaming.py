"""Streamed pretraining on generated folders of small PNGs: bounded memory, rates, resume.

For each file count (default 2,000 and 20,000) it generates that many PNGs of mixed sizes
(16..48 px, a third grey, the rest RGB; seeded) in a temporary folder and runs
`auxtl pretrain --stream` on it in a fresh process (small_cnn, 32x32, batch 64, grain
workers), sampling the resident memory of that process and its grain workers together
(every process of its process group, from /proc, every 0.2 s). Memory that does not
grow with the file count while the decoded set grows 10x is what "bounded" means here.
It also prints
  - the input pipeline alone (grain, `workers` decode processes): images/s;
  - the streamed training loop (pipeline + device prefetch + step): images/s, and the
    step alone on in-memory images of the same shape: images/s;
  - how long the asynchronous checkpoint saves held the loop (seconds);
  - on the largest folder, a mid-epoch resume: the run is repeated from its checkpoint
    inside the second epoch, and the final trunk must equal the uninterrupted one bit for
    bit (printed as `resume_bit_identical`).

    python benchmarks/streaming.py                  # 2,000 and 20,000 files (~5 min, 2 cores)
    python benchmarks/streaming.py --small          # 300 and 600 files, a quick check
    python benchmarks/streaming.py --json benchmarks/results/streaming.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

import auxtl
from auxtl.bench.machine import cpu_description
from auxtl.reporting import read_metrics
from auxtl.streaming import default_workers, pipeline_images_per_s

TINY = ["--model-arg", "widths=[8,8,16,16,16]", "--model-arg", "fc_dim=16"]


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


def group_rss_mib(pgid: int) -> tuple[float, int]:
    """(resident MiB of every process in process group `pgid`, how many processes)."""
    total, count = 0, 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = pathlib.Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:   # field 5 of stat: the process group
                continue
            rss_pages = int(pathlib.Path(entry.path, "statm").read_text().split()[1])
        except (OSError, ValueError):
            continue   # gone meanwhile
        total += rss_pages * os.sysconf("SC_PAGE_SIZE")
        count += 1
    return total / 2**20, count


def run_sampled(command: list[str]) -> dict:
    """Runs `command` in its own process group; its peak resident memory (the group's
    sum, sampled every 0.2 s) and most processes seen, and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak, most = [0.0], [0]

    def sample() -> None:
        while proc.poll() is None:
            rss, count = group_rss_mib(proc.pid)
            peak[0], most[0] = max(peak[0], rss), max(most[0], count)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{output[-3000:]}")
    return {"peak_group_rss_mib": round(peak[0], 1), "processes": most[0],
            "wall_s": round(time.perf_counter() - start, 1)}


def loop_images_per_s(out: pathlib.Path, batch_size: int) -> float:
    """Median training-loop rate over the logged windows after the first (compile)."""
    rates = [r["steps_per_s"] for r in read_metrics(out / "metrics.jsonl")
             if r.get("split") == "train"][1:]
    return round(statistics.median(rates) * batch_size, 1) if rates else float("nan")


def pretrain_command(data: str, out: pathlib.Path, *, steps: int, batch_size: int,
                     size: tuple[int, int], workers: int, checkpoint_every: int,
                     extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "auxtl.cli", "pretrain", "--task", "rotation", *TINY,
            "--data", data, "--steps", str(steps), "--batch-size", str(batch_size),
            "--log-every", "10", "--checkpoint-every", str(checkpoint_every),
            "--eval-examples", "1000", "--no-progress", "--out", str(out), *extra,
            *(["--stream", "--image-size", f"{size[0]},{size[1]}", "--workers", str(workers)]
              if data.startswith("folder:") else [])]


def resume_mid_epoch(out: pathlib.Path, command: list[str], checkpoint: int) -> bool:
    """Repeats the run in `out` from its checkpoint at step `checkpoint` (a copy, the later
    checkpoints and the trunk dropped) and compares the final trunks bit for bit."""
    copy = out.with_name(out.name + "-resumed")
    shutil.copytree(out, copy, symlinks=True)
    for path in (copy / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > checkpoint:
            shutil.rmtree(path)
    shutil.rmtree((copy / "trunk").resolve())
    (copy / "trunk").unlink()
    resumed = [copy if part == str(out) else part for part in command]
    run_sampled([str(part) for part in resumed] + ["--resume"])
    first = auxtl.checkpoints.load_trunk_state(out / "trunk")[:2]
    second = auxtl.checkpoints.load_trunk_state(copy / "trunk")[:2]
    return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first),
                                                    jax.tree.leaves(second)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="300 and 600 files")
    parser.add_argument("--files", default=None, help="comma-separated file counts")
    parser.add_argument("--epochs", type=float, default=1.2,
                        help="passes over the largest folder's training split (default 1.2: "
                             "the resume check starts inside the second epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", default="32,32")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    counts = [int(v) for v in (args.files or ("300,600" if args.small else "2000,20000")
                               ).split(",")]
    size = tuple(int(v) for v in args.image_size.split(","))
    batch = args.batch_size
    results: dict = {"machine": cpu_description(), "python": platform.python_version(),
                     "batch_size": batch, "image_size": list(size), "workers": args.workers,
                     "runs": []}
    with tempfile.TemporaryDirectory(prefix="auxtl-stream-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        # the same number of steps for every count (the largest's epochs): only the
        # folder's size differs between the runs
        n_train = int(max(counts) * 0.9)
        steps = max(20, int(args.epochs * n_train / batch))
        checkpoint = (n_train // batch) + max(5, (steps - n_train // batch) // 2)
        for count in counts:
            root = tmp / f"images-{count}"
            root.mkdir()
            start = time.perf_counter()
            decoded = generate_folder(root, count)
            run = {"files": count, "decoded_mib": round(decoded / 2**20, 1),
                   "generate_s": round(time.perf_counter() - start, 1), "steps": steps}
            run["pipeline_images_per_s"] = round(pipeline_images_per_s(
                f"folder:{root}", batch_size=batch, steps=50, workers=args.workers,
                image_size=size), 1)
            out = tmp / f"run-{count}"
            command = pretrain_command(f"folder:{root}", out, steps=steps, batch_size=batch,
                                       size=size, workers=args.workers,
                                       checkpoint_every=checkpoint if count == max(counts)
                                       else steps)
            run.update(run_sampled(command))
            run["stream_loop_images_per_s"] = loop_images_per_s(out, batch)
            run["save_blocked_s"] = json.loads((out / "summary.json").read_text())[
                "checkpoint_save_blocked_s"]
            if count == max(counts) and checkpoint < steps:
                run["resume_from_step"] = checkpoint
                run["resume_epoch"] = round(checkpoint * batch / n_train, 2)
                run["resume_bit_identical"] = resume_mid_epoch(out, command, checkpoint)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            shutil.rmtree(root)
        synthetic = tmp / "synthetic.npz"
        np.savez(synthetic, images=np.random.default_rng(1).integers(
            0, 256, (max(batch * 8, 1000), *size, 3), dtype=np.uint8))
        out = tmp / "run-in-memory"
        alone = run_sampled(pretrain_command(f"npz:{synthetic}", out, steps=min(steps, 200),
                                             batch_size=batch, size=size, workers=0,
                                             checkpoint_every=steps))
        results["step_alone"] = {**alone, "images_per_s": loop_images_per_s(out, batch)}
    print(json.dumps(results["step_alone"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
