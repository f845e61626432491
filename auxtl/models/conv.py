"""2-D convolution with a faster weight gradient on CPU; XLA's own everywhere else.

XLA's CPU weight gradient slows down more than linearly with the batch (a
512x28x28x32->32 convolution: 20 ms for 128 images, 297 ms for 512), while its
forward pass and input gradient scale well. On CPU this module computes the weight
gradient per chunk of at most 64 images and sums the chunks, and for convolutions of
a few input channels (a first layer) as one matmul of shifted rows per chunk; see
benchmarks/NOTES.md for what was measured. On GPU and TPU the lowering picks XLA's
native weight gradient for the whole batch (`jax.lax.platform_dependent`).

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (pass it to
`nnx.Conv(conv_general_dilated=...)`); shapes it does not cover (dilation, groups,
non-2-D) go straight to XLA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_LAYOUT = ("NHWC", "HWIO", "NHWC")
# Elements of a chunk's two matmul operands: about 1.5 MB of float32 (fits L2/L3).
_ELEMENTS_PER_CHUNK = 384 * 1024
# Images per chunk of XLA's own weight gradient (32-64 measured best for 7-28 px).
_XLA_CHUNK = 64
# Input channels up to which the shifted-rows matmul beats XLA's weight gradient.
_ROWS_MAX_IN_CHANNELS = 4


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _LAYOUT


def _all_ones(values) -> bool:
    return values is None or all(v == 1 for v in values)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
    """`lax.conv_general_dilated` whose 2-D NHWC case differentiates through `conv2d`."""
    covered = (lhs.ndim == 4 and _is_nhwc(dimension_numbers) and _all_ones(lhs_dilation)
               and _all_ones(rhs_dilation) and feature_group_count == 1
               and batch_group_count == 1 and precision is None
               and preferred_element_type is None
               and all(v is None for v in kwargs.values()))
    if not covered:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type, **kwargs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return conv2d(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


def _xla_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_LAYOUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """NHWC x HWIO convolution; forward and input gradient by XLA, weight gradient by
    `kernel_gradient` (chunked on CPU, XLA's whole-batch one elsewhere)."""
    return _xla_conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel, strides, padding), x)
    (dx,) = input_vjp(dy)
    dkernel = kernel_gradient(x, dy, kernel.shape, strides, padding)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def kernel_gradient(x, dy, kernel_shape: Sequence[int], strides, padding) -> jax.Array:
    """d(loss)/d(kernel) for an NHWC x HWIO convolution, chosen per platform at lowering."""
    kernel_shape = tuple(kernel_shape)
    return lax.platform_dependent(
        x, dy,
        cpu=functools.partial(cpu_kernel_gradient, kernel_shape=kernel_shape,
                              strides=strides, padding=padding),
        default=functools.partial(xla_kernel_gradient, kernel_shape=kernel_shape,
                                  strides=strides, padding=padding))


def xla_kernel_gradient(x, dy, *, kernel_shape, strides, padding) -> jax.Array:
    """XLA's native weight gradient (the reference, and the GPU/TPU path)."""
    kernel = jnp.zeros(kernel_shape, dy.dtype)
    _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x.astype(dy.dtype), k, strides, padding),
                            kernel)
    return kernel_vjp(dy)[0]


