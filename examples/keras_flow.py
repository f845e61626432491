"""Géron's "Reusing pretrained layers" flow (Hands-On ML, ch. 11), in JAX with auxtl.

The Keras original: model A is trained on 8 of the 10 classes; task B is a
binary classifier for the 2 other classes with only 200 labeled images.
"B on A" reuses every layer of A except its output layer, freezes them, trains
the new head for a few epochs, then unfreezes everything and trains on with a
lower learning rate; it is compared with the same network trained on B from
scratch.

Here, on the embedded MNIST-5k: A = digits 0-7, B = digits 8 vs 9 (labels 0/1).

    held-out split (10%, seed 0) ──────────────────────────────── test sets (A: 0-7, B: 8/9)
    pool 0-7 ── finetune(train="all") ── model A ── save_trunk (self-describing checkpoint)
                                                        │ load_trunk_state
    pool 8/9 ── 100+50 per class (seeded) ── build_transfer_model ── finetune(head, then all @0.1)
                                         └─ build_transfer_model(transplant=False)
                                            ── finetune(scratch_config: same epochs, all trainable)

A is trained once; each seed draws a new B subset and new initialisations (head
and scratch trunk) and fine-tuning batch order. Per seed both B models see the
same 200 training and 100 validation images, so the difference is paired.

Run:  python examples/keras_flow.py [--seeds 5] [--epochs-a 3] [--epochs-b 4,16] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np
from flax import nnx

import auxtl
from auxtl import checkpoints
from auxtl.data import Dataset, compute_normalization
from auxtl.finetune import FinetuneConfig, StepCache, finetune, score
from auxtl.freezing import Phase
from auxtl.models import config_to_json, make_config
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
from auxtl.stats import mean_interval, paired_difference
from auxtl.splits import per_class_indices, train_test_split
from auxtl.transfer import scratch_config, target_normalization
from auxtl.transplant import build_transfer_model

A_CLASSES = tuple(range(8))
B_CLASSES = (8, 9)
TINY_WIDTHS = {"widths": (8, 8, 16, 16, 16), "fc_dim": 16}


# --------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class Splits:
    a_train: Dataset
    a_val: Dataset
    a_test: Dataset
    b_pool: Dataset   # every 8/9 image outside the held-out split (labels 0/1)
    b_test: Dataset


def only_classes(ds: Dataset, classes: tuple[int, ...], *, name: str) -> Dataset:
    """The examples of `classes`, relabelled 0..len(classes)-1 in that order."""
    keep = np.flatnonzero(np.isin(ds.labels, classes))
    subset = ds.subset(keep, name=name)
    remap = np.full(int(ds.labels.max()) + 1, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
    return Dataset(name=name, images=subset.images, labels=remap[subset.labels])


def make_splits(ds: Dataset, *, a_per_class: int | None = None) -> Splits:
    pool, test = train_test_split(ds, test_fraction=0.1, seed=0)
    a_pool = only_classes(pool, A_CLASSES, name="A[pool]")
    a_train, a_val = train_test_split(a_pool, test_fraction=0.1, seed=1)
    if a_per_class is not None:  # --tiny: a small A, same code path
        a_train = a_train.subset(per_class_indices(a_train.labels, (a_per_class,), seed=0)[0])
    return Splits(a_train=a_train, a_val=a_val,
                  a_test=only_classes(test, A_CLASSES, name="A[test]"),
                  b_pool=only_classes(pool, B_CLASSES, name="B[pool]"),
                  b_test=only_classes(test, B_CLASSES, name="B[test]"))


def b_subsets(b_pool: Dataset, *, train_per_class: int, val_per_class: int, seed: int):
    """(train, val, rest): seeded per-class picks; `rest` is every pool image left over."""
    train_idx, val_idx = per_class_indices(b_pool.labels, (train_per_class, val_per_class),
                                           seed=seed)
    rest_idx = np.setdiff1d(np.arange(len(b_pool)), np.concatenate([train_idx, val_idx]))
    return b_pool.subset(train_idx), b_pool.subset(val_idx), b_pool.subset(rest_idx)


def pair(ds: Dataset):
    return ds.images, ds.labels


# --------------------------------------------------------------------------- model A

def train_model_a(splits: Splits, *, model_overrides: dict, epochs: int, seed: int,
                  learning_rate: float, batch_size: int, path: pathlib.Path, cache: StepCache,
                  progress: bool):
    """Trains A (a small_cnn trunk + 8-way head, everything trainable) and saves its trunk
    as a self-describing checkpoint, exactly like a pretrained trunk."""
    input_shape = splits.a_train.image_shape
    config = make_config("small_cnn", input_shape, **model_overrides)
    rngs = nnx.Rngs(seed)
    model = TransferModel(build_target_trunk("small_cnn", config, TargetSpec(), rngs=rngs),
                          len(A_CLASSES), rngs=rngs)
    normalization = compute_normalization(splits.a_train.images)
    layers = len(model.trunk.layer_names)
    fine = FinetuneConfig(phases=(Phase(epochs=epochs, train="all"),),
                          learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    result = finetune(model, layers, fine, train=pair(splits.a_train), val=pair(splits.a_val),
                      test=pair(splits.a_test), normalization=normalization, cache=cache,
                      progress=progress, desc="model A")
    metadata = checkpoints.trunk_metadata(
        model.trunk, config_json=config_to_json(config), input_shape=input_shape,
        normalization=normalization,
        tasks=[{"name": "classification", "weight": 1.0,
                "params": {"num_classes": len(A_CLASSES), "classes": list(A_CLASSES)}}],
        extra={"data": "mnist5k digits 0-7", "steps": result.steps, "seed": seed,
               "finetune": fine.to_json(),
               "eval": {"val_accuracy": result.best_val_accuracy,
                        "test_accuracy": result.test_accuracy}})
    checkpoints.save_trunk(path, trunk_params=result.params["trunk"],
                           trunk_batch_stats=result.batch_stats["trunk"],
                           head_params={"classifier": result.params["head"]}, metadata=metadata)
    return result


# --------------------------------------------------------------------------- model B

def evaluate(model, result, dataset: Dataset, normalization, cache: StepCache) -> float:
    """Accuracy of a fine-tuned result (its best-validation weights) on another data set."""
    return score(model, result, *pair(dataset), normalization=normalization,
                 cache=cache)


def run_seed(seed: int, splits: Splits, source, *, epochs_b: tuple[int, int], lr_scale: float,
             learning_rate: float, batch_size: int, train_per_class: int, val_per_class: int,
             cache: StepCache, progress: bool):
    metadata, params, stats = source
    b_train, b_val, b_rest = b_subsets(splits.b_pool, train_per_class=train_per_class,
                                       val_per_class=val_per_class, seed=seed)
    normalization = target_normalization(metadata, b_train)   # A's: what its layers expect
    data = dict(train=pair(b_train), val=pair(b_val), test=pair(splits.b_test))
    spec = TargetSpec()   # reuse every layer of A's trunk; only the output layer is new
    k = len(metadata["layer_names"])
    fine = FinetuneConfig(phases=(Phase(epochs=epochs_b[0], train="head"),
                                  Phase(epochs=epochs_b[1], train="all", lr_scale=lr_scale)),
                          learning_rate=learning_rate, batch_size=batch_size, seed=seed)

    on_a, report = build_transfer_model(metadata, params, stats, spec,
                                        num_classes=len(B_CLASSES), in_channels=1, seed=seed)
    t0 = time.perf_counter()
    on_a_result = finetune(on_a, k, fine, normalization=normalization, cache=cache,
                           progress=progress, desc=f"B on A, seed {seed}", **data)
    on_a_s = time.perf_counter() - t0

    scratch, _ = build_transfer_model(metadata, None, None, spec, num_classes=len(B_CLASSES),
                                      in_channels=1, seed=seed, transplant=False)
    t0 = time.perf_counter()
    scratch_result = finetune(scratch, k, scratch_config(fine), normalization=normalization,
                              cache=cache, progress=progress, desc=f"B scratch, seed {seed}",
                              **data)
    scratch_s = time.perf_counter() - t0

    row = {
        "seed": seed,
        "b_on_a_test_accuracy": on_a_result.test_accuracy,
        "b_scratch_test_accuracy": scratch_result.test_accuracy,
        "b_on_a_val_accuracy": on_a_result.best_val_accuracy,
        "b_scratch_val_accuracy": scratch_result.best_val_accuracy,
        "b_on_a_rest_accuracy": evaluate(on_a, on_a_result, b_rest, normalization, cache),
        "b_scratch_rest_accuracy": evaluate(scratch, scratch_result, b_rest, normalization,
                                            cache),
        "b_on_a_best_epoch": best_epoch(on_a_result.history),
        "b_scratch_best_epoch": best_epoch(scratch_result.history),
        "b_on_a_steps": on_a_result.steps,
        "b_scratch_steps": scratch_result.steps,
        "b_on_a_seconds": on_a_s,
        "b_scratch_seconds": scratch_s,
        "b_rest_size": len(b_rest),
    }
    return row, report, on_a_result.history


def best_epoch(history) -> dict[str, Any]:
    """Where early stopping picked its weights: (phase, epoch) of the first best validation."""
    best = max(history, key=lambda r: r["val_accuracy"])   # max keeps the first maximum
    return {"phase": best["phase"], "train": best["train"], "epoch": best["epoch"]}


# --------------------------------------------------------------------------- summary

def interval(values) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else v)
            for k, v in zip(("mean", "low", "high"), mean_interval(values))}


def error_ratio(scratch_acc: float, on_a_acc: float) -> float | None:
    """Scratch error / B-on-A error (Géron's "the error rate dropped by a factor of ...")."""
    on_a_err, scratch_err = 1.0 - on_a_acc, 1.0 - scratch_acc
    if on_a_err <= 0.0:
        return None if scratch_err <= 0.0 else math.inf
    return scratch_err / on_a_err


def summarize(rows, which: str) -> dict[str, Any]:
    on_a = [r[f"b_on_a_{which}_accuracy"] for r in rows]
    scratch = [r[f"b_scratch_{which}_accuracy"] for r in rows]
    mean_on_a, mean_scratch = float(np.mean(on_a)), float(np.mean(scratch))
    ratio = error_ratio(mean_scratch, mean_on_a)
    return {
        "b_on_a": interval(on_a),
        "b_scratch": interval(scratch),
        "difference": {k: (None if math.isnan(v) else v) for k, v in
                       zip(("mean", "low", "high"), paired_difference(on_a, scratch))},
        "error_rate": {"b_on_a": 1.0 - mean_on_a, "b_scratch": 1.0 - mean_scratch,
                       "scratch_over_on_a": None if ratio in (None, math.inf) else ratio,
                       "on_a_error_is_zero": 1.0 - mean_on_a <= 0.0},
        "seeds_on_a_better": int(sum(a > b for a, b in zip(on_a, scratch))),
        "seeds_tied": int(sum(a == b for a, b in zip(on_a, scratch))),
    }


def fmt_interval(d) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def print_table(result, log) -> None:
    log("")
    log(f"{'seed':>4}  {'B on A (test)':>13}  {'B scratch (test)':>16}  {'diff':>7}  "
        f"{'B on A (rest)':>13}  {'B scratch (rest)':>16}")
    for r in result["seeds"]:
        log(f"{r['seed']:>4}  {r['b_on_a_test_accuracy']:>13.4f}  "
            f"{r['b_scratch_test_accuracy']:>16.4f}  "
            f"{r['b_on_a_test_accuracy'] - r['b_scratch_test_accuracy']:>+7.4f}  "
            f"{r['b_on_a_rest_accuracy']:>13.4f}  {r['b_scratch_rest_accuracy']:>16.4f}")
    for which, title in (("test", f"held-out test ({result['data']['b_test']} images of 8/9)"),
                         ("rest", "rest of the 8/9 pool (never trained or validated on; "
                                  f"{result['seeds'][0]['b_rest_size']} images per seed)")):
        s = result[which]
        ratio = s["error_rate"]["scratch_over_on_a"]
        ratio_text = (f"{ratio:.2f}x" if ratio is not None
                      else "n/a (B on A made no error)" if s["error_rate"]["on_a_error_is_zero"]
                      else "n/a")
        log(f"{title}:")
        log(f"  B on A    {s['b_on_a']['mean']:.4f}   B scratch {s['b_scratch']['mean']:.4f}   "
            f"paired diff (95% CI) {fmt_interval(s['difference'])}")
        log(f"  error rate {s['error_rate']['b_scratch']:.4f} (scratch) -> "
            f"{s['error_rate']['b_on_a']:.4f} (B on A): scratch/B-on-A = {ratio_text}; "
            f"B on A better on {s['seeds_on_a_better']} of {len(result['seeds'])} seeds, "
            f"tied on {s['seeds_tied']}")


# --------------------------------------------------------------------------- main

def parse_epochs_b(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--epochs-b takes HEAD,ALL (two positive integers, e.g. 4,16), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None,
                   help="number of B seeds 0..N-1 (default 5; 2 with --tiny)")
    p.add_argument("--epochs-a", type=int, default=None,
                   help="epochs for model A (default 3; 1 with --tiny)")
    p.add_argument("--epochs-b", type=parse_epochs_b, default=None,
                   help="HEAD,ALL epochs for B on A: frozen reused layers, then all unfrozen "
                        "(default 4,16; 1,1 with --tiny); B from scratch gets HEAD+ALL")
    p.add_argument("--lr", type=float, default=3e-3, help="base learning rate (AdamW)")
    p.add_argument("--lr-scale", type=float, default=0.1,
                   help="learning-rate factor of the reused layers once unfrozen")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None,
                   help="folder for results.json, surgery_report.txt and A's trunk checkpoint "
                        "(default: print only; A's checkpoint goes to a temporary folder)")
    p.add_argument("--tiny", action="store_true",
                   help="seconds-long smoke run: narrow trunk, 40 A images per class, "
                        "1 epoch each, 2 seeds")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.epochs_a is not None and args.epochs_a < 1:
        p.error("--epochs-a must be >= 1")
    args.seeds = args.seeds or (2 if args.tiny else 5)
    args.epochs_a = args.epochs_a or (1 if args.tiny else 3)
    args.epochs_b = args.epochs_b or ((1, 1) if args.tiny else (4, 16))
    return args


