"""The command line's persistent compilation cache: where it lives, when it stays off."""

import os
import subprocess
import sys

import jax
import pytest

from auxtl import compile_cache
from auxtl.errors import AuxtlWarning


@pytest.fixture
def jax_cache_config():
    """Restores the JAX settings enable_compilation_cache changes."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_folder_is_private_and_keyed_by_the_cpu(tmp_path, monkeypatch, jax_cache_config):
    monkeypatch.setenv("AUXTL_CACHE_DIR", str(tmp_path / "cache"))
    folder = compile_cache.enable_compilation_cache({})
    assert folder == compile_cache.cache_folder()
    assert folder.parent == tmp_path / "cache" / "xla" and len(folder.name) == 16
    assert folder.is_dir() and folder.stat().st_mode & 0o077 == 0
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    monkeypatch.setattr(compile_cache, "cpu_signature", lambda: "machine: other\nflags: sse2")
    assert compile_cache.cache_folder() != folder   # another CPU, another folder


@pytest.mark.parametrize("environ", [{"AUXTL_COMPILATION_CACHE": "0"},
                                     {"AUXTL_COMPILATION_CACHE": "off"},
                                     {"JAX_COMPILATION_CACHE_DIR": "/somewhere/else"}])
def test_switched_off_or_left_to_jax(environ, tmp_path, monkeypatch, jax_cache_config):
    monkeypatch.setenv("AUXTL_CACHE_DIR", str(tmp_path / "cache"))
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable_compilation_cache(environ) is None
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "cache").exists()


def test_a_folder_others_can_write_is_not_used(tmp_path, monkeypatch, jax_cache_config):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    monkeypatch.setenv("AUXTL_CACHE_DIR", str(root))
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(AuxtlWarning, match=r"without a persistent cache: .*writable by group"):
        assert compile_cache.enable_compilation_cache({}) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_the_command_line_fills_it(tmp_path):
    """A real `auxtl.cli.main` process: its compilations land in the cache folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["AUXTL_CACHE_DIR"] = str(tmp_path)
    code = ("import jax, jax.numpy as jnp\n"
            "from auxtl.cli import main\n"
            "from auxtl.compile_cache import cache_folder\n"
            "assert main(['tasks']) == 0\n"
            "jax.jit(lambda x: x * 3 + 1)(jnp.ones(5)).block_until_ready()\n"
            "print(cache_folder())\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    folder = done.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(tmp_path / "xla"))
    assert any(name.endswith("-cache") for name in os.listdir(folder))
