"""The same code path on 1 device, 2 devices in one process, and 2 processes on loopback."""

import json
import os
import socket
import subprocess
import sys

import pytest

TINY = ["--task", "rotation", "--model-arg", "widths=[8,8,16,16,16]", "--model-arg", "fc_dim=16",
        "--steps", "6",
        "--batch-size", "16", "--log-every", "3", "--no-progress", "--data", "digits"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(out, *extra, env_extra=None, background=False):
    env = {**os.environ, **(env_extra or {})}
    command = [sys.executable, "-m", "auxtl.cli", "pretrain", *TINY, "--out", str(out), *extra]
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def eval_metrics(out):
    return json.loads((out / "summary.json").read_text())["eval"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    pretrain(out)
    return out


@pytest.mark.slow
def test_two_devices_in_one_process_match_one_device(single, tmp_path):
    out = tmp_path / "two"
    pretrain(out, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    one, two = eval_metrics(single), eval_metrics(out)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-4), key


@pytest.mark.slow
def test_two_processes_on_loopback_match_one_process(single, tmp_path):
    out = tmp_path / "multi"
    port = free_port()
    procs = [pretrain(out, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                      "--process-id", str(i), background=True) for i in range(2)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    assert "held-out rotation accuracy" in stdout
    one, multi = eval_metrics(single), eval_metrics(out)
    for key in one:
        assert multi[key] == pytest.approx(one[key], rel=1e-3, abs=1e-4), key
    import auxtl
    assert auxtl.load_trunk(out / "trunk").layer_names[0] == "conv1"
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 6]
