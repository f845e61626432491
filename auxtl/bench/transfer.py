"""Label-efficiency sweep: how much each pretraining source helps at each label budget.

For each source (every registered task that accepts the images, a multi-task mix,
and two controls: `random`, a frozen randomly initialised trunk, and `scratch`,
the target architecture trained from random init with every layer trainable),
each label budget (labeled images per class, or `all`) and each evaluation mode,
over several seeds, each seed with its own labeled training subset and one shared
labeled validation set per budget:

  linear    closed-form ridge on globally pooled features (`auxtl.probes`), its L2
            strength and the depth chosen on validation per seed
  knn       temperature-weighted k-NN on L2-normalised pooled features, k and depth
            chosen on validation per seed
  head      the lowest `reuse` layers frozen, a linear classifier on their pooled
            output trained from the ridge probe's solution (LP-FT; with `--top replace`
            the source's upper layers, fresh, and a random classifier)
  staged    `head`, then the top `unfreeze` reused layers unfrozen at a reduced rate
  finetune  `head`, then every reused layer unfrozen at that reduced rate
  best      per seed, the trained mode with the best validation accuracy
  auto      per seed, the pretrained source (and its mode) with the best validation

Trained modes run epochs with augmentation, a warmup + cosine schedule and the best
validation epoch kept (`auxtl.bench.transfer_trained`); `scratch`, their paired
reference, runs the same recipe with its rate chosen on validation. The probes
(cheap) run for every source; the trained modes for the `trained_sources` pretrained
sources whose linear probe validates best. The test split only ever scores.

    auxtl bench transfer                       # defaults: mnist5k, sized for 2 CPU cores
    auxtl bench transfer --tiny --out /tmp/t   # smoke test
    auxtl bench transfer --full --data cifar10:PATH   # RotNet semi-supervised setting (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from auxtl.bench import BenchError
from auxtl.bench import transfer_report as report
from auxtl.bench.machine import environment, keep_freed_memory
from auxtl.bench.transfer_cells import add_differences
from auxtl.bench.transfer_config import (ALL, BENCH_TRUNKS, MIX, MODES, SCRATCH, RANDOM,
                                         TINY_TRUNKS, TRAINED_MODES, TransferBenchConfig,
                                         full_config, tiny_overrides)
from auxtl.bench.transfer_data import labeled_split, load_bench_data, val_count
from auxtl.bench.transfer_probes import probe_cells
from auxtl.bench.transfer_sources import (expand_sources, load_source, pretrained_trunk,
                                          random_trunk, refusal, source_tasks)
from auxtl.bench.transfer_trained import Trainer, auto_cells, trained_cells
# ---- the sweep ---------------------------------------------------------------------------------

def split_all(config: TransferBenchConfig, labels: np.ndarray) -> dict:
    """budget -> one `SeedSplit` per seed (`auxtl.bench.transfer_data.labeled_split`)."""
    return {b: [labeled_split(labels, b, s, val_per_class=val_count(
                b, minimum=config.val_per_class, maximum=config.max_val_per_class))
                for s in config.seeds]
            for b in config.budgets}


def rank_sources(cells: list[dict], names: Sequence[str]) -> list[str]:
    """Pretrained sources by their linear probe's mean validation accuracy (chosen depth,
    every budget and seed), best first; ties keep the sweep's order."""
    score = {n: np.mean([v for c in cells if c["source"] == n and c["mode"] == "linear"
                         and not c.get("depth_only") for v in c["val_accuracy"]])
             for n in names}
    return sorted(names, key=lambda n: -score[n])


