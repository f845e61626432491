"""keep_freed_memory: XLA:CPU's per-execution buffers stop page-faulting once applied."""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from auxtl import host_memory

# One process per case: the setting is process-wide and must precede JAX's backend.
PROBE = r"""
import json, resource, sys
from auxtl import host_memory
if sys.argv[1] == "late":
    import jax.numpy as jnp
    jnp.ones(3).block_until_ready()
status = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    y = jax.lax.optimization_barrier(jnp.sin(x) + 1.0)  # a 64 MB temporary buffer
    return jnp.sum(y * y)

x = jnp.ones((16 * 2**20,), jnp.float32)
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"status": status, "faults": faults}))
"""


def probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def thp_always() -> bool:
    path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_applied_before_jax_keeps_buffers_mapped():
    kept = probe("early", AUXTL_KEEP_FREED_MEMORY="1")
    default = probe("early", AUXTL_KEEP_FREED_MEMORY="0")
    assert kept["status"] == "applied"
    assert default["status"] == "off (AUXTL_KEEP_FREED_MEMORY=0)"
    # 64 MB in 4 KiB pages is 16384 faults when glibc mmaps the buffer afresh. With the
    # setting the heap still grows during the first calls (measured: up to ~14 calls
    # fault, settling in 2-7), so the steady state is the median of the last 12.
    assert statistics.median(kept["faults"][-12:]) < 100, kept
    if not thp_always():   # with huge pages everywhere the default faults 512x less
        assert statistics.median(default["faults"][-12:]) > 10000, default


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_refused_once_jax_has_started():
    late = probe("late", AUXTL_KEEP_FREED_MEMORY="1")
    assert late["status"] == "not applied: JAX's backend had already started"


def test_command_line_applies_it_first():
    code = ("import sys; from auxtl import cli, host_memory; "
            "assert host_memory.status() == 'not configured'; "
            "cli.main(['models']); print(host_memory.status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300, check=True)
    expected = "applied" if sys.platform.startswith("linux") else "not glibc"
    assert out.stdout.strip().splitlines()[-1].startswith(expected), out.stdout


def test_skipped_when_jax_will_run_on_an_accelerator():
    code = "from auxtl import host_memory; print(host_memory.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cuda"}, timeout=300, check=True)
    assert out.stdout.strip().startswith("skipped: JAX_PLATFORMS=cuda"), out.stdout


def test_accelerator_reason():
    no_plugins, cuda = (lambda: []), (lambda: ["xla_cuda12"])
    assert host_memory.accelerator_reason(None, no_plugins) is None
    assert host_memory.accelerator_reason("cpu", cuda) is None   # asked for: CPU wins
    assert host_memory.accelerator_reason("tpu,cpu", no_plugins) == "JAX_PLATFORMS=tpu,cpu"
    assert host_memory.accelerator_reason(None, cuda) == \
        "accelerator plugins installed (xla_cuda12)"
    plugins = host_memory._accelerator_plugins()
    assert plugins == sorted(plugins) and all(isinstance(p, str) for p in plugins)


def test_status_is_remembered():
    first = host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory() == first == host_memory.status()
