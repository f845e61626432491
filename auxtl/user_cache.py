"""auxtl's per-user cache folder: where it is, that it is private, which CPU it serves.

Two caches live under `$AUXTL_CACHE_DIR` (default `~/.cache/auxtl`): the CPU kernels'
compiled libraries (`auxtl.cpu`) and the command line's XLA executables
(`auxtl.compile_cache`). Both hold code the process will run, so every directory from
the cache root down to an entry must be owned by the current user and not writable by
group or others; new directories are made with mode 0o700. Both are keyed by this CPU's
signature where the code depends on the instruction set.
"""

from __future__ import annotations

import os
import pathlib
import platform
import stat
from collections.abc import Iterable

from auxtl.errors import UnsafeFileError

# /proc/cpuinfo keys that identify a CPU's model and instruction set: x86 ("model name",
# "flags"), Arm ("CPU implementer", "CPU part", "CPU variant", "Features").
CPU_KEYS = ("model name", "flags", "CPU implementer", "CPU part", "CPU variant", "Features")


class UnsafeCacheError(UnsafeFileError):
    """A cache directory or file that another user could have written: not used."""


def cache_root() -> pathlib.Path:
    """`$AUXTL_CACHE_DIR`, else `~/.cache/auxtl`."""
    return pathlib.Path(os.environ.get("AUXTL_CACHE_DIR")
                        or pathlib.Path.home() / ".cache" / "auxtl")


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
    none), for code compiled for this instruction set: a cache shared between machines
    must not hand one the other's."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return cpu_signature_of(text, platform.machine(), platform.processor())


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


def check_private(paths: Iterable[pathlib.Path], what: str = "the cache") -> None:
    """Raises UnsafeCacheError naming the first of `paths` (existing directories, or a
    regular file) that another user could have written; `what` names the cache."""
    uid = os.getuid()
    for path in paths:
        status = os.stat(path)
        reason = unsafe_reason(status, uid)
        if reason is None and not (stat.S_ISDIR(status.st_mode) or
                                   stat.S_ISREG(os.lstat(path).st_mode)):
            reason = "neither a directory nor a regular file"
        if reason:
            raise UnsafeCacheError(
                f"refusing {what}: {path} is {reason}; "
                f"use a private $AUXTL_CACHE_DIR or `chmod go-w` / chown it")


def private_directory(root: pathlib.Path, directory: pathlib.Path,
                      what: str = "the cache") -> None:
    """Creates `directory` (below `root`) and any missing directories from `root` down
    with mode 0o700 (those above `root` as `mkdir -p` does), then checks every directory
    from `root` down with `check_private`."""
    root.parent.mkdir(parents=True, exist_ok=True)
    for path in chain(root, directory):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
    check_private(chain(root, directory), what)