def run_sweep(config: TransferBenchConfig, *, log: Callable[[str], None] = print) -> dict:
    """Pretrains (or reuses) every source, evaluates every mode, budget and seed."""
    total_start = time.perf_counter()
    unknown = [m for m in config.modes if m not in MODES]
    if unknown or not config.modes:
        raise BenchError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if len(config.seeds) < 2:
        raise BenchError("a 95% interval needs at least 2 seeds")
    data = load_bench_data(config.data)
    shape = data.pool.image_shape
    log(f"[transfer] data {config.data}: pool {len(data.pool)}, test {len(data.test)} "
        f"({data.test_origin}), {data.pool.num_classes} classes, images {shape}")
    splits = split_all(config, data.pool.labels)
    names = expand_sources(config.sources)
    sources: dict[str, dict] = {}
    paths: dict[str, pathlib.Path] = {}
    for name in names:
        reason = refusal(name, shape)
        if reason:
            log(f"[transfer] source {name}: skipped ({reason})")
            sources[name] = {"status": "skipped", "reason": reason, "tasks": source_tasks(name)}
            continue
        if name == SCRATCH:
            sources[name] = {"status": "ok", "tasks": (), "kind": "control"}
            continue
        path, info = (random_trunk(config, data) if name == RANDOM
                      else pretrained_trunk(config, name, data, log))
        paths[name] = path
        sources[name] = {"status": "ok", "tasks": source_tasks(name), "trunk": str(path),
                         "kind": "control" if name == RANDOM else "pretrained", **info}
    cells: list[dict] = []
    timings: dict[str, float] = {}
    trainer = Trainer(config)
    loaded = {name: load_source(name, path) for name, path in paths.items()}
    probing = {"linear", "knn"} & set(config.modes)
    for name, source in loaded.items():
        start = time.perf_counter()
        if probing:
            cells += probe_cells(source, data, splits, config, log)
        timings[name] = time.perf_counter() - start
    pretrained = [n for n in loaded if n != RANDOM]
    trained = pretrained
    if config.trained_sources and "linear" in config.modes:
        trained = rank_sources(cells, pretrained)[:config.trained_sources]
        log(f"[transfer] trained modes for the {len(trained)} sources whose linear probe "
            f"validates best: {', '.join(trained)}")
    if set(TRAINED_MODES) & set(config.modes):
        for name in trained:
            start = time.perf_counter()
            cells += trained_cells(name, loaded[name], data, splits, config, trainer,
                                   loaded[name], log)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        if SCRATCH in sources:
            reference = (next(iter(loaded.values()), None)
                         or load_source(RANDOM, random_trunk(config, data)[0]))
            start = time.perf_counter()
            cells += trained_cells(SCRATCH, None, data, splits, config, trainer, reference, log)
            timings[SCRATCH] = time.perf_counter() - start
        cells += auto_cells(cells, config)
    add_differences(cells)
    pool_labels = data.pool.labels
    classes = data.pool.num_classes
    return {
        "config": config.to_json(),
        "environment": environment(),
        "trained_seeds": "vmapped" if trainer.vmap else "one after another, one compiled step",
        "trained_sources": trained,
        "data": {"spec": config.data, "pool_size": len(data.pool), "test_size": len(data.test),
                 "test_split": data.test_origin, "num_classes": classes,
                 "image_shape": list(shape)},
        "subsets": {str(b): {"x": float(np.mean([len(s.train) for s in per_seed])) / classes,
                             "sizes": [len(s.train) for s in per_seed],
                             "val_size": len(per_seed[0].val),
                             "per_class": [np.bincount(pool_labels[s.train]).tolist()
                                           for s in per_seed]}
                    for b, per_seed in splits.items()},
        "sources": sources,
        "cells": [c for c in cells if not c.get("depth_only")],
        "probe_by_depth": [c for c in cells if c.get("depth_only")],
        "timings_s": {"evaluation": timings,
                      "pretraining": {n: s.get("pretrain_s", 0.0) for n, s in sources.items()},
                      "total": time.perf_counter() - total_start},
    }


# ---- command line ------------------------------------------------------------------------------

