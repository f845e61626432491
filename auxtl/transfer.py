"""Transfer from a trunk checkpoint to a labeled target task, with a scratch baseline.

checkpoint -> the target model with the source's lowest k layers (auxtl.transplant)
-> phases of freezing/unfreezing (finetune) -> test accuracy, beside the same
architecture trained from scratch for the same steps, per seed. Here: the config, the
runs and their summary; the target data's preparation (held-out test split, resize to
the trunk's resolution, normalisation, per-seed splits) is auxtl.target_data's, whose
names are re-exported here.

Fine-tuning runs on the pretraining mesh (`auxtl.parallel.data_mesh`: every device of
every process). With several processes each runs the same transfer on its own copy of
the data, to identical results; only process 0 writes files (the model checkpoint is
saved by all together, as orbax requires, and written by process 0).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from auxtl import checkpoints, freezing, parallel, recipes
from auxtl.data import Dataset, load_dataset
from auxtl.errors import InputError
from auxtl.finetune import FinetuneConfig, FinetuneResult, StepCache, finetune
from auxtl.freezing import Phase
from auxtl.models import config_to_json
from auxtl.models.target import TargetSpec, num_reused
from auxtl.splits import SplitRecord
from auxtl.surgery import SurgeryReport
from auxtl.target_data import (DEFAULT_TEST_FRACTION, RESIZE_MODES, LabeledSplits, SplitWarning,
                               TargetData, choose_normalization, held_out_split,
                               labeled_splits, prepare_target, resize_target, seed_splits,
                               target_normalization)
from auxtl.transplant import build_transfer_model, plan_surgery, reused_layers, target_config
from auxtl.trunk_metadata import TrunkMetadata
from auxtl.stats import mean_interval, paired_difference

__all__ = ["DEFAULT_TEST_FRACTION", "RESIZE_MODES", "LabeledSplits", "SeedResult",
           "SplitWarning", "TargetData", "TransferConfig", "choose_normalization",
           "held_out_split", "labeled_splits", "plan_transfer", "prepare_target",
           "resize_target", "run_transfer", "save_transfer_model", "scratch_config",
           "seed_splits", "summarize", "target_normalization"]


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """A transfer run; `finetune` defaults to the recipe the CLI runs
    (`auxtl.recipes.finetune_recipe`). `resize`: "auto" or "on" resize the target images
    to the trunk's pretraining resolution when they differ ("auto" says so with a hint to
    turn it off), "off" keeps them (see `resize_target`)."""

    trunk: str
    data: str = "mnist5k"
    labels_per_class: int = 10
    val_per_class: int | None = None      # None: same as labels_per_class (at least 5)
    target: TargetSpec = TargetSpec()
    finetune: FinetuneConfig = dataclasses.field(default_factory=recipes.finetune_recipe)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    baseline: bool = True
    out: str | None = None
    progress: bool = True
    resize: str = "auto"

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise InputError(f"resize (--resize) must be one of {', '.join(RESIZE_MODES)}, "
                             f"got {self.resize!r}")
        seeds = tuple(self.seeds)
        if not seeds:
            raise InputError("seeds (--seeds) must name at least one seed, got none")
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, numbers.Integral)
               or s < 0]
        if bad:
            raise InputError(f"seeds (--seed) must be whole numbers >= 0, got {bad[0]!r}")
        if len(set(seeds)) != len(seeds):
            raise InputError(f"seeds must differ, got {list(seeds)}")
        object.__setattr__(self, "seeds", seeds)
        for field, flag, value in (("labels_per_class", "--labels-per-class",
                                    self.labels_per_class),
                                   ("val_per_class", "--val-per-class", self.val_per_class)):
            if value is None and field == "val_per_class":
                continue  # the default
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError(f"{field} ({flag}) must be a whole number >= 1"
                                 f"{' or None for the default' if field == 'val_per_class' else ''}"
                                 f", got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return {"trunk": self.trunk, "data": self.data, "labels_per_class": self.labels_per_class,
                "val_per_class": self.val_per_class, "target": self.target.to_json(),
                "finetune": self.finetune.to_json(), "seeds": list(self.seeds),
                "baseline": self.baseline, "out": self.out, "resize": self.resize}


@dataclasses.dataclass
class SeedResult:
    seed: int
    transfer: FinetuneResult
    scratch: FinetuneResult | None


def scratch_config(config: FinetuneConfig) -> FinetuneConfig:
    """Same budget (epochs, or steps when the phases count steps), everything trainable
    from step 0 (early stopping on the same validation), same optimizer, schedule and
    augmentation; the head starts random (a probe of random features is no baseline's
    recipe)."""
    if all(p.steps is not None for p in config.phases):
        phase = Phase(steps=sum(p.steps for p in config.phases), train="all")
    else:
        phase = Phase(epochs=sum(p.epochs or 0 for p in config.phases), train="all")
    return dataclasses.replace(config, phases=(phase,), cache_features=False,
                               head_init="random")


def plan_transfer(trunk_path, spec: TargetSpec, *, num_classes: int, in_channels: int,
                  phases: Sequence[Phase] = ()) -> SurgeryReport:
    """The dry run: `phases` checked against the reused layers (InputError naming both),
    then the surgery report from shapes alone; no weights loaded, nothing trained."""
    metadata = checkpoints.read_metadata(trunk_path)
    freezing.check_phases(phases, reused_layers(metadata, spec))
    return plan_surgery(metadata, spec, num_classes=num_classes, in_channels=in_channels)


def run_transfer(config: TransferConfig, dataset: Dataset | None = None,
                 log=print) -> dict[str, Any]:
    """Transfer (and baseline) for each seed; returns and writes the summary."""
    source_params, source_stats, metadata = checkpoints.load_trunk_state(config.trunk)
    dataset = load_dataset(config.data) if dataset is None else dataset
    target = prepare_target(metadata, dataset, config, log)
    num_classes = target.dataset.num_classes
    normalization = target.normalization
    in_channels = target.dataset.image_shape[-1]
    cache = StepCache()
    mesh = parallel.data_mesh()
    is_main = jax.process_index() == 0
    results: list[SeedResult] = []
    report = None
    for seed in config.seeds:
        splits = seed_splits(target, config, seed)
        data = dict(train=(splits.train.images, splits.train.labels),
                    val=(splits.val.images, splits.val.labels),
                    test=(splits.test.images, splits.test.labels))
        model, seed_report = build_transfer_model(
            metadata, source_params, source_stats, config.target, num_classes=num_classes,
            in_channels=in_channels, seed=seed, compute_dtype=config.finetune.compute_dtype)
        report = report or seed_report
        k = num_reused(config.target, len(metadata.layer_names))
        fine = dataclasses.replace(config.finetune, seed=seed)
        transferred = finetune(model, k, fine, normalization=normalization, cache=cache,
                               progress=config.progress and is_main,
                               desc=f"transfer seed {seed}", mesh=mesh, **data)
        scratch = None
        if config.baseline:
            fresh, _ = build_transfer_model(metadata, None, None, config.target,
                                            num_classes=num_classes, in_channels=in_channels,
                                            seed=seed, transplant=False,
                                            compute_dtype=config.finetune.compute_dtype)
            scratch = finetune(fresh, k, scratch_config(fine), normalization=normalization,
                               cache=cache, progress=config.progress and is_main,
                               desc=f"scratch seed {seed}", mesh=mesh, **data)
        results.append(SeedResult(seed, transferred, scratch))
        line = f"seed {seed}: transfer test accuracy {transferred.test_accuracy:.4f}"
        if scratch:
            line += f"  scratch {scratch.test_accuracy:.4f}"
        log(line)
        if seed == config.seeds[0] and config.out:
            save_transfer_model(pathlib.Path(config.out) / "model", model, transferred,
                                metadata, config, report, normalization,
                                splits.train.image_shape, split=target.split, target=target)
    summary = summarize(results, config, report)
    summary["split"] = {**target.split.to_json(), "test_examples": len(splits.test),
                        "note": target.split_note}
    summary["normalization"] = target.normalization_record
    summary["resize"] = target.resize
    summary["mesh"] = {**parallel.mesh_record(mesh), "steps": cache.layout.record()}
    if config.out and is_main:
        out = pathlib.Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "transfer.json").write_text(json.dumps(summary, indent=2))
        (out / "surgery_report.txt").write_text(report.table() + "\n")
    return summary


def summarize(results: list[SeedResult], config: TransferConfig, report) -> dict[str, Any]:
    transfer = [r.transfer.test_accuracy for r in results]
    summary: dict[str, Any] = {
        "config": config.to_json(),
        "seeds": [{"seed": r.seed, "transfer_test_accuracy": r.transfer.test_accuracy,
                   "transfer_val_accuracy": r.transfer.best_val_accuracy,
                   "transfer_steps": r.transfer.steps,
                   "scratch_test_accuracy": r.scratch.test_accuracy if r.scratch else None,
                   "scratch_val_accuracy": r.scratch.best_val_accuracy if r.scratch else None,
                   "scratch_steps": r.scratch.steps if r.scratch else None}
                  for r in results],
        "transfer": dict(zip(("mean", "low", "high"), mean_interval(transfer))),
        "surgery": report.counts() if report else None,
    }
    if all(r.scratch for r in results):
        scratch = [r.scratch.test_accuracy for r in results]
        summary["scratch"] = dict(zip(("mean", "low", "high"), mean_interval(scratch)))
        summary["difference"] = dict(zip(("mean", "low", "high"),
                                         paired_difference(transfer, scratch)))
    return summary


def save_transfer_model(path, model, result: FinetuneResult, source_metadata: TrunkMetadata,
                        config,
                        report, normalization, input_shape, *,
                        split: SplitRecord | None = None,
                        target: TargetData | None = None) -> pathlib.Path:
    """The fine-tuned target model as a self-describing checkpoint (report included, and
    the test split it was evaluated on, which a later transfer from it honours; with
    `target`, which normalisation it was trained with and why, and any resize)."""
    trunk = model.trunk
    params, stats = result.params, result.batch_stats
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(target_config(
            source_metadata, input_shape[-1], config.finetune.compute_dtype)),
        input_shape=input_shape, normalization=normalization,
        tasks=[{"name": "classification", "weight": 1.0,
                "params": {"num_classes": int(model.head.out_features)}}],
        extra={"target": config.target.to_json(), "surgery_report": report.to_json(),
               "source": {"path": str(config.trunk), "model": source_metadata.model,
                          "tasks": [t.to_json() for t in source_metadata.tasks]},
               "finetune": config.finetune.to_json(),
               "test_accuracy": result.test_accuracy,
               **({"split": split.to_json()} if split else {}),
               **({"normalization_record": target.normalization_record,
                   "resize": target.resize} if target else {})})
    return checkpoints.save_trunk(path, trunk_params=params["trunk"],
                                  trunk_batch_stats=stats["trunk"],
                                  head_params={"classifier": params["head"]},
                                  metadata=metadata)
