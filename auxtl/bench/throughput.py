"""Throughput and MFU of auxtl's steps on CPU, GPU and TPU.

For each model x compute dtype x step kind: step time (median, min/max, IQR after
warm-up), examples/s, FLOPs per step from XLA's cost analysis of the compiled
step (plus auxtl.cpu's convolution kernels, which it does not count), achieved FLOP/s
and MFU against the device's peak (`auxtl.bench.peaks`).

Step kinds:
  pretrain         full rotation pretraining step (`auxtl.pretrain_step.make_train_step`);
                   every image yields 4 rotated examples
  frozen_prefix    fine-tuning step with the lowest layers frozen (small_cnn: conv1-4
                   of 5; resnets: all but the last stage), gradients for the rest only
  cached_features  the same with the frozen prefix's output precomputed (training
                   starts at the first trainable layer)
  inference        jitted forward, BatchNorm in inference mode
  finetune_full    (opt-in) fine-tuning step with everything trainable

Parameters stay float32; `--dtypes bfloat16` sets the model config's compute dtype.
The steps are timed on synthetic uint8 images already on the device. Beside each
step's images/s, the input pipeline's: once per model, the pretraining loop's
in-memory path (`auxtl.data.batch_indices`, `parallel.process_slice`, host gather,
`parallel.put_batch`, waited for) on `--data` (default: synthetic uint8 images of the
model's input shape), or its streamed path with `--data stream:SPEC` (grain workers
decode and random-resized-crop SPEC's images to the model's input shape), and which of
the two bounds a run (`bound`).

    auxtl bench throughput --models small_cnn,resnet18 --steps 10
    python -m auxtl.bench.throughput --tiny --batch-size 8 --steps 2 --out runs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from auxtl.bench import BenchError, peaks, torch_reference
from auxtl.bench.machine import environment, keep_freed_memory
from auxtl.bench.throughput_cases import (ACCELERATOR_BATCH, CPU_BATCH, CPU_DEFAULT_MODELS,
                                          DTYPES, EXTRA_KINDS, MODEL_INPUTS, STEP_KINDS,
                                          TINY_OVERRIDES, BenchConfig)
from auxtl.bench.throughput_measure import run_benchmark
from auxtl.bench.throughput_report import (format_header, format_table, markdown_table,
                                           ok_rows, plot_examples_per_s)
from auxtl.models import MODELS
# ---- command line ------------------------------------------------------------------------

def _parse_list(text: str, valid: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [x for x in items if x not in valid]
    if unknown or not items:
        raise BenchError(f"unknown {what} {unknown or text!r}; choose from {', '.join(valid)}")
    return items


def _parse_value(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return tuple(_parse_value(x) for x in text.split(",") if x)
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_model_args(items: Sequence[str], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """'[MODEL:]KEY=VALUE' items -> {model: {key: value}}; without MODEL, for every model
    whose config has that field (a field no chosen model has is an error)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, assignment = item.rpartition(":") if ":" in item.split("=")[0] \
            else ("", "", item)
        key, eq, value = assignment.partition("=")
        if not eq or not key:
            raise BenchError(f"--model-arg {item!r} must look like [MODEL:]KEY=VALUE")
        chosen = [target] if target else list(models)
        applied = False
        for model in chosen:
            if model not in MODELS:
                raise BenchError(f"--model-arg {item!r}: unknown model {model!r}")
            fields = {f.name for f in dataclasses.fields(MODELS[model][0])}
            if key in fields:
                out.setdefault(model, {})[key] = _parse_value(value)
                applied = True
            elif target:
                raise BenchError(f"--model-arg {item!r}: {model} has no field {key!r}; "
                                 f"fields: {sorted(fields)}")
        if not applied:
            raise BenchError(f"--model-arg {item!r}: none of {chosen} has a field {key!r}")
    return out


