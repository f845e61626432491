"""PyTorch `.pt`/`.pth` files read without PyTorch and without running pickled code.

`torch.save` (torch >= 1.6) writes a zip: `<root>/data.pkl` (a pickle of the saved
object), `<root>/data/<key>` (one raw storage per key), `<root>/byteorder` ("little" when
absent). The pickle names the functions that rebuild tensors; `read_torch` unpickles it
with an allow-list: each allowed global (tensor and parameter rebuilders, typed storage
classes, `OrderedDict`, `torch.Size`, `torch.device`) maps to a pure-Python stand-in
that builds numpy arrays, and any other global (a user class, `os.system`,
`builtins.exec`, a pickled `nn.Module`) raises `UnsafeFileError` when the pickle first
names it, before anything is called. The stand-ins are shared by every load, so each
refuses the pickle's BUILD opcode (which would otherwise rewrite a function's defaults or
a storage class's dtype for the whole process) with UnsafeFileError. The extension
opcodes (EXT1/2/4), which CPython resolves through a process-wide cache without asking
`find_class`, are refused before unpickling starts. Each storage is read from the zip
once (see `torch_zip`), when a tensor first uses it; a tensor may not hold more elements
than its storage; every tensor is copied out of it, so tensors that shared a storage are
independent. A container the pickle shares (reached twice) is refused before flattening.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from typing import Any, Callable

import ml_dtypes
import numpy as np

from auxtl.errors import InputError, MissingFileError, UnsafeFileError
from auxtl.interop.source import Source
from auxtl.interop.torch_zip import Archive, refuse_non_zip

# torch's typed storage classes -> the numpy dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# torch dtypes (the names torch pickles them by) -> numpy dtypes; `_rebuild_tensor_v3`
# names one for the dtypes without a typed storage class (uint16, float8, ...).
TORCH_DTYPES = {
    **{name: dtype for dtype, names in (
        (np.float32, ("float32", "float")), (np.float64, ("float64", "double")),
        (np.float16, ("float16", "half")), (ml_dtypes.bfloat16, ("bfloat16",)),
        (np.int64, ("int64", "long")), (np.int32, ("int32", "int")),
        (np.int16, ("int16", "short")), (np.int8, ("int8",)), (np.uint8, ("uint8",)),
        (np.uint16, ("uint16",)), (np.uint32, ("uint32",)), (np.uint64, ("uint64",)),
        (np.bool_, ("bool",)), (np.complex64, ("complex64", "cfloat")),
        (np.complex128, ("complex128", "cdouble")),
        (ml_dtypes.float8_e4m3fn, ("float8_e4m3fn",)), (ml_dtypes.float8_e5m2, ("float8_e5m2",)),
        (ml_dtypes.float8_e4m3fnuz, ("float8_e4m3fnuz",)),
        (ml_dtypes.float8_e5m2fnuz, ("float8_e5m2fnuz",)),
    ) for name in names},
}
TORCH_DTYPES = {name: np.dtype(dtype) for name, dtype in TORCH_DTYPES.items()}

_EXT_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})
_SAVE_STATE_DICT = ("if it is a whole pickled model (torch.save(model)), save "
                    "model.state_dict() instead")


class _RefusedBuild(Exception):
    """A pickle's BUILD aimed at a stand-in; `_Unpickler.load` reports it with the path."""


def _refuse_build(name: str) -> None:
    raise _RefusedBuild(name)