def chunk_size(batch: int, elements_per_image: int) -> int:
    """Images per chunk: the largest divisor of `batch` whose chunk holds at most about
    _ELEMENTS_PER_CHUNK elements (so a chunk's operands stay in cache), at least 1."""
    return largest_divisor_at_most(batch, _ELEMENTS_PER_CHUNK // elements_per_image)


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _scan_chunks(add_chunk, init, x, dy, elements_per_image: int):
    """Sum `add_chunk(x_chunk, dy_chunk)` over chunks of the batch with a `lax.scan`."""
    n = x.shape[0]
    chunk = chunk_size(n, elements_per_image)
    x = x.reshape(n // chunk, chunk, *x.shape[1:])
    dy = dy.reshape(n // chunk, chunk, *dy.shape[1:])
    total, _ = lax.scan(lambda total, xs: (total + add_chunk(*xs), None), init, (x, dy))
    return total


def _tn_dot(a, b, accumulate) -> jax.Array:
    """a^T @ b over the rows of 2-D a and b, accumulated in `accumulate`."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=accumulate)


def cpu_kernel_gradient(x, dy, *, kernel_shape, strides, padding) -> jax.Array:
    """Weight gradient on CPU: shifted-rows matmuls for stride-1 convolutions of a few
    input channels (the first layer), else XLA's over chunks of the batch."""
    kh, kw, cin, cout = kernel_shape
    if tuple(strides) == (1, 1) and cin <= _ROWS_MAX_IN_CHANNELS:
        return shifted_rows_kernel_gradient(x, dy, kernel_shape=kernel_shape, padding=padding)
    return chunked_xla_kernel_gradient(x, dy, kernel_shape=kernel_shape, strides=strides,
                                       padding=padding)


def chunked_xla_kernel_gradient(x, dy, *, kernel_shape, strides, padding) -> jax.Array:
    """XLA's weight gradient summed over static slices of at most _XLA_CHUNK images.

    XLA's CPU weight gradient slows down more than linearly with the batch (a
    512x28x28x32->32 conv: 20 ms at 128 images, 297 ms at 512); per chunk of 32-64
    images it stays fast. The slices are unrolled: inside a `lax.scan` XLA's CPU
    convolution falls back to a slow loop (seconds).
    """
    n = x.shape[0]
    chunk = largest_divisor_at_most(n, _XLA_CHUNK)
    parts = [xla_kernel_gradient(x[i:i + chunk], dy[i:i + chunk], kernel_shape=kernel_shape,
                                 strides=strides, padding=padding)
             for i in range(0, n, chunk)]
    return functools.reduce(jnp.add, parts)


def shifted_rows_kernel_gradient(x, dy, *, kernel_shape, padding) -> jax.Array:
    """Stride-1 weight gradient as one matmul per chunk of images.

    dW[i, j, c, o] = sum_{n, h, w} xpad[n, h + i, w + j, c] * dy[n, h, w, o]. The kw
    column shifts of x go into channels (x3: kw*cin wide) and the kh row shifts into
    zero-padded copies of dy (dy3: kh*cout wide), both over the padded height, so
    x3^T @ dy3 is (kw*cin, kh*cout) and holds every (i, j) block: 2*kw + 2*kh copies of
    the data instead of the 9 + 9 of an im2col with separate slices.
    """
    kh, kw, cin, cout = kernel_shape
    n, oh, ow, _ = dy.shape
    (top, bottom), (left, right) = padding
    padded_h = x.shape[1] + top + bottom
    if padded_h != oh + kh - 1:
        raise ValueError(f"stride-1 kernel gradient: padded height {padded_h} != output "
                         f"height {oh} + kernel {kh} - 1")
    accumulate = jnp.promote_types(dy.dtype, jnp.float32)

    def add_chunk(x_chunk, dy_chunk):
        x_pad = jnp.pad(x_chunk, ((0, 0), (top, bottom), (left, right), (0, 0)))
        x3 = jnp.concatenate([x_pad[:, :, j:j + ow, :] for j in range(kw)], axis=-1)
        dy3 = jnp.concatenate([jnp.pad(dy_chunk, ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0)))
                               for i in range(kh)], axis=-1)
        return _tn_dot(x3.reshape(-1, kw * cin), dy3.reshape(-1, kh * cout), accumulate)

    total = _scan_chunks(add_chunk, jnp.zeros((kw * cin, kh * cout), accumulate),
                         x.astype(dy.dtype), dy, padded_h * ow * (kw * cin + kh * cout))
    return total.reshape(kw, cin, kh, cout).transpose(2, 0, 1, 3).astype(dy.dtype)
