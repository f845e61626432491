"""The transfer benchmark end to end on a tiny configuration (real MNIST-5k and a tiny
CIFAR-format folder), its statistics, its split discipline and its --full preset."""

from __future__ import annotations

import json
import pickle

import jax
import numpy as np
import pytest
from flax import nnx

from auxtl.bench import BenchError, transfer, transfer_report
from auxtl.bench.transfer_cells import reference_for
from auxtl.bench.transfer_config import BEST, MODES, PROBE_MODES, TRAINED_MODES
from auxtl.bench.transfer_data import labeled_split, load_bench_data
from auxtl.bench.transfer_trained import pick_on_validation
from auxtl.bench.transfer_sources import refusal
from auxtl.models import build_trunk, make_config
from auxtl.pretrain import SPLIT_SEED

SOURCES = ("rotation", "jigsaw", "colorization", "random", "scratch")
TINY = ["--tiny", "--sources", ",".join(SOURCES), "--budgets", "2,5", "--seeds", "2",
        "--pretrain-steps", "4"]
TOP_FIELDS = ("config", "environment", "data", "subsets", "sources", "cells",
              "probe_by_depth", "timings_s", "outputs", "trained_sources")
CELL_FIELDS = ("source", "mode", "budget", "seeds", "accuracy", "mean", "low", "high",
               "reference", "difference")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_transfer")
    return transfer.main(TINY + ["--out", str(out)]), out


def cells_by_key(result):
    return {(c["source"], c["mode"], c["budget"], c["layer"] if c.get("depth_only") else None): c
            for c in result["cells"] + result["probe_by_depth"]}


