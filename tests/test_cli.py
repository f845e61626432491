import json

import pytest

from auxtl import cli, read_metadata, recipes
from test_registry import write_flip_task

TINY = ["--model-arg", "widths=[8,8,8,8,8]", "--model-arg", "fc_dim=8", "--steps", "4",
        "--batch-size", "16", "--log-every", "2", "--no-progress"]


def test_tasks_lists_rotation_with_what_it_needs(capsys):
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "rotation" in out and "needs: square images" in out


def test_pretrain_with_a_user_task_module(tmp_path, capsys):
    module = write_flip_task(tmp_path, "hflip_cli")
    out = tmp_path / "run"
    code = cli.main(["pretrain", "--task-module", str(module), "--task", "hflip_cli",
                     "--data", "digits", "--out", str(out), *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out hflip_cli accuracy" in printed
    assert f"trunk checkpoint: {out / 'trunk'}" in printed
    assert (out / "metrics.png").stat().st_size > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    saved = json.loads((out / "config.json").read_text())
    assert saved["tasks"] == [{"name": "hflip_cli", "weight": 1.0, "params": {}}]


def test_two_tasks_with_weights_and_task_args(tmp_path, capsys):
    module = write_flip_task(tmp_path, "hflip_mix")
    out = tmp_path / "mix"
    code = cli.main(["pretrain", "--task-module", str(module), "--task", "rotation:1.0",
                     "--task", "hflip_mix:0.5", "--task-arg", "rotation.all_rotations=false",
                     "--data", "digits", "--out", str(out), *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out rotation accuracy" in printed and "held-out hflip_mix accuracy" in printed
    tasks = read_metadata(out / "trunk")["tasks"]
    assert tasks == [{"name": "rotation", "weight": 1.0, "params": {"all_rotations": False}},
                     {"name": "hflip_mix", "weight": 0.5, "params": {}}]


def test_unknown_task_is_a_clear_cli_error(tmp_path, capsys):
    code = cli.main(["pretrain", "--task", "spin", "--out", str(tmp_path / "x"), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown task 'spin'" in err and "rotation" in err


def test_bad_task_flags_are_named():
    with pytest.raises(SystemExit, match="weight 'heavy'"):
        cli.parse_task_flags(["rotation:heavy"], [])
    with pytest.raises(SystemExit, match="NAME.KEY=VALUE"):
        cli.parse_task_flags(["rotation"], ["all_rotations=false"])


def test_pretrain_defaults_are_the_recipe():
    config = cli.pretrain_config_from_args(cli.build_parser().parse_args(["pretrain"]))
    assert [t.name for t in config.tasks] == [recipes.PRETRAIN_TASK]
    assert (config.steps, config.epochs) == (None, recipes.PRETRAIN_EPOCHS)
    assert config.batch_size == recipes.PRETRAIN_BATCH_SIZE
    assert config.optimizer == recipes.pretrain_optimizer()
    stepped = cli.pretrain_config_from_args(cli.build_parser().parse_args(
        ["pretrain", "--steps", "7"]))
    assert (stepped.steps, stepped.epochs) == (7, None)
