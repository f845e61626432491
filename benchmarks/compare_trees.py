"""Before/after step times of two auxtl checkouts, paired with PyTorch, in alternating runs.

Each run is `auxtl bench throughput --compare-torch` (small_cnn float32, the rotation
pretraining step and the frozen-prefix fine-tuning step, each round timing auxtl then
torch eager / channels-last / torch.compile back to back) from one checkout's own
`.venv`; runs alternate A, B, A, B, ... so slow drifts of the host's load hit both.
Printed per checkout and kind: auxtl's median step time over every run, and the
median over runs of the per-run ratio to torch.compile (each itself a median of
per-round ratios).

    python benchmarks/compare_trees.py BEFORE_DIR AFTER_DIR --torch-python PY \
        [--runs 2] [--rounds 5] [--out runs/compare_trees]

Each checkout needs `make .venv/.auxtl-installed` first. The JSON of every run and a
summary.json land in --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

KINDS = ("pretrain", "frozen_prefix")


def run_once(tree: pathlib.Path, torch_python: str, rounds: int, out: pathlib.Path) -> dict:
    """One `auxtl bench throughput --compare-torch` run of `tree`; its JSON."""
    out.mkdir(parents=True, exist_ok=True)
    command = [str(tree / ".venv" / "bin" / "auxtl"), "bench", "throughput",
               "--models", "small_cnn", "--dtypes", "float32", "--kinds", ",".join(KINDS),
               "--compare-torch", "--torch-python", torch_python,
               "--torch-rounds", str(rounds), "--no-plot", "--out", str(out)]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "throughput.json").read_text())


def summary_of(runs: list[dict]) -> dict:
    """Per kind: auxtl's median step ms over every timed step of every run, torch.compile's,
    and the median over runs of the run's ratio_median to torch.compile."""
    out = {}
    for kind in KINDS:
        auxtl_steps, torch_steps, ratios = [], [], []
        for run in runs:
            record = run["torch"]["kinds"][kind]
            auxtl_steps += [t for r in record["auxtl"]["round_times_s"] for t in r]
            compiled = record["torch"]["compile"]
            torch_steps += [t for r in compiled["round_times_s"] for t in r]
            ratios.append(compiled["ratio_median"])
        out[kind] = {"auxtl_ms": 1e3 * statistics.median(auxtl_steps),
                     "torch_compile_ms": 1e3 * statistics.median(torch_steps),
                     "ratio_to_torch_compile_per_run": ratios,
                     "ratio_median": statistics.median(ratios)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=pathlib.Path)
    parser.add_argument("after", type=pathlib.Path)
    parser.add_argument("--torch-python", required=True)
    parser.add_argument("--runs", type=int, default=2, help="runs per checkout (alternating)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per run")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/compare_trees"))
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for index in range(args.runs):
        for name, tree in trees.items():
            print(f"[compare] run {index + 1}/{args.runs}: {name} ({tree})", file=sys.stderr,
                  flush=True)
            runs[name].append(run_once(tree, args.torch_python, args.rounds,
                                       args.out / f"{name}_{index}"))
    result = {name: summary_of(found) for name, found in runs.items()}
    result["trees"] = {name: str(tree) for name, tree in trees.items()}
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    print(f"{'checkout':<8} {'kind':<14} {'auxtl ms':>9} {'compile ms':>11} "
          f"{'ratio (per run)':>24}")
    for name in trees:
        for kind, row in result[name].items():
            per_run = ", ".join(f"{r:.2f}" for r in row["ratio_to_torch_compile_per_run"])
            print(f"{name:<8} {kind:<14} {row['auxtl_ms']:>9.1f} {row['torch_compile_ms']:>11.1f} "
                  f"{row['ratio_median']:>6.2f} ({per_run})")
    return result


if __name__ == "__main__":
    main()