class _Global:
    """Stand-in for an allow-listed callable global: calls `function`; immune to BUILD
    (no `__dict__`, and `__setstate__` refuses), so a pickle cannot reach the function
    object itself (its `__defaults__`, `__code__`, `__dict__`)."""
    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Callable[..., Any]):
        self.name, self.function = name, function

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __setstate__(self, state):
        _refuse_build(self.name)


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for a torch typed storage class (e.g. `torch.FloatStorage`)."""
    name: str
    dtype: np.dtype

    def __setstate__(self, state):  # replaces dataclasses' own, which would rewrite us
        _refuse_build(f"torch.{self.name}")


@dataclasses.dataclass(frozen=True, slots=True)
class _TorchDtype:
    """Stand-in for a torch dtype (e.g. `torch.uint16`)."""
    name: str
    dtype: np.dtype

    def __setstate__(self, state):
        _refuse_build(f"torch.{self.name}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    """A storage the pickle refers to: its key in the zip, its element type (uint8 for an
    untyped storage) and a reader of its elements."""
    key: str
    dtype: np.dtype
    read: Callable[[str, np.dtype], np.ndarray]

    def elements(self, dtype: np.dtype | None = None) -> np.ndarray:
        return self.read(self.key, self.dtype if dtype is None else dtype)

    def __setstate__(self, state):
        _refuse_build(f"storage {self.key}")


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int for v in value):
        raise InputError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return value


def strided_copy(elements: np.ndarray, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...]) -> np.ndarray:
    """The tensor a storage holds at `offset` with `size` and `stride` (in elements), as a
    fresh contiguous array; InputError if it would reach outside the storage or hold
    more elements than the storage (stride 0 or overlapping strides expanding it)."""
    if type(offset) is not int or offset < 0:
        raise InputError(f"tensor storage offset must be an int >= 0, got {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or min(size + stride, default=0) < 0:
        raise InputError(f"tensor size {size} and stride {stride} do not match")
    if 0 in size:
        return np.zeros(size, elements.dtype)
    if math.prod(size) > elements.size:
        raise InputError(f"tensor of size {size}, stride {stride} holds {math.prod(size)} "
                         f"elements, more than its storage of {elements.size} (a state dict "
                         f"never expands a storage)")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= elements.size:
        raise InputError(f"tensor of size {size}, stride {stride} at offset {offset} "
                         f"reaches element {last} of a storage of {elements.size}")
    item = elements.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        elements[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise InputError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return strided_copy(storage.elements(), storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None) -> np.ndarray:
    """torch's rebuild for dtypes without a typed storage: an untyped (byte) storage read
    as `dtype`, offset and strides in elements of `dtype`."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDtype):
        raise InputError(f"tensor rebuilt from {type(storage).__name__} as "
                         f"{type(dtype).__name__}, not a storage and a torch dtype")
    return strided_copy(storage.elements(dtype.dtype), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, np.ndarray):
        raise InputError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _size(dims=()) -> tuple[int, ...]:
    return _int_tuple(tuple(dims), "torch.Size")


def _device(*args) -> str:
    return ":".join(str(a) for a in args)


_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
}

