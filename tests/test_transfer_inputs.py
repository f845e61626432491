"""Transfer inputs: channel adaptation for every trunk, and bad flags refused early."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import checkpoints, cli, surgery
from auxtl.data import Normalization
from auxtl.models import config_to_json, make_config
from auxtl.models.target import TargetSpec
from auxtl.transplant import build_transfer_model, new_transfer_model, rules_for, variables
from conftest import gamma

SMALL = {"small_cnn": dict(widths=(4, 4, 4, 4, 4), fc_dim=4),
         "nin": dict(width=8, num_blocks=2),
         "resnet18": dict(width=4, stage_sizes=(1, 1)),
         "resnet50": dict(width=4, stage_sizes=(1, 1))}
FIRST_CONV = {"nin": "params/layers/0/convs/0/conv/kernel"}
SIZE = 16


def source_trunk(model: str, channels: int, seed: int = 0):
    config = make_config(model, (SIZE, SIZE, channels), **SMALL.get(model, {}))
    trunk = auxtl.build_trunk(model, config, rngs=nnx.Rngs(seed))
    # non-trivial statistics, so copying them (or not) shows in the features
    rng = np.random.default_rng(seed)
    stats = nnx.state(trunk, nnx.BatchStat)
    flat = surgery.flatten(nnx.to_pure_dict(stats))
    nnx.replace_by_pure_dict(stats, surgery.unflatten({
        path: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if path.endswith("var")
                          else rng.normal(0.0, 0.05, x.shape), x.dtype)
        for path, x in flat.items()}))
    nnx.update(trunk, stats)
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(config), input_shape=(SIZE, SIZE, channels),
        normalization=Normalization((0.5,) * channels, (0.25,) * channels), tasks=[])
    return trunk, metadata


@pytest.mark.parametrize("model", auxtl.list_models())
@pytest.mark.parametrize("source_channels,target_channels", [(1, 3), (3, 1)])
def test_every_trunk_adapts_its_first_convolution(model, source_channels, target_channels):
    trunk, metadata = source_trunk(model, source_channels)
    tree = variables(trunk)
    expected = FIRST_CONV.get(model, "params/layers/0/conv/kernel")
    # planned (shapes only) and transplanted: one adapted kernel, every other leaf copied
    target = nnx.eval_shape(lambda: new_transfer_model(
        metadata, TargetSpec(), num_classes=3, in_channels=target_channels, seed=1))
    rules = rules_for(metadata, TargetSpec(), target_channels)
    planned = surgery.plan(tree, variables(target.trunk), rules)
    model_out, report = build_transfer_model(
        metadata, tree["params"], tree["batch_stats"], TargetSpec(), num_classes=3,
        in_channels=target_channels, seed=1)
    assert report == planned
    assert [e.path for e in report.entries if e.action == "adapted"] == [expected]
    assert report.counts()["kept"] == 0 and report.counts()["dropped"] == 0
    adapted = surgery.flatten(variables(model_out.trunk))[expected]
    assert adapted.shape[2] == target_channels

    # adapt_channels semantics: a grey image replicated over the channels gives the
    # source's first convolution. conv(repeat(g, C), K) = conv(g, K.sum(axis=2)), so the
    # kernels' channel sums must agree; each side is a float32 sum of C rounded terms
    # (the adapted ones rounded once more when scaled), hence within gamma(C + 1) of
    # the sum of absolute values, in float64.
    source_kernel = np.asarray(surgery.flatten(tree)[expected], np.float64)
    adapted = np.asarray(adapted, np.float64)
    depth = max(source_channels, target_channels) + 1
    bound = gamma(depth) * (np.abs(source_kernel).sum(2) + np.abs(adapted).sum(2))
    assert np.all(np.abs(adapted.sum(2) - source_kernel.sum(2)) <= bound)
    assert np.abs(source_kernel).sum() > 0
    grey = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 1)).astype(np.float32)
    assert np.all(np.isfinite(model_out.trunk(jnp.repeat(grey, target_channels, axis=-1))))


@pytest.mark.parametrize("model", auxtl.list_models())
def test_the_input_kernels_are_found_from_the_architecture(model):
    from auxtl.transplant import input_channel_paths
    _, metadata = source_trunk(model, 1)
    assert input_channel_paths(metadata, 3) == (
        FIRST_CONV.get(model, "params/layers/0/conv/kernel"),)
    assert input_channel_paths(metadata, 1) == ()


def test_partial_reuse_adapts_only_reused_layers():
    _, metadata = source_trunk("nin", 1)
    assert [r.label for r in rules_for(metadata, TargetSpec(reuse=0), 3)] == ["rest"]
    rules = rules_for(metadata, TargetSpec(reuse=1), 3)
    assert rules[0].on_mismatch == "adapt_channels"
    assert rules[0].source_path(FIRST_CONV["nin"]) == FIRST_CONV["nin"]


# ------------------------------------------------------------------ the command line

def save_source(path, model: str, channels: int):
    trunk, metadata = source_trunk(model, channels)
    tree = variables(trunk)
    checkpoints.save_trunk(path, trunk_params=tree["params"],
                           trunk_batch_stats=tree["batch_stats"], metadata=metadata)
    return path


def save_images(path, channels: int, classes: int = 3, per_class: int = 40):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (classes * per_class, SIZE, SIZE, channels), np.uint8)
    np.savez(path, images=images, labels=np.repeat(np.arange(classes), per_class))
    return f"npz:{path}"


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """A grey small_cnn trunk (6 layers) and grey labeled data for it."""
    folder = tmp_path_factory.mktemp("grey")
    return (str(save_source(folder / "trunk", "small_cnn", 1)),
            save_images(folder / "grey.npz", 1))


def transfer(grey, tmp_path, *flags):
    trunk, data = grey
    return cli.main(["transfer", "--trunk", trunk, "--data", data, "--out",
                     str(tmp_path / "out"), "--no-progress", "--labels-per-class", "2",
                     "--val-per-class", "2", "--seeds", "1", "--no-baseline",
                     "--batch-size", "4", "--phases", "head:1", *flags])


def refused(capsys, tmp_path, *fragments):
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("auxtl: error: "), printed.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert printed.out == ""   # refused before the plan printed
    assert not (tmp_path / "out").exists()


def test_cli_refuses_top_n_beyond_the_reused_layers(grey, tmp_path, capsys):
    code = transfer(grey, tmp_path, "--reuse", "3", "--phases", "head:1,head+top4:1")
    assert code == 2
    refused(capsys, tmp_path, "--phases", "'head+top4'", "top 4", "only 3 layer(s) are reused",
            "conv1, conv2, conv3", "use 'all' or head+top3")


@pytest.mark.parametrize("flags,fragments", [
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--seeds", "0"], ["--seeds", "at least one seed"]),
    (["--val-per-class", "0"], ["--val-per-class", "0"]),
    (["--labels-per-class", "0"], ["--labels-per-class", "0"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--reuse", "two"], ["--reuse", "'two'"]),
    (["--add", "64,wide"], ["--add", "'64,wide'"]),
    (["--lr", "0"], ["--lr", "0"]),
    (["--phases", "head:1,tail:2"], ["--phases", "unknown phase spec 'head:1,tail'"]),
    (["--phases", "head:1,head+re:(conv:2"], ["--phases", "bad regex"]),
], ids=lambda value: " ".join(value) if value and value[0].startswith("--") else "")
def test_cli_names_the_bad_flag_before_anything_runs(grey, tmp_path, capsys, flags,
                                                     fragments):
    assert transfer(grey, tmp_path, *flags) == 2
    refused(capsys, tmp_path, *fragments)


def test_cli_dry_run_refuses_bad_flags_before_the_plan(grey, tmp_path, capsys):
    assert transfer(grey, tmp_path, "--dry-run", "--batch-size", "0") == 2
    refused(capsys, tmp_path, "--batch-size")


def test_cli_phase_regex_may_hold_commas(grey, tmp_path, capsys):
    trunk, data = grey
    flags = ["transfer", "--trunk", trunk, "--phases",
             "head:1,head+re:(conv1|conv2){1,2}:2@0.5,all:1"]
    config = cli.transfer_config_from_args(cli.build_parser().parse_args(flags))
    assert [(p.train, p.epochs, p.lr_scale) for p in config.finetune.phases] == [
        ("head", 1, 1.0), ("head+re:(conv1|conv2){1,2}", 2, 0.5), ("all", 1, 1.0)]
    assert cli.main(flags + ["--data", data, "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert "copied" in capsys.readouterr().out and not (tmp_path / "o").exists()


def test_cli_grey_nin_trunk_onto_rgb_data(tmp_path, capsys):
    trunk = save_source(tmp_path / "nin", "nin", 1)
    data = save_images(tmp_path / "rgb.npz", 3)
    common = ["transfer", "--trunk", str(trunk), "--data", data, "--no-progress"]
    assert cli.main(common + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    row = next(line for line in plan.splitlines()
               if line.startswith("params/layers/0/convs/0/conv/kernel"))
    assert "adapted" in row and "input channels 1 -> 3" in row
    out = tmp_path / "run"
    assert cli.main(common + ["--labels-per-class", "2", "--val-per-class", "2", "--seeds", "1",
                              "--no-baseline", "--batch-size", "4", "--phases",
                              "head:1,head+top1:1", "--out", str(out)]) == 0
    summary = json.loads((out / "transfer.json").read_text())
    assert summary["surgery"]["adapted"] == 1
    assert 0 <= summary["transfer"]["mean"] <= 1


@pytest.mark.parametrize("field,value,fragment", [
    ("seeds", (), "--seeds"), ("seeds", (0, 0), "seeds must differ"),
    ("val_per_class", 0, "--val-per-class"), ("labels_per_class", 0, "--labels-per-class")])
def test_transfer_config_refuses_bad_fields(field, value, fragment):
    from auxtl.transfer import TransferConfig
    with pytest.raises(ValueError, match=fragment):
        TransferConfig(trunk="t", **{field: value})
    assert TransferConfig(trunk="t", val_per_class=None).val_per_class is None
