"""The command line's flags mapped onto typed configs (`PretrainConfig`, `TransferConfig`,
`SearchSpace`): every bad flag raises an InputError naming it, before anything loads.
`auxtl.cli` builds the parser and runs the commands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from auxtl import recipes
from auxtl.errors import InputError
from auxtl.finetune import FinetuneConfig
from auxtl.freezing import parse_phases
from auxtl.models import load_model_module
from auxtl.models.target import TargetSpec
from auxtl.optim import OptimizerConfig
from auxtl.pretrain import PretrainConfig, TaskConfig
from auxtl.search import SearchSpace
from auxtl.streaming import parse_image_size
from auxtl.transfer import TransferConfig


def add_model_module(parser: argparse.ArgumentParser) -> None:
    """--model-module PATH (repeatable): files registering extra models."""
    parser.add_argument("--model-module", action="append", default=[], metavar="PATH",
                        help="a Python file registering extra models with "
                             "auxtl.register_model (repeatable)")


def load_model_modules(paths: list[str]) -> None:
    """Imports each --model-module file, so the models it registers have names."""
    for path in paths:
        load_model_module(path)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_task_flags(specs: list[str], args: list[str]) -> tuple[TaskConfig, ...]:
    """--task NAME[:WEIGHT] and --task-arg NAME.KEY=VALUE into TaskConfigs."""
    weights: dict[str, float] = {}
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise SystemExit(f"auxtl: --task {spec!r}: weight {weight!r} is not a number")
    params: dict[str, dict[str, Any]] = {name: {} for name in weights}
    for arg in args:
        target, sep, value = arg.partition("=")
        name, dot, key = target.partition(".")
        if not (sep and dot and key):
            raise SystemExit(f"auxtl: --task-arg {arg!r} must look like NAME.KEY=VALUE")
        if name not in params:
            raise SystemExit(f"auxtl: --task-arg {arg!r} names task {name!r}, which no --task gives")
        params[name][key] = _parse_value(value)
    return tuple(TaskConfig(name, weights[name], params[name]) for name in weights)


def parse_key_values(args: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"auxtl: {flag} {arg!r} must look like KEY=VALUE")
        out[key] = _parse_value(value)
    return out


def pretrain_config_from_args(args: argparse.Namespace) -> PretrainConfig:
    defaults = PretrainConfig()
    optimizer = OptimizerConfig(
        name=args.optimizer, learning_rate=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, schedule=args.schedule)
    return PretrainConfig(
        tasks=parse_task_flags(args.task or [recipes.PRETRAIN_TASK], args.task_arg),
        data=args.data, model=args.model,
        model_overrides=parse_key_values(args.model_arg, "--model-arg"),
        compute_dtype=args.compute_dtype,
        loss_weighting=args.loss_weighting,
        steps=args.steps,
        epochs=recipes.PRETRAIN_EPOCHS if args.steps is None and args.epochs is None
        else args.epochs, batch_size=args.batch_size, seed=args.seed,
        optimizer=optimizer,
        test_fraction=args.test_fraction, log_every=args.log_every,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        eval_batch_size=defaults.eval_batch_size, out=args.out, resume=args.resume,
        overwrite=args.overwrite, keep=args.keep, progress=not args.no_progress,
        stream=args.stream, image_size=parse_image_size(args.image_size), workers=args.workers,
        eval_examples=args.eval_examples)


def transfer_config_from_args(args: argparse.Namespace):
    """The TransferConfig the flags describe; a bad flag raises InputError naming it (the
    flags parsed here; the configs check their own values: counts, rates, seeds)."""
    if args.reuse == "all":
        reuse = None
    else:
        try:
            reuse = int(args.reuse)
        except ValueError:
            raise InputError(f"--reuse must be 'all' or a number of layers, got "
                             f"{args.reuse!r}") from None
        if reuse < 0:
            raise InputError(f"--reuse must be 'all' or a number of layers >= 0, got {reuse}")
    try:
        add = tuple(int(w) for w in args.add.split(",") if w.strip()) if args.add else ()
    except ValueError:
        raise InputError(f"--add must be comma-separated layer widths like 256,128, got "
                         f"{args.add!r}") from None
    if any(w < 1 for w in add):
        raise InputError(f"--add widths must be >= 1, got {args.add!r}")
    try:
        phases = parse_phases(args.phases)
    except InputError as error:
        raise InputError(f"--phases: {error}") from None
    target = TargetSpec(reuse=reuse, top=args.top, add=add)
    finetune = FinetuneConfig(phases=phases, learning_rate=args.lr,
                              weight_decay=args.weight_decay, optimizer=args.optimizer,
                              batch_size=args.batch_size,
                              cache_features=not args.no_feature_cache,
                              augment=args.augment, schedule=args.schedule,
                              warmup=args.warmup,
                              min_steps_per_epoch=args.min_steps_per_epoch,
                              max_steps_per_epoch=args.max_steps_per_epoch,
                              head_init=args.head_init, compute_dtype=args.compute_dtype)
    seeds = tuple(range(args.seed, args.seed + args.seeds))
    return TransferConfig(trunk=args.trunk, data=args.data,
                          labels_per_class=args.labels_per_class,
                          val_per_class=args.val_per_class, target=target, finetune=finetune,
                          seeds=seeds, baseline=not args.no_baseline, out=args.out,
                          progress=not args.no_progress, resize=args.resize)


def search_space_from_args(args: argparse.Namespace) -> SearchSpace | None:
    """--search's SearchSpace (None without --search); a bad or stray flag: InputError."""
    given = [flag for flag, value in (("--search-reuse", args.search_reuse),
                                      ("--search-unfreeze", args.search_unfreeze),
                                      ("--search-hindsight", args.search_hindsight)) if value]
    if not args.search and given:
        raise InputError(f"{given[0]} needs --search")
    if args.search and args.reuse != "all":
        raise InputError(f"--reuse {args.reuse}: --search chooses the depth (--search-reuse)")
    return SearchSpace.from_flags(args.search_reuse, args.search_unfreeze) if args.search else None
