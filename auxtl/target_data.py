"""The target data of a transfer, prepared once for all its seeds: `prepare_target`.

The held-out test split (`held_out_split`: pretraining's own held-out images when the
target is the trunk's pretraining data), the images resized to the trunk's pretraining
resolution (`resize_target`), the normalisation and why (`choose_normalization`), and
each seed's labeled training and validation subsets (`seed_splits`, `labeled_splits`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from auxtl.data import Dataset, Normalization, compute_normalization
from auxtl.errors import AuxtlWarning, InputError
from auxtl.pretrain import SPLIT_SEED
from auxtl.resize import resize_dataset
from auxtl.splits import SplitRecord, per_class_indices, train_test_split
from auxtl.trunk_metadata import TrunkMetadata, as_trunk_metadata

RESIZE_MODES = ("auto", "on", "off")


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


def target_normalization(metadata: TrunkMetadata, train: Dataset) -> Normalization:
    """The trunk's own normalisation when channels match, else `train`'s: the rule for a
    caller that does not know where its data came from (examples/keras_flow.py). Transfer
    runs use `choose_normalization`, which knows (content hash) and says why."""
    metadata = as_trunk_metadata(metadata)
    if metadata.input_shape[-1] == train.image_shape[-1]:
        return metadata.normalization
    return compute_normalization(train.images)


def _shown_stats(norm: Normalization) -> str:
    return (f"mean {', '.join(f'{m:.4f}' for m in norm.mean)}; "
            f"std {', '.join(f'{s:.4f}' for s in norm.std)}")


def choose_normalization(metadata: TrunkMetadata, pool: Dataset, split: SplitRecord, *,
                         data: str | None) -> tuple[Normalization, dict[str, Any], str]:
    """The normalisation the target's images get, its record, and one line saying which.

    The trunk's own (what its layers were trained on) when the target is its pretraining
    data: the content hash of the data as loaded (`split.data_hash`) equals the one the
    trunk's split record holds, or, for a trunk that records no split (older auxtl,
    imported), the trunk names the same data (`data`) and the images have its input shape.
    Otherwise the target's own per-channel statistics over `pool`, its training pool (the
    data less the held-out test split, at the resolution the model sees), never over test.
    Other data with another channel count is thus normalised with its own channels (the
    first convolution is adapted, see auxtl.transplant).

    Returns:
      (normalization, record, line): record = {"source": "trunk" or "target", "mean",
      "std", "computed_on" (None, or {"data", "examples", "test_excluded"}), "reason"}.
    """
    metadata = as_trunk_metadata(metadata)
    recorded = metadata.split
    if recorded is not None and recorded.data_hash == split.data_hash:
        reason = (f"the target is the trunk's pretraining data ({recorded.data!r}, same "
                  "content hash)")
    elif (recorded is None and data is not None and metadata.data == data
          and pool.image_shape == tuple(metadata.input_shape)):
        reason = (f"the trunk records no content hash but names the same data ({data!r}) and "
                  "image shape")
    else:
        norm = compute_normalization(pool.images)
        if recorded is None and metadata.data is None:
            reason = "the trunk records neither its pretraining data nor a content hash"
        else:
            why = (f"{recorded.data!r}, another content hash" if recorded is not None
                   else f"{metadata.data!r}, another image shape" if metadata.data == data
                   else repr(metadata.data))
            reason = f"the target is not the trunk's pretraining data ({why})"
        record = {"source": "target", **norm.to_json(),
                  "computed_on": {"data": pool.name, "examples": len(pool),
                                  "test_excluded": True}, "reason": reason}
        return norm, record, (f"normalization: the target's own over its training pool "
                              f"({len(pool)} images, test split excluded; "
                              f"{_shown_stats(norm)}): {reason}")
    norm = metadata.normalization
    record = {"source": "trunk", **norm.to_json(), "computed_on": None, "reason": reason}
    return norm, record, f"normalization: the trunk's ({_shown_stats(norm)}): {reason}"


def resize_target(metadata: TrunkMetadata, dataset: Dataset, mode: str, *,
                  data: str | None = None) -> tuple[Dataset, str | None]:
    """The target images at the trunk's pretraining resolution, as `mode` says, and a note.

    "auto" and "on" resize (auxtl.resize: bilinear, antialiased; labels, order and
    channels kept) to `metadata.input_shape[:2]` when the size differs; "off" keeps the
    images (a trunk ending in global pooling may still run on them). The note (None
    when the sizes are equal) names the data, both sizes and the flag.
    """
    if mode not in RESIZE_MODES:
        raise InputError(f"resize (--resize) must be one of {', '.join(RESIZE_MODES)}, "
                         f"got {mode!r}")
    want = tuple(int(v) for v in as_trunk_metadata(metadata).input_shape[:2])
    have = dataset.image_shape[:2]
    if have == want:
        return dataset, None
    name, sizes = data or dataset.name, f"{have[0]}x{have[1]} -> {want[0]}x{want[1]}"
    if mode == "off":
        return dataset, (f"keeping {name} images at {have[0]}x{have[1]} (--resize off; the "
                         f"trunk was pretrained at {want[0]}x{want[1]})")
    hint = "--resize off to keep them" if mode == "auto" else "--resize on"
    return resize_dataset(dataset, want), (f"resizing {name} images {sizes} (the trunk's "
                                           f"pretraining resolution; {hint})")


@dataclasses.dataclass(frozen=True)
class TargetData:
    """The target data as every run of a transfer uses it (`prepare_target`).

    dataset: the images the model sees (resized when asked), labels and order as loaded;
    split: the held-out test split (hashes of the data as loaded); normalization and its
    record (`choose_normalization`); resize: {"mode", "from", "to"} when resized, else
    None; notes: the lines `prepare_target` logged (split, resize, normalisation).
    """

    dataset: Dataset
    split: SplitRecord
    split_note: str
    normalization: Normalization
    normalization_record: dict[str, Any]
    resize: dict[str, Any] | None
    notes: tuple[str, ...]


def prepare_target(metadata: TrunkMetadata, dataset: Dataset, config: Any,
                   log=print) -> TargetData:
    """The target data of `config`, prepared once for all its seeds and cells.

    1. the held-out test split (`held_out_split`), on the data as loaded, so that its
       content hash can match the split the trunk's pretraining recorded;
    2. the images resized to the trunk's pretraining resolution per `config.resize`
       (`resize_target`; the split's indices still apply: count, order, labels kept);
    3. the normalisation (`choose_normalization`) over the training pool (the resized
       data less the test split).
    Logs one line for each (the resize one only when the sizes differ).

    Args:
      metadata: the trunk's (its input shape, normalisation and split record decide).
      dataset: the target data as loaded (labeled).
      config: a TransferConfig; this reads its data, trunk and resize.
      log: where the lines go.
    """
    metadata = as_trunk_metadata(metadata)
    if dataset.labels is None:
        raise InputError(f"transfer needs labeled data; {config.data!r} has no labels")
    split, split_note = held_out_split(metadata, dataset, config.data, trunk=config.trunk)
    resized, resize_note = resize_target(metadata, dataset, config.resize, data=config.data)
    pool, _ = split.split(resized)
    normalization, record, norm_note = choose_normalization(metadata, pool, split,
                                                            data=config.data)
    notes = tuple(n for n in (split_note, resize_note, norm_note) if n)
    for note in notes:
        log(note)
    resize = None if resized is dataset else {
        "mode": config.resize, "from": list(dataset.image_shape[:2]),
        "to": list(resized.image_shape[:2])}
    return TargetData(resized, split, split_note, normalization, record, resize, notes)


def seed_splits(target: TargetData, config: Any, seed: int) -> LabeledSplits:
    """Seed `seed`'s labeled training and validation subsets of the prepared target, and
    its fixed test split (`labeled_splits` with config's counts; what run_transfer uses)."""
    return labeled_splits(target.dataset, labels_per_class=config.labels_per_class,
                          val_per_class=config.val_per_class or max(config.labels_per_class, 5),
                          seed=seed, split=target.split)
