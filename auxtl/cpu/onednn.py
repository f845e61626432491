"""oneDNN convolutions for XLA:CPU through XLA's FFI, for the training step.

`auxtl/cpu/native/onednn_conv.cc` wraps oneDNN's three convolution primitives
(forward, input gradient, weight gradient; the library PyTorch uses on CPU, faster
there than XLA's own: benchmarks/NOTES.md, section 6) as XLA FFI handlers. This
module compiles it on first use with the C++ compiler (`$CXX`, else `c++`) against
the headers of the installed jaxlib and of oneDNN (the `onednn` extra:
`onednn-cpu-gomp` + `onednn-devel-cpu-gomp`), caches the library under
`$AUXTL_CACHE_DIR` (auxtl.cpu.native_build) and registers the handlers for the CPU
platform.

`available()` says whether the convolutions can be used; `status()` says why not in
words. `auxtl.cpu.conv` uses them for differentiated convolutions on a single CPU
device (GSPMD cannot partition a custom call, so sharded steps keep XLA's
convolutions). The "onednn" component of AUXTL_CPU_KERNELS (`auxtl.cpu.switch`).
"""

from __future__ import annotations

import pathlib
import platform
import re
import sys
import warnings
from importlib import metadata

import jax
import numpy as np

from auxtl.cpu import native_build, switch
from auxtl.errors import InputError

SOURCE = native_build.SOURCES / "onednn_conv.cc"
TARGETS = {"forward": "AuxtlOneDnnConvForward", "input_grad": "AuxtlOneDnnConvInputGrad",
           "weight_grad": "AuxtlOneDnnConvWeightGrad"}
RUNTIME, HEADERS = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"

_status: str | None = None


def available() -> bool:
    """Whether the oneDNN convolutions are built, loaded and registered (tries once)."""
    return status() == "available"


def status() -> str:
    """"available", or why not: "off (AUXTL_CPU_KERNELS=0)", "unsupported platform ...",
    "not installed ...", "no C++ compiler ...", "build failed: ...", "load failed: ..."."""
    global _status
    if _status is None:
        _status = _set_up()
    return _status


def _set_up() -> str:
    if not switch.enabled("onednn"):
        return switch.off_reason("onednn")
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        return f"unsupported platform ({sys.platform} {platform.machine()}; Linux x86-64 only)"
    paths = onednn_paths()
    if isinstance(paths, str):
        return paths
    include, libdir = paths
    compiler = native_build.compiler()
    if not compiler:
        return "no C++ compiler (set CXX, or install g++) to build auxtl/cpu/native/onednn_conv.cc"
    try:
        library = build_library(compiler, include, libdir)
    except (native_build.BuildError, OSError) as error:
        return _warn(f"build failed: {error}")
    try:
        native_build.register(library, TARGETS)
    except (OSError, AttributeError, RuntimeError, ValueError) as error:
        return _warn(f"load failed: {library}: {error}")
    return "available"


def _warn(reason: str) -> str:
    """Installed but unusable: say so once, as training then runs XLA's slower kernels."""
    warnings.warn(f"auxtl: oneDNN convolutions unavailable, using XLA's: {reason}",
                  RuntimeWarning, stacklevel=3)
    return reason


def onednn_paths() -> tuple[pathlib.Path, pathlib.Path] | str:
    """(include dir, lib dir) of the installed oneDNN wheels, or why they are not there."""
    try:
        runtime, headers = metadata.files(RUNTIME), metadata.files(HEADERS)
    except metadata.PackageNotFoundError as error:
        return (f"not installed ({error.name} missing; pip install 'auxtl[onednn]' "
                f"or {RUNTIME} {HEADERS})")
    library = next((f.locate() for f in runtime or [] if f.name == "libdnnl.so.3"), None)
    header = next((f.locate() for f in headers or []
                   if str(f).endswith("oneapi/dnnl/dnnl.hpp")), None)
    if library is None or header is None:
        return f"not installed (no libdnnl.so.3 in {RUNTIME} or no dnnl.hpp in {HEADERS})"
    library, header = pathlib.Path(library).resolve(), pathlib.Path(header).resolve()
    return header.parent.parent.parent, library.parent


