"""The `auxtl` command line: maps flags onto typed configs and runs them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

from auxtl import cpu, recipes
from auxtl.bench.throughput import main as throughput_main
from auxtl.bench.transfer import main as transfer_main
from auxtl.checkpoints import read_metadata
from auxtl.compile_cache import enable_compilation_cache
from auxtl.data import load_dataset
from auxtl.cli_interop import add_export_parser, add_import_parser
from auxtl.cli_configs import (add_model_module, load_model_modules, parse_task_flags,
                               pretrain_config_from_args, search_space_from_args,
                               transfer_config_from_args)
from auxtl.errors import AuxtlError, AuxtlWarning, InputError
from auxtl.finetune import HEAD_INITS
from auxtl.finetune_step import AUGMENTS
from auxtl.freezing import PHASES_GRAMMAR, check_phases
from auxtl.models import COMPUTE_DTYPES, list_models
from auxtl.optim import FINETUNE_SCHEDULES
from auxtl.parallel import DISTRIBUTED_MODES, start_distributed
from auxtl.pretrain import PretrainConfig, run_pretraining
from auxtl.registry import list_tasks, load_task_module, task_class
from auxtl.search import SearchSpace, plan_search, search_transfer
from auxtl.transfer import TransferConfig, plan_transfer, run_transfer
from auxtl.transplant import reused_layers

__all__ = ["build_parser", "main", "parse_task_flags", "pretrain_config_from_args",
           "search_space_from_args", "transfer_config_from_args"]


def _load_task_modules(paths: list[str]) -> None:
    for path in paths:
        load_task_module(path)


def cmd_tasks(args: argparse.Namespace) -> int:
    _load_task_modules(args.task_module)
    names = list_tasks()
    width = max(map(len, names), default=0)
    for name in names:
        cls = task_class(name)
        print(f"{name:<{width}}  {cls.summary}")
        print(f"{'':<{width}}    needs: {cls.needs}; predicts: {cls.predicts}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    load_model_modules(args.model_module)
    print("\n".join(list_models()))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    load_model_modules(args.model_module)
    print(json.dumps(read_metadata(args.path).to_json(), indent=2))
    return 0


def _start_distributed(args: argparse.Namespace) -> None:
    start_distributed(args.distributed, args.coordinator, args.num_processes, args.process_id)


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", default="off", choices=list(DISTRIBUTED_MODES),
                   help="auto: jax.distributed.initialize() finds the cluster from its "
                        "launcher (Slurm, Open MPI, TPU/GKE, JAX_COORDINATOR_ADDRESS); off: "
                        "one process (unless --coordinator is given)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-process run: the coordinator's address (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)


def cmd_pretrain(args: argparse.Namespace) -> int:
    _start_distributed(args)
    _load_task_modules(args.task_module)
    load_model_modules(args.model_module)
    config = pretrain_config_from_args(args)
    result = run_pretraining(config)
    held_out = result.eval_metrics
    for task in config.tasks:
        for metric in ("accuracy", "loss"):
            key = f"{task.name}/{metric}"
            if key in held_out:
                print(f"held-out {task.name} {metric}: {held_out[key]:.4f}")
    budget = result.budget
    print(f"trained {budget['steps']} steps: {budget['examples_seen']} examples, "
          f"{budget['epochs']:.3g} epochs of the training split")
    if result.trunk_path:
        print(f"trunk checkpoint: {result.trunk_path}")
        print(f"metrics: {result.out / 'metrics.jsonl'}  plot: {result.out / 'metrics.png'}")
    return 0


def cmd_search(args: argparse.Namespace, config: TransferConfig, space: SearchSpace) -> int:
    dataset = load_dataset(config.data)
    cells = plan_search(config, space, dataset)   # refuses before anything trains
    print(f"search: {len(cells)} cells x {len(config.seeds)} seed(s), chosen on validation: "
          + ", ".join(c.label for c in cells))
    if not args.dry_run:
        result = search_transfer(config, space, dataset, hindsight=args.search_hindsight)
        print("\n".join(result.lines() + ([f"results: {config.out}/search.json"]
                                           if config.out else [])))
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    _start_distributed(args)
    config = transfer_config_from_args(args)   # flags checked before anything loads
    space = search_space_from_args(args)
    load_model_modules(args.model_module)     # a user's trunk, rebuilt from the checkpoint
    if space is not None:
        return cmd_search(args, config, space)
    reused = reused_layers(read_metadata(config.trunk), config.target)
    try:  # before the plan prints or anything trains (or an output folder appears)
        check_phases(config.finetune.phases, reused)
    except InputError as error:
        raise InputError(f"--phases: {error}") from None
    dataset = load_dataset(config.data)
    if dataset.labels is None:
        raise InputError(f"transfer needs labeled data; {config.data!r} has no labels")
    report = plan_transfer(config.trunk, config.target, num_classes=dataset.num_classes,
                           in_channels=dataset.image_shape[-1])
    print(report.table())
    if args.dry_run:
        return 0
    summary = run_transfer(config, dataset)
    t = summary["transfer"]
    print(f"transfer test accuracy: {_interval(t)} over {len(config.seeds)} seed(s)")
    if "scratch" in summary:
        print(f"scratch  test accuracy: {_interval(summary['scratch'])}")
        print(f"difference (transfer - scratch, paired by seed): {_interval(summary['difference'])}")
    if config.out:
        print(f"results: {config.out}/transfer.json  model: {config.out}/model")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.benchmark == "throughput":
        throughput_main(args.rest)
        return 0
    if args.benchmark == "transfer":
        transfer_main(args.rest)
        return 0
    raise InputError(f"unknown benchmark {args.benchmark!r}; available: throughput, transfer")


def _interval(stats: dict) -> str:
    if stats["low"] != stats["low"]:  # NaN: a single seed
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} (95% CI {stats['low']:.4f} .. {stats['high']:.4f})"


def build_parser() -> argparse.ArgumentParser:
    defaults = PretrainConfig()
    opt = recipes.pretrain_optimizer()
    ft = recipes.finetune_recipe()
    parser = argparse.ArgumentParser(prog="auxtl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tasks = sub.add_parser("tasks", help="list registered auxiliary tasks")
    tasks.add_argument("--task-module", action="append", default=[], metavar="PATH",
                       help="a Python file defining extra tasks (repeatable)")
    tasks.set_defaults(func=cmd_tasks)

    models = sub.add_parser("models", help="list trunk architectures")
    add_model_module(models)
    models.set_defaults(func=cmd_models)

    add_import_parser(sub)
    add_export_parser(sub)

    inspect = sub.add_parser("inspect", help="print a trunk checkpoint's metadata")
    inspect.add_argument("path")
    add_model_module(inspect)
    inspect.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pretrain", help="pretrain a trunk on auxiliary tasks")
    p.add_argument("--task", action="append", metavar="NAME[:WEIGHT]",
                   help=f"task and loss weight (repeatable; default {recipes.PRETRAIN_TASK})")
    p.add_argument("--task-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a task parameter, value parsed as JSON when it can be")
    p.add_argument("--task-module", action="append", default=[], metavar="PATH",
                   help="a Python file defining extra tasks (repeatable)")
    p.add_argument("--loss-weighting", default=defaults.loss_weighting,
                   choices=["fixed", "uncertainty"],
                   help="fixed task weights, or learned uncertainty weights (Kendall et al.)")
    p.add_argument("--data", default=defaults.data,
                   help="mnist5k | digits | npz:PATH | folder:PATH "
                        "(--stream: also npz-shards:GLOB | arrayrecord:GLOB)")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compute-dtype", default=defaults.compute_dtype, metavar="DTYPE",
                   help=f"{' or '.join(COMPUTE_DTYPES)}: the dtype the model computes in; "
                        "parameters and optimizer state stay float32")
    add_model_module(p)
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help=f"training steps (or give --epochs; default: "
                        f"{recipes.PRETRAIN_EPOCHS:g} epochs)")
    p.add_argument("--epochs", type=float, default=defaults.epochs,
                   help="budget in passes over the training split: "
                        "steps = ceil(EPOCHS * training images / batch size)")
    p.add_argument("--batch-size", type=int, default=recipes.PRETRAIN_BATCH_SIZE)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--optimizer", default=opt.name, choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=opt.learning_rate)
    p.add_argument("--momentum", type=float, default=opt.momentum)
    p.add_argument("--weight-decay", type=float, default=opt.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=opt.warmup_steps)
    p.add_argument("--schedule", default=opt.schedule, choices=["cosine", "constant"])
    p.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--stream", action="store_true",
                   help="stream the data with grain (folder:PATH, npz-shards:GLOB, "
                        "arrayrecord:GLOB): decoded in worker processes, never all in memory")
    p.add_argument("--image-size", metavar="H,W[,C]",
                   help="streamed images are resized/cropped to this (default: the first "
                        "file's size; C: 3 if the normalisation sample has colour)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="streaming decode processes (default: min(4, CPU count); 0: in-process)")
    p.add_argument("--eval-examples", type=int, metavar="N",
                   help="held-out images evaluated (default: all; streamed: 10000)")
    p.add_argument("--out", default="runs/pretrain", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out and start afresh")
    p.add_argument("--keep", type=int, default=defaults.keep, metavar="N",
                   help="step checkpoints to keep in --out/checkpoints (the latest N)")
    p.add_argument("--no-progress", action="store_true")
    add_distributed_flags(p)
    p.set_defaults(func=cmd_pretrain)

    t = sub.add_parser("transfer", help="transplant a trunk's lower layers and fine-tune")
    t.add_argument("--trunk", required=True, help="trunk checkpoint folder")
    add_model_module(t)
    t.add_argument("--reuse", default="all", help="how many of the lowest layers to reuse, or 'all'")
    t.add_argument("--top", default="drop", choices=["drop", "replace"],
                   help="drop the layers above --reuse, or keep them freshly initialised")
    t.add_argument("--add", default="", metavar="W1,W2", help="dense layers to add on top")
    t.add_argument("--data", default="mnist5k")
    t.add_argument("--resize", default="auto", choices=["auto", "on", "off"],
                   help="resize the target images to the trunk's pretraining resolution when "
                        "they differ (auto: with a notice; on: the same; off: keep them)")
    t.add_argument("--labels-per-class", type=int, default=10,
                   help="labeled training examples per class (>= 1)")
    t.add_argument("--val-per-class", type=int, default=None,
                   help="validation examples per class (>= 1; default: --labels-per-class, "
                        "at least 5)")
    t.add_argument("--phases", default=recipes.FINETUNE_PHASES,
                   help="fine-tuning phases, in order: " + PHASES_GRAMMAR.replace("%", "%%")
                   + "; N may not exceed the number of reused layers")
    t.add_argument("--optimizer", default=ft.optimizer, choices=["adamw", "sgd"])
    t.add_argument("--lr", type=float, default=ft.learning_rate)
    t.add_argument("--weight-decay", type=float, default=ft.weight_decay)
    t.add_argument("--batch-size", type=int, default=ft.batch_size, help=">= 1")
    t.add_argument("--seed", type=int, default=0, help="first seed (>= 0)")
    t.add_argument("--seeds", type=int, default=5, help="number of seeds (>= 1)")
    t.add_argument("--no-baseline", action="store_true", help="skip the scratch baseline")
    t.add_argument("--no-feature-cache", action="store_true")
    t.add_argument("--augment", default=ft.augment, choices=list(AUGMENTS),
                   help="training-batch augmentation in fine-tuning (both models)")
    t.add_argument("--schedule", default=ft.schedule, choices=list(FINETUNE_SCHEDULES),
                   help="each phase's learning rates: constant or warmup+cosine to 0")
    t.add_argument("--warmup", type=float, default=ft.warmup, metavar="FRACTION",
                   help="warmup from 0 over this fraction of each phase's steps")
    t.add_argument("--min-steps-per-epoch", type=int, default=ft.min_steps_per_epoch,
                   metavar="N",
                   help="an epoch is one pass over the labeled images, at least N steps")
    t.add_argument("--head-init", default=ft.head_init, choices=list(HEAD_INITS),
                   help="the new head starts random, or as the frozen trunk's ridge probe "
                        "(L2 chosen on validation; LP-FT)")
    t.add_argument("--max-steps-per-epoch", type=int, default=None, metavar="N",
                   help="... and at most N steps (validation every N steps on large sets)")
    t.add_argument("--compute-dtype", default=ft.compute_dtype, metavar="DTYPE",
                   help=f"{' or '.join(COMPUTE_DTYPES)}: the target model's compute dtype "
                        "(the trunk's pretraining one is not inherited); weights stay float32")
    t.add_argument("--dry-run", action="store_true", help="print the surgery plan and stop")
    t.add_argument("--search", action="store_true",
                   help="sweep reuse depth K x unfrozen top reused layers N on validation, "
                        "print the grid, test only the pick (OUT/search.json)")
    t.add_argument("--search-reuse", metavar="K,...",
                   help="depths to try (default: every K the trunk and target allow)")
    t.add_argument("--search-unfreeze", metavar="N,...",
                   help="top reused layers fine-tuned in phase 2, numbers or 'all' "
                        "(default 0,1,2,all; capped at K)")
    t.add_argument("--search-hindsight", action="store_true",
                   help="after the pick, score every cell on test too (analysis only)")
    t.add_argument("--out", default="runs/transfer")
    t.add_argument("--no-progress", action="store_true")
    add_distributed_flags(t)
    t.set_defaults(func=cmd_transfer)

    b = sub.add_parser("bench", help="benchmarks (throughput, transfer; see --help of each)")
    b.add_argument("benchmark", choices=["throughput", "transfer"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    b.set_defaults(func=cmd_bench)
    return parser


@contextlib.contextmanager
def auxtl_warnings_as_lines():
    """Prints each of auxtl's own warnings as one line on stderr (every time it occurs);
    other warnings show as Python shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", AuxtlWarning)
        show = warnings.showwarning

        def show_warning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, AuxtlWarning):
                print(f"auxtl: warning: {message}", file=sys.stderr, flush=True)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_warning
        yield


@auxtl_warnings_as_lines()
def main(argv: list[str] | None = None) -> int:
    cpu.keep_freed_memory()   # before the first JAX computation starts XLA's threads
    enable_compilation_cache()   # before the first compilation
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AuxtlError as error:  # raised on purpose about the input: one line; bugs keep tracebacks
        if os.environ.get("AUXTL_DEBUG"):
            raise
        code = getattr(error, "exit_code", 2)  # Preempted: 143, as for SIGTERM
        print(f"auxtl: {'error: ' if code == 2 else ''}{error}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
