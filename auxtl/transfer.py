"""Transfer from a trunk checkpoint to a labeled target task, with a scratch baseline.

checkpoint -> the target model with the source's lowest k layers (auxtl.transplant)
-> phases of freezing/unfreezing (finetune) -> test accuracy, beside the same
architecture trained from scratch for the same steps, per seed. Here: the splits
(held-out test split, N labels per class), the runs and their summary.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

from auxtl import checkpoints, freezing
from auxtl.data import Dataset, Normalization, compute_normalization, load_dataset
from auxtl.errors import AuxtlWarning, InputError
from auxtl.finetune import FinetuneConfig, FinetuneResult, StepCache, finetune
from auxtl.freezing import Phase
from auxtl.models import config_to_json
from auxtl.models.target import TargetSpec, num_reused
from auxtl.pretrain import SPLIT_SEED
from auxtl.splits import SplitRecord, per_class_indices, train_test_split
from auxtl.surgery import SurgeryReport
from auxtl.transplant import build_transfer_model, plan_surgery, reused_layers, target_config
from auxtl.trunk_metadata import TrunkMetadata, as_trunk_metadata
from auxtl.stats import mean_interval, paired_difference


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    trunk: str
    data: str = "mnist5k"
    labels_per_class: int = 10
    val_per_class: int | None = None      # None: same as labels_per_class (at least 5)
    target: TargetSpec = TargetSpec()
    finetune: FinetuneConfig = FinetuneConfig()
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    baseline: bool = True
    out: str | None = None
    progress: bool = True

    def __post_init__(self):
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
                "baseline": self.baseline, "out": self.out}


@dataclasses.dataclass(frozen=True)
class LabeledSplits:
    train: Dataset
    val: Dataset
    test: Dataset


DEFAULT_TEST_FRACTION = 0.1  # the test split of data the trunk was not pretrained on


class SplitWarning(AuxtlWarning):
    """The test split may hold images the trunk was pretrained on (test accuracy inflated)."""


def held_out_split(metadata: TrunkMetadata, dataset: Dataset, data: str | None, *,
                   trunk: str | None = None) -> tuple[SplitRecord, str]:
    """The held-out split transfer tests on, and a line saying which and why.

    The target data is the trunk's pretraining data (same content hash): that
    run's own held-out split (fraction and seed), so no test image was in
    pretraining's training split. Other data: the default 10% (SPLIT_SEED).
    A trunk that records no split (older auxtl, imported) whose data may be the
    target's (same data spec, or unknown): the default split and a SplitWarning.
    """
    metadata = as_trunk_metadata(metadata)
    target = SplitRecord.of(dataset, data=data, test_fraction=DEFAULT_TEST_FRACTION,
                            seed=SPLIT_SEED)
    default = (f"test split: {DEFAULT_TEST_FRACTION:.0%} of {data!r} (seed {SPLIT_SEED})")
    name = f"trunk {trunk!r}" if trunk else "the trunk"
    if metadata.split is not None:
        recorded = metadata.split
        reason = recorded.mismatch(target)
        if reason is None:
            return dataclasses.replace(recorded, data=data), (
                f"test split: the {recorded.test_fraction * 100:g}% that pretraining {name} "
                f"held out of {recorded.data!r} (seed {recorded.seed}; same data by content "
                f"hash), so pretraining never trained on a test image")
        if recorded.data_hash == target.data_hash:
            warnings.warn(SplitWarning(
                f"{name} was pretrained on these images ({recorded.data!r}) but {reason}: its "
                f"held-out split cannot be recomputed, so the default test split may hold "
                f"images pretraining trained on and overstate test accuracy"), stacklevel=2)
            return target, f"{default}; pretraining's split could not be recomputed"
        if recorded.data is not None and recorded.data == data:
            warnings.warn(SplitWarning(
                f"{name} was pretrained on {recorded.data!r} with other contents (another "
                f"content hash: a subset, or the data changed), so its held-out split cannot "
                f"be matched to these images: the default test split may hold images "
                f"pretraining trained on and overstate test accuracy"), stacklevel=2)
            return target, f"{default}; same data name, other contents (not honoured)"
        return target, (f"{default}; the trunk was pretrained on other data "
                        f"({recorded.data!r}, another content hash)")
    source = metadata.data
    if source is None or source == data:
        seen = "on unknown data" if source is None else f"on {source!r} too"
        warnings.warn(SplitWarning(
            f"{name} records no pretraining split (it was pretrained {seen}; older auxtl or "
            f"imported), so transfer cannot keep pretraining's held-out images for test: the "
            f"default test split of {data!r} may hold images pretraining trained on and "
            f"overstate test accuracy. Pretrain again with this auxtl to record the split"),
            stacklevel=2)
        return target, f"{default}; pretraining's split unknown (not honoured)"
    return target, f"{default}; the trunk was pretrained on other data ({source!r})"


def labeled_splits(dataset: Dataset, *, labels_per_class: int, val_per_class: int,
                   seed: int, split: SplitRecord | None = None) -> LabeledSplits:
    """N labels per class to train, V per class to validate (disjoint), the fixed test split.

    The test split is `split` (see `held_out_split`: the pretraining held-out split
    when this is the pretraining data), else the default 10% with SPLIT_SEED. It
    is the same for every seed and never takes part in model selection.
    """
    if dataset.labels is None:
        raise InputError(f"transfer needs labeled data; {dataset.name!r} has no labels")
    if split is None:
        pool, test = train_test_split(dataset, test_fraction=DEFAULT_TEST_FRACTION,
                                      seed=SPLIT_SEED)
    else:
        pool, test = split.split(dataset)
    train_index, val_index = per_class_indices(pool.labels, (labels_per_class, val_per_class),
                                               seed=seed, name=dataset.name)
    return LabeledSplits(pool.subset(train_index), pool.subset(val_index), test)


@dataclasses.dataclass
class SeedResult:
    seed: int
    transfer: FinetuneResult
    scratch: FinetuneResult | None


def scratch_config(config: FinetuneConfig) -> FinetuneConfig:
    """Same budget (epochs, or steps when the phases count steps), everything trainable
    from step 0 (early stopping on the same validation)."""
    if all(p.steps is not None for p in config.phases):
        phase = Phase(steps=sum(p.steps for p in config.phases), train="all")
    else:
        phase = Phase(epochs=sum(p.epochs or 0 for p in config.phases), train="all")
    return dataclasses.replace(config, phases=(phase,), cache_features=False)


def target_normalization(metadata: TrunkMetadata, train: Dataset) -> Normalization:
    """The trunk's own normalisation when channels match (what its layers expect)."""
    metadata = as_trunk_metadata(metadata)
    if metadata.input_shape[-1] == train.image_shape[-1]:
        return metadata.normalization
    return compute_normalization(train.images)


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
    if dataset.labels is None:
        raise InputError(f"transfer needs labeled data; {config.data!r} has no labels")
    split, note = held_out_split(metadata, dataset, config.data, trunk=config.trunk)
    log(note)
    num_classes = dataset.num_classes
    val_per_class = config.val_per_class or max(config.labels_per_class, 5)
    cache = StepCache()
    results: list[SeedResult] = []
    report = None
    for seed in config.seeds:
        splits = labeled_splits(dataset, labels_per_class=config.labels_per_class,
                                val_per_class=val_per_class, seed=seed, split=split)
        normalization = target_normalization(metadata, splits.train)
        in_channels = splits.train.image_shape[-1]
        data = dict(train=(splits.train.images, splits.train.labels),
                    val=(splits.val.images, splits.val.labels),
                    test=(splits.test.images, splits.test.labels))
        model, seed_report = build_transfer_model(
            metadata, source_params, source_stats, config.target, num_classes=num_classes,
            in_channels=in_channels, seed=seed)
        report = report or seed_report
        k = num_reused(config.target, len(metadata.layer_names))
        fine = dataclasses.replace(config.finetune, seed=seed)
        transferred = finetune(model, k, fine, normalization=normalization, cache=cache,
                               progress=config.progress, desc=f"transfer seed {seed}", **data)
        scratch = None
        if config.baseline:
            fresh, _ = build_transfer_model(metadata, None, None, config.target,
                                            num_classes=num_classes, in_channels=in_channels,
                                            seed=seed, transplant=False)
            scratch = finetune(fresh, k, scratch_config(fine), normalization=normalization,
                               cache=cache, progress=config.progress,
                               desc=f"scratch seed {seed}", **data)
        results.append(SeedResult(seed, transferred, scratch))
        line = f"seed {seed}: transfer test accuracy {transferred.test_accuracy:.4f}"
        if scratch:
            line += f"  scratch {scratch.test_accuracy:.4f}"
        log(line)
        if seed == config.seeds[0] and config.out:
            save_transfer_model(pathlib.Path(config.out) / "model", model, transferred,
                                metadata, config, report, normalization,
                                splits.train.image_shape, split=split)
    summary = summarize(results, config, report)
    summary["split"] = {**split.to_json(), "test_examples": len(splits.test), "note": note}
    if config.out:
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
                        split: SplitRecord | None = None) -> pathlib.Path:
    """The fine-tuned target model as a self-describing checkpoint (report included, and
    the test split it was evaluated on, which a later transfer from it honours)."""
    trunk = model.trunk
    params, stats = result.params, result.batch_stats
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(target_config(source_metadata, input_shape[-1])),
        input_shape=input_shape, normalization=normalization,
        tasks=[{"name": "classification", "weight": 1.0,
                "params": {"num_classes": int(model.head.out_features)}}],
        extra={"target": config.target.to_json(), "surgery_report": report.to_json(),
               "source": {"path": str(config.trunk), "model": source_metadata.model,
                          "tasks": [t.to_json() for t in source_metadata.tasks]},
               "finetune": config.finetune.to_json(),
               "test_accuracy": result.test_accuracy,
               **({"split": split.to_json()} if split else {})})
    return checkpoints.save_trunk(path, trunk_params=params["trunk"],
                                  trunk_batch_stats=stats["trunk"],
                                  head_params={"classifier": params["head"]},
                                  metadata=metadata)
