import dataclasses
import json
import warnings

import numpy as np
import pytest

import auxtl
from auxtl import checkpoints, cli, transfer
from auxtl.finetune import FinetuneConfig
from auxtl.freezing import Phase
from auxtl.models.target import TargetSpec
from auxtl.transfer import TransferConfig, labeled_splits, run_transfer
from auxtl.data import compute_normalization
from auxtl.errors import InputError
from auxtl.pretrain import SPLIT_SEED
from auxtl.resize import resize_dataset
from auxtl.splits import per_class_indices
from conftest import leaves_equal, tiny_config


@pytest.fixture(scope="module")
def trunk_path(tmp_path_factory, mnist_small):
    out = tmp_path_factory.mktemp("pretrained")
    return auxtl.run_pretraining(tiny_config(out=str(out)), mnist_small).trunk_path


def quick(trunk_path, out, **overrides):
    values = dict(trunk=str(trunk_path), labels_per_class=3, val_per_class=3, seeds=(0, 1),
                  finetune=FinetuneConfig(phases=(Phase(2, "head"), Phase(2, "head+top1", 0.1)),
                                          batch_size=10),
                  out=str(out), progress=False)
    values.update(overrides)
    return TransferConfig(**values)


def test_labeled_splits_are_disjoint_per_class_and_keep_the_test_split(mnist):
    splits = labeled_splits(mnist, labels_per_class=4, val_per_class=2, seed=3)
    assert np.bincount(splits.train.labels).tolist() == [4] * 10
    assert np.bincount(splits.val.labels).tolist() == [2] * 10
    assert len(splits.test) == 500
    rows = lambda d: {r.tobytes() for r in d.images.reshape(len(d), -1)}
    assert not rows(splits.train) & rows(splits.val)
    assert not (rows(splits.train) | rows(splits.val)) & rows(splits.test)
    again = labeled_splits(mnist, labels_per_class=4, val_per_class=2, seed=3)
    assert np.array_equal(again.train.images, splits.train.images)


def test_per_class_indices_counts_nesting_and_errors():
    """The one labeled-subset function (was also splits.labeled_subset)."""
    ds = auxtl.load_dataset("digits")
    small, = per_class_indices(ds.labels, (3,), seed=1)
    large, = per_class_indices(ds.labels, (10,), seed=1)
    assert np.bincount(ds.labels[small]).tolist() == [3] * 10
    assert np.bincount(ds.labels[large]).tolist() == [10] * 10
    assert set(small) <= set(large)  # a seed's smaller subset is inside its larger one
    train, val = per_class_indices(ds.labels, (3, 7), seed=1)
    assert np.array_equal(train, small) and not set(train) & set(val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), large)
    assert np.array_equal(per_class_indices(ds.labels, (3,), seed=1)[0], small)
    assert not np.array_equal(per_class_indices(ds.labels, (3,), seed=2)[0], small)
    with pytest.raises(ValueError, match=r"class 3 of 'd' has 1 examples, fewer than the 2"):
        per_class_indices(np.array([0, 0, 1, 1, 2, 2, 3]), (2,), seed=0, name="d")
    with pytest.raises(ValueError, match="'u' is unlabeled"):
        per_class_indices(None, (1,), seed=0, name="u")
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        per_class_indices(ds.labels, (0,), seed=0)


def test_transfer_run_writes_summary_report_and_a_loadable_model(trunk_path, tmp_path, mnist):
    config = quick(trunk_path, tmp_path / "t", target=TargetSpec(reuse=3, top="drop"))
    summary = run_transfer(config, mnist, log=lambda _: None)
    assert [s["seed"] for s in summary["seeds"]] == [0, 1]
    assert set(summary["difference"]) == {"mean", "low", "high"}
    # The summary's mean and 95% t-interval, recomputed by hand from the per-seed test
    # accuracies written to transfer.json; each accuracy counts correct test images.
    written = json.loads((tmp_path / "t" / "transfer.json").read_text())
    accuracies = [s["transfer_test_accuracy"] for s in written["seeds"]]
    n_test = len(labeled_splits(mnist, labels_per_class=3, val_per_class=3, seed=0).test)
    # correct / n_test, stored as float32: within n_test * 2**-24 of a whole count
    assert all(abs(a * n_test - round(a * n_test)) <= n_test * 2.0 ** -24
               and 0 <= round(a * n_test) <= n_test for a in accuracies), accuracies
    mean = (accuracies[0] + accuracies[1]) / 2
    half = 12.706 * abs(accuracies[0] - accuracies[1]) / np.sqrt(2) / np.sqrt(2)  # t(0.975, 1)
    # a few float64 roundings of numbers below 13: far under 1e-12
    assert written["transfer"] == summary["transfer"] == pytest.approx(
        {"mean": mean, "low": mean - half, "high": mean + half}, rel=0, abs=1e-12)
    saved = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert saved["surgery"]["copied"] > 0
    assert "params/layers/0/conv/kernel" in (tmp_path / "t" / "surgery_report.txt").read_text()
    trunk = auxtl.load_trunk(tmp_path / "t" / "model")
    assert trunk.layer_names == ("conv1", "conv2", "conv3")
    metadata = auxtl.read_metadata(tmp_path / "t" / "model")
    assert metadata["target"] == {"reuse": 3, "top": "drop", "add": []}
    assert {e["action"] for e in metadata["surgery_report"]} == {"copied", "dropped"}