def build_command(compiler: str, include: pathlib.Path, libdir: pathlib.Path) -> list[str]:
    """The compile command of the handler library ("{out}" for the output path)."""
    return [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-I{jax.ffi.include_dir()}", f"-I{include}", str(SOURCE), "-o", "{out}",
            f"-L{libdir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{libdir}"]


def key_parts() -> list[str]:
    """What besides the source and command decides the library: the oneDNN version."""
    return [metadata.version(RUNTIME)]


def build_library(compiler: str, include: pathlib.Path, libdir: pathlib.Path) -> pathlib.Path:
    """The compiled handler library, built once per source, compiler, jaxlib and oneDNN
    version."""
    return native_build.build_library(SOURCE, build_command(compiler, include, libdir),
                                      key_parts=key_parts())


def _call(target: str, out_shape, a, b, strides, padding):
    attrs = {"strides": np.asarray(strides, np.int64),
             "padding": np.asarray([p for pair in padding for p in pair], np.int64)}
    return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(out_shape, np.float32),
                            vmap_method="sequential")(a, b, **attrs)


def conv_forward(x, kernel, strides, padding, out_shape):
    """NHWC x HWIO -> NHWC, float32; padding ((top, bottom), (left, right))."""
    return _call("forward", out_shape, x, kernel, strides, padding)


def conv_input_grad(dy, kernel, strides, padding, x_shape):
    return _call("input_grad", x_shape, dy, kernel, strides, padding)


def conv_weight_grad(x, dy, strides, padding, kernel_shape):
    return _call("weight_grad", kernel_shape, x, dy, strides, padding)


_CALL = re.compile(
    r"= f32\[([\d,]*)\]\S* custom-call\(.*?custom_call_target=\"(AuxtlOneDnnConv\w+)\""
    r".*?operand_layout_constraints=\{f32\[([\d,]*)\]\S*, f32\[([\d,]*)\]\S*\}"
    r".*?backend_config=\{([^}]*)\}")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)


def _attr(config: str, name: str) -> tuple[int, ...]:
    """An int64 array attribute as HLO text prints it: `dense<[0, 2]> : tensor<2xi64>`,
    `dense<1> : tensor<4xi64>` (all equal) or `array<i64: 0, 2>`."""
    dense = re.search(name + r" = dense<([^>]*)> : tensor<(\d+)xi64>", config)
    if dense:
        values = _ints(dense.group(1).strip("[]"))
        return values * int(dense.group(2)) if len(values) == 1 else values
    array = re.search(name + r" = array<i64:([^>]*)>", config)
    if array:
        return _ints(array.group(1))
    raise InputError(f"no {name} in the oneDNN call's backend_config {{{config}}}")


def taps(size: int, out: int, kernel: int, stride: int, pad_low: int) -> int:
    """(output position, kernel tap) pairs that read inside the input along one axis."""
    return sum(1 for o in range(out) for k in range(kernel)
               if 0 <= o * stride + k - pad_low < size)


def convolution_flops(hlo_text: str) -> float:
    """FLOPs of the oneDNN convolution calls in a compiled module's HLO text, counted as
    XLA's cost analysis counts a convolution (2 per multiply-add that reads inside the
    input); XLA's own count leaves custom calls out."""
    total = 0
    for match in _CALL.finditer(hlo_text):
        out, target, a, b, config = match.groups()
        out, a, b = _ints(out), _ints(a), _ints(b)
        x, k, y = {"AuxtlOneDnnConvForward": (a, b, out),
                   "AuxtlOneDnnConvInputGrad": (out, b, a),
                   "AuxtlOneDnnConvWeightGrad": (a, out, b)}[target]
        strides, pads = _attr(config, "strides"), _attr(config, "padding")
        pairs = (taps(x[1], y[1], k[0], strides[0], pads[0])
                 * taps(x[2], y[2], k[1], strides[1], pads[2]))
        total += 2 * x[0] * x[3] * y[3] * pairs
    return float(total)
