"""Build auxtl's C++ XLA FFI handlers (`auxtl/cpu/native/*.cc`) on first use and cache them.

A library is compiled once per source text, command, compiler version, jax version and
whatever else its caller puts in the key (a oneDNN version, this CPU's instruction set
for `-march=native`), into `$AUXTL_CACHE_DIR/native` (default `~/.cache/auxtl/native`).
It is built beside its target and renamed, so concurrent processes never load a
partial file.

A cached library is code this process will run, so the cache must be private
(`auxtl.user_cache`): every directory from the cache root down to the library, and the
library itself, must be owned by the current user and not writable by group or others.
Anything else is refused with `UnsafeCacheError` (naming the path and what is wrong)
rather than loaded; new directories are created with mode 0o700.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import jax

from auxtl import user_cache
from auxtl.user_cache import cache_root

SOURCES = pathlib.Path(__file__).with_name("native")


class BuildError(RuntimeError):
    """The compiler could not be run, or failed."""


class UnsafeCacheError(BuildError, user_cache.UnsafeCacheError):
    """A cache directory or library that another user could have written: not loaded."""


_WHAT = "the native library cache"


def check_private(paths: Iterable[pathlib.Path]) -> None:
    """`auxtl.user_cache.check_private` for this cache (UnsafeCacheError is a BuildError)."""
    try:
        user_cache.check_private(paths, _WHAT)
    except user_cache.UnsafeCacheError as error:
        raise UnsafeCacheError(str(error)) from None


def private_directory(root: pathlib.Path, directory: pathlib.Path) -> None:
    """`auxtl.user_cache.private_directory` for this cache."""
    try:
        user_cache.private_directory(root, directory, _WHAT)
    except user_cache.UnsafeCacheError as error:
        raise UnsafeCacheError(str(error)) from None


def cache_dir() -> pathlib.Path:
    return cache_root() / "native"


def compiler() -> str | None:
    """`$CXX`, else `c++` or `g++` on PATH, else None."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@functools.cache
def compiler_identity(command: str) -> str:
    """The first line of `command --version` (e.g. "c++ (Debian 12.2.0-14) 12.2.0"), or
    why it could not be read; cached per process. Part of a library's key, so that an
    upgraded compiler rebuilds rather than reusing the old one's output."""
    try:
        result = subprocess.run([command, "--version"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{command}: --version failed: {error}"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return f"{command}: {lines[0] if lines else 'no --version output'}"


def library_key(source_text: str, command: Sequence[str], compiler_id: str,
                jax_version: str, key_parts: Sequence[str] = ()) -> str:
    """16 hex digits of SHA-256 over everything that determines a library's contents."""
    text = "\0".join([source_text, *command, compiler_id, jax_version, *key_parts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def library_path(source: pathlib.Path, command: Sequence[str], *,
                 key_parts: Sequence[str] = ()) -> pathlib.Path:
    """Where the library of `source` built by `command` lives in the cache: its name
    carries the key of the source text, the command, the compiler's `--version`
    (`command[0]`), the jax version and `key_parts`."""
    key = library_key(source.read_text(), command, compiler_identity(command[0]),
                      jax.__version__, key_parts)
    return cache_dir() / f"auxtl_{source.stem}-{key}.so"


def build_library(source: pathlib.Path, command: Sequence[str], *,
                  key_parts: Sequence[str] = ()) -> pathlib.Path:
    """The compiled library of `source` (`library_path`): `command`, with "{out}"
    standing for the output path, run once per key. Raises UnsafeCacheError where the
    cache (or a library already in it) is not private, BuildError where the build fails."""
    root, target = cache_root(), library_path(source, command, key_parts=key_parts)
    private_directory(root, target.parent)
    if os.path.lexists(target):
        check_private([target])
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = pathlib.Path(scratch) / target.name
        run = [part.replace("{out}", str(partial)) for part in command]
        try:
            result = subprocess.run(run, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildError(f"{command[0]}: {error}") from error
        if result.returncode != 0:
            raise BuildError(f"{' '.join(run)} exited {result.returncode}: "
                             f"{result.stderr.strip()[-2000:]}")
        os.chmod(partial, 0o700)
        os.replace(partial, target)
    check_private([target])
    return target


def register(library: pathlib.Path, targets: Mapping[str, str] | Sequence[str]) -> None:
    """Loads `library` and registers its handler symbols as CPU FFI targets of the same name."""
    lib = ctypes.cdll.LoadLibrary(str(library))
    for target in (targets.values() if isinstance(targets, Mapping) else targets):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)),
                                    platform="cpu")
