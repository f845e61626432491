"""The prepared device check (issue 18): one script that, on one GPU and offline, checks
what it needs, prints the environment, runs the throughput bench for resnet50 at 224 px
in bfloat16 and float32 (pretraining step, MFU against the chip's table peak, the input
pipeline's rate beside it), a short pretrain + transfer on generated data through the
CLI, and writes results.json + results.md; all inside a time budget (default 450 s).

Each stage is a subprocess in its own process group, time-boxed: its timeout is its own
cap, cut so that the stages after it keep a floor of time, and the whole stays inside
`--budget-s`. A stage's failure (exit status, timeout, a missing output) is recorded
with the tail of its log; the next stages still run. Only a missing dependency stops
the run early (nothing after it could run), with a message naming what is missing.

This driver uses the standard library only, so that it can report a broken environment.
Run it through `benchmarks/device_check.sh`:

    benchmarks/device_check.sh                       # on the GPU machine
    benchmarks/device_check.sh --dry-run --out /tmp/dc   # CPU, tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from device_check_report import check_outputs, markdown, tail   # beside this file

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "device_check"
REQUIRED = ("numpy", "jax", "flax", "optax", "orbax.checkpoint", "tqdm", "matplotlib",
            "safetensors", "h5py", "filelock", "grain", "array_record")
WHEELS = REPO / ".whl"   # wheels carried to an offline machine (--wheels)
# How to fetch, on a machine with the registry, the wheels an offline GPU machine lacks
# (its image has jax, flax, optax, orbax, h5py, safetensors, filelock; not grain).
FETCH = ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
         "--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 -d .whl "
         "grain array-record")
FLOOR_S = 20          # time kept back for each later stage
PROBE = """
import importlib.util, json, sys
missing, found = [], {}
for name in sys.argv[1].split(","):   # found, not imported: the environment stage imports
    try:
        spec = importlib.util.find_spec(name)
    except Exception as error:
        spec, error_text = None, f" ({type(error).__name__}: {error})"
    else:
        error_text = ""
    if spec is None:
        missing.append(name + error_text)
    else:
        found[name] = spec.origin
spec = importlib.util.find_spec("auxtl")
print(json.dumps({"missing": missing, "found": found,
                  "auxtl_file": spec.origin if spec else None}))