def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_budgets(text: str) -> tuple[int | str, ...]:
    budgets: list[int | str] = []
    for item in _split(text):
        if item == ALL:
            budgets.append(ALL)
            continue
        try:
            value = int(item)
        except ValueError as error:
            raise BenchError(f"--budgets {text!r}: {item!r} is neither a number nor "
                             f"'all'") from error
        if value < 1:
            raise BenchError(f"--budgets {text!r}: labels per class must be >= 1")
        budgets.append(value)
    if not budgets:
        raise BenchError(f"--budgets {text!r} names no budget")
    return tuple(dict.fromkeys(budgets))


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(_split(text)))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise BenchError(f"--modes {text!r}: choose from {', '.join(MODES)}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auxtl bench transfer",
        description="Label-efficiency sweep: test accuracy by pretraining source, labels per "
                    "class and evaluation mode over seeds, with 95%% intervals and paired "
                    "differences to scratch (trained modes) or a random trunk (probes).")
    parser.add_argument("--data", default=None,
                        help="mnist5k (default) | digits | npz:PATH | folder:PATH | cifar10:PATH")
    parser.add_argument("--sources", default=None,
                        help="comma list of task names, A+B mixes, random, scratch, or 'tasks' "
                             f"(every registered task); default: tasks,{MIX},random,scratch")
    parser.add_argument("--budgets", default=None, help="labels per class, e.g. 1,5,10,50,all")
    parser.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    parser.add_argument("--pretrain-epochs", type=float, default=None,
                        help="pretraining budget per source, in passes over the pool")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pretraining budget in steps (overrides --pretrain-epochs)")
    parser.add_argument("--head-epochs", type=int, default=None,
                        help="epochs with the reused layers frozen")
    parser.add_argument("--tune-epochs", type=int, default=None,
                        help="epochs with reused layers unfrozen (staged, finetune)")
    parser.add_argument("--trained-sources", type=int, default=None,
                        help="pretrained sources given the trained modes: the N whose linear "
                             "probe validates best (0: all)")
    parser.add_argument("--reuse", type=int, default=None,
                        help="lowest trunk layers reused by the trained modes")
    parser.add_argument("--top", default=None, choices=["drop", "replace"],
                        help="the source layers above --reuse: dropped (default) or fresh")
    parser.add_argument("--model", default=None, help="trunk architecture (auxtl models)")
    parser.add_argument("--out", default=None, help="output folder (default runs/bench_transfer)")
    parser.add_argument("--json", default=None, help="JSON path (default OUT/transfer.json)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: narrow trunk, a few steps, 2 seeds, budgets 1,5")
    parser.add_argument("--full", action="store_true",
                        help="RotNet's CIFAR-10 semi-supervised setting (NIN trunk, rotation, "
                             "20/100/400/1000/5000 labels per class); needs --data cifar10:PATH")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--progress", action="store_true", help="pretraining progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TransferBenchConfig:
    """Preset (defaults, --full, then --tiny), then explicit flags on top."""
    config = full_config() if args.full else TransferBenchConfig()
    if args.tiny:
        config = dataclasses.replace(config, **tiny_overrides(config))
    explicit: dict[str, Any] = {}
    if args.data:
        explicit["data"] = args.data
    elif args.full:
        raise BenchError("--full needs --data cifar10:PATH (the CIFAR-10 python batches)")
    if args.sources:
        explicit["sources"] = tuple(dict.fromkeys(_split(args.sources)))
    if args.budgets:
        explicit["budgets"] = parse_budgets(args.budgets)
    if args.modes:
        explicit["modes"] = parse_modes(args.modes)
    if args.seeds is not None:
        explicit["seeds"] = tuple(range(args.seeds))
    for flag, least in (("pretrain_steps", 1), ("pretrain_epochs", 0), ("head_epochs", 1),
                        ("tune_epochs", 1), ("reuse", 1), ("trained_sources", 0)):
        value = getattr(args, flag)
        if value is not None:
            if value < least or (flag == "pretrain_epochs" and value == 0):
                raise BenchError(f"--{flag.replace('_', '-')} must be "
                                 f"{'> 0' if flag == 'pretrain_epochs' else f'>= {least}'}, "
                                 f"got {value}")
            explicit[flag] = value
    if args.model and args.model != config.model:
        explicit["model"] = args.model
        explicit["model_overrides"] = dict((TINY_TRUNKS if args.tiny else BENCH_TRUNKS)
                                           .get(args.model, {}))
    if args.top:
        explicit["top"] = args.top
    if args.out:
        explicit["out"] = args.out
    explicit["progress"] = args.progress
    config = dataclasses.replace(config, **explicit)
    if config.unfreeze > config.reuse:
        config = dataclasses.replace(config, unfreeze=config.reuse)
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep from command-line arguments; writes and returns transfer.json's content."""
    keep_freed_memory()   # no-op when the CLI already did it
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    config = config_from_args(args)
    out = pathlib.Path(config.out)
    json_path = pathlib.Path(args.json) if args.json else out / "transfer.json"
    out.mkdir(parents=True, exist_ok=True)
    result = run_sweep(config, log=lambda text: print(text, file=sys.stderr, flush=True))
    result["outputs"] = {"json": str(json_path), "markdown": str(out / "transfer.md"),
                         "plot": None if args.no_plot else str(out / "transfer.png"),
                         "pretraining_plot": None if args.no_plot
                         else str(out / "pretraining.png")}
    markdown = report.markdown(result)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    (out / "transfer.md").write_text(markdown)
    if not args.no_plot:
        report.plot(result, out / "transfer.png")
        report.plot_pretraining(result, out / "pretraining.png")
    print(markdown)
    print(f"wrote {json_path}, {out / 'transfer.md'}"
          + ("" if args.no_plot else f", {out / 'transfer.png'}"))
    return result
