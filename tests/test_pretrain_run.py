"""A pretraining run as a user runs it: the `auxtl pretrain` command in its own process,
stopped by a real SIGKILL or SIGTERM and resumed, must end bit-identical to a run that
was never interrupted."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from auxtl import cli, load_trunk_state
from conftest import leaves_equal

# Rotation with a gate: on the train step numbered AUXTL_TEST_GATE_AT (counted by a host
# callback) it writes DIR/reached and waits for DIR/release, so a test knows the run is
# mid-training, past its first checkpoints, when it sends the signal. Without the
# variables the callback does nothing; every run here compiles the same program.
GATED_TASK = textwrap.dedent('''
    import dataclasses, os, pathlib, time
    import jax
    import auxtl

    _CALLS = [0]

    def _gate():
        _CALLS[0] += 1
        at = os.environ.get("AUXTL_TEST_GATE_AT")
        if at and _CALLS[0] == int(at):
            folder = pathlib.Path(os.environ["AUXTL_TEST_GATE_DIR"])
            (folder / "reached").write_text(str(_CALLS[0]))
            deadline = time.monotonic() + 120
            while not (folder / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    @auxtl.register_task("rotation_gated")
    @dataclasses.dataclass(frozen=True)
    class GatedRotation(type(auxtl.get_task("rotation"))):
        def forward(self, trunk, head, inputs, *, train, frozen=()):
            if train:
                jax.debug.callback(_gate)
            return super().forward(trunk, head, inputs, train=train, frozen=frozen)
''')

STEPS = 60
RUN = ["--task", "rotation_gated", "--data", "digits", "--model-arg", "widths=[8,8,8,8,8]",
       "--model-arg", "fc_dim=8", "--batch-size", "16", "--steps", str(STEPS),
       "--checkpoint-every", "10", "--log-every", "5", "--no-progress"]
GATE_AT = 35
TIMEOUT = 180


@pytest.fixture(scope="module")
def task_module(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tasks") / "gated_task.py"
    path.write_text(GATED_TASK)
    return path


def command(task_module, out, *extra) -> list[str]:
    return [sys.executable, "-m", "auxtl.cli", "pretrain", "--task-module", str(task_module),
            *RUN, "--out", str(out), *extra]


def run(task_module, out, *extra) -> subprocess.CompletedProcess:
    done = subprocess.run(command(task_module, out, *extra), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done


def start_gated(task_module, out, gate: pathlib.Path) -> subprocess.Popen:
    gate.mkdir()
    env = {**os.environ, "AUXTL_TEST_GATE_AT": str(GATE_AT), "AUXTL_TEST_GATE_DIR": str(gate)}
    process = subprocess.Popen(command(task_module, out), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (gate / "reached").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached the gate"
        time.sleep(0.05)
    return process


def checkpoint_steps(out: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def train_records(out: pathlib.Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(task_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(task_module, out)
    return load_trunk_state(out / "trunk")[:2], train_records(out)


def assert_same_as_uninterrupted(out, uninterrupted):
    (params, stats), records = uninterrupted
    resumed_params, resumed_stats, _ = load_trunk_state(out / "trunk")
    assert leaves_equal(params, resumed_params)
    assert leaves_equal(stats, resumed_stats)
    assert train_records(out) == records  # no record lost or repeated


def test_sigkill_mid_training_then_resume_is_bit_identical(task_module, uninterrupted,
                                                           tmp_path):
    out = tmp_path / "run"
    process = start_gated(task_module, out, tmp_path / "gate")
    deadline = time.monotonic() + TIMEOUT
    while not any(step > 10 for step in checkpoint_steps(out)):
        assert time.monotonic() < deadline, "no checkpoint past step 10 appeared"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "trunk").exists()
    run(task_module, out, "--resume")
    assert_same_as_uninterrupted(out, uninterrupted)


def test_sigterm_saves_a_checkpoint_then_resume_is_bit_identical(task_module, uninterrupted,
                                                                 tmp_path):
    out = tmp_path / "run"
    gate = tmp_path / "gate"
    process = start_gated(task_module, out, gate)
    os.kill(process.pid, signal.SIGTERM)
    (gate / "release").touch()
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 143, stderr
    match = re.search(r"preempted at step (\d+) of 60; checkpoint saved at (\S+); "
                      r"rerun with --resume", stderr)
    assert match, stderr
    step = int(match.group(1))
    assert 10 < step < STEPS
    assert checkpoint_steps(out)[-1] == step
    assert pathlib.Path(match.group(2)) == out / "checkpoints" / str(step)
    assert not (out / "trunk").exists()
    run(task_module, out, "--resume")
    assert_same_as_uninterrupted(out, uninterrupted)


@pytest.mark.parametrize("flag, value, field", [
    ("--batch-size", "0", "batch_size"), ("--batch-size", "-4", "batch_size"),
    ("--steps", "0", "steps"), ("--log-every", "0", "log_every"),
    ("--eval-every", "-1", "eval_every"), ("--checkpoint-every", "-2", "checkpoint_every"),
    ("--test-fraction", "0", "test_fraction"), ("--test-fraction", "1.5", "test_fraction"),
    ("--keep", "0", "keep")])
def test_bad_setting_is_refused_before_the_run_folder_is_made(tmp_path, capsys, flag, value,
                                                              field):
    out = tmp_path / "run"
    code = cli.main(["pretrain", "--data", "digits", "--no-progress", "--out", str(out),
                     flag, value])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{field} ({flag}) must be" in err and value in err
    assert not out.exists()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    code = cli.main(["pretrain", "--data", "digits", "--out", str(tmp_path / "run"),
                     "--resume", "--overwrite"])
    assert code == 2
    assert "give one of them" in capsys.readouterr().err
