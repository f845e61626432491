"""Keep freed host memory mapped, so XLA:CPU's per-step buffers stop page-faulting.

XLA's CPU runtime allocates each execution's temporary buffer with `malloc` and
frees it when the execution ends. glibc serves a large block from a fresh `mmap`
(always above 32 MB, and for any block too big for a worker thread's arena) and
unmaps it on `free`, so every step faults every page in again (benchmarks/NOTES.md,
section 5). Restricting malloc to its main arena, without mmap and without trimming
the heap, keeps freed pages mapped and reuses them from the next step on.

The setting is process-wide and lasts for the process: `auxtl`'s command line
applies it at start, unless JAX will run on a GPU or TPU (device buffers do not
come from malloc); a script calls `auxtl.keep_freed_memory()` before its first JAX
computation. The cost is that the process keeps its peak heap size (it never gives
freed memory back to the system), and all threads share one malloc arena. The
"host_memory" component of AUXTL_CPU_KERNELS (`auxtl.cpu.switch`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import jax   # importing JAX starts no threads; its first computation does

from auxtl.cpu import switch

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1     # bytes of free heap top kept before trimming (int max)

_status: str | None = None


def keep_freed_memory() -> str:
    """Configures glibc malloc once per process; returns what was done, in words.

    "applied", or why not: "off (AUXTL_CPU_KERNELS=0)", "skipped: ..." (JAX will run
    on a GPU/TPU: JAX_PLATFORMS or an installed plugin says so), "not glibc (...)",
    "not applied: JAX's backend had already started", "failed: ...". It must run
    before the first JAX computation: threads XLA has started keep their own malloc
    arenas, whose large blocks are mmapped whatever the settings.
    """
    global _status
    if _status is None:
        _status = _configure()
    return _status


def status() -> str:
    """What `keep_freed_memory` did in this process; "not configured" before it ran
    (or why it would not run: the switch is off)."""
    if _status is None and not switch.enabled("host_memory"):
        return switch.off_reason("host_memory")
    return _status or "not configured"


def _configure() -> str:
    if not switch.enabled("host_memory"):
        return switch.off_reason("host_memory")
    skip = _accelerator_expected()
    if skip:
        return f"skipped: {skip}; the page faults are XLA:CPU's (JAX_PLATFORMS=cpu applies it)"
    if _jax_backend_started():
        # Measured: applied after XLA's threads started, every step still faulted its
        # buffer in (the threads keep their arenas) and the step got slower.
        return "not applied: JAX's backend had already started"
    libc = _glibc()
    if isinstance(libc, str):
        return libc
    settings = {"arena_max": (_M_ARENA_MAX, 1), "mmap_max": (_M_MMAP_MAX, 0),
                "trim_threshold": (_M_TRIM_THRESHOLD, _NEVER_TRIM)}
    rejected = [label for label, (param, value) in settings.items()
                if libc.mallopt(param, value) != 1]
    if rejected:
        return f"failed: mallopt rejected {', '.join(rejected)}"
    return "applied"


def _accelerator_expected() -> str | None:
    return accelerator_reason(jax.config.jax_platforms, _accelerator_plugins)


def accelerator_reason(requested: str | None, plugins) -> str | None:
    """Why JAX will run on an accelerator, or None: the requested platforms (JAX_PLATFORMS,
    first one wins) decide; else any installed plugin (`plugins()` lists them) does."""
    if requested:
        first = requested.split(",")[0].strip().lower()
        return None if first == "cpu" else f"JAX_PLATFORMS={requested}"
    found = plugins()
    return f"accelerator plugins installed ({', '.join(found)})" if found else None


def _accelerator_plugins() -> list[str]:
    """JAX's PJRT plugins and libtpu, looked up where JAX looks, without importing them."""
    import importlib.util
    import pkgutil
    from importlib import metadata
    names = {entry.name for entry in metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    if importlib.util.find_spec("libtpu") is not None:
        names.add("libtpu")
    return sorted(names)


def _glibc():
    if not sys.platform.startswith("linux"):
        return f"not glibc ({sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only; musl and others lack it
    except (OSError, AttributeError) as error:
        return f"not glibc ({error})"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def _jax_backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False