def main(argv=None, log=print) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    model_overrides = dict(TINY_WIDTHS) if args.tiny else {}
    splits = make_splits(auxtl.load_dataset("mnist5k"), a_per_class=40 if args.tiny else None)
    cache = StepCache()
    out = pathlib.Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory(prefix="keras_flow_") as tmp:
        a_path = (out if out else pathlib.Path(tmp)) / "model_a_trunk"
        t0 = time.perf_counter()
        a_result = train_model_a(splits, model_overrides=model_overrides, epochs=args.epochs_a,
                                 seed=0, learning_rate=args.lr, batch_size=args.batch_size,
                                 path=a_path, cache=cache, progress=args.progress)
        a_seconds = time.perf_counter() - t0
        log(f"model A (digits 0-7, {len(splits.a_train)} train images, {args.epochs_a} epochs): "
            f"val {a_result.best_val_accuracy:.4f}, test {a_result.test_accuracy:.4f} "
            f"[{a_seconds:.0f} s]")
        # Everything B needs comes back through the checkpoint, as for a pretrained trunk.
        params, stats, metadata = checkpoints.load_trunk_state(a_path)
        rows, report, histories = [], None, {}
        for seed in range(args.seeds):
            row, seed_report, history = run_seed(
                seed, splits, (metadata, params, stats), epochs_b=args.epochs_b,
                lr_scale=args.lr_scale, learning_rate=args.lr, batch_size=args.batch_size,
                train_per_class=100, val_per_class=50, cache=cache, progress=args.progress)
            if report is None:
                report = seed_report
                log("surgery report (B on A; the same for every seed):")
                log(report.table())
            rows.append(row)
            histories[seed] = history
            log(f"seed {seed}: B on A {row['b_on_a_test_accuracy']:.4f}  "
                f"B scratch {row['b_scratch_test_accuracy']:.4f}  (test); "
                f"{row['b_on_a_rest_accuracy']:.4f} vs {row['b_scratch_rest_accuracy']:.4f} "
                f"(rest) [{row['b_on_a_seconds'] + row['b_scratch_seconds']:.0f} s]")
    result = {
        "config": {"seeds": list(range(args.seeds)), "epochs_a": args.epochs_a,
                   "epochs_b": list(args.epochs_b), "lr": args.lr, "lr_scale": args.lr_scale,
                   "batch_size": args.batch_size, "tiny": args.tiny, "model": "small_cnn",
                   "model_config": metadata["config"], "optimizer": "adamw",
                   "b_train_per_class": 100, "b_val_per_class": 50},
        "data": {"dataset": "mnist5k", "a_classes": list(A_CLASSES),
                 "b_classes": list(B_CLASSES), "a_train": len(splits.a_train),
                 "a_val": len(splits.a_val), "a_test": len(splits.a_test),
                 "b_pool": len(splits.b_pool), "b_train": 200, "b_val": 100,
                 "b_test": len(splits.b_test)},
        "model_a": {"val_accuracy": a_result.best_val_accuracy,
                    "test_accuracy": a_result.test_accuracy, "steps": a_result.steps,
                    "seconds": a_seconds,
                    "checkpoint": str(a_path) if out else None},
        "surgery": {"counts": report.counts(),
                    "copied_params": report.num_params("copied", "adapted"),
                    "total_params": report.num_params("copied", "adapted", "kept",
                                                      "reinitialised")},
        "seeds": rows,
        "test": summarize(rows, "test"),
        "rest": summarize(rows, "rest"),
        "b_on_a_history_seed0": histories[0],
    }
    result["runtime_s"] = time.perf_counter() - started
    print_table(result, log)
    log(f"total runtime {result['runtime_s']:.0f} s")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "surgery_report.txt").write_text(report.table() + "\n")
        log(f"results: {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
