"""A persistent XLA compilation cache for auxtl's command line.

Without it every `auxtl` process compiles its steps afresh, and the first trunk it
builds compiles an initializer for each new kernel shape (a ResNet-18 at width 8: about
11 s on a 2-core CPU, then 0.07 s; benchmarks/NOTES.md, "Issue 17"): every
`auxtl transfer` paid that. The command line turns on JAX's persistent compilation cache
(`jax_compilation_cache_dir`) in `$AUXTL_CACHE_DIR/xla/<cpu>` (default
`~/.cache/auxtl/xla/<cpu>`), so a second run loads what the first compiled. The library
API changes no global setting: only `auxtl.cli.main` calls `enable_compilation_cache`.

A cached executable is code the process runs, so the folder must be private, as the
native kernel cache (`auxtl.user_cache`): one another user
could write is not used (a warning says why, and the run goes on uncached). JAX's own
key names the backend and its version, not the CPU's instruction set, so the folder is
keyed by this CPU's signature (`auxtl.user_cache.cpu_signature`): an executable
compiled for AVX-512 never reaches a machine without it through a shared home folder.

`AUXTL_COMPILATION_CACHE=0` turns it off; a `JAX_COMPILATION_CACHE_DIR` the user set
wins (JAX reads it itself). Executables are cached whatever their compile time (eager
initializer ops compile in well under JAX's default 1 s threshold); the folder is an LRU
cache of at most `MAX_BYTES`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import warnings
from collections.abc import Mapping

import jax

from auxtl.errors import AuxtlWarning
from auxtl.user_cache import UnsafeCacheError, cache_root, cpu_signature, private_directory

SWITCH = "AUXTL_COMPILATION_CACHE"
MAX_BYTES = 2 * 1024 ** 3
_OFF = ("0", "off", "false", "no")


def cache_folder() -> pathlib.Path:
    """`<cache root>/xla/<16 hex digits of SHA-256 of this CPU's signature>`."""
    key = hashlib.sha256(cpu_signature().encode()).hexdigest()[:16]
    return cache_root() / "xla" / key


def enable_compilation_cache(environ: Mapping[str, str] | None = None) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at `cache_folder()`; returns it, or None
    where it stays off (switched off, the user's own JAX_COMPILATION_CACHE_DIR, or a
    folder that is not private or cannot be made). Call before the first compilation."""
    environ = os.environ if environ is None else environ
    if environ.get(SWITCH, "").strip().lower() in _OFF or environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = cache_folder()
    try:
        private_directory(cache_root(), folder, "the compilation cache")
    except (OSError, UnsafeCacheError) as error:
        warnings.warn(AuxtlWarning(f"compiling without a persistent cache: {error}; set "
                                   f"{SWITCH}=0 to silence this"), stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
