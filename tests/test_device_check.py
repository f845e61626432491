"""benchmarks/device_check.sh: the CPU dry run CI runs (every stage ok, results.json and
results.md written), and the driver's time box and missing-package message."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "device_check.sh"


def _driver():
    if str(REPO / "benchmarks") not in sys.path:   # as when run: its report module beside it
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("device_check",
                                                  REPO / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("device_check", module)   # its dataclasses look their module up
    spec.loader.exec_module(sys.modules["device_check"])
    return sys.modules["device_check"]


def test_dry_run_passes_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "device_check"
    done = subprocess.run([str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    stages = {s["name"]: s for s in results["stages"]}
    assert list(stages) == list(_driver().STAGES)
    assert results["ok"] and all(s["status"] == "ok" for s in stages.values()), stages
    assert results["meta"]["mode"] == "dry-run"
    for dtype in ("bfloat16", "float32"):
        row = stages[f"throughput_{dtype}"]["summary"]
        assert row["dtype"] == dtype and row["model"] == "small_cnn"
        assert row["step_images_per_s"] > 0 and row["input_images_per_s"] > 0
        assert row["bound"] in ("input", "step") and row["mfu"] > 0
    assert results["environment"]["backend"] == "cpu"
    assert stages["pretrain"]["summary"]["trained"].startswith("trained 2 steps")
    assert (out / "pretrain" / "trunk").is_dir()
    assert stages["transfer"]["summary"]["transfer"].startswith("transfer test accuracy")
    markdown = (out / "results.md").read_text()
    assert "| stage | status | seconds | limit s | summary |" in markdown
    for name in stages:
        assert f"| {name} | ok |" in markdown
    assert "| small_cnn | bfloat16 | 8 |" in markdown and "| small_cnn | float32 | 8 |" in markdown


def test_a_hanging_stage_is_killed_at_its_limit_and_recorded(tmp_path):
    driver = _driver()
    start = time.monotonic()
    record = driver.run_stage("hang", ["/bin/sh", "-c", "echo started; sleep 30"],
                              timeout_s=0.5, logs=tmp_path, env=dict(os.environ))
    assert time.monotonic() - start < 10
    assert record["status"] == "timeout" and "started" in record["tail"]
    failed = driver.run_stage("fail", ["/bin/sh", "-c", "echo broken >&2; exit 3"],
                              timeout_s=10, logs=tmp_path, env=dict(os.environ))
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert "broken" in failed["tail"]
    skipped = {"name": "later", "status": "skipped", "seconds": 0.0, "timeout_s": 0,
               "tail": "no time left in the budget"}
    markdown = driver.markdown({"meta": {"mode": "full", "budget_s": 450, "total_s": 12.0,
                                         "started_utc": "now"}, "ok": False, "environment": {},
                                "stages": [record, failed, skipped]})
    assert "FAILED" in markdown and "| hang | timeout |" in markdown
    assert "## fail: failed" in markdown and "broken" in markdown
    assert "| later | skipped | 0.0 | 0 | no time left in the budget |" in markdown


def test_a_missing_package_is_named(tmp_path, monkeypatch):
    driver = _driver()
    monkeypatch.setattr(driver, "REQUIRED", driver.REQUIRED + ("no_such_package_auxtl",))
    record = driver.install(sys.executable, dict(os.environ), 30, tmp_path)
    assert record["status"] == "failed"
    assert "missing Python packages: no_such_package_auxtl" in record["tail"]


def _wheel(folder, name: str) -> None:
    """A minimal pure-Python wheel of module `name` (what `pip download` would carry)."""
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


def test_carried_wheels_are_installed_offline_first(tmp_path, monkeypatch):
    driver = _driver()
    monkeypatch.setattr(driver, "REQUIRED", driver.REQUIRED + ("carried_pkg_auxtl",))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "carried_pkg_auxtl")
    env = dict(os.environ)
    record = driver.install(sys.executable, env, 60, tmp_path, wheels)
    assert record["status"] == "ok", record
    assert record["carried_wheels"]["wheels"] == ["carried_pkg_auxtl-1.0-py3-none-any.whl"]
    assert "carried_pkg_auxtl" in record["found"]
    assert record["carried_wheels"]["status"] == "ok" and env["PYTHONPATH"]