def test_writes_json_markdown_and_png_with_every_field(tiny_run):
    result, out = tiny_run
    written = json.loads((out / "transfer.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert all(field in written for field in TOP_FIELDS)
    assert written["environment"]["jax_version"] == jax.__version__
    assert written["data"]["test_size"] == 500 and written["data"]["pool_size"] == 4500
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pretraining.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "transfer.md").read_text()
    assert "| staged unfreezing (vs scratch) | rotation |" in markdown
    assert "| **auto**: best source and mode on validation |" in markdown
    assert "Skipped: `colorization`" in markdown
    assert written["environment"]["cpu"]
    for name in ("rotation", "jigsaw"):
        info = written["sources"][name]
        assert info["steps"] == 4 and info["examples_seen"] == 4 * 16 and info["loss_curve"]
    for c in written["cells"] + written["probe_by_depth"]:
        assert all(field in c for field in CELL_FIELDS), c
        assert len(c["accuracy"]) == 2 and all(0 <= a <= 1 for a in c["accuracy"])


def test_every_source_mode_and_budget_has_a_cell(tiny_run):
    result, _ = tiny_run
    keys = {(c["source"], c["mode"], c["budget"]) for c in result["cells"]}
    expected = {(s, m, b) for s in ("rotation", "jigsaw") for m in MODES + (BEST,)
                for b in (2, 5)}
    expected |= {("random", m, b) for m in PROBE_MODES for b in (2, 5)}
    expected |= {("scratch", m, b) for m in TRAINED_MODES + (BEST,) for b in (2, 5)}
    expected |= {("auto", BEST, b) for b in (2, 5)}
    assert keys == expected
    depths = {(c["source"], c["mode"], c["layer"]) for c in result["probe_by_depth"]}
    assert len(depths) == 3 * 2 * 6              # every depth of small_cnn, per source and probe
    skipped = result["sources"]["colorization"]
    assert skipped["status"] == "skipped" and "3 channels" in skipped["reason"]
    # scratch is one choice per seed, the reference of every trained mode
    index = cells_by_key(result)
    assert index[("scratch", "head", 2, None)]["accuracy"] == \
        index[("scratch", "staged", 2, None)]["accuracy"]


def test_every_choice_is_the_validation_argmax(tiny_run):
    """The probes' depth, each source's mode, auto's source and scratch's rate: each seed
    keeps the candidate whose validation accuracy is highest (never test's)."""
    result, _ = tiny_run
    index = cells_by_key(result)
    for c in result["cells"]:
        seeds = range(len(c["seeds"]))
        if c["mode"] in PROBE_MODES:
            for s in seeds:
                layers = [d for d in result["probe_by_depth"] if (d["source"], d["mode"],
                          d["budget"]) == (c["source"], c["mode"], c["budget"])]
                best = max(d["val_accuracy"][s] for d in layers)
                kept = next(d for d in layers if d["layer"] == c["layer"][s])
                assert kept["val_accuracy"][s] == best
                assert kept["accuracy"][s] == c["accuracy"][s]
        elif c["mode"] == BEST and c["source"] not in ("scratch", "auto"):
            for s in seeds:
                chosen = index[(c["source"], c["chosen"][s], c["budget"], None)]
                best = max(index[(c["source"], m, c["budget"], None)]["val_accuracy"][s]
                           for m in TRAINED_MODES)
                assert chosen["val_accuracy"][s] == best == c["val_accuracy"][s]
                assert chosen["accuracy"][s] == c["accuracy"][s]
        elif c["source"] == "auto":
            for s in seeds:
                source, mode = c["chosen"][s].split("/")
                best = max(index[(n, BEST, c["budget"], None)]["val_accuracy"][s]
                           for n in result["trained_sources"])
                assert index[(source, BEST, c["budget"], None)]["val_accuracy"][s] == best
    assert list(pick_on_validation([[0.5, 0.7], [0.6, 0.7]])) == [1, 0]   # ties: the first


def test_intervals_contain_means_and_paired_differences_are_per_seed(tiny_run):
    result, _ = tiny_run
    index = cells_by_key(result)
    for c in result["cells"] + result["probe_by_depth"]:
        assert c["mean"] == pytest.approx(np.mean(c["accuracy"]))
        assert c["low"] <= c["mean"] <= c["high"]
        reference = reference_for(c["mode"])
        if c["source"] == reference:
            assert c["difference"] is None
            continue
        assert c["reference"] == reference
        layer = c["layer"] if c.get("depth_only") else None
        ref = index[(reference, c["mode"], c["budget"], layer)]
        expected = [a - b for a, b in zip(c["accuracy"], ref["accuracy"])]
        assert c["difference"]["per_seed"] == pytest.approx(expected)
        d = c["difference"]
        assert d["mean"] == pytest.approx(np.mean(expected))
        assert d["low"] <= d["mean"] <= d["high"]


def test_labeled_subsets_are_class_balanced_nested_and_disjoint(tiny_run):
    result, _ = tiny_run
    data = load_bench_data("mnist5k")
    test_images = {image.tobytes() for image in data.test.images}
    labels = data.pool.labels
    for seed in (0, 1):
        small = labeled_split(labels, 2, seed, val_per_class=5)
        large = labeled_split(labels, 5, seed, val_per_class=5)
        assert set(small.train) <= set(large.train)
        assert np.array_equal(small.val, large.val)               # shared by budgets and seeds
        for budget, split in ((2, small), (5, large)):
            assert np.bincount(labels[split.train]).tolist() == [budget] * 10
            assert np.bincount(labels[split.val]).tolist() == [5] * 10
            assert not set(split.train) & set(split.val)
            chosen = np.concatenate([split.train, split.val])
            assert not test_images & {image.tobytes() for image in data.pool.images[chosen]}
            assert result["subsets"][str(budget)]["per_class"][seed] == [budget] * 10
    assert not np.array_equal(labeled_split(labels, 2, 0, val_per_class=5).train,
                              labeled_split(labels, 2, 1, val_per_class=5).train)
    everything = labeled_split(labels, "all", 0, val_per_class=20)
    assert len(everything.train) + len(everything.val) == len(data.pool)
    assert result["data"]["test_split"] == f"held-out 10% (SPLIT_SEED={SPLIT_SEED})"


def test_a_rerun_reuses_the_sources_and_gives_identical_results(tiny_run):
    result, out = tiny_run
    # the probes and the head runs at one budget, not the finetune runs: enough to show the
    # rerun repeats every kind of cell bit for bit
    again = transfer.main(TINY + ["--out", str(out), "--no-plot", "--modes", "linear,knn,head",
                                  "--budgets", "2"])
    assert all(again["sources"][s]["cached"] for s in ("rotation", "jigsaw"))
    first = {(c["source"], c["mode"], c["budget"]): c["accuracy"] for c in result["cells"]}
    cells = [c for c in again["cells"] if c["mode"] in ("linear", "knn", "head")]
    assert len(cells) == 3 * 2 + 3               # probes of 3 trunks, head of 3 incl. scratch
    assert all(c["accuracy"] == first[(c["source"], c["mode"], c["budget"])] for c in cells)
    depth_first = {(c["source"], c["mode"], c["budget"], c["layer"]): c["accuracy"]
                   for c in result["probe_by_depth"]}
    assert again["probe_by_depth"] and all(
        c["accuracy"] == depth_first[(c["source"], c["mode"], c["budget"], c["layer"])]
        for c in again["probe_by_depth"])


def write_cifar_batch(path, images, labels):
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    with open(path, "wb") as handle:
        pickle.dump({b"labels": [int(x) for x in labels], b"data": data}, handle)


def test_full_tiny_runs_on_a_cifar_format_folder(tmp_path):
    """--full wires up end to end (NIN trunk, rotation, CIFAR test batch) at tiny size."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar"
    folder.mkdir()
    images = rng.integers(0, 256, (230, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(230) % 10
    write_cifar_batch(folder / "data_batch_1", images[:180], labels[:180])
    write_cifar_batch(folder / "test_batch", images[180:], labels[180:])
    result = transfer.main(["--full", "--tiny", "--data", f"cifar10:{folder}", "--budgets",
                            "2", "--modes", "linear,head,staged", "--pretrain-steps", "2",
                            "--out", str(tmp_path / "out"), "--no-plot"])
    assert result["config"]["model"] == "nin" and result["config"]["published"]
    assert result["data"]["pool_size"] == 180 and result["data"]["test_size"] == 50
    assert result["data"]["test_split"].startswith("cifar10-test")
    assert result["sources"]["rotation"]["status"] == "ok"
    modes = {(c["source"], c["mode"]) for c in result["cells"]}
    assert ("rotation", "head") in modes and ("scratch", "staged") in modes
    assert {c["layer"] for c in result["probe_by_depth"]} == {"block1", "block2", "block3",
                                                             "block4"}


def test_full_preset_is_the_rotnet_setting():
    args = transfer.build_parser().parse_args(["--full", "--data", "cifar10:/nowhere"])
    config = transfer.config_from_args(args)
    assert config.model == "nin" and config.budgets == (20, 100, 400, 1000, 5000)
    assert config.sources == ("rotation", "random", "scratch") and len(config.seeds) >= 5
    assert config.published == "rotnet_cifar10" and config.pretrain_batch_size == 128
    assert config.pretrain_epochs == 100 and config.pretrain_steps is None
    trunk = nnx.eval_shape(lambda: build_trunk(
        "nin", make_config("nin", (32, 32, 3), **config.model_overrides), rngs=nnx.Rngs(0)))
    assert trunk.layer_names == ("block1", "block2", "block3", "block4")
    assert trunk.feature_dim == 192 and 0 < config.unfreeze <= config.reuse < 4
    with pytest.raises(BenchError, match="--full needs --data"):
        transfer.config_from_args(transfer.build_parser().parse_args(["--full"]))


def test_published_numbers_are_printed_beside_ours():
    def cell(source, mode, budget, mean):
        return {"source": source, "mode": mode, "budget": budget, "mean": mean}
    result = {"config": {"budgets": [20, 100]},
              "cells": [cell("scratch", "head", 20, 0.3), cell("rotation", "head", 20, 0.6),
                        cell("rotation", "head", 100, 0.7)]}
    table = transfer_report.published_table(result)
    assert "| published scratch | 33.66 | 47.26 |" in table
    assert "| published RotNet + conv | 64.63 | 75.28 |" in table
    assert "| ours: rotation, frozen trunk + new head | 60.00 | 70.00 |" in table
    assert "| ours: scratch | 30.00 | — |" in table


def test_bad_flags_are_clear_errors():
    parse = transfer.build_parser().parse_args
    with pytest.raises(BenchError, match="--budgets"):
        transfer.config_from_args(parse(["--budgets", "1,many"]))
    with pytest.raises(BenchError, match="--modes"):
        transfer.config_from_args(parse(["--modes", "linear,magic"]))
    with pytest.raises(BenchError, match="unknown source"):
        refusal("no_such_task", (28, 28, 1))
    assert refusal("rotation+jigsaw", (28, 28, 1)) is None
