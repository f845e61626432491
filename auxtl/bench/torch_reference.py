"""The PyTorch reference for `auxtl bench throughput --compare-torch`.

auxtl's small_cnn rotation pretraining step in PyTorch (eager channels-last and
torch.compile) runs as `torch_step.py` in another interpreter, so torch is never
an auxtl dependency; its JSON comes back on stdout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

from auxtl.bench.throughput import BenchConfig, BenchError, ok_rows, run_benchmark

TORCH_MODES = ("eager", "compile")
TORCH_SCRIPT = pathlib.Path(__file__).with_name("torch_step.py")


def resolve_torch_python(path: str | None) -> str:
    """The interpreter that runs the PyTorch reference; fails clearly if it cannot import torch."""
    if path is None:
        if importlib.util.find_spec("torch") is None:
            raise BenchError(f"--compare-torch: torch is not importable by {sys.executable}; "
                             f"pass --torch-python PATH, an interpreter with torch installed "
                             f"(auxtl never depends on torch)")
        path = sys.executable
    resolved = shutil.which(path) if os.path.sep not in path else path
    if not resolved or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise BenchError(f"--torch-python {path!r}: no such executable interpreter")
    try:
        probe = subprocess.run([resolved, "-c", "import torch; print(torch.__version__)"],
                               capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BenchError(f"--torch-python {path!r} could not be run: {error}") from error
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"--torch-python {path!r} cannot import torch: {tail[0]}")
    return resolved


def run_torch_reference(python: str, *, batch_size: int, warmup: int, steps: int,
                        modes: Sequence[str] = TORCH_MODES, timeout: float = 1800) -> dict:
    """Runs torch_step.py in `python` and returns its JSON (per-mode timings)."""
    args = json.dumps({"batch_size": batch_size, "warmup": warmup, "steps": steps,
                       "modes": list(modes)})
    try:
        done = subprocess.run([python, str(TORCH_SCRIPT), args], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"the PyTorch reference in {python} ran past {timeout:.0f}s") from error
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("AUXTL_TORCH_JSON "):
            result = json.loads(line[len("AUXTL_TORCH_JSON "):])
            result["python_executable"] = python
            return result
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    raise BenchError(f"the PyTorch reference in {python} failed (exit {done.returncode}):\n"
                     f"{tail}")


def compare_torch(rows: list[dict], config: BenchConfig, python: str, *,
                  batch_size: int, log: Callable[[str], None] = print) -> dict:
    """auxtl's small_cnn float32 pretraining step next to PyTorch eager and torch.compile."""
    auxtl_row = next((r for r in ok_rows(rows) if r["model"] == "small_cnn"
                      and r["dtype"] == "float32"
                      and r["kind"] == "pretrain" and r["batch_size"] == batch_size
                      and not config.model_args.get("small_cnn") and r["devices"] == 1), None)
    if auxtl_row is None:
        log(f"[bench] auxtl small_cnn float32 pretrain at batch {batch_size} for the comparison")
        single = dataclasses.replace(config, models=("small_cnn",), dtypes=("float32",),
                                     kinds=("pretrain",), batch_sizes={"*": batch_size},
                                     model_args={}, devices=1)
        auxtl_row = run_benchmark(single, log=log)[0]
        if "error" in auxtl_row:
            raise BenchError(f"auxtl's side of the PyTorch comparison failed: "
                             f"{auxtl_row['error']}")
    log(f"[bench] PyTorch reference in {python} (batch {batch_size}, "
        f"{', '.join(TORCH_MODES)})")
    torch_result = run_torch_reference(python, batch_size=batch_size, warmup=config.warmup,
                                       steps=config.steps)
    ratios = {mode: (auxtl_row["examples_per_s"] / m["examples_per_s"]
                     if "examples_per_s" in m else None)
              for mode, m in torch_result["modes"].items()}
    return {"auxtl": {k: auxtl_row[k] for k in (
                "step_time_median_s", "step_time_min_s", "step_time_max_s", "examples_per_s",
                "batch_size", "examples_per_step", "backend", "device_kind", "jax_version")},
            "torch": torch_result,
            "ratio_auxtl_over_torch_examples_per_s": ratios}


def format_torch(comparison: dict) -> str:
    a, t = comparison["auxtl"], comparison["torch"]
    lines = [f"small_cnn rotation pretraining step, batch {a['batch_size']} images "
             f"({a['examples_per_step']} examples), float32; torch {t['torch_version']} on "
             f"{t['device_name']} ({t['threads']} threads), python {t['python']}",
             f"{'impl':<16} {'median ms':>10} {'min-max ms':>15} {'ex/s':>10} "
             f"{'auxtl/torch':>11}",
             f"{'auxtl (jax)':<16} {a['step_time_median_s'] * 1e3:>10.2f} "
             f"{a['step_time_min_s'] * 1e3:>7.1f}-{a['step_time_max_s'] * 1e3:<7.1f} "
             f"{a['examples_per_s']:>10.1f} {'1.00':>11}"]
    for mode, m in t["modes"].items():
        name = f"torch {mode}"
        if "error" in m:
            lines.append(f"{name:<16} failed: {m['error'].splitlines()[0][:100]}")
            continue
        ratio = comparison["ratio_auxtl_over_torch_examples_per_s"][mode]
        lines.append(f"{name:<16} {m['step_time_median_s'] * 1e3:>10.2f} "
                     f"{m['step_time_min_s'] * 1e3:>7.1f}-{m['step_time_max_s'] * 1e3:<7.1f} "
                     f"{m['examples_per_s']:>10.1f} {ratio:>11.2f}")
    lines.append("auxtl/torch > 1: auxtl processes more examples per second")
    return "\n".join(lines)
