"""`pip install .` (not editable) puts auxtl and its built-in tasks in place."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_lists_rotation(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(REPO)], check=True,
                   cwd=tmp_path)
    assert (site / "auxtl" / "tasks" / "rotation.py").is_file()
    assert (site / "auxtl" / "datasets" / "mnist5k.npz").is_file()
    assert (site / "auxtl" / "cpu" / "native" / "onednn_conv.cc").is_file()
    assert (site / "auxtl" / "cpu" / "native" / "winograd_conv.cc").is_file()
    assert (site / "auxtl" / "cpu" / "__init__.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import auxtl; print(auxtl.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    listed = subprocess.run([str(site / "bin" / "auxtl"), "tasks"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    assert listed.stdout.startswith("rotation") or "\nrotation" in listed.stdout