"""
ENVIRONMENT = """
import json, shutil, subprocess, sys
from auxtl.bench.machine import environment
from auxtl.bench import peaks
import jax
env = environment()
env["devices"] = [str(d) for d in jax.devices()]
if shutil.which("nvidia-smi"):
    env["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
device = jax.devices()[0]
env["peak_table_entry"] = (None if device.platform == "cpu" else
                           getattr(peaks.find_entry(device.device_kind), "name", None))
print(json.dumps(env, indent=2, default=str))
open(sys.argv[1], "w").write(json.dumps(env, indent=2, default=str))
"""
MAKE_DATA = """
import pathlib, sys
import numpy as np
folder, count, size = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for name, n, seed in (("pretrain.npz", count, 1), ("target.npz", max(count // 2, 200), 2)):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.int32)
    rng.shuffle(labels)
    images = rng.integers(0, 120, (n, size, size, 3)).astype(np.uint8)
    cell = size // 4
    for c in range(10):   # a bright square whose place is the class: learnable, not trivial
        r, q = divmod(c, 4)
        images[labels == c, r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] += 120
    np.savez(folder / name, images=images, labels=labels)
    print(f"wrote {folder / name}: images {images.shape} uint8, labels {labels.shape}")
"""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode runs: the throughput bench's flags and the pretrain/transfer sizes."""

    bench: tuple[str, ...]
    images: int
    image_size: int
    model: tuple[str, ...]
    pretrain: tuple[str, ...]
    transfer: tuple[str, ...]
    caps: dict[str, int]
    budget_s: int


FULL = Sizes(
    bench=("--models", "resnet50", "--kinds", "pretrain", "--batch-size", "64", "--steps",
           "20", "--warmup", "3", "--input-images", "512"),
    images=4096, image_size=32,
    model=("--model", "resnet18"),
    pretrain=("--task", "rotation", "--steps", "100", "--batch-size", "128",
              "--log-every", "25"),
    transfer=("--labels-per-class", "20", "--val-per-class", "20", "--seeds", "2",
              "--phases", "head:2,all:2@0.1"),
    caps={"install": 120, "environment": 60, "throughput_bfloat16": 150,
          "throughput_float32": 150, "data": 30, "pretrain": 120, "transfer": 120},
    budget_s=450)
DRY = Sizes(
    bench=("--models", "small_cnn", "--tiny", "--kinds", "pretrain", "--batch-size", "8",
           "--steps", "2", "--warmup", "1", "--input-images", "64",
           "--peak-matmul-size", "128"),
    images=256, image_size=32,
    model=("--model", "small_cnn", "--model-arg", "widths=[8,8,16,16,16]",
           "--model-arg", "fc_dim=16"),
    pretrain=("--task", "rotation", "--steps", "2", "--batch-size", "16", "--log-every", "1"),
    transfer=("--labels-per-class", "2", "--val-per-class", "2", "--seeds", "1",
              "--no-baseline", "--phases", "head:1", "--batch-size", "10"),
    caps={"install": 60, "environment": 30, "throughput_bfloat16": 60,
          "throughput_float32": 60, "data": 30, "pretrain": 60, "transfer": 60},
    budget_s=240)
STAGES = ("install", "environment", "throughput_bfloat16", "throughput_float32", "data",
          "pretrain", "transfer")
# After install, two independent lanes: run one after the other on an accelerator (the
# timings must not share the chip), side by side in a dry run (--parallel).
LANES = (("environment", "throughput_bfloat16", "throughput_float32"),
         ("data", "pretrain", "transfer"))
# A dry run checks the plumbing, not the speed: XLA's CPU back end at its cheapest
# optimisation compiles each step about twice as fast.
DRY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


RUNNING: set[subprocess.Popen] = set()   # the stages' processes, for a SIGTERM to end


def end_running(signum, frame) -> None:
    """On SIGTERM (the wrapper's backstop `timeout`): end every stage's process group
    (each runs in its own session, out of reach of a signal to ours), then exit."""
    for process in list(RUNNING):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(128 + signum)


def run_stage(name: str, argv: list[str], *, timeout_s: float, logs: pathlib.Path,
              env: dict[str, str]) -> dict:
    """Runs argv in its own process group with its output in logs/NAME.log; on timeout
    the group gets SIGTERM, then SIGKILL 5 s later."""
    log = logs / f"{name}.log"
    start = time.monotonic()
    with log.open("w") as sink:
        sink.write("$ " + " ".join(argv) + "\n")
        sink.flush()
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                   cwd=logs.parent,
                                   env=env, start_new_session=True)
        RUNNING.add(process)
        try:
            code, timed_out = process.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = process.poll()
        RUNNING.discard(process)
    seconds = time.monotonic() - start
    status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
    print(f"[device_check] {name}: {status} in {seconds:.1f} s (limit {timeout_s:.0f} s)",
          flush=True)
    if status != "ok":
        print(tail(log), flush=True)
    return {"name": name, "status": status, "returncode": code, "seconds": round(seconds, 2),
            "timeout_s": round(timeout_s, 1), "command": argv, "log": str(log),
            "tail": "" if status == "ok" else tail(log)}


def probe(python: str, env: dict[str, str]) -> dict:
    done = subprocess.run([python, "-c", PROBE, ",".join(REQUIRED)], capture_output=True,
                          text=True, cwd=tempfile.gettempdir(), env=env, timeout=120)
    if done.returncode:
        return {"missing": [f"python probe failed: {done.stderr.strip()[-500:]}"],
                "found": {}, "auxtl_file": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


def install_wheels(python: str, wheels: pathlib.Path, env: dict[str, str], timeout_s: float,
                   logs: pathlib.Path) -> dict | None:
    """The carried wheels in `wheels` (if any) installed offline into a fresh folder first
    on PYTHONPATH (`pip install --no-index --no-deps --target`); None when there are none."""
    files = sorted(str(f) for f in wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        return None
    site = tempfile.mkdtemp(prefix="auxtl-device-check-wheels-")
    result = run_stage("install_wheels", [python, "-m", "pip", "install", "-q", "--no-index",
                                          "--no-deps", "--target", site, *files],
                       timeout_s=timeout_s, logs=logs, env=env)
    if result["status"] == "ok":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    return {**result, "wheels": [pathlib.Path(f).name for f in files]}


def install(python: str, env: dict[str, str], timeout_s: float, logs: pathlib.Path,
            wheels: pathlib.Path = WHEELS) -> dict:
    """auxtl importable from this checkout, offline: carried wheels first
    (`install_wheels`); then as it is when the interpreter already has auxtl from here;
    else `pip install --no-deps --no-build-isolation --no-index --target TMP .` (nothing
    downloaded) and TMP first on PYTHONPATH for every stage."""
    start = time.monotonic()
    carried = install_wheels(python, wheels, env, timeout_s / 2, logs)
    found = probe(python, env)
    record = {"name": "install", "command": [python, "-c", "PROBE"], "found":
              found["found"], "log": str(logs / "install.log"), "returncode": 0,
              "carried_wheels": carried}
    if found["missing"]:
        message = ("missing Python packages: " + "; ".join(found["missing"]) + ". This check "
                   "installs nothing from the network: install them into " + python +
                   f" first, or carry their wheels in {wheels} (--wheels), e.g. fetched "
                   f"elsewhere with: {FETCH}")
        print(f"[device_check] {message}", file=sys.stderr, flush=True)
        return {**record, "status": "failed", "returncode": 1, "tail": message,
                "seconds": round(time.monotonic() - start, 2), "timeout_s": timeout_s}
    here = found["auxtl_file"] and pathlib.Path(found["auxtl_file"]).resolve().is_relative_to(
        REPO)
    if here:
        print(f"[device_check] install: auxtl found at {found['auxtl_file']}")
        return {**record, "status": "ok", "tail": "", "auxtl_file": found["auxtl_file"],
                "seconds": round(time.monotonic() - start, 2), "timeout_s": timeout_s}
    site = tempfile.mkdtemp(prefix="auxtl-device-check-site-")
    result = run_stage("install", [python, "-m", "pip", "install", "-q", "--no-deps",
                                   "--no-build-isolation", "--no-index", "--target", site,
                                   str(REPO)], timeout_s=timeout_s, logs=logs, env=env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    found = probe(python, env) if result["status"] == "ok" else found
    if result["status"] == "ok" and not found["auxtl_file"]:
        result.update(status="failed", tail=f"auxtl still not found after installing into "
                      f"{site}")
    return {**record, **result, "auxtl_file": found["auxtl_file"], "site": site}


def stage_commands(python: str, sizes: Sizes, out: pathlib.Path,
                   env: dict[str, str]) -> dict[str, list[str]]:
    auxtl = [python, "-m", "auxtl.cli"]
    data = out / "data"
    commands = {"environment": [python, "-c", ENVIRONMENT, str(out / "environment.json")],
                "data": [python, "-c", MAKE_DATA, str(data), str(sizes.images),
                         str(sizes.image_size)]}
    for dtype in ("bfloat16", "float32"):
        commands[f"throughput_{dtype}"] = [
            python, "-m", "auxtl.bench.throughput", *sizes.bench, "--dtypes", dtype,
            "--no-plot", "--out", str(out / f"throughput_{dtype}")]
    commands["pretrain"] = [*auxtl, "pretrain", "--data", f"npz:{data / 'pretrain.npz'}",
                            *sizes.model, *sizes.pretrain, "--no-progress", "--overwrite",
                            "--out", str(out / "pretrain")]
    commands["transfer"] = [*auxtl, "transfer", "--trunk", str(out / "pretrain" / "trunk"),
                            "--data", f"npz:{data / 'target.npz'}", *sizes.transfer,
                            "--no-progress", "--out", str(out / "transfer")]
    return commands


def bf16_flags(python: str, env: dict[str, str]) -> list[str]:
    """bfloat16 pretraining: `--compute-dtype bfloat16` where the CLI has it, else the
    model config's `dtype` field."""
    try:
        done = subprocess.run([python, "-m", "auxtl.cli", "pretrain", "--help"],
                              capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env,
                              timeout=60)
        if "--compute-dtype" in done.stdout:
            return ["--compute-dtype", "bfloat16"]
    except subprocess.TimeoutExpired:
        pass
    return ["--model-arg", "dtype=bfloat16"]


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/device_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="the same stages at tiny sizes (small_cnn, 32 px, 2 steps) on "
                             "whatever backend is there: the CI check")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole run's limit (default 450 s; dry run 240 s)")
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="run the bench lane and the pretrain/transfer lane side by side "
                             "(default: in a dry run only; never for timings you report)")
    parser.add_argument("--wheels", default=str(WHEELS),
                        help="folder of wheels to install offline first (default .whl/ in "
                             "this checkout, when it holds any)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="resnet50 images per step of the throughput stages (default 64)")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else FULL
    if args.batch_size:
        bench = list(sizes.bench)
        bench[bench.index("--batch-size") + 1] = str(args.batch_size)
        sizes = dataclasses.replace(sizes, bench=tuple(bench))
    budget = args.budget_s or sizes.budget_s
    out = pathlib.Path(args.out).absolute()
    logs = out / "logs"
    for stale in ("data", "logs", "pretrain", "transfer", "throughput_bfloat16",
                  "throughput_float32"):
        shutil.rmtree(out / stale, ignore_errors=True)
    logs.mkdir(parents=True)
    (out / "data").mkdir()
    signal.signal(signal.SIGTERM, end_running)
    started, deadline = time.monotonic(), time.monotonic() + budget
    started_utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"[device_check] {'dry run' if args.dry_run else 'full run'}, budget {budget:.0f} s, "
          f"results in {out}", flush=True)

    parallel = args.dry_run if args.parallel is None else args.parallel
    if args.dry_run:
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), DRY_XLA_FLAGS]))
    else:   # auxtl's CPU kernels serve CPU steps only: nothing to build on an accelerator
        env.setdefault("AUXTL_CPU_KERNELS", "0")

    def limit(name: str, lane: tuple[str, ...]) -> float:
        """The stage's cap, cut to keep FLOOR_S for each later stage of its lane (of every
        stage after it, when the lanes run one after the other) inside the budget."""
        order = lane if parallel else STAGES
        later = order[order.index(name) + 1:]
        reserve = sum(min(FLOOR_S, sizes.caps[s]) for s in later)
        return min(sizes.caps[name], deadline - time.monotonic() - reserve)

    records = {"install": install(args.python, env, limit("install", STAGES), logs,
                                  pathlib.Path(args.wheels))}
    commands = {}
    if records["install"]["status"] == "ok":
        commands = stage_commands(args.python, sizes, out, env)
        if not args.dry_run:
            commands["pretrain"] += bf16_flags(args.python, env)

    def run_lane(lane: tuple[str, ...]) -> None:
        for name in lane:
            seconds = limit(name, lane)
            if name not in commands or seconds < 5:
                why = "install failed" if name not in commands else "no time left in the budget"
                records[name] = {"name": name, "status": "skipped", "seconds": 0.0,
                                 "timeout_s": 0, "tail": why}
                continue
            record = run_stage(name, commands[name], timeout_s=seconds, logs=logs, env=env)
            check_outputs(record, out)
            records[name] = record

    if parallel:
        threads = [threading.Thread(target=run_lane, args=(lane,), daemon=True)
                   for lane in LANES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for lane in LANES:
            run_lane(lane)
    stages = [records[name] for name in STAGES]
    environment = {}
    if (out / "environment.json").is_file():
        environment = json.loads((out / "environment.json").read_text())
    ok = all(s["status"] == "ok" for s in stages)
    results = {"meta": {"mode": "dry-run" if args.dry_run else "full", "budget_s": budget,
                        "parallel_lanes": parallel, "xla_flags": env.get("XLA_FLAGS"),
                        "auxtl_cpu_kernels": env.get("AUXTL_CPU_KERNELS"),
                        "total_s": round(time.monotonic() - started, 2), "commit": commit(),
                        "started_utc": started_utc, "python": args.python},
               "ok": ok, "environment": environment, "stages": stages}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"[device_check] wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
