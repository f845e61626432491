"""read_torch: torch.save zips read without torch, against files real PyTorch wrote
(tests/fixtures/interop, see make_torch_fixtures.py), and pickles that must be refused."""

from __future__ import annotations

import copyreg
import json
import os
import pathlib
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from auxtl.errors import InputError, MissingFileError, UnsafeFileError
from auxtl.interop import torch_pickle, torch_zip
from auxtl.interop.torch_pickle import flatten, read_torch, strided_copy

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "interop"
FACTS = json.loads((FIXTURES / "fixtures.json").read_text())


# --- building torch-like zips by hand -----------------------------------------------

def _prim(value) -> bytes:
    """Pickle opcodes pushing a plain value (PROTO and STOP stripped)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor_ops(storage: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """What torch writes for one tensor: _rebuild_tensor_v2(persistent storage, ...)."""
    persistent = (b"(" + _prim("storage") + _global("torch", storage) + _prim(key)
                  + _prim("cpu") + _prim(numel) + b"tQ")
    hooks = _global("collections", "OrderedDict") + b")R"
    return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + persistent + _prim(offset)
            + _prim(tuple(size)) + _prim(tuple(stride)) + b"\x89" + hooks + b"tR")


def _dict_pickle(items: dict[str, bytes]) -> bytes:
    body = b"".join(_prim(name) + ops for name, ops in items.items())
    return b"\x80\x02}(" + body + b"u."


def _write_zip(path: pathlib.Path, data_pkl: bytes, storages=None, extra=None,
               compression=zipfile.ZIP_STORED) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
        for name, raw in (extra or {}).items():
            zf.writestr(f"archive/{name}", raw)
    return path


# --- files real PyTorch wrote -------------------------------------------------------

def test_resnet18_state_dict_reads_back_as_torch_wrote_it():
    source = read_torch(FIXTURES / "resnet18_w8.pt")
    shapes = FACTS["state_dict_shapes"]["resnet18_w8"]
    assert (source.format, source.layout) == ("torch", "torch")
    assert list(source.tensors) == list(shapes)  # file order
    assert {k: list(v) for k, v in source.shapes().items()} == shapes
    reference = np.load(FIXTURES / "resnet18_w8_reference.npz")
    for name in reference.files:
        got, want = source.tensors[name], reference[name]
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert source.tensors["bn1.num_batches_tracked"].dtype == np.int64
    assert source.info["non_tensors"] == [] and source.info["byteorder"] == "little"


def test_ddp_checkpoint_flattens_to_the_same_tensors_and_names_the_rest():
    plain = read_torch(FIXTURES / "resnet18_w8.pt")
    checkpoint = read_torch(FIXTURES / "resnet18_w8_checkpoint.pth")
    assert checkpoint.info["non_tensors"] == ["epoch", "arch"]
    inner = checkpoint.select("state_dict.module.")
    assert list(inner.tensors) == list(plain.tensors)
    for name, array in plain.tensors.items():
        assert np.array_equal(inner.tensors[name], array), name


def test_timm_resnet50_names_and_shapes():
    source = read_torch(FIXTURES / "resnet50_timm_w4.pt")
    assert {k: list(v) for k, v in source.shapes().items()} == \
        FACTS["state_dict_shapes"]["resnet50_timm_w4"]
    assert all(a.dtype in (np.float32, np.int64) for a in source.tensors.values())


def test_dtypes_views_and_shared_storages():
    source = read_torch(FIXTURES / "dtypes.pt")
    reference = np.load(FIXTURES / "dtypes_reference.npz")
    assert list(source.tensors) == reference.files
    assert source.tensors["bf16"].dtype == ml_dtypes.bfloat16
    assert source.tensors["f8"].dtype == ml_dtypes.float8_e4m3fn  # via _rebuild_tensor_v3
    for name in reference.files:
        got, want = source.tensors[name], reference[name]
        if name not in ("bf16", "f8"):  # stored as float32 in the npz
            assert got.dtype == want.dtype, name
        assert got.shape == want.shape and np.array_equal(got.astype(want.dtype), want), name
    assert source.tensors["transposed"].flags.c_contiguous
    head, step = source.tensors["nested.head"], source.tensors["nested.step"]
    head[1] = -1.0  # nested.head and nested.step shared one storage in torch
    assert step[0] == reference["nested.step"][0] == 1.0


# --- hand-built zips: the reader's arithmetic -----------------------------------------

def test_offset_stride_and_big_endian_storages(tmp_path):
    values = np.arange(12, dtype=np.float32)
    data = _dict_pickle({"t": _tensor_ops("FloatStorage", "0", 12, 1, (3, 2), (1, 4))})
    little = read_torch(_write_zip(tmp_path / "l.pt", data, {"0": values.tobytes()}))
    want = np.array([[1, 5], [2, 6], [3, 7]], np.float32)
    assert np.array_equal(little.tensors["t"], want)
    big = read_torch(_write_zip(tmp_path / "b.pt", data, {"0": values.astype(">f4").tobytes()},
                                {"byteorder": b"big"}))
    assert big.info["byteorder"] == "big" and np.array_equal(big.tensors["t"], want)
    bits = np.array([1.5, -2.0], ml_dtypes.bfloat16).view(np.uint16)
    bf16 = _dict_pickle({"h": _tensor_ops("BFloat16Storage", "0", 2, 0, (2,), (1,))})
    path = _write_zip(tmp_path / "h.pt", bf16, {"0": bits.astype(">u2").tobytes()},
                      {"byteorder": b"big"})
    assert read_torch(path).tensors["h"].astype(np.float32).tolist() == [1.5, -2.0]


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    data = _dict_pickle({"t": _tensor_ops("FloatStorage", "0", 4, 2, (3,), (1,))})
    path = _write_zip(tmp_path / "oob.pt", data, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(InputError, match=r"reaches element 4 of a storage of 4"):
        read_torch(path)
    with pytest.raises(InputError, match="do not match"):
        strided_copy(np.zeros(4, np.float32), 0, (2,), (-1,))


def test_flatten_names_nested_leaves_and_refuses_duplicates():
    tensors, others = flatten({"a": {"b": np.zeros(1), "n": 3}, "l": [np.ones(1)], "s": "x"}, "p")
    assert list(tensors) == ["a.b", "l.0"] and others == ["a.n", "s"]
    with pytest.raises(InputError, match="'a.b' occurs twice"):
        flatten({"a.b": np.zeros(1), "a": {"b": np.zeros(1)}}, "p")
    deep: dict = {}
    for _ in range(10 ** 4):
        deep = {"d": deep}
    with pytest.raises(InputError, match="nests too deeply"):
        flatten(deep, "p")


# --- refusals ----------------------------------------------------------------------

class _Exploit:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


class UserModule:  # stands in for a pickled nn.Module subclass
    pass


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL
@pytest.mark.parametrize("attack", ["system", "exec", "user_class"])
def test_pickles_naming_other_globals_are_refused_without_effect(tmp_path, protocol, attack):
    marker = tmp_path / "marker"
    payload = {"system": _Exploit(os.system, f"touch {marker}"),
               "exec": _Exploit(exec, f"open({str(marker)!r}, 'w').close()"),
               "user_class": UserModule()}[attack]
    path = _write_zip(tmp_path / "evil.pt", pickle.dumps({"w": payload}, protocol=protocol))
    builtins = "builtins" if protocol >= 3 else "__builtin__"  # as pickle writes it
    expected = {"system": os.system.__module__ + ".system", "exec": f"{builtins}.exec",
                "user_class": f"{__name__}.UserModule"}[attack]
    with pytest.raises(UnsafeFileError, match="save model.state_dict\\(\\) instead") as raised:
        read_torch(path)
    assert expected in str(raised.value) and str(path) in str(raised.value)
    assert not marker.exists()


def test_extension_opcodes_are_refused_even_when_cached(tmp_path):
    marker = tmp_path / "marker"
    code = 0x7FFFF0
    copyreg.add_extension(os.system.__module__, "system", code)
    try:
        data = pickle.dumps(_Exploit(os.system, f"touch {marker}"), protocol=2)
        assert b"\x84" in data  # EXT4
        copyreg._extension_cache[code] = os.system  # resolved before: skips find_class
        with pytest.raises(UnsafeFileError, match="EXT4"):
            read_torch(_write_zip(tmp_path / "ext.pt", data))
    finally:
        copyreg.remove_extension(os.system.__module__, "system", code)
    assert not marker.exists()


def test_a_pickled_module_and_unknown_persistent_ids_are_refused(tmp_path):
    module = b"\x80\x02" + _global("torch.nn.modules.linear", "Linear") + b")\x81."
    with pytest.raises(UnsafeFileError, match=r"torch\.nn\.modules\.linear\.Linear.*"
                                              r"save model\.state_dict\(\) instead"):
        read_torch(_write_zip(tmp_path / "m.pt", module))
    persid = b"\x80\x02" + _prim(("file", "/etc/passwd")) + b"Q."
    with pytest.raises(UnsafeFileError, match="unknown persistent id"):
        read_torch(_write_zip(tmp_path / "p.pt", persid))


def test_files_that_are_not_torch_save_zips_are_named(tmp_path):
    with pytest.raises(MissingFileError, match="nothing.pt does not exist"):
        read_torch(tmp_path / "nothing.pt")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(InputError, match="legacy format"):
        read_torch(legacy)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(InputError, match="notes.pt is not a PyTorch file"):
        read_torch(text)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((FIXTURES / "dtypes.pt").read_bytes()[:1000])
    with pytest.raises(InputError, match="cut.pt is a damaged or truncated zip"):
        read_torch(truncated)
    script = _write_zip(tmp_path / "ts.pt", b"\x80\x02}.", extra={"constants.pkl": b"",
                                                               "code/m.py": b""})
    with pytest.raises(InputError, match="TorchScript"):
        read_torch(script)
    bare = _tensor_ops("FloatStorage", "0", 1, 0, (), ())
    single = _write_zip(tmp_path / "one.pt", b"\x80\x02" + bare + b".",
                        {"0": struct.pack("<f", 1.0)})
    with pytest.raises(InputError, match="single tensor, not a state dict"):
        read_torch(single)


def test_a_missing_storage_is_named(tmp_path):
    with zipfile.ZipFile(FIXTURES / "dtypes.pt") as source:
        names = source.namelist()
        dropped = next(n for n in names if "/data/" in n)
        path = tmp_path / "dtypes_cut.pt"
        with zipfile.ZipFile(path, "w") as target:
            for name in names:
                if name != dropped:
                    target.writestr(name, source.read(name))
    with pytest.raises(InputError, match=f"storage {dropped} is missing"):
        read_torch(path)


# --- hostile pickles aimed at memory, time and the allow-list itself --------------------

def _allow_list_state() -> dict:
    """Everything a BUILD could rewrite in the allow-list, copied out."""
    state = {}
    for key, value in torch_pickle._ALLOWED.items():
        function = getattr(value, "function", None)
        state[key] = (value, getattr(value, "name", None), getattr(value, "dtype", None),
                      function, getattr(function, "__defaults__", None),
                      getattr(function, "__kwdefaults__", None),
                      dict(getattr(function, "__dict__", {})),
                      getattr(function, "__code__", None))
    return state


@pytest.mark.parametrize("target, state, named", [
    (("torch._utils", "_rebuild_parameter"), (None, {"__defaults__": (True, None, None)}),
     "torch._utils._rebuild_parameter"),
    (("torch._utils", "_rebuild_tensor_v2"), {"injected": 1}, "torch._utils._rebuild_tensor_v2"),
    (("torch", "FloatStorage"), ("FloatStorage", "<f8"), "torch.FloatStorage"),
    (("torch", "float16"), ("float16", "<f4"), "torch.float16"),
    (("collections", "OrderedDict"), (None, {"__init__": None}), "collections.OrderedDict"),
])
def test_build_aimed_at_an_allowed_global_is_refused_and_changes_nothing(
        tmp_path, target, state, named):
    before = _allow_list_state()
    data = b"\x80\x02" + _global(*target) + _prim(state) + b"b0" + _prim({}) + b"."
    with pytest.raises(UnsafeFileError, match=f"BUILD opcode tries to rewrite {named}") as raised:
        read_torch(_write_zip(tmp_path / "build.pt", data))
    assert str(tmp_path / "build.pt") in str(raised.value)
    assert _allow_list_state() == before
    assert torch_pickle._ALLOWED["torch", "FloatStorage"].dtype == np.float32


def test_build_aimed_at_a_storage_is_refused(tmp_path):
    persistent = (b"(" + _prim("storage") + _global("torch", "FloatStorage") + _prim("0")
                  + _prim("cpu") + _prim(1) + b"tQ")
    data = b"\x80\x02" + persistent + _prim(("0", "<f8", None)) + b"b."
    with pytest.raises(UnsafeFileError, match="rewrite storage 0"):
        read_torch(_write_zip(tmp_path / "s.pt", data, {"0": np.zeros(1, np.float32).tobytes()}))


def test_a_tensor_holding_more_elements_than_its_storage_is_refused(tmp_path):
    bomb = _tensor_ops("FloatStorage", "0", 4, 0, (1 << 20, 1 << 20), (0, 0))
    path = _write_zip(tmp_path / "bomb.pt", _dict_pickle({"t": bomb}),
                      {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(InputError, match=r"size \(1048576, 1048576\), stride \(0, 0\) holds "
                                         r"1099511627776 elements, more than its storage of 4"):
        read_torch(path)
    with pytest.raises(InputError, match="holds 3 elements, more than its storage of 2"):
        strided_copy(np.zeros(2, np.float32), 0, (3,), (0,))  # in bounds, but expands
    with pytest.raises(InputError, match="holds 4 elements, more than its storage of 3"):
        strided_copy(np.zeros(3, np.float32), 0, (2, 2), (1, 1))  # overlapping strides
    assert strided_copy(np.arange(4, dtype=np.float32), 0, (2, 2), (1, 2)).tolist() == \
        [[0, 2], [1, 3]]


def test_running_out_of_memory_on_a_malformed_file_names_it(tmp_path, monkeypatch):
    def exhausted(*args):
        raise MemoryError
    monkeypatch.setattr(torch_zip, "native_elements", exhausted)
    with pytest.raises(InputError, match=r"dtypes.pt: reading it ran out of memory"):
        read_torch(FIXTURES / "dtypes.pt")


def test_compressed_or_oversized_zip_entries_are_refused(tmp_path):
    data = _dict_pickle({"t": _tensor_ops("FloatStorage", "0", 1, 0, (1,), (1,))})
    raw = {"0": np.zeros(1, np.float32).tobytes()}
    deflated = _write_zip(tmp_path / "z.pt", data, raw, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError, match="zip entry archive/data.pkl is compressed"):
        read_torch(deflated)
    path = _write_zip(tmp_path / "big.pt", data, raw)
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        entry = zf.getinfo("archive/data/0")
    # the central directory's declared uncompressed size (offset 24 in its record)
    central = blob.index(b"archive/data/0", blob.index(b"PK\x01\x02")) - 46
    assert blob[central:central + 4] == b"PK\x01\x02" and entry.file_size == 4
    blob[central + 24:central + 28] = struct.pack("<I", 1 << 30)
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError, match=r"zip entry archive/data/0 declares 1073741824 bytes"):
        read_torch(path)


def test_shared_containers_are_refused_before_an_exponential_walk(tmp_path):
    shared: list = [np.zeros(1)]
    for _ in range(40):
        shared = [shared, shared]
    with pytest.raises(InputError, match=r"the list at 'x(\.0){39}\.1' also occurs elsewhere"):
        flatten({"w": np.ones(1), "x": shared}, "p")
    # the same through a pickle: its memo (BINPUT 1 / BINGET 1) shares one dict twice
    inner = b"}(" + _prim("w") + _tensor_ops("FloatStorage", "0", 1, 0, (1,), (1,)) + b"u"
    data = b"\x80\x02}(" + _prim("a") + inner + b"q\x01" + _prim("b") + b"h\x01u."
    path = _write_zip(tmp_path / "shared.pt", data, {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(InputError, match=r"shared.pt: the dict at 'b' also occurs elsewhere"):
        read_torch(path)
    cycle: list = [np.zeros(1)]
    cycle.append(cycle)
    with pytest.raises(InputError, match="contains itself"):
        flatten({"c": cycle}, "p")
    betas = (0.9, 0.999)  # optimizer param groups share defaults: leaves, not refused
    tensors, others = flatten({"w": np.zeros(1), "g": [{"betas": betas}, {"betas": betas}]}, "p")
    assert list(tensors) == ["w"] and others == ["g"]
