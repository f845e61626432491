"""The same code path on 1 device, 4 devices in one process, and 2 processes x 2 devices
on loopback (started by `--distributed auto` from a faked Slurm environment):
pretraining and transfer place the batch on every device and match one device.

Each configuration is one interpreter per process that runs pretrain then transfer
(`auxtl.cli.main` twice), recording the shardings of the real pretraining batches.

Tolerance: a run on D devices changes only the order of the float32 sums of the batch
reductions (BatchNorm statistics, gradients), split into D partial sums and then added.
Reordering a sum of n float32 terms moves it by at most ~n * eps (relative to the sum
of the terms' magnitudes); the longest such sum is a first-layer kernel gradient over
batch x height x width terms, once per step, so the runs may drift apart by
eps * (B * H * W) * steps, relative, for these few steps of training.
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import auxtl
from auxtl import checkpoints

EPS32 = float(np.finfo(np.float32).eps)
HEIGHT = WIDTH = 8   # digits
PRETRAIN_STEPS, PRETRAIN_BATCH = 6, 16
TRANSFER_BATCH = 32   # 10 classes x 8 labels: min(32, 80)
TRANSFER_STEPS = 8    # head:2,all:2 epochs x 2 steps
PRETRAIN_TOL = EPS32 * PRETRAIN_BATCH * HEIGHT * WIDTH * PRETRAIN_STEPS
TRANSFER_TOL = EPS32 * TRANSFER_BATCH * HEIGHT * WIDTH * TRANSFER_STEPS
# An accuracy is a count over the evaluated images: parameters within the tolerance above
# may still flip a prediction that sat on a decision boundary, so one flip (1 / n) is
# allowed; the smallest evaluated set is pretraining's held-out digits (10% of 1797).
ONE_FLIP = 1 / 179

TINY = ["--task", "rotation", "--model-arg", "widths=[8,8,16,16,16]", "--model-arg", "fc_dim=16",
        "--steps", str(PRETRAIN_STEPS), "--batch-size", str(PRETRAIN_BATCH), "--log-every", "3",
        "--no-progress", "--data", "digits"]
TRANSFER = ["--data", "digits", "--labels-per-class", "8", "--seeds", "1", "--no-progress",
            "--phases", "head:2,all:2", "--batch-size", str(TRANSFER_BATCH),
            "--min-steps-per-epoch", "2", "--no-baseline"]

# One process: pretrain into OUT/pretrain, transfer from that trunk into OUT/transfer,
# and write the pretraining batches' shardings (read from the arrays) to OUT/batches.N.json.
RUNNER = """
import json, pathlib, sys
import jax
from auxtl import parallel
from auxtl.cli import main
out, extra, tiny, transfer = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]), \\
    json.loads(sys.argv[3]), json.loads(sys.argv[4])
if len(sys.argv) > 5:   # --distributed auto, no cluster: refused, nothing started
    import contextlib, io
    with contextlib.redirect_stderr(io.StringIO()) as error:
        code = main(["pretrain", "--distributed", "auto", "--out", str(out / "refused")])
    (out / "auto_error.txt").write_text(f"{code} {error.getvalue()}")
seen, put = [], parallel.put_batch
def recording(local, mesh):
    array = put(local, mesh)
    seen.append({**parallel.array_layout(array), "local_devices": len(array.addressable_shards),
                 "rows_per_device": array.sharding.shard_shape(array.shape)[0]})
    return array
parallel.put_batch = recording
assert main(["pretrain", *tiny, "--out", str(out / "pretrain"), *extra]) == 0
assert main(["transfer", "--trunk", str(out / "pretrain" / "trunk"), *transfer,
             "--out", str(out / "transfer"), *extra]) == 0
(out / f"batches.{jax.process_index()}.json").write_text(json.dumps(seen))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLUSTER_VARIABLES = re.compile(r"(SLURM|OMPI|PMIX|JAX_COORDINATOR|TPU|KUBERNETES|MEGASCALE)_")


def start(out, *extra, env_extra=None, check_auto_error=False):
    env = {k: v for k, v in os.environ.items() if not CLUSTER_VARIABLES.match(k)}
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(out), json.dumps(list(extra)), json.dumps(TINY),
         json.dumps(TRANSFER), *(["check-auto-error"] if check_auto_error else [])], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def finish(*procs) -> str:
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    return stdout


