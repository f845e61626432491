"""Build auxtl's C++ XLA FFI handlers (`auxtl/native/*.cc`) on first use and cache them.

A library is compiled once per source text, command, jax version and whatever else
its caller puts in the key (a oneDNN version, this CPU's instruction set for
`-march=native`), into `$AUXTL_CACHE_DIR/native` (default `~/.cache/auxtl/native`).
It is built beside its target and renamed, so concurrent processes never load a
partial file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence

import jax

SOURCES = pathlib.Path(__file__).with_name("native")


class BuildError(RuntimeError):
    pass


def cache_dir() -> pathlib.Path:
    root = os.environ.get("AUXTL_CACHE_DIR") or pathlib.Path.home() / ".cache" / "auxtl"
    return pathlib.Path(root) / "native"


def compiler() -> str | None:
    """`$CXX`, else `c++` or `g++` on PATH, else None."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def cpu_signature() -> str:
    """This CPU's model and instruction-set flags (Linux), for libraries built with
    `-march=native`: a cache shared between machines must not hand one the other's."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = [line for line in text.splitlines()
             if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build_library(source: pathlib.Path, command: Sequence[str], *,
                  key_parts: Sequence[str] = ()) -> pathlib.Path:
    """The compiled library of `source`: `command` with "{out}" standing for the output
    path, run once per key (source text, command, jax version, `key_parts`)."""
    key = hashlib.sha256("\0".join([source.read_text(), *command, jax.__version__,
                                    *key_parts]).encode()).hexdigest()[:16]
    target = cache_dir() / f"auxtl_{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
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
        os.replace(partial, target)
    return target


def register(library: pathlib.Path, targets: Mapping[str, str] | Sequence[str]) -> None:
    """Loads `library` and registers its handler symbols as CPU FFI targets of the same name."""
    lib = ctypes.cdll.LoadLibrary(str(library))
    for target in (targets.values() if isinstance(targets, Mapping) else targets):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)),
                                    platform="cpu")
