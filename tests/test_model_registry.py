"""The public model registry: a user's own trunk registered from a file goes the whole way
(pretrain, save, load, transfer); registrations that break the contract are named."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import cli, models
from auxtl.finetune import FinetuneConfig
from auxtl.freezing import Phase
from auxtl.models.target import TargetSpec
from auxtl.transfer import TransferConfig, run_transfer
from conftest import USER_MODEL, tiny_config

def test_a_user_trunk_pretrains_saves_loads_and_transfers(user_model, tmp_path, mnist_small):
    assert "user_pair" in auxtl.list_models()
    result = auxtl.run_pretraining(tiny_config(model="user_pair", model_overrides={},
                                               steps=4, out=str(tmp_path / "p")), mnist_small)
    metadata = auxtl.read_metadata(result.trunk_path)
    assert (metadata.model, metadata.layer_names) == ("user_pair", ("low", "high"))
    assert metadata.config == {"in_channels": 1, "width": 6}
    # loaded through the registry: the same function as the trained module
    trunk = auxtl.load_trunk(result.trunk_path)
    trained = nnx.merge(result.graphdef, result.state.params, result.state.batch_stats).trunk
    x = auxtl.normalize(mnist_small.images[:8], metadata.normalization)
    np.testing.assert_array_equal(np.asarray(trunk(x)), np.asarray(trained(x)))
    # transfer of the lower layer, with the scratch baseline
    summary = run_transfer(TransferConfig(
        trunk=str(result.trunk_path), labels_per_class=2, val_per_class=2, seeds=(0,),
        target=TargetSpec(reuse=1, top="replace"),
        finetune=FinetuneConfig(phases=(Phase(1, "head"),), batch_size=10),
        out=str(tmp_path / "t"), progress=False), mnist_small, log=lambda _: None)
    assert summary["surgery"]["copied"] > 0 and summary["surgery"]["kept"] > 0
    assert auxtl.load_trunk(tmp_path / "t" / "model").layer_names == ("low", "high")


@dataclasses.dataclass(frozen=True)
class GoodConfig:
    in_channels: int = 1


def good_builder(config, *, rngs):
    return auxtl.build_trunk("small_cnn", None, rngs=rngs)


@pytest.mark.parametrize("config_cls,builder,fragment", [
    (dict, good_builder, "config must be a dataclass"),
    (dataclasses.make_dataclass("NoDefault", [("in_channels", int)]), good_builder,
     r"field\(s\) \['in_channels'\] have no default"),
    (dataclasses.make_dataclass("NoChannels", [("width", int, 4)]), good_builder,
     "no field 'in_channels'"),
    (GoodConfig, "build", "builder must be callable"),
    (GoodConfig, lambda config: None, r"cannot be called as builder\(config, rngs=...\)"),
])
def test_registration_checks_the_contract(config_cls, builder, fragment):
    with pytest.raises(auxtl.BadParameterError, match=fragment):
        auxtl.register_model("broken", config_cls, builder)
    assert "broken" not in auxtl.list_models()


def test_a_taken_name_needs_replace(tmp_path):
    with pytest.raises(auxtl.InputError, match="'small_cnn' is already registered"):
        auxtl.register_model("small_cnn", GoodConfig, good_builder)
    with pytest.raises(auxtl.InputError, match="non-empty identifier"):
        auxtl.register_model("no spaces", GoodConfig, good_builder)
    try:
        auxtl.register_model("user_wrong", GoodConfig, good_builder)
        auxtl.register_model("user_wrong", GoodConfig, good_builder)  # same again: fine
        with pytest.raises(auxtl.BadParameterError, match="model_name='user_wrong'"):
            auxtl.build_trunk("user_wrong", rngs=nnx.Rngs(0))  # returns a small_cnn
        auxtl.register_model("user_wrong", GoodConfig, lambda config, *, rngs: None,
                             replace=True)
        with pytest.raises(auxtl.BadParameterError, match="got NoneType"):
            auxtl.build_trunk("user_wrong", rngs=nnx.Rngs(0))
    finally:
        models.MODELS.pop("user_wrong", None)


def test_unknown_models_and_missing_files_are_named(tmp_path):
    with pytest.raises(auxtl.InputError, match="unknown model 'nope'; known models: nin"):
        auxtl.make_config("nope")
    with pytest.raises(auxtl.MissingFileError, match="model module .* does not exist"):
        auxtl.load_model_module(tmp_path / "absent.py")


def test_builtin_fit_hooks_keep_their_input_rules():
    assert auxtl.make_config("resnet18", (96, 96, 3)).large_stem
    assert not auxtl.make_config("resnet18", (32, 32, 3)).large_stem
    assert auxtl.make_config("small_cnn", (28, 28, 3)).in_channels == 3


def test_the_cli_pretrains_and_transfers_a_user_model_from_its_file(tmp_path, capsys):
    """--model-module on pretrain, models and transfer: the checkpoint names the user's
    model, and transfer rebuilds that trunk from the checkpoint once the file is loaded."""
    path = tmp_path / "cli_model.py"
    path.write_text(USER_MODEL.replace("user_pair", "user_cli"))
    try:
        assert cli.main(["models", "--model-module", str(path)]) == 0
        assert "user_cli" in capsys.readouterr().out.split()
        out = tmp_path / "p"
        assert cli.main(["pretrain", "--model-module", str(path), "--model", "user_cli",
                         "--data", "digits", "--steps", "2", "--batch-size", "8",
                         "--log-every", "1", "--no-progress", "--out", str(out)]) == 0
        assert f"trunk checkpoint: {out / 'trunk'}" in capsys.readouterr().out
        assert cli.main(["inspect", str(out / "trunk"), "--model-module", str(path)]) == 0
        assert '"model": "user_cli"' in capsys.readouterr().out
        assert cli.main(["transfer", "--model-module", str(path), "--trunk", str(out / "trunk"),
                         "--data", "digits", "--reuse", "1", "--top", "replace",
                         "--labels-per-class", "2", "--val-per-class", "2",
                         "--phases", "head:1", "--batch-size", "10", "--seeds", "1",
                         "--no-baseline", "--no-progress", "--out", str(tmp_path / "t")]) == 0
        assert "transfer test accuracy" in capsys.readouterr().out
        assert auxtl.load_trunk(tmp_path / "t" / "model").layer_names == ("low", "high")
    finally:
        models.MODELS.pop("user_cli", None)


@pytest.mark.parametrize("command", [
    ["models"], ["inspect", "never/read"], ["pretrain", "--model", "small_cnn", "--out", "OUT"],
    ["transfer", "--trunk", "never/read", "--out", "OUT"]])
def test_a_missing_model_module_is_one_error_line_naming_it(command, tmp_path, capsys):
    absent = tmp_path / "absent_model.py"
    argv = [str(tmp_path / "o") if arg == "OUT" else arg for arg in command]
    assert cli.main([*argv, "--model-module", str(absent)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "o").exists()
    assert err == f"auxtl: error: model module {str(absent)!r} does not exist\n"