def run(out, *extra, env_extra=None, check_auto_error=False):
    finish(start(out, *extra, env_extra=env_extra, check_auto_error=check_auto_error))
    return out


def results(out):
    pretrain = json.loads((out / "pretrain" / "summary.json").read_text())["eval"]
    transfer = json.loads((out / "transfer" / "transfer.json").read_text())
    params, stats, _ = checkpoints.load_trunk_state(out / "transfer" / "model")
    return pretrain, transfer, (params, stats)


def batches(out, process: int = 0):
    return json.loads((out / f"batches.{process}.json").read_text())


def assert_match(out, reference):
    (pre, tr, trees), (pre1, tr1, trees1) = results(out), results(reference)
    for key in pre1:
        tol = ONE_FLIP if key.endswith("accuracy") else PRETRAIN_TOL
        assert pre[key] == pytest.approx(pre1[key], rel=PRETRAIN_TOL, abs=tol), key
    for seed, seed1 in zip(tr["seeds"], tr1["seeds"]):
        for key, value in seed1.items():
            tol = ONE_FLIP if key.endswith("accuracy") else TRANSFER_TOL
            assert seed[key] == (value if value is None else pytest.approx(
                value, rel=TRANSFER_TOL, abs=tol)), key
    for a, b in zip(*(jax_leaves(t) for t in (trees, trees1))):
        np.testing.assert_allclose(a, b, rtol=TRANSFER_TOL, atol=TRANSFER_TOL)


def jax_leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), check_auto_error=True)


@pytest.mark.slow
def test_four_devices_in_one_process_split_the_batch_and_match_one_device(single, tmp_path):
    out = run(tmp_path / "four", env_extra={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    seen = batches(out)
    assert len(seen) == PRETRAIN_STEPS
    assert all(b == {"batch_spec": "P('data',)", "batch": PRETRAIN_BATCH, "batch_devices": 4,
                     "mesh_devices": 4, "rows_per_device": PRETRAIN_BATCH // 4,
                     "local_devices": 4} for b in seen), seen
    summary = json.loads((out / "pretrain" / "summary.json").read_text())["mesh"]
    assert summary["devices"] == 4 and summary["steps"] == [
        {"batch": PRETRAIN_BATCH, "batch_spec": "P('data',)", "batch_devices": 4,
         "mesh_devices": 4}]
    mesh = json.loads((out / "transfer" / "transfer.json").read_text())["mesh"]
    assert mesh["devices"] == 4 and mesh["processes"] == 1 and mesh["axes"] == {"data": 4}
    assert mesh["steps"] == [{"batch": TRANSFER_BATCH, "batch_spec": "P('data',)",
                              "batch_devices": 4, "mesh_devices": 4}]
    one = json.loads((single / "transfer" / "transfer.json").read_text())["mesh"]
    assert one["devices"] == 1 and one["steps"][0]["batch_devices"] == 1
    assert_match(out, single)


@pytest.mark.slow
def test_two_processes_started_by_distributed_auto_match_one_process(single, tmp_path):
    out, port = tmp_path / "multi", free_port()
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
             "JAX_COORDINATOR_PORT": str(port),
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    stdout = finish(*[start(out, "--distributed", "auto", env_extra={
        **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}) for i in range(2)])
    assert "held-out rotation accuracy" in stdout and "transfer test accuracy" in stdout
    for process in range(2):
        seen = batches(out, process)
        assert len(seen) == PRETRAIN_STEPS
        assert all(b["batch_devices"] == b["mesh_devices"] == 4 and b["local_devices"] == 2
                   and b["rows_per_device"] == PRETRAIN_BATCH // 4 for b in seen), seen
    mesh = json.loads((out / "transfer" / "transfer.json").read_text())["mesh"]
    assert (mesh["devices"], mesh["processes"], mesh["local_devices"]) == (4, 2, 2)
    assert mesh["steps"][0]["batch_devices"] == 4
    assert_match(out, single)
    assert auxtl.load_trunk(out / "pretrain" / "trunk").layer_names[0] == "conv1"
    records = [json.loads(line) for line in
               (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 6]


@pytest.mark.slow
def test_distributed_auto_without_a_cluster_is_an_input_error(single):
    code, error = (single / "auto_error.txt").read_text().split(" ", 1)
    assert code == "2", error
    assert "--distributed auto found no cluster environment" in error
    assert "SLURM_JOB_ID" in error and "--coordinator" in error
    assert not (single / "refused").exists()
