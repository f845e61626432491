"""The paired PyTorch comparison: ratio math, the worker protocol against a fake worker
that speaks it (no torch needed), failures, and one real run when /opt/torch311 exists."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys

import pytest

from auxtl.bench import throughput, torch_reference
from auxtl.bench import BenchError
from auxtl.bench.throughput_cases import DTYPES, STEP_KINDS, BenchConfig

REAL_TORCH = "/opt/torch311/bin/python"

# Speaks torch_step.py's protocol; behaviour from $AUXTL_FAKE_TORCH. As an interpreter
# (shebang) it also answers resolve_torch_python's `-c "import torch ..."` probe.
FAKE_WORKER = r'''
import json, os, sys, time
if sys.argv[1] == "-c":
    print("0.0+fake")
    sys.exit()
cfg = json.loads(sys.argv[-1])
fake = json.loads(os.environ.get("AUXTL_FAKE_TORCH", "{}"))
if fake.get("crash_at_start"):
    print("Traceback ...\nImportError: fake torch is broken", file=sys.stderr)
    sys.exit(3)
time.sleep(fake.get("sleep_at_start", 0))
failing = fake.get("failing_at_warmup", [])
cases = {f"{k}/{m}": {"error": "RuntimeError: fake compile failure\ndetails"}
         if m in failing else {"warmup_s": [0.5] * cfg["warmup"]}
         for k in cfg["kinds"] for m in cfg["modes"]}
print("some library chatter on stdout")
print("AUXTL_TORCH_READY " + json.dumps({
    "torch_version": "0.0+fake", "python": "3.x", "device": "cpu", "device_name": "cpu",
    "threads": 7, "batch_size": cfg["batch_size"], "cases": cases}), flush=True)
for index, line in enumerate(sys.stdin):
    request = json.loads(line)
    if index == fake.get("crash_on_request"):
        print("Fatal Python error: Segmentation fault", file=sys.stderr)
        sys.exit(139)
    reply = {"kind": request["kind"], "mode": request["mode"]}
    if request["mode"] in fake.get("failing_on_request", []):
        reply["error"] = "RuntimeError: fake failure mid-run"
    else:
        reply["step_times_s"] = [fake.get("seconds", {}).get(request["mode"], 0.1)] * \
            request["steps"]
    print("AUXTL_TORCH_RESULT " + json.dumps(reply), flush=True)
'''


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    """(path of the fake worker script, also an executable 'interpreter'; behaviour setter)."""
    path = tmp_path / "fake_torch_python"
    path.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    path.chmod(0o755)
    return str(path), lambda **fake: monkeypatch.setenv("AUXTL_FAKE_TORCH", json.dumps(fake))


def start(script, **kwargs):
    return torch_reference.TorchWorker(
        sys.executable, batch_size=4, kinds=("pretrain", "frozen_prefix"),
        modes=("eager", "compile"), warmup=2, script=script, **kwargs)


def test_ratios_pair_steps_within_rounds():
    auxtl = [[1.0, 3.0, 2.0], [10.0, 10.0, 10.0], [4.0, 4.0, 4.0]]
    torch = [[4.0, 4.0, 4.0], [5.0, 5.0, 5.0], [2.0, 2.0, 2.0]]
    ratios = torch_reference.round_ratios(auxtl, torch)
    assert ratios == [0.5, 2.0, 2.0]
    assert torch_reference.ratio_stats(ratios) == {
        "round_ratios": ratios, "ratio_median": 2.0, "ratio_min": 0.5, "ratio_max": 2.0}
    stats = torch_reference.time_stats(auxtl, examples_per_step=8)
    assert stats["step_time_median_s"] == 4.0 and stats["examples_per_s"] == 2.0
    assert (stats["step_time_min_s"], stats["step_time_max_s"]) == (1.0, 10.0)


def test_rounds_alternate_and_a_failing_mode_is_dropped():
    calls = []

    def timer(kind):
        def run(warmup, steps):
            calls.append(("auxtl", kind, warmup, steps))
            return [0.2] * steps
        return run

    def torch_steps(kind, mode, steps, warmup):
        calls.append((mode, kind, warmup, steps))
        if mode == "compile" and sum(c[0] == "compile" for c in calls) == 2:
            return {"error": "RuntimeError: recompiled and failed"}
        return {"step_times_s": [0.4] * steps}

    raw = torch_reference.paired_rounds(
        {"pretrain": timer("pretrain"), "frozen_prefix": timer("frozen_prefix")}, torch_steps,
        {"pretrain": ["eager", "compile"], "frozen_prefix": ["eager"]},
        rounds=3, steps=2, warmup=1, log=lambda _: None)
    assert [c[:2] for c in calls[:5]] == [("auxtl", "pretrain"), ("eager", "pretrain"),
                                          ("compile", "pretrain"), ("auxtl", "frozen_prefix"),
                                          ("eager", "frozen_prefix")]
    assert all(c[2:] == (1, 2) for c in calls)
    assert sum(c[0] == "compile" for c in calls) == 2          # not asked again after failing
    pretrain = raw["pretrain"]
    assert len(pretrain["auxtl"]) == 3 and len(pretrain["torch"]["eager"]) == 3
    assert len(pretrain["torch"]["compile"]) == 1 and len(pretrain["load_1m"]) == 3
    assert "recompiled" in pretrain["errors"]["compile"]
    kinds = torch_reference.summarize(raw, {}, {"pretrain": 8, "frozen_prefix": 2})
    assert kinds["pretrain"]["torch"]["compile"]["round_ratios"] == [0.5]
    assert "error" in kinds["pretrain"]["torch"]["compile"]
    assert kinds["frozen_prefix"]["torch"]["eager"]["ratio_median"] == 0.5


def test_worker_protocol(fake_worker):
    script, behave = fake_worker
    behave(failing_at_warmup=["compile"], seconds={"eager": 0.25})
    with start(script) as worker:
        assert worker.info["threads"] == 7
        assert worker.info["cases"]["pretrain/eager"] == {"warmup_s": [0.5, 0.5]}
        assert "fake compile failure" in worker.info["cases"]["frozen_prefix/compile"]["error"]
        reply = worker.steps("frozen_prefix", "eager", 3, warmup=1)
        assert reply == {"kind": "frozen_prefix", "mode": "eager", "step_times_s": [0.25] * 3}
        assert list(worker.stray) == ["some library chatter on stdout"]
    assert worker.process.returncode == 0                   # stdin closed: it exited


def test_worker_failures_are_clear_errors(fake_worker, tmp_path):
    script, behave = fake_worker
    with pytest.raises(BenchError, match="could not start in /nonexistent/python"):
        torch_reference.TorchWorker("/nonexistent/python", batch_size=4, kinds=("pretrain",),
                                    modes=("eager",), warmup=1)
    behave(crash_at_start=True)
    with pytest.raises(BenchError, match=r"exited \(code 3\) while building(.|\n)*fake torch "
                                         r"is broken"):
        start(script)
    behave(sleep_at_start=30)
    with pytest.raises(BenchError, match="ran past 1s building"):
        start(script, start_timeout=1)
    behave(crash_on_request=1)
    with start(script) as worker:
        worker.steps("pretrain", "eager", 1)
        with pytest.raises(BenchError, match=r"code 139\) while timing pretrain compile(.|\n)*"
                                             r"Segmentation fault"):
            worker.steps("pretrain", "compile", 1)


def test_zero_rounds_is_refused_before_any_benchmark_runs(fake_worker, tmp_path):
    python, _ = fake_worker
    with pytest.raises(BenchError, match="--torch-rounds must be >= 1, got 0"):
        throughput.main(["--compare-torch", "--torch-python", python, "--torch-rounds", "0",
                         "--out", str(tmp_path)])
    assert not (tmp_path / "throughput.json").exists()


def test_compare_torch_end_to_end_with_a_fake_interpreter(fake_worker, tmp_path, capsys):
    python, behave = fake_worker
    behave(failing_at_warmup=["compile"], failing_on_request=["channels_last"],
           seconds={"eager": 2.0})
    result = throughput.main([
        "--tiny", "--batch-size", "4", "--warmup", "0", "--steps", "2", "--no-plot",
        "--peak-matmul-size", "64", "--out", str(tmp_path), "--compare-torch",
        "--torch-python", python, "--torch-batch-size", "4", "--torch-rounds", "2"])
    # only what the comparison needs: small_cnn float32, the two kinds
    assert [(r["model"], r["dtype"], r["kind"]) for r in result["results"]] == [
        ("small_cnn", "float32", "pretrain"), ("small_cnn", "float32", "frozen_prefix")]
    comparison = result["torch"]
    assert comparison["torch"]["threads"] == 7 and comparison["rounds"] == 2
    for kind, examples in (("pretrain", 16), ("frozen_prefix", 4)):
        block = comparison["kinds"][kind]
        assert block["examples_per_step"] == examples
        auxtl_rounds = block["auxtl"]["round_times_s"]
        assert [len(r) for r in auxtl_rounds] == [2, 2]
        eager = block["torch"]["eager"]
        assert eager["round_times_s"] == [[2.0, 2.0], [2.0, 2.0]]
        expected = [statistics.median(r) / 2.0 for r in auxtl_rounds]
        assert eager["round_ratios"] == pytest.approx(expected)
        assert eager["ratio_median"] == pytest.approx(statistics.median(expected))
        assert "mid-run" in block["torch"]["channels_last"]["error"]
        assert "fake compile failure" in block["torch"]["compile"]["error"]
    printed = capsys.readouterr().out
    assert re.search(r"\ntorch compile +failed: RuntimeError: fake compile failure\n", printed)
    assert re.search(r"\ntorch eager +[\d.]+ +[\d.]+-[\d.]+ +[\d.]+ +[\d.]+ \([\d.]+-[\d.]+\)\n",
                     printed)
    assert "auxtl/torch time (median of 2 paired rounds)" in printed
    assert torch_reference.LEGEND in printed
    written = json.loads((tmp_path / "throughput.json").read_text())
    assert written["torch"]["kinds"]["pretrain"]["torch"]["eager"]["round_ratios"] == \
        pytest.approx(comparison["kinds"]["pretrain"]["torch"]["eager"]["round_ratios"])
    assert "## PyTorch reference" in (tmp_path / "throughput.md").read_text()


def test_compare_torch_restricts_only_the_defaults():
    parse = lambda *argv: throughput.config_from_args(throughput.build_parser().parse_args(argv))
    plain = parse()
    assert plain.dtypes == DTYPES and plain.kinds == STEP_KINDS
    compared = parse("--compare-torch")
    assert (compared.models, compared.dtypes, compared.kinds) == (
        ("small_cnn",), ("float32",), ("pretrain", "frozen_prefix"))
    more = parse("--compare-torch", "--models", "small_cnn,resnet18", "--kinds", "inference")
    assert more.models == ("small_cnn", "resnet18") and more.kinds == ("inference",)


@pytest.mark.skipif(not os.access(REAL_TORCH, os.X_OK), reason=f"no {REAL_TORCH}")
def test_real_torch_worker_pairs_with_auxtl():
    comparison = torch_reference.compare_torch(
        BenchConfig(steps=1, warmup=1), REAL_TORCH, batch_size=4, rounds=1,
        modes=("eager", "channels_last"), log=lambda _: None)   # compile: ~30 s, skipped
    assert comparison["torch"]["torch_version"].startswith("2.")
    assert comparison["torch"]["threads"] >= 1
    for kind in ("pretrain", "frozen_prefix"):
        for mode in ("eager", "channels_last"):
            entry = comparison["kinds"][kind]["torch"][mode]
            assert "error" not in entry, entry["error"]
            assert len(entry["round_ratios"]) == 1 and entry["ratio_median"] > 0
            assert len(entry["warmup_s"]) == 1
