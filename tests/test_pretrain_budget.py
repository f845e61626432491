"""Pretraining budgets in epochs: steps = ceil(epochs * training images / batch size),
recorded in config.json (what --resume checks) and summary.json."""

import json
import math

import pytest

import auxtl
from auxtl import cli
from auxtl.errors import InputError
from auxtl.splits import train_test_split
from conftest import tiny_config


def test_epochs_resolve_to_steps_over_the_training_split():
    config = auxtl.PretrainConfig(epochs=1.5, batch_size=16)
    config.validate()
    assert config.resolved(100).steps == math.ceil(1.5 * 100 / 16) == 10
    assert config.resolved(96).steps == 9           # exact: no rounding up
    assert config.resolved(100).epochs == 1.5       # kept beside the steps it gave
    assert auxtl.PretrainConfig().resolved(100).steps == 300
    assert auxtl.PretrainConfig(steps=7).resolved(100).steps == 7


@pytest.mark.parametrize("overrides,match", [
    (dict(steps=5, epochs=1.0), "not both"),
    (dict(steps=None, epochs=0), "--epochs"),
    (dict(steps=None, epochs=-1.0), "--epochs"),
    (dict(steps=None, epochs=True), "--epochs"),
    (dict(steps=None, epochs=float("inf")), "--epochs")])
def test_bad_budgets_are_refused(overrides, match):
    with pytest.raises(InputError, match=match):
        tiny_config(**overrides).validate()


def test_steps_and_epochs_on_the_command_line_are_refused(tmp_path, capsys):
    code = cli.main(["pretrain", "--steps", "5", "--epochs", "1", "--out", str(tmp_path / "x"),
                     "--no-progress"])
    assert code != 0
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_epoch_budget_runs_records_and_resumes(tmp_path, mnist_small):
    out = tmp_path / "run"
    config = tiny_config(steps=None, epochs=0.25, out=str(out), log_every=2)
    train_set, _ = train_test_split(mnist_small, test_fraction=config.test_fraction,
                                    seed=auxtl.pretrain.SPLIT_SEED)
    steps = math.ceil(0.25 * len(train_set) / config.batch_size)
    result = auxtl.run_pretraining(config, mnist_small)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps == int(result.state.step)
    assert summary["examples_seen"] == steps * config.batch_size
    assert summary["epochs"] == steps * config.batch_size / len(train_set)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["epochs"]) == (steps, 0.25)
    # the same epochs resume (the resolved steps match); other epochs are refused
    auxtl.run_pretraining(tiny_config(steps=None, epochs=0.25, out=str(out), log_every=2,
                                      resume=True), mnist_small)
    with pytest.raises(InputError, match="steps"):
        auxtl.run_pretraining(tiny_config(steps=None, epochs=0.5, out=str(out), resume=True),
                              mnist_small)
