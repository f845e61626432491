"""What a benchmark ran on (device, versions, host), and the bench's only calls into
auxtl's CPU kernels: their status, the FLOPs of their custom calls (which XLA's cost
analysis does not count) and the host-memory setting."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from typing import Any

import jax

from auxtl import cpu


def keep_freed_memory() -> None:
    """The host-memory setting every benchmark runs under (a no-op when the CLI already
    applied it); see `auxtl.cpu`."""
    cpu.keep_freed_memory()


def custom_call_flops(hlo_text: str) -> float:
    """FLOPs of auxtl's CPU-kernel custom calls in a compiled module's HLO text, counted
    as XLA counts the direct convolutions they compute (`auxtl.cpu.convolution_flops`)."""
    return cpu.convolution_flops(hlo_text)


def environment() -> dict[str, Any]:
    """The device, library versions, host and CPU-kernel settings a result was measured
    with; saved in every benchmark's JSON."""
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "device_platform": device.platform, "devices_available": jax.device_count(),
            "jax_version": jax.__version__, "jaxlib_version": _version("jaxlib"),
            "flax_version": _version("flax"), "python": platform.python_version(),
            "host": platform.node(), "cpu_count": os.cpu_count(),
            "default_matmul_precision": jax.config.jax_default_matmul_precision,
            # compile times measured with a persistent cache may be cache loads
            "compilation_cache": jax.config.jax_compilation_cache_dir,
            "cpu_kernels": cpu.status(), "cpu": cpu_description()}


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU as a line to print beside a number: model, vector extensions (AVX2,
    AVX-512 subsets), logical cores; the platform's processor string where /proc/cpuinfo
    is missing (not Linux)."""
    try:
        text = open(cpuinfo).read()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    avx512 = sorted(f[len("avx512"):].lstrip("_") for f in flags if f.startswith("avx512"))
    vector = ("AVX-512 " + "/".join(avx512) if avx512
              else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{model}, {vector}, {os.cpu_count()} cores"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except Exception:  # noqa: BLE001
        return None


def environment_brief() -> dict[str, str]:
    """Device kind, backend and JAX version: the part of `environment` every row carries."""
    return {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax_version": jax.__version__}
