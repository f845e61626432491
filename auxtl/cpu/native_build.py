"""Build auxtl's C++ XLA FFI handlers (`auxtl/cpu/native/*.cc`) on first use and cache them.

A library is compiled once per source text, command, compiler version, jax version and
whatever else its caller puts in the key (a oneDNN version, this CPU's instruction set
for `-march=native`), into `$AUXTL_CACHE_DIR/native` (default `~/.cache/auxtl/native`).
It is built beside its target and renamed, so concurrent processes never load a
partial file.

A cached library is code this process will run, so the cache must be private: every
directory from the cache root down to the library, and the library itself, must be
owned by the current user and not writable by group or others. Anything else is
refused with `UnsafeCacheError` (naming the path and what is wrong) rather than
loaded; new directories are created with mode 0o700.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import jax

from auxtl.errors import UnsafeFileError

SOURCES = pathlib.Path(__file__).with_name("native")

# /proc/cpuinfo keys that identify a CPU's model and instruction set: x86 ("model name",
# "flags"), Arm ("CPU implementer", "CPU part", "CPU variant", "Features").
CPU_KEYS = ("model name", "flags", "CPU implementer", "CPU part", "CPU variant", "Features")


class BuildError(RuntimeError):
    """The compiler could not be run, or failed."""


class UnsafeCacheError(BuildError, UnsafeFileError):
    """A cache directory or library that another user could have written: not loaded."""


def cache_root() -> pathlib.Path:
    """`$AUXTL_CACHE_DIR`, else `~/.cache/auxtl`."""
    return pathlib.Path(os.environ.get("AUXTL_CACHE_DIR")
                        or pathlib.Path.home() / ".cache" / "auxtl")


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


def cpu_signature_of(cpuinfo: str, machine: str, processor: str = "") -> str:
    """This CPU's identity from the text of /proc/cpuinfo: its model and instruction-set
    lines ("model name"/"flags" on x86, "CPU implementer"/"CPU part"/"CPU variant"/
    "Features" on Arm), one "key: value" per distinct line, sorted, after a "machine:"
    line from `machine` and `processor` (platform.machine(), platform.processor()), so
    the signature is never empty. Pure: the same text gives the same signature."""
    found = set()
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in CPU_KEYS:
            found.add(f"{key.strip()}: {' '.join(value.split())}")
    names = " ".join(part for part in dict.fromkeys((machine, processor)) if part)
    return "\n".join([f"machine: {names or 'unknown'}", *sorted(found)])


def cpu_signature() -> str:
    """This CPU's signature (`cpu_signature_of` /proc/cpuinfo, empty text where there is
    none), for libraries built with `-march=native`: a cache shared between machines
    must not hand one the other's."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return cpu_signature_of(text, platform.machine(), platform.processor())


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


def unsafe_reason(status: os.stat_result, uid: int) -> str | None:
    """Why a file or directory with this `os.stat` result cannot be trusted by user
    `uid` (owned by another user, or writable by group or others), or None."""
    problems = []
    if status.st_uid != uid:
        problems.append(f"owned by uid {status.st_uid}, not the current user (uid {uid})")
    if status.st_mode & 0o022:
        problems.append(f"writable by group or others (mode {stat.S_IMODE(status.st_mode):o})")
    return "; ".join(problems) or None


def chain(root: pathlib.Path, path: pathlib.Path) -> list[pathlib.Path]:
    """`root`, then each path below it down to and including `path` (inside `root`)."""
    relative = path.relative_to(root)
    return [root, *(root / pathlib.Path(*relative.parts[:i + 1])
                    for i in range(len(relative.parts)))]


def check_private(paths: Iterable[pathlib.Path]) -> None:
    """Raises UnsafeCacheError naming the first of `paths` (existing directories, or a
    regular file) that another user could have written."""
    uid = os.getuid()
    for path in paths:
        status = os.stat(path)
        reason = unsafe_reason(status, uid)
        if reason is None and not (stat.S_ISDIR(status.st_mode) or
                                   stat.S_ISREG(os.lstat(path).st_mode)):
            reason = "neither a directory nor a regular file"
        if reason:
            raise UnsafeCacheError(
                f"refusing the native library cache: {path} is {reason}; "
                f"use a private $AUXTL_CACHE_DIR or `chmod go-w` / chown it")


def private_directory(root: pathlib.Path, directory: pathlib.Path) -> None:
    """Creates `directory` (below `root`) and any missing directories from `root` down
    with mode 0o700 (those above `root` as `mkdir -p` does), then checks every directory
    from `root` down with `check_private`."""
    root.parent.mkdir(parents=True, exist_ok=True)
    for path in chain(root, directory):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
    check_private(chain(root, directory))


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
