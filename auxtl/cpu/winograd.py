"""Winograd 3x3 convolutions for XLA:CPU through XLA's FFI, with a fused epilogue.

`auxtl/cpu/native/winograd_conv.cc` computes y = pool(relu(conv3x3(x, k) * scale + shift))
for stride-1 float32 NHWC convolutions with Winograd's F(4x4, 3x3) (F(2x2, 3x3) when
the output is smaller than 4 pixels): a quarter of the direct multiply-adds, tiled so
each block's transformed input stays in cache (benchmarks/NOTES.md, section 7a).
Outputs differ from a direct convolution's by rounding only, within the bound
tests/rounding.py derives from the transforms.

The kernel transform (U = G k G^T, with `scale` folded in) runs in JAX; the library is
compiled on first use with `-march=native -fopenmp` (auxtl.cpu.native_build) and
cached per CPU. `available()` says whether it can be used, `status()` why not.
`auxtl.cpu.conv` and `auxtl.cpu.fused` use it on one CPU device in one process
(GSPMD cannot partition a custom call). The "winograd" component of
AUXTL_CPU_KERNELS (`auxtl.cpu.switch`).
"""

from __future__ import annotations

import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from auxtl.cpu import native_build, switch
from auxtl.cpu.onednn import taps
from auxtl.errors import InputError
from auxtl.user_cache import cpu_signature

SOURCE = native_build.SOURCES / "winograd_conv.cc"
TARGET = "AuxtlWinogradConv"
COLUMNS = 16   # output channels per column block of the transformed kernel (the .cc's kCols)
# G of F(m x m, 3 x 3) (Lavin & Gray 2016); the input and output transforms are in the .cc.
G = {2: np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
     4: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])}

_status: str | None = None


def available() -> bool:
    """Whether the Winograd convolution is built, loaded and registered (tries once)."""
    return status() == "available"


def status() -> str:
    """"available", or why not: "off (AUXTL_CPU_KERNELS=0)", "unsupported platform ...",
    "no C++ compiler ...", "build failed: ...", "load failed: ..."."""
    global _status
    if _status is None:
        _status = _set_up()
    return _status


def _set_up() -> str:
    if not switch.enabled("winograd"):
        return switch.off_reason("winograd")
    if not sys.platform.startswith("linux"):
        return f"unsupported platform ({sys.platform}; Linux only)"
    compiler = native_build.compiler()
    if not compiler:
        return "no C++ compiler (set CXX, or install g++) to build auxtl/cpu/native/winograd_conv.cc"
    try:
        library = native_build.build_library(SOURCE, build_command(compiler),
                                             key_parts=key_parts())
    except (native_build.BuildError, OSError) as error:
        return _warn(f"build failed: {error}")
    try:
        native_build.register(library, [TARGET])
    except (OSError, AttributeError, RuntimeError, ValueError) as error:
        return _warn(f"load failed: {library}: {error}")
    return "available"


def build_command(compiler: str) -> list[str]:
    """The compile command of the handler library ("{out}" for the output path)."""
    return [compiler, "-O3", "-march=native", "-fno-signed-zeros", "-fno-trapping-math",
            "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", "{out}"]


def key_parts() -> list[str]:
    """What besides the source and command decides the library: `-march=native`'s CPU."""
    return [cpu_signature()]


def _warn(reason: str) -> str:
    warnings.warn(f"auxtl: Winograd convolutions unavailable, using XLA's: {reason}",
                  RuntimeWarning, stacklevel=3)
    return reason


def tile_for(conv_h: int, conv_w: int) -> int:
    """Output tile m: 4 (fewest multiply-adds), or 2 where a 4x4 tile would be mostly
    padding (an output under 4 pixels high or wide)."""
    return 4 if min(conv_h, conv_w) >= 4 else 2


def transform_kernel(kernel: jax.Array, tile: int, scale: jax.Array | None = None) -> jax.Array:
    """HWIO 3x3 kernel (times a per-output-channel `scale`) -> U = G k G^T laid out as
    [(m+2)^2, ceil(O/16), I, 16], zero-padded to whole column blocks."""
    if scale is not None:
        kernel = kernel * scale
    g = jnp.asarray(G[tile], jnp.float32)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision="highest")
    side, (cin, cout) = tile + 2, kernel.shape[2:]
    blocks = -(-cout // COLUMNS)
    u = jnp.pad(u.reshape(side * side, cin, cout),
                ((0, 0), (0, 0), (0, blocks * COLUMNS - cout)))
    return u.reshape(side * side, cin, blocks, COLUMNS).transpose(0, 2, 1, 3)


def conv(x: jax.Array, kernel: jax.Array, padding, *, scale: jax.Array | None = None,
         shift: jax.Array | None = None, relu: bool = False, pool: bool = False) -> jax.Array:
    """pool(relu(conv3x3(x, kernel) * scale + shift)), NHWC x HWIO, stride 1, float32.

    Args:
      padding: ((top, bottom), (left, right)), each 0-2.
      scale, shift: per output channel (None: 1 and 0).
      pool: 2x2/2 max-pool of the (even-floored) output, as `max_pool_2x2`.
    """
    n, h, w, _ = x.shape
    cout = kernel.shape[3]
    (top, bottom), (left, right) = padding
    conv_h, conv_w = h + top + bottom - 2, w + left + right - 2
    out_h, out_w = (conv_h // 2, conv_w // 2) if pool else (conv_h, conv_w)
    tile = tile_for(conv_h, conv_w)
    shift = jnp.zeros((cout,), jnp.float32) if shift is None else shift
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, out_h, out_w, cout), jnp.float32),
                            vmap_method="sequential")(
        x, transform_kernel(kernel, tile, scale), shift.astype(jnp.float32),
        tile=np.int64(tile), pad_top=np.int64(top), pad_left=np.int64(left),
        conv_h=np.int64(conv_h), conv_w=np.int64(conv_w), relu=bool(relu), pool=bool(pool))


_CALL = re.compile(r"custom-call\(.*?custom_call_target=\"" + TARGET + r"\""
                   r".*?operand_layout_constraints=\{f32\[([\d,]*)\]\S*, f32\[[\d,]*\]\S*, "
                   r"f32\[(\d+)\]\S*\}.*?backend_config=\{([^}]*)\}")


def _int_attr(config: str, name: str) -> int:
    match = re.search(name + r" = (-?\d+) : i64", config)
    if not match:
        raise InputError(f"no {name} in the Winograd call's backend_config {{{config}}}")
    return int(match.group(1))


def convolution_flops(hlo_text: str) -> float:
    """FLOPs of the Winograd calls in a compiled module's HLO text, counted as XLA
    counts the direct convolution each stands for (2 per multiply-add that reads inside
    the input): model FLOPs, not the fewer the Winograd algorithm performs."""
    total = 0
    for match in _CALL.finditer(hlo_text):
        x = tuple(int(v) for v in match.group(1).split(","))
        cout, config = int(match.group(2)), match.group(3)
        rows = taps(x[1], _int_attr(config, "conv_h"), 3, 1, _int_attr(config, "pad_top"))
        cols = taps(x[2], _int_attr(config, "conv_w"), 3, 1, _int_attr(config, "pad_left"))
        total += 2 * x[0] * x[3] * cout * rows * cols
    return float(total)
