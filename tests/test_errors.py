"""Errors auxtl raises on purpose are one line; internal bugs keep their traceback."""

import pathlib

import numpy as np
import pytest

import auxtl
from auxtl import cli, errors


def test_each_error_is_also_the_matching_builtin():
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.UnknownNameError, KeyError)
    assert issubclass(errors.BadParameterError, TypeError)
    # KeyError would print repr('...') with quotes; the message stays as written.
    assert str(errors.UnknownNameError("unknown task 'x'")) == "unknown task 'x'"


def test_an_error_raised_on_purpose_is_one_line(capsys):
    assert cli.main(["pretrain", "--task", "no_such_task", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'no_such_task'" in err[0]
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("bug", [TypeError, KeyError, ValueError, FileNotFoundError])
def test_an_internal_bug_keeps_its_traceback(monkeypatch, bug):
    def broken(config, dataset=None):
        raise bug("an internal bug")

    monkeypatch.setattr("auxtl.cli.run_pretraining", broken)
    with pytest.raises(bug, match="an internal bug"):
        cli.main(["pretrain", "--no-progress", "--out", "unused"])
    assert not pathlib.Path("unused").exists()


def _write_task(path: pathlib.Path, body: str) -> pathlib.Path:
    path.write_text("import auxtl\nimport jax.numpy as jnp\n\n" + body)
    return path


def test_bad_task_parameters_are_named_but_a_type_error_inside_the_task_is_a_bug(tmp_path):
    module = _write_task(tmp_path / "buggy.py", '''
from auxtl.tasks.rotation import Rotation

@auxtl.register_task("buggy_init")
class BuggyInit(Rotation):
    def __init__(self, size: int = 2):
        super().__init__()
        len(size)  # a bug: TypeError inside the constructor
''')
    auxtl.load_task_module(module)
    with pytest.raises(errors.BadParameterError, match="bad parameters .* 'buggy_init'"):
        auxtl.get_task("buggy_init", colour=3)
    with pytest.raises(TypeError) as caught:
        auxtl.get_task("buggy_init", size=2)
    assert not isinstance(caught.value, errors.AuxtlError)


def test_a_user_tasks_value_error_in_validate_is_named(tmp_path, capsys):
    module = _write_task(tmp_path / "picky.py", '''
from auxtl.tasks.rotation import Rotation

@auxtl.register_task("picky")
class Picky(Rotation):
    def validate(self, image_shape):
        raise ValueError(f"picky needs 64x64 images, got {image_shape}")
''')
    code = cli.main(["pretrain", "--task-module", str(module), "--task", "picky",
                     "--data", "digits", "--steps", "2", "--batch-size", "8", "--no-progress",
                     "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "task 'picky': picky needs 64x64 images, got (8, 8, 1)" in err


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("auxtl: error: "), err
    return err[0]


def test_a_task_parameter_value_the_task_refuses_is_one_line(capsys):
    assert cli.main(["pretrain", "--task", "jigsaw", "--task-arg", "jigsaw.grid=1",
                     "--no-progress", "--out", "unused"]) == 2
    assert "task 'jigsaw' with {'grid': 1}: jigsaw grid must be >= 2" in _one_error_line(capsys)


def test_a_model_argument_of_the_wrong_kind_is_one_line(capsys, tmp_path):
    assert cli.main(["pretrain", "--data", "digits", "--model-arg", "widths=16",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "field 'widths' must be like its default" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"not a zip archive", "pickled"])
def test_an_unreadable_npz_is_one_line(capsys, tmp_path, content):
    path = tmp_path / "data.npz"
    if content == "pickled":  # object arrays would need pickle: never loaded
        np.savez(path, images=np.array([{"a": 1}], dtype=object))
    else:
        path.write_bytes(content)
    assert cli.main(["pretrain", "--data", f"npz:{path}", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 2
    assert "is not a readable .npz archive" in _one_error_line(capsys)
