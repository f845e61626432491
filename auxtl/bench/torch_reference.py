"""The PyTorch reference for `auxtl bench throughput --compare-torch`, timed in pairs.

auxtl's small_cnn steps (rotation pretraining; fine-tuning with conv1-4 frozen) run
in PyTorch in `torch_step.py`, a worker in another interpreter (torch is never an
auxtl dependency) that builds and warms up every mode once, then times steps on
request over its stdin/stdout. Each round times k steps of auxtl's compiled step,
then k steps of each torch mode, back to back; the round's ratio is auxtl's median
step time over torch's, and the comparison is the median of per-round ratios: load
from other work on the machine changes between rounds more than within one. Load
need not slow both libraries alike (on an oversubscribed CPU torch's OpenMP suffers
more than XLA's thread pool), so each round's host load average is recorded too.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pathlib
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from auxtl.bench import BenchError
from auxtl.bench.machine import environment
from auxtl.bench.throughput_cases import build_cases
from auxtl.bench.throughput_timing import compile_case, timed_calls

TORCH_KINDS = ("pretrain", "frozen_prefix")
TORCH_MODES = ("eager", "channels_last", "compile")
TORCH_SCRIPT = pathlib.Path(__file__).with_name("torch_step.py")
READY, RESULT = "AUXTL_TORCH_READY ", "AUXTL_TORCH_RESULT "
LEGEND = "<= 1: auxtl's step is at least as fast"


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


class TorchWorker:
    """`script` (torch_step.py) running in `python`, answering timing requests.

    Starting it waits for its ready line (every mode built and warmed up, torch.compile
    included); `info` is that line's JSON. A worker that exits, or stays silent past
    the timeout, is a BenchError carrying the tail of its output; a mode that failed
    is only reported (in `info["cases"]` or the request's reply).
    """

    def __init__(self, python: str, *, batch_size: int, kinds: Sequence[str],
                 modes: Sequence[str], warmup: int, script: str | os.PathLike = TORCH_SCRIPT,
                 start_timeout: float = 1800, step_timeout: float = 600):
        self.python, self.step_timeout = python, step_timeout
        self.stderr = tempfile.TemporaryFile("w+")
        self.stray = collections.deque(maxlen=20)     # stdout lines outside the protocol
        config = {"batch_size": batch_size, "kinds": list(kinds), "modes": list(modes),
                  "warmup": warmup}
        try:
            self.process = subprocess.Popen([python, str(script), json.dumps(config)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=self.stderr, text=True, bufsize=1)
        except OSError as error:
            self.stderr.close()
            raise BenchError(f"the PyTorch worker could not start in {python}: {error}") \
                from error
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.info = self._read(READY, start_timeout, "building and warming up "
                                   f"{', '.join(kinds)} x {', '.join(modes)}")
        except BenchError:
            self.__exit__()
            raise

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _tail(self) -> str:
        self.stderr.seek(0)
        lines = list(self.stray) + self.stderr.read().strip().splitlines()
        return "\n".join(lines[-15:]) or "(no output)"

    def _read(self, prefix: str, timeout: float, doing: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.process.kill()
                raise BenchError(f"the PyTorch worker in {self.python} ran past "
                                 f"{timeout:.0f}s {doing}:\n{self._tail()}") from None
            if line is None:
                code = self.process.wait()
                raise BenchError(f"the PyTorch worker in {self.python} exited (code {code}) "
                                 f"while {doing}:\n{self._tail()}")
            if line.startswith(prefix):
                try:
                    return json.loads(line[len(prefix):])
                except json.JSONDecodeError as error:
                    raise BenchError(f"the PyTorch worker in {self.python} sent a malformed "
                                     f"line while {doing}: {line[:200]!r}") from error
            self.stray.append(line.rstrip())

    def steps(self, kind: str, mode: str, steps: int, warmup: int = 0) -> dict:
        """{"step_times_s": [...]} for `steps` timed steps after `warmup` untimed ones, or
        {"error": ...} if that mode failed."""
        request = {"kind": kind, "mode": mode, "steps": steps, "warmup": warmup}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass                    # it died: _read reports how
        return self._read(RESULT, self.step_timeout, f"timing {kind} {mode}")

    def close(self) -> None:
        """Closes stdin (the worker's signal to exit) and waits for it, killing it if it
        does not exit within 30 s."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "TorchWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.stderr.close()


def auxtl_timer(case) -> tuple[Callable[[int, int], list[float]], float]:
    """(timer, compile seconds): timer(warmup, steps) runs untimed then timed calls of the
    compiled step, threading its donated state from call to call, and returns seconds."""
    compiled, compile_s, _ = compile_case(case)
    args = case.args

    def timer(warmup: int, steps: int) -> list[float]:
        nonlocal args
        args, _ = timed_calls(compiled, case, args, warmup)
        args, times = timed_calls(compiled, case, args, steps)
        return times

    return timer, compile_s


def paired_rounds(auxtl: dict[str, Callable[[int, int], list[float]]],
                  torch_steps: Callable[..., dict], modes: dict[str, Sequence[str]], *,
                  rounds: int, steps: int, warmup: int,
                  log: Callable[[str], None] = print) -> dict[str, dict]:
    """Per kind: {"auxtl": [round times], "torch": {mode: [round times]}, "errors": {mode:
    error}, "load_1m": [the host's load average as each round began]}. Each round times
    every kind's auxtl step, then its torch modes (`modes[kind]`, those that warmed up),
    back to back; a mode that fails is dropped from later rounds."""
    out = {kind: {"auxtl": [], "torch": {m: [] for m in modes[kind]}, "errors": {},
                  "load_1m": []} for kind in auxtl}
    for index in range(rounds):
        for kind, timer in auxtl.items():
            record = out[kind]
            record["load_1m"].append(os.getloadavg()[0])
            record["auxtl"].append(timer(warmup, steps))
            medians = [f"auxtl {statistics.median(record['auxtl'][-1]) * 1e3:.1f}"]
            for mode in [m for m in modes[kind] if m not in record["errors"]]:
                reply = torch_steps(kind, mode, steps, warmup)
                if "error" in reply:
                    record["errors"][mode] = reply["error"]
                    continue
                record["torch"][mode].append(reply["step_times_s"])
                medians.append(f"{mode} {statistics.median(reply['step_times_s']) * 1e3:.1f}")
            log(f"[bench] round {index + 1}/{rounds} {kind}: {', '.join(medians)} ms")
    return out


def round_ratios(auxtl_rounds: Sequence[Sequence[float]],
                 torch_rounds: Sequence[Sequence[float]]) -> list[float]:
    """auxtl's median step time / torch's, one per round both sides completed."""
    return [statistics.median(a) / statistics.median(t)
            for a, t in zip(auxtl_rounds, torch_rounds)]


def time_stats(rounds: Sequence[Sequence[float]], examples_per_step: int) -> dict:
    """Median, min and max over every timed step of every round, and examples/s."""
    times = [t for r in rounds for t in r]
    median = statistics.median(times)
    return {"round_times_s": [list(r) for r in rounds], "step_time_median_s": median,
            "step_time_min_s": min(times), "step_time_max_s": max(times),
            "examples_per_s": examples_per_step / median}


def ratio_stats(ratios: Sequence[float]) -> dict:
    return {"round_ratios": list(ratios), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def summarize(raw: dict[str, dict], warmups: dict, examples: dict[str, int]) -> dict:
    """Per kind and mode: time statistics, per-round ratios and their median; errors kept."""
    kinds = {}
    for kind, record in raw.items():
        torch_out = {}
        for mode, rounds in record["torch"].items():
            entry = dict(warmups.get(f"{kind}/{mode}", {}))
            if rounds:
                entry.update(time_stats(rounds, examples[kind]))
                entry.update(ratio_stats(round_ratios(record["auxtl"], rounds)))
            if mode in record["errors"]:
                entry["error"] = record["errors"][mode]
            torch_out[mode] = entry
        kinds[kind] = {"examples_per_step": examples[kind], "round_load_1m": record["load_1m"],
                       "auxtl": time_stats(record["auxtl"], examples[kind]), "torch": torch_out}
    return kinds


def describe(kind: str, batch_size: int) -> str:
    if kind == "pretrain":
        return (f"rotation pretraining step, {batch_size} images x 4 rotations = "
                f"{4 * batch_size} examples")
    return f"fine-tuning step with conv1-4 frozen, {batch_size} images, 10 classes"


def compare_torch(config, python: str, *, batch_size: int, rounds: int = 5,
                  kinds: Sequence[str] = TORCH_KINDS, modes: Sequence[str] = TORCH_MODES,
                  log: Callable[[str], None] = print, script=TORCH_SCRIPT,
                  start_timeout: float = 1800) -> dict:
    """auxtl's small_cnn float32 steps of `kinds` and PyTorch's in `modes`, in `rounds`
    paired rounds of `config.steps` steps (after `config.warmup` untimed ones each)."""
    log(f"[bench] auxtl small_cnn float32 batch {batch_size}: compiling {', '.join(kinds)}")
    cases = build_cases("small_cnn", "float32", kinds, batch_size, seed=config.seed)
    timers, compile_s = {}, {}
    for kind, case in cases.items():
        timers[kind], compile_s[kind] = auxtl_timer(case)
        timers[kind](config.warmup, 0)
    log(f"[bench] PyTorch worker in {python}: building and warming up "
        f"{', '.join(kinds)} x {', '.join(modes)}")
    with TorchWorker(python, batch_size=batch_size, kinds=kinds, modes=modes,
                     warmup=config.warmup, script=script,
                     start_timeout=start_timeout) as worker:
        info = worker.info
        for name, case in info["cases"].items():
            if "error" in case:
                log(f"[bench] torch {name} FAILED: {case['error'].splitlines()[0][:160]}")
        ready = {kind: [m for m in modes if "error" not in info["cases"][f"{kind}/{m}"]]
                 for kind in kinds}
        raw = paired_rounds(timers, worker.steps, ready, rounds=rounds, steps=config.steps,
                            warmup=config.warmup, log=log)
    for kind in kinds:
        for mode in modes:
            if mode not in ready[kind]:
                raw[kind]["torch"][mode] = []
                raw[kind]["errors"][mode] = info["cases"][f"{kind}/{mode}"]["error"]
        raw[kind]["torch"] = {m: raw[kind]["torch"][m] for m in modes}
    env = environment()
    return {
        "model": "small_cnn", "dtype": "float32", "batch_size": batch_size,
        "rounds": rounds, "steps_per_round": config.steps, "warmup_per_round": config.warmup,
        "ratio": "per round: auxtl median step time / torch median step time; "
                 "ratio_median: median over rounds",
        "python_executable": python,
        "torch": {k: info.get(k) for k in ("torch_version", "python", "device", "device_name",
                                           "threads")},
        "auxtl": {**{k: env[k] for k in ("backend", "device_kind", "jax_version", "python",
                                         "cpu_count")}, "compile_s": compile_s},
        "descriptions": {kind: describe(kind, batch_size) for kind in kinds},
        "kinds": summarize(raw, info["cases"], {k: c.examples_per_step
                                                for k, c in cases.items()}),
    }


def _ms(stats: dict) -> str:
    return (f"{stats['step_time_median_s'] * 1e3:>10.2f} "
            f"{stats['step_time_min_s'] * 1e3:>8.1f}-{stats['step_time_max_s'] * 1e3:<8.1f}"
            f"{stats['examples_per_s']:>10.1f}")


def format_torch(comparison: dict) -> str:
    """One block per kind: auxtl and each torch mode; times and the paired ratio."""
    a, t, rounds = comparison["auxtl"], comparison["torch"], comparison["rounds"]
    lines = [f"PyTorch comparison, small_cnn float32: auxtl jax {a['jax_version']} "
             f"({a['device_kind']}) vs torch {t['torch_version']} "
             f"({t['device_name']}, {t['threads']} threads, python {t['python']}); "
             f"{rounds} paired rounds of {comparison['steps_per_round']} steps, each after "
             f"{comparison['warmup_per_round']} untimed"]
    header = (f"{'impl':<20} {'median ms':>10} {'min-max ms':>17} {'ex/s':>10}   "
              f"auxtl/torch time (median of {rounds} paired rounds)")
    for kind, block in comparison["kinds"].items():
        load = block["round_load_1m"]
        lines += ["", f"{kind}: {comparison['descriptions'][kind]}; host load average "
                      f"{min(load):.1f}-{max(load):.1f} during the rounds", header,
                  f"{'auxtl (jax)':<20} {_ms(block['auxtl'])}"]
        for mode, m in block["torch"].items():
            name = f"torch {mode}"
            if "error" in m:
                lines.append(f"{name:<20} failed: {m['error'].splitlines()[0][:100]}")
                continue
            lines.append(f"{name:<20} {_ms(m)}   {m['ratio_median']:.2f} "
                         f"({m['ratio_min']:.2f}-{m['ratio_max']:.2f})")
    loads = [x for block in comparison["kinds"].values() for x in block["round_load_1m"]]
    cores = a["cpu_count"] or 1
    if a["backend"] == "cpu" and max(loads) > 1.5 * cores:
        lines += ["", f"warning: host load average up to {max(loads):.1f} on {cores} cores: "
                      f"other work competed, and torch's OpenMP slows more than XLA under "
                      f"contention, so these ratios favour auxtl; compare the min ms too"]
    return "\n".join(lines + ["", LEGEND])
