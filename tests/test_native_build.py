"""auxtl.cpu.native_build: the library cache is private (another user's or a group-writable
directory or library is refused, never loaded), and a library's key covers the compiler
version and the CPU (x86 and Arm /proc/cpuinfo alike)."""

import os
import pathlib
import stat

import pytest

from auxtl import user_cache
from auxtl.cpu import native_build, switch, winograd
from auxtl.errors import UnsafeFileError

SOURCE_TEXT = "// a stand-in source\n"

_ARM_CORE = """\
processor\t: {0}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""
ARM_CPUINFO = "\n".join(_ARM_CORE.format(core) for core in range(2))  # two identical cores

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme sse sse2 avx2 avx512f
cpu MHz\t\t: 2400.000

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme sse sse2 avx2 avx512f
cpu MHz\t\t: 3700.000
"""


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("AUXTL_CACHE_DIR", str(root))
    return root


@pytest.fixture
def source(tmp_path) -> pathlib.Path:
    path = tmp_path / "stand_in.cc"
    path.write_text(SOURCE_TEXT)
    return path


def fake_build(log: pathlib.Path) -> list[str]:
    """A build command that appends a line to `log` and writes a small output file."""
    return ["sh", "-c", f"echo built >> {log}; printf library > {{out}}"]


def test_a_build_makes_private_directories_and_is_reused(cache, source, tmp_path):
    log = tmp_path / "log"
    first = native_build.build_library(source, fake_build(log))
    assert first == native_build.library_path(source, fake_build(log))
    assert first.read_text() == "library" and first.parent == cache / "native"
    for path in (cache, cache / "native", first):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert native_build.build_library(source, fake_build(log)) == first
    assert log.read_text() == "built\n"    # built once, then found in the cache


@pytest.mark.parametrize("writable", ["root", "native"])
def test_a_group_writable_cache_directory_is_refused_naming_it(cache, source, tmp_path,
                                                               writable):
    (cache / "native").mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    bad = cache if writable == "root" else cache / "native"
    bad.chmod(0o770)
    log = tmp_path / "log"
    with pytest.raises(native_build.UnsafeCacheError,
                       match=f"{bad} is writable by group or others \\(mode 770\\)"):
        native_build.build_library(source, fake_build(log))
    assert not log.exists()    # nothing was built into it


def test_a_group_writable_library_is_refused(cache, source, tmp_path):
    log = tmp_path / "log"
    library = native_build.build_library(source, fake_build(log))
    library.chmod(0o720)
    with pytest.raises(UnsafeFileError, match=f"{library} is writable by group"):
        native_build.build_library(source, fake_build(log))


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_a_library_owned_by_someone_else_is_refused(cache, source, tmp_path, monkeypatch):
    log = tmp_path / "log"
    planted = native_build.library_path(source, fake_build(log))
    planted.parent.mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    planted.write_text("someone else's code")
    planted.chmod(0o700)
    # We run as root (uid 0) and own the file: pretend to be uid 4242, who owns the
    # directories but not the library.
    other = 4242
    for directory in (cache, planted.parent):
        os.chown(directory, other, -1)
    monkeypatch.setattr(os, "getuid", lambda: other)
    with pytest.raises(native_build.UnsafeCacheError,
                       match=f"{planted} is owned by uid 0, not the current user "
                             f"\\(uid {other}\\)"):
        native_build.build_library(source, fake_build(log))
    assert not log.exists()


def test_a_refused_cache_reaches_the_winograd_warning(cache, monkeypatch):
    if not native_build.compiler():
        pytest.skip("no C++ compiler")
    if not switch.enabled("winograd"):
        pytest.skip(f"Winograd convolutions: {switch.off_reason()}")
    cache.mkdir(mode=0o700)
    cache.chmod(0o777)
    with pytest.warns(RuntimeWarning, match=f"Winograd.*{cache} is writable by group"):
        status = winograd._set_up()    # the module's own status is left alone
    assert status.startswith("build failed: refusing the native library cache")


def test_the_key_changes_with_the_compiler_version(cache, source, monkeypatch):
    command = ["c++", "{out}"]
    monkeypatch.setattr(native_build, "compiler_identity", lambda c: f"{c} 12.2.0")
    old = native_build.library_path(source, command)
    monkeypatch.setattr(native_build, "compiler_identity", lambda c: f"{c} 13.1.0")
    new = native_build.library_path(source, command)
    assert old != new and old.parent == new.parent
    source.write_text(SOURCE_TEXT + "// changed\n")
    assert native_build.library_path(source, command) not in (old, new)


def test_the_compiler_identity_is_the_first_line_of_its_version(tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc (Fake) 9.9.9'\necho 'Copyright nobody'\n")
    fake.chmod(0o700)
    assert native_build.compiler_identity(str(fake)) == f"{fake}: fakecc (Fake) 9.9.9"
    missing = str(tmp_path / "no-such-compiler")
    assert native_build.compiler_identity(missing).startswith(f"{missing}: --version failed")


def test_arm_cpuinfo_gives_a_signature_of_implementer_part_and_features():
    signature = user_cache.cpu_signature_of(ARM_CPUINFO, "aarch64")
    assert signature.splitlines() == [
        "machine: aarch64",
        "CPU implementer: 0x41",
        "CPU part: 0xd0c",
        "CPU variant: 0x3",
        "Features: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid"]
    other_part = ARM_CPUINFO.replace("0xd0c", "0xd40")
    assert user_cache.cpu_signature_of(other_part, "aarch64") != signature


def test_x86_cpuinfo_gives_model_and_flags_and_no_text_still_a_signature():
    assert user_cache.cpu_signature_of(X86_CPUINFO, "x86_64", "x86_64").splitlines() == [
        "machine: x86_64", "flags: fpu vme sse sse2 avx2 avx512f",
        "model name: AMD EPYC 9654 96-Core Processor"]
    assert user_cache.cpu_signature_of("", "riscv64", "") == "machine: riscv64"
    assert user_cache.cpu_signature_of("", "", "") == "machine: unknown"
    assert user_cache.cpu_signature().startswith("machine: ")


def test_unsafe_reason_names_owner_and_mode():
    stat_of = lambda uid, mode: os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))
    assert user_cache.unsafe_reason(stat_of(7, stat.S_IFDIR | 0o755), 7) is None
    assert user_cache.unsafe_reason(stat_of(7, stat.S_IFDIR | 0o757), 7) == (
        "writable by group or others (mode 757)")
    assert user_cache.unsafe_reason(stat_of(8, stat.S_IFREG | 0o700), 7) == (
        "owned by uid 8, not the current user (uid 7)")
    assert user_cache.chain(pathlib.Path("/a"), pathlib.Path("/a/b/c")) == [
        pathlib.Path("/a"), pathlib.Path("/a/b"), pathlib.Path("/a/b/c")]