def test_frozen_transplanted_layers_equal_the_source_after_fine_tuning(trunk_path, tmp_path,
                                                                      mnist):
    config = quick(trunk_path, tmp_path / "f", seeds=(0,), baseline=False,
                   target=TargetSpec(reuse=4, top="replace"))
    run_transfer(config, mnist, log=lambda _: None)
    source_params, source_stats, _ = checkpoints.load_trunk_state(trunk_path)
    params, stats, _ = checkpoints.load_trunk_state(tmp_path / "f" / "model")
    # head+top1 unfroze conv4 (index 3); conv1..conv3 stayed frozen throughout
    for i in range(3):
        assert leaves_equal(params["layers"][i], source_params["layers"][i])
        assert leaves_equal(stats["layers"][i], source_stats["layers"][i])
    assert not leaves_equal(params["layers"][3], source_params["layers"][3])


def test_rgb_target_of_another_size_is_resized_and_adapts_the_first_convolution(
        trunk_path, tmp_path):
    """An npz of 20x20 RGB images into a trunk pretrained on 28x28 grey ones: resized to
    28x28 (labels kept), the first convolution adapted, normalised with its own three
    channels' statistics over its training pool."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 20, 20, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 100).astype(np.int32)
    np.savez(tmp_path / "rgb.npz", images=images, labels=labels)
    config = quick(trunk_path, tmp_path / "rgb", data=f"npz:{tmp_path / 'rgb.npz'}",
                   seeds=(0,), baseline=False, target=TargetSpec(reuse=2))
    lines = []
    summary = run_transfer(config, log=lines.append)
    assert summary["surgery"]["adapted"] == 1
    assert summary["resize"] == {"mode": "auto", "from": [20, 20], "to": [28, 28]}
    notice = f"resizing {config.data} images 20x20 -> 28x28"
    assert sum(line.startswith(notice) for line in lines) == 1
    assert summary["normalization"]["source"] == "target"
    assert len(summary["normalization"]["mean"]) == 3
    assert auxtl.read_metadata(tmp_path / "rgb" / "model")["input_shape"] == [28, 28, 3]


def test_cli_dry_run_prints_the_plan_and_builds_nothing(trunk_path, tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli.main(["transfer", "--trunk", str(trunk_path), "--reuse", "2",
                     "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "params/layers/1/conv/kernel" in printed and "copied" in printed
    assert "dropped" in printed and not out.exists()


def test_cli_transfer_prints_the_paired_difference(trunk_path, tmp_path, capsys):
    code = cli.main(["transfer", "--trunk", str(trunk_path), "--reuse", "3", "--top", "replace",
                     "--labels-per-class", "3", "--val-per-class", "3",
                     "--phases", "head:2,head+top2:2@0.1", "--batch-size", "10", "--seeds", "2",
                     "--out", str(tmp_path / "c"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "difference (transfer - scratch, paired by seed)" in printed
    assert "95% CI" in printed


def test_reuse_beyond_the_trunk_is_named(trunk_path, tmp_path):
    with pytest.raises(ValueError, match="reuse=9 is outside 0..6"):
        run_transfer(quick(trunk_path, tmp_path / "x", target=TargetSpec(reuse=9)))


# --------------------------------------------------------------------------- the test split

@pytest.fixture(scope="module")
def digits_trunk(tmp_path_factory):
    """A trunk pretrained on digits holding out 5% (not transfer's default 10%)."""
    out = tmp_path_factory.mktemp("digits05")
    return auxtl.run_pretraining(tiny_config(data="digits", test_fraction=0.05,
                                             out=str(out))).trunk_path


def digits_quick(trunk, out, **overrides):
    config = quick(trunk, out, **{"data": "digits", "seeds": (0,), "baseline": False,
                                  "target": TargetSpec(reuse=2), **overrides})
    return config if out else dataclasses.replace(config, out=None)  # None: write nothing


def spy_on_test_sets(monkeypatch) -> list[np.ndarray]:
    """Records the test images every fine-tuning run of the transfer is evaluated on."""
    seen, real = [], transfer.finetune

    def spy(*args, **kwargs):
        seen.append(np.asarray(kwargs["test"][0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(transfer, "finetune", spy)
    return seen


def indices_of(images: np.ndarray, dataset) -> set[int]:
    index = {row.tobytes(): i for i, row in enumerate(dataset.images.reshape(len(dataset), -1))}
    assert len(index) == len(dataset)  # digits has no duplicate images: content is identity
    return {index[row.tobytes()] for row in images.reshape(len(images), -1)}


def test_transfer_on_the_pretraining_data_tests_only_on_its_held_out_images(
        digits_trunk, tmp_path, monkeypatch):
    digits = auxtl.load_dataset("digits")
    train, held_out = auxtl.train_test_split(digits, test_fraction=0.05, seed=SPLIT_SEED)
    held_out, trained_on = indices_of(held_out.images, digits), indices_of(train.images, digits)
    seen = spy_on_test_sets(monkeypatch)
    summary = run_transfer(digits_quick(digits_trunk, tmp_path / "t"), log=lambda _: None)
    assert len(seen) == 1
    tested = indices_of(seen[0], digits)
    assert not tested & trained_on                 # no test image was pretrained on
    assert tested == held_out                      # the whole held-out split, nothing else
    assert summary["split"]["test_fraction"] == 0.05
    assert summary["split"]["test_examples"] == len(held_out)
    # the pretraining data itself: the trunk's own normalisation, and the record says why
    assert summary["resize"] is None
    assert summary["normalization"] == {
        **auxtl.read_metadata(digits_trunk)["normalization"], "source": "trunk",
        "computed_on": None,
        "reason": "the target is the trunk's pretraining data ('digits', same content hash)"}
    # the fine-tuned model carries the split it was tested on, for a transfer from it
    model_split = auxtl.read_metadata(tmp_path / "t" / "model")["split"]
    assert model_split == auxtl.read_metadata(digits_trunk)["split"]
    assert model_split["data_hash"] == auxtl.splits.content_hash(digits.images)


def test_the_trunk_records_the_pretraining_split(digits_trunk):
    digits = auxtl.load_dataset("digits")
    assert auxtl.read_metadata(digits_trunk)["split"] == {
        "data": "digits", "data_hash": auxtl.splits.content_hash(digits.images),
        "labels_hash": auxtl.splits.content_hash(digits.labels), "test_fraction": 0.05,
        "seed": SPLIT_SEED}


def test_other_data_gets_the_default_split_without_a_warning(digits_trunk, tmp_path,
                                                              monkeypatch):
    digits = auxtl.load_dataset("digits")
    other = auxtl.Dataset("digits-flipped", digits.images[:, :, ::-1], digits.labels)
    seen = spy_on_test_sets(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = run_transfer(digits_quick(digits_trunk, None, data="digits-flipped"), other,
                               log=lambda _: None)
    _, default_test = auxtl.train_test_split(other, test_fraction=0.1, seed=SPLIT_SEED)
    np.testing.assert_array_equal(seen[0], default_test.images)
    assert summary["split"]["test_fraction"] == 0.1


def test_same_data_name_with_other_contents_warns(digits_trunk):
    digits = auxtl.load_dataset("digits")
    subset = digits.subset(np.arange(0, len(digits), 2))  # e.g. pretrained on all, now half
    metadata = auxtl.read_metadata(digits_trunk)
    with pytest.warns(transfer.SplitWarning, match="with other contents"):
        split, note = transfer.held_out_split(metadata, subset, "digits")
    assert split.test_fraction == 0.1 and "not honoured" in note


def without_split(trunk, path, **changes):
    params, stats, metadata = checkpoints.load_trunk_state(trunk)
    metadata = {k: v for k, v in metadata.items() if k != "split"}
    checkpoints.save_trunk(path, trunk_params=params, trunk_batch_stats=stats,
                           metadata={**metadata, **changes})
    return path


@pytest.mark.parametrize("data", ["digits", None])
def test_a_trunk_without_a_recorded_split_warns_that_the_split_cannot_be_honoured(
        digits_trunk, tmp_path, data):
    old = without_split(digits_trunk, tmp_path / "old", data=data)
    with pytest.warns(UserWarning, match="records no pretraining split") as caught:
        summary = run_transfer(digits_quick(old, None), log=lambda _: None)
    assert "may hold images pretraining trained on" in str(caught[0].message)
    # no content hash: the trunk's normalisation only when it names the same data
    assert summary["normalization"]["source"] == ("trunk" if data else "target")
    assert summary["normalization"]["reason"] == (
        "the trunk records no content hash but names the same data ('digits') and image shape"
        if data else "the trunk records neither its pretraining data nor a content hash")


def test_no_warning_when_the_old_trunk_names_other_data(digits_trunk, tmp_path):
    old = without_split(digits_trunk, tmp_path / "old", data="mnist5k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_transfer(digits_quick(old, None), log=lambda _: None)


def test_the_cli_prints_the_split_warning_as_one_line(digits_trunk, tmp_path, capsys):
    old = without_split(digits_trunk, tmp_path / "old")
    code = cli.main(["transfer", "--trunk", str(old), "--data", "digits", "--reuse", "2",
                     "--labels-per-class", "3", "--val-per-class", "3", "--phases", "head:1",
                     "--batch-size", "10", "--seeds", "1", "--no-baseline", "--no-progress",
                     "--out", str(tmp_path / "run")])
    assert code == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "records no pretraining split" in l]
    assert len(lines) == 1 and lines[0].startswith("auxtl: warning: trunk ")


def test_same_images_with_other_labels_cannot_honour_a_stratified_split(digits_trunk):
    digits = auxtl.load_dataset("digits")
    relabeled = auxtl.Dataset("digits", digits.images, (digits.labels + 1) % 10)
    metadata = auxtl.read_metadata(digits_trunk)
    with pytest.warns(transfer.SplitWarning, match="the labels differ"):
        split, note = transfer.held_out_split(metadata, relabeled, "digits")
    assert split.test_fraction == 0.1 and "could not be recomputed" in note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split, note = transfer.held_out_split(metadata, digits, "digits")
    assert split.test_fraction == 0.05 and "held out of 'digits'" in note


# --------------------------------------------------------------------------- cross-dataset

def digits_cli(trunk, out, *flags) -> list[str]:
    return ["transfer", "--trunk", str(trunk), "--data", "digits", "--reuse", "2",
            "--labels-per-class", "3", "--val-per-class", "3", "--phases", "head:1",
            "--batch-size", "10", "--seeds", "1", "--no-baseline", "--no-progress",
            "--out", str(out), *flags]


def test_cli_resizes_digits_to_the_trunks_resolution_and_records_the_normalization(
        trunk_path, tmp_path, capsys):
    assert cli.main(digits_cli(trunk_path, tmp_path / "d")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert ("resizing digits images 8x8 -> 28x28 (the trunk's pretraining resolution; "
            "--resize off to keep them)") in printed
    written = json.loads((tmp_path / "d" / "transfer.json").read_text())
    assert written["resize"] == {"mode": "auto", "from": [8, 8], "to": [28, 28]}
    assert written["config"]["resize"] == "auto"
    # not the trunk's pretraining data (mnist): the target's own statistics over its
    # training pool (the resized data less the test split), never over test
    digits = auxtl.load_dataset("digits")
    pool, test = auxtl.train_test_split(resize_dataset(digits, (28, 28)), test_fraction=0.1,
                                        seed=SPLIT_SEED)
    own = compute_normalization(pool.images)
    record = written["normalization"]
    assert record["source"] == "target" and "not the trunk's pretraining data" in record["reason"]
    assert (record["mean"], record["std"]) == (list(own.mean), list(own.std))
    assert record["computed_on"]["examples"] == len(pool) == len(digits) - len(test)
    assert sum(line.startswith("normalization: the target's own") for line in printed) == 1
    # the model is 28x28 and carries the normalisation it was trained with, and why
    metadata = auxtl.read_metadata(tmp_path / "d" / "model")
    assert metadata["input_shape"] == [28, 28, 1]
    assert metadata["normalization"] == {"mean": record["mean"], "std": record["std"]}
    assert metadata["normalization_record"] == record
    assert metadata["resize"] == written["resize"]


def test_resize_off_keeps_the_target_size(trunk_path, tmp_path):
    lines = []
    summary = run_transfer(digits_quick(trunk_path, tmp_path / "off", resize="off"),
                           log=lines.append)
    assert summary["resize"] is None and summary["config"]["resize"] == "off"
    assert "keeping digits images at 8x8 (--resize off; the trunk was pretrained at 28x28)" \
        in lines
    assert not any(line.startswith("resizing") for line in lines)
    assert auxtl.read_metadata(tmp_path / "off" / "model")["input_shape"] == [8, 8, 1]


def test_resize_modes_are_checked():
    with pytest.raises(InputError, match=r"resize \(--resize\) must be one of auto, on, off"):
        TransferConfig(trunk="t", resize="yes")