_ALLOWED: dict[tuple[str, str], Any] = {
    **{key: _Global(".".join(key), function) for key, function in _CALLABLES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{("torch", name): _TorchDtype(name, dtype) for name, dtype in TORCH_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Unpickles data.pkl with the allow-list; storages come from `read_storage`."""

    def __init__(self, data: bytes, path: str, read_storage):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._read_storage = read_storage

    def load(self):
        try:
            return super().load()
        except _RefusedBuild as refused:
            raise UnsafeFileError(
                f"{self._path}: the pickle's BUILD opcode tries to rewrite {refused} (shared "
                f"by every load), which auxtl refuses") from None

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafeFileError(
                f"{self._path}: the pickle asks for {module}.{name}, which auxtl does not "
                f"load (loading it could run code); {_SAVE_STATE_DICT}")
        return allowed

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)):
            raise UnsafeFileError(f"{self._path}: unknown persistent id {pid!r} in the pickle")
        return _Storage(pid[2], pid[1].dtype, self._read_storage)


def refuse_extension_opcodes(data: bytes, path: str) -> None:
    """UnsafeFileError if the pickle uses EXT1/EXT2/EXT4 (resolved via copyreg's
    process-wide cache, not always through `find_class`; torch never writes them);
    InputError if it is not a well-formed pickle."""
    try:
        for opcode, _, _ in pickletools.genops(data):
            if opcode.name in _EXT_OPCODES:
                raise UnsafeFileError(f"{path}: the pickle uses the {opcode.name} opcode "
                                      f"(a registered extension), which auxtl refuses")
    except (ValueError, EOFError) as error:  # pickletools' parse errors
        raise InputError(f"{path}: data.pkl is not a valid pickle ({error})") from None


def _holds_tensor(value: Any, known: dict[int, bool]) -> bool:
    """Whether `value` holds a tensor at any depth; `known` caches the answer per
    container id, so a container the pickle shares is examined once (and a cycle ends)."""
    if isinstance(value, np.ndarray):
        return True
    if not isinstance(value, (dict, list, tuple)):
        return False
    if id(value) not in known:
        known[id(value)] = False  # while in progress: a cycle holds nothing new
        items = value.values() if isinstance(value, dict) else value
        known[id(value)] = any(_holds_tensor(item, known) for item in items)
    return known[id(value)]


def flatten(obj: Any, path: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Nested dicts (and lists/tuples holding tensors) -> ('.'-joined name -> array, in
    order; the names of the non-tensor leaves). InputError on a name seen twice, and on a
    dict or tensor-holding list/tuple reached twice (the pickle shared it: a state dict
    never does, and walking a shared tree again at each reference takes exponential time);
    a shared list/tuple without tensors (an optimizer's `betas`) is one leaf each time."""
    tensors: dict[str, np.ndarray] = {}
    others: list[str] = []
    known: dict[int, bool] = {}
    entered: set[int] = set()

    def enter(value: Any, name: str) -> None:
        if id(value) in entered:
            raise InputError(f"{path}: the {type(value).__name__} at {name or '<root>'!r} "
                             f"also occurs elsewhere in the saved object (it is shared or "
                             f"contains itself); a state dict never shares containers")
        entered.add(id(value))

    def walk(value: Any, name: str) -> None:
        if isinstance(value, np.ndarray):
            if name in tensors:
                raise InputError(f"{path}: tensor name {name!r} occurs twice")
            tensors[name] = value
        elif isinstance(value, dict) and value:
            enter(value, name)
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)) and _holds_tensor(value, known):
            enter(value, name)
            for index, item in enumerate(value):
                walk(item, f"{name}.{index}" if name else str(index))
        else:
            others.append(name)

    try:
        walk(obj, "")
    except RecursionError:
        raise InputError(f"{path}: the saved object nests too deeply to flatten") from None
    return tensors, others


def load_object(path: str) -> tuple[Any, Archive]:
    """The object a torch.save zip holds, tensors as numpy arrays; errors as `read_torch`."""
    if not os.path.exists(path):
        raise MissingFileError(f"{path} does not exist")
    if not os.path.isfile(path):
        raise InputError(f"{path} is not a file (a torch .pt/.pth file is one zip)")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not zipfile.is_zipfile(path):
        refuse_non_zip(path, head)
    try:
        with zipfile.ZipFile(path) as zf:
            archive = Archive(zf, path)
            data = archive.pickle_bytes()
            refuse_extension_opcodes(data, path)
            obj = _Unpickler(data, path, archive.storage).load()
    except zipfile.BadZipFile as error:
        raise InputError(f"{path} is a damaged zip ({error}); save it again") from None
    except (UnsafeFileError, InputError):
        raise
    except MemoryError:
        raise InputError(f"{path}: reading it ran out of memory (a malformed file, or "
                         f"one too large for this machine)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError) as error:
        raise InputError(f"{path}: data.pkl could not be read as a torch.save pickle "
                         f"({type(error).__name__}: {error})") from None
    return obj, archive


def read_torch(path: str | os.PathLike) -> Source:
    """A torch.save zip (a state dict or a checkpoint nesting one) as a `Source` (format
    "torch", layout "torch"): nested dicts flattened into '.'-joined names, tensors only,
    in file order; `info["non_tensors"]` names the other leaves (epoch, hyper-parameters),
    `info["byteorder"]` the file's. Raises MissingFileError for a missing path,
    UnsafeFileError for a pickle that names anything outside the allow-list (a pickled
    nn.Module included), InputError for the legacy format, TorchScript archives, a file
    that is neither zip nor pickle, a damaged zip, a missing storage, or no tensors."""
    path = os.fspath(path)
    obj, archive = load_object(path)
    if isinstance(obj, np.ndarray):
        raise InputError(f"{path} holds a single tensor, not a state dict; save a dict "
                         f"name -> tensor (model.state_dict())")
    tensors, others = flatten(obj, path)
    if not tensors:
        raise InputError(f"{path} holds no tensors (leaves: {others[:5]})")
    info = {"non_tensors": others,
            "byteorder": "little" if archive.byteorder == "<" else "big"}
    return Source(path=path, format="torch", tensors=tensors, layout="torch", info=info)