def parse_batch_sizes(text: str | None) -> dict[str, int]:
    """'64' (every model) or 'small_cnn=256,resnet50=16' (per model)."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return {"*": int(text)}
        return {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p)}
    except ValueError as error:
        raise BenchError(f"--batch-size {text!r}: use N or MODEL=N,MODEL=N") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auxtl bench throughput",
        description="Step time, examples/s, XLA FLOPs and MFU of auxtl's pretraining, "
                    "frozen-prefix, cached-features and inference steps.")
    parser.add_argument("--models", default=None,
                        help=f"comma list of {', '.join(MODEL_INPUTS)} (inputs: small_cnn 28px "
                             f"x1, resnet18 32px x3, resnet50 224px x3); default: all on "
                             f"accelerators, {','.join(CPU_DEFAULT_MODELS)} on CPU (a resnet50 "
                             f"pretraining step at batch 8 takes tens of seconds on 2 cores)")
    parser.add_argument("--dtypes", default=None,
                        help=f"compute dtypes (parameters stay float32); default "
                             f"{','.join(DTYPES)}")
    parser.add_argument("--kinds", default=None,
                        help=f"step kinds: {', '.join(STEP_KINDS + EXTRA_KINDS)}; default "
                             f"{','.join(STEP_KINDS)}")
    parser.add_argument("--batch-size", default=None,
                        help=f"images per step: N for every model or MODEL=N,...; default per "
                             f"model, CPU {CPU_BATCH}, accelerators {ACCELERATOR_BATCH}")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per case (default: 5 on CPU, 20 on accelerators)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after compilation (default 3; on CPU the first steps "
                             "also grow the kept heap, benchmarks/NOTES.md section 5)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                        help="model config override, e.g. small_cnn:widths=8,8,16,16,16 or "
                             "width=8 (every chosen model with that field); repeatable")
    parser.add_argument("--tiny", action="store_true",
                        help=f"narrow models for smoke tests: {TINY_OVERRIDES}")
    parser.add_argument("--devices", default="1",
                        help="devices to shard the batch over: N or 'all' (default 1: per-chip "
                             "numbers)")
    parser.add_argument("--f32-peak", default="auto", choices=("auto", "tensor", "fp32"),
                        help="float32 MFU denominator on accelerators: 'tensor' = TF32 on "
                             "NVIDIA / 1-pass bf16 on TPU (JAX's default precision), 'fp32' = "
                             "true float32 (CUDA cores); 'auto' follows "
                             "jax_default_matmul_precision")
    parser.add_argument("--peak-matmul-size", type=int, default=None,
                        help="matmul size for measured peaks (CPU, unknown devices); "
                             "default 2048 on CPU")
    parser.add_argument("--data", default="synthetic",
                        help="images the input pipeline gathers from: 'synthetic' (random "
                             "uint8 of each model's input shape), a data spec as for "
                             "`auxtl pretrain --data` (digits, mnist5k, npz:PATH, folder:PATH), "
                             "'stream:SPEC' for the streamed pipeline (stream:folder:PATH, "
                             "stream:npz-shards:GLOB, stream:arrayrecord:GLOB), "
                             "or 'none' to skip the input measurement")
    parser.add_argument("--input-images", type=int, default=1024,
                        help="how many synthetic images the input pipeline gathers from "
                             "(default 1024; at least one batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench",
                        help="folder for throughput.json, throughput.md and throughput.png")
    parser.add_argument("--json", default=None, help="JSON path (default OUT/throughput.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time the small_cnn float32 pretraining and frozen-prefix "
                             "steps in PyTorch (eager, channels-last, torch.compile) in paired "
                             "rounds with auxtl's and print auxtl/torch step time; without "
                             "--models/--dtypes/--kinds the table shows only those steps")
    parser.add_argument("--torch-python", default=None, metavar="PATH",
                        help="interpreter with torch for --compare-torch (default: this one, "
                             "if it can import torch)")
    parser.add_argument("--torch-batch-size", type=int, default=128,
                        help="images per step of the PyTorch comparison (pretraining: x4 "
                             "rotations)")
    parser.add_argument("--torch-rounds", type=int, default=5,
                        help="paired rounds of the PyTorch comparison, each --steps steps of "
                             "auxtl then of each torch mode")
    parser.add_argument("--show-peaks", action="store_true",
                        help="print the known-accelerator peak table and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    on_cpu = jax.default_backend() == "cpu"
    default_models = CPU_DEFAULT_MODELS if on_cpu else tuple(MODEL_INPUTS)
    default_dtypes, default_kinds = DTYPES, STEP_KINDS
    if args.compare_torch:   # only what the comparison runs, unless asked for more
        default_models, default_dtypes, default_kinds = (("small_cnn",), ("float32",),
                                                          torch_reference.TORCH_KINDS)
    models = _parse_list(args.models or ",".join(default_models), tuple(MODEL_INPUTS),
                         "model(s)")
    dtypes = _parse_list(args.dtypes or ",".join(default_dtypes), DTYPES, "dtype(s)")
    kinds = _parse_list(args.kinds or ",".join(default_kinds), STEP_KINDS + EXTRA_KINDS,
                        "step kind(s)")
    model_args = {m: dict(TINY_OVERRIDES[m]) for m in models} if args.tiny else {}
    for model, values in parse_model_args(args.model_arg, models).items():
        model_args.setdefault(model, {}).update(values)
    try:
        devices = jax.device_count() if args.devices == "all" else int(args.devices)
    except ValueError as error:
        raise BenchError(f"--devices {args.devices!r}: use a number or 'all'") from error
    steps = args.steps if args.steps is not None else (5 if on_cpu else 20)
    warmup = args.warmup if args.warmup is not None else 3
    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    return BenchConfig(models=models, dtypes=dtypes, kinds=kinds,
                       batch_sizes=parse_batch_sizes(args.batch_size), steps=steps,
                       warmup=warmup, model_args=model_args, devices=devices,
                       f32_peak=args.f32_peak, peak_matmul_size=args.peak_matmul_size,
                       seed=args.seed, data=args.data, input_images=args.input_images)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark from command-line arguments; returns everything written to JSON.

    Returns {"meta": {config, environment, peaks, outputs}, "results": [row, ...],
    "torch": comparison or None}. Raises BenchError on unusable arguments.
    """
    keep_freed_memory()   # no-op when the CLI already did it
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.show_peaks:
        rows = peaks.table_rows()
        for r in rows:
            print(f"{r['name']:<22} bf16 {r['bf16'] / 1e12:7.1f}  f32(tensor) "
                  f"{r['tensor_f32'] / 1e12:7.1f}  fp32 {r['fp32'] / 1e12:7.1f} TFLOP/s  "
                  f"[{r['source']}]")
        return {"peak_table": rows}
    config = config_from_args(args)
    if args.compare_torch and args.torch_rounds < 1:   # before the table, not after it
            raise BenchError(f"--torch-rounds must be >= 1, got {args.torch_rounds}")
    torch_python = (torch_reference.resolve_torch_python(args.torch_python)
                    if args.compare_torch else None)
    out_dir = pathlib.Path(args.out)
    json_path = pathlib.Path(args.json) if args.json else out_dir / "throughput.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)

    rows = run_benchmark(config, log=lambda text: print(text, file=sys.stderr, flush=True))
    device = jax.devices()[0]
    meta = {"config": dataclasses.asdict(config), "environment": environment(),
            "peaks": {d: peaks.device_peak(d, device, f32_peak=config.f32_peak,
                                           measure_size=config.peak_matmul_size).to_json()
                      for d in config.dtypes},
            "created_unix": time.time(),
            "outputs": {"json": str(json_path), "markdown": str(out_dir / "throughput.md"),
                        "plot": None if args.no_plot else str(out_dir / "throughput.png")}}
    print(format_header(meta))
    print(format_table(rows))
    comparison = None
    if torch_python:
        comparison = torch_reference.compare_torch(
            config, torch_python, batch_size=args.torch_batch_size, rounds=args.torch_rounds,
            log=lambda text: print(text, file=sys.stderr, flush=True))
        print()
        print(torch_reference.format_torch(comparison))
    result = _jsonable({"meta": meta, "results": rows, "torch": comparison})
    json_path.write_text(json.dumps(result, indent=2))
    markdown = markdown_table(rows, meta)
    if comparison:
        markdown += ("\n## PyTorch reference\n\n```\n"
                     + torch_reference.format_torch(comparison) + "\n```\n")
    (out_dir / "throughput.md").write_text(markdown)
    if not args.no_plot and ok_rows(rows):
        env = meta["environment"]
        plot_examples_per_s(ok_rows(rows), out_dir / "throughput.png",
                            f"auxtl throughput on {env['device_kind']} ({env['backend']}), "
                            f"jax {env['jax_version']}")
    print(f"wrote {json_path}, {out_dir / 'throughput.md'}"
          + ("" if args.no_plot else f", {out_dir / 'throughput.png'}"))
    return result


if __name__ == "__main__":
    try:
        main()
    except BenchError as error:
        sys.exit(f"error: {error}")
