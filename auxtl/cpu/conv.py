"""The training convolution of auxtl.cpu: a custom_vjp 2-D convolution whose CPU
forward pass and gradients come from auxtl's kernels, XLA's everywhere else.

Differentiated float32 NHWC convolutions on one CPU device in one process (GSPMD
cannot partition a custom call):
- forward pass and input gradient of a 3x3 stride-1 convolution with at least
  MIN_WINOGRAD_CHANNELS input (output, for the input gradient) channels: Winograd
  (`auxtl.cpu.winograd`);
- the other forward passes and input gradients, and every weight gradient: oneDNN
  (`auxtl.cpu.onednn`) where it is built.
Any other differentiated convolution on CPU takes XLA's weight gradient summed over
slices of at most _SLICE_IMAGES images ("sliced"), which XLA:CPU computes faster than
the whole batch at once.
Each choice is made when the step is traced, from the switch (`auxtl.cpu.switch`) and
whether the kernel is built; the lowering picks XLA's own convolutions for GPU and
TPU (`jax.lax.platform_dependent`). A convolution that is not differentiated runs
XLA's. Measurements: benchmarks/NOTES.md, sections 1, 6 and 7.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (the
`ops.conv_general_dilated` hook); shapes it does not cover (dilation, groups,
non-2-D, a precision or output type) go straight to XLA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from auxtl.cpu import onednn, switch, winograd

_LAYOUT = ("NHWC", "HWIO", "NHWC")
# Images per slice of the CPU weight gradient (benchmarks/NOTES.md, section 1).
_SLICE_IMAGES = 64
# Fewer input channels than this keep the direct kernels (too little work per tile).
MIN_WINOGRAD_CHANNELS = 8


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
    """NHWC x HWIO convolution by XLA; differentiated, its forward pass and gradients
    come from the kernels the module docstring lists."""
    return _xla_conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    xla = functools.partial(_xla_conv, strides=strides, padding=padding)
    if use_winograd(x, kernel, strides, padding):
        cpu = functools.partial(winograd.conv, padding=padding)
    elif use_onednn(x, kernel, padding):
        out_shape = jax.eval_shape(xla, x, kernel).shape
        cpu = functools.partial(onednn.conv_forward, strides=strides, padding=padding,
                                out_shape=out_shape)
    else:
        return xla(x, kernel), (x, kernel)
    return lax.platform_dependent(x, kernel, cpu=cpu, default=xla), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    dx = _input_gradient(dy, kernel, x, strides, padding)
    dkernel = _weight_gradient(x, dy, kernel, strides, padding)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


def _input_gradient(dy, kernel, x, strides, padding):
    xla = functools.partial(_xla_input_gradient, strides=strides, padding=padding)
    if use_winograd(x, kernel, strides, padding, input_gradient=True):
        def cpu(dy, kernel, x):
            return _winograd_input_gradient(dy, kernel, padding)
    elif use_onednn(x, kernel, padding):
        def cpu(dy, kernel, x):
            return onednn.conv_input_grad(dy, kernel, strides, padding, x.shape)
    else:
        return xla(dy, kernel, x)
    return lax.platform_dependent(dy, kernel, x, cpu=cpu, default=xla)


def _winograd_input_gradient(dy, kernel, padding):
    """dx of a stride-1 3x3 convolution: dy convolved with the kernel rotated 180 degrees
    (input and output channels swapped), padded by 2 - padding."""
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return winograd.conv(dy, flipped, tuple((2 - low, 2 - high) for low, high in padding))


def _xla_input_gradient(dy, kernel, x, strides, padding):
    _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel, strides, padding), x)
    return input_vjp(dy)[0]


def _weight_gradient(x, dy, kernel, strides, padding):
    if not use_onednn(x, kernel, padding):
        if switch.enabled("sliced"):
            return kernel_gradient(x, dy, kernel.shape, strides, padding)
        return xla_kernel_gradient(x, dy, kernel_shape=tuple(kernel.shape),
                                   strides=strides, padding=padding)
    return lax.platform_dependent(
        x, dy,
        cpu=lambda x, dy: onednn.conv_weight_grad(x, dy, strides, padding, kernel.shape),
        default=functools.partial(xla_kernel_gradient, kernel_shape=kernel.shape,
                                  strides=strides, padding=padding))


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def use_onednn(x, kernel, padding) -> bool:
    """oneDNN for this convolution's training step: float32, padding >= 0, JAX running
    on one CPU device in one process (GSPMD cannot partition the custom calls; GPU and
    TPU hosts never build them), and oneDNN built."""
    return (x.dtype == kernel.dtype == jnp.float32
            and all(p >= 0 for pair in padding for p in pair)
            and _one_cpu_device() and onednn.available())


def use_winograd(x, kernel, strides, padding, *, input_gradient: bool = False) -> bool:
    """The Winograd kernel for this convolution's forward pass (or its input gradient):
    3x3, stride 1, padding 0-2, float32, at least MIN_WINOGRAD_CHANNELS input channels
    (output channels for the input gradient), one CPU device in one process, built."""
    channels = kernel.shape[3] if input_gradient else kernel.shape[2]
    return (kernel.shape[:2] == (3, 3) and tuple(strides) == (1, 1)
            and all(0 <= p <= 2 for pair in padding for p in pair)
            and channels >= MIN_WINOGRAD_CHANNELS
            and x.dtype == kernel.dtype == jnp.float32 and _one_cpu_device()
            and winograd.available())


def _one_cpu_device() -> bool:
    return (jax.default_backend() == "cpu" and jax.device_count() == 1
            and jax.process_count() == 1)


def kernel_gradient(x, dy, kernel_shape: Sequence[int], strides, padding) -> jax.Array:
    """d(loss)/d(kernel) for an NHWC x HWIO convolution, chosen per platform at lowering."""
    kernel_shape = tuple(kernel_shape)
    return lax.platform_dependent(
        x, dy,
        cpu=functools.partial(sliced_kernel_gradient, kernel_shape=kernel_shape,
                              strides=strides, padding=padding),
        default=functools.partial(xla_kernel_gradient, kernel_shape=kernel_shape,
                                  strides=strides, padding=padding))


def xla_kernel_gradient(x, dy, *, kernel_shape, strides, padding) -> jax.Array:
    """XLA's native weight gradient (the reference, and the GPU/TPU path)."""
    kernel = jnp.zeros(kernel_shape, dy.dtype)
    _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x.astype(dy.dtype), k, strides, padding),
                            kernel)
    return kernel_vjp(dy)[0]


def sliced_kernel_gradient(x, dy, *, kernel_shape, strides, padding) -> jax.Array:
    """XLA's weight gradient summed over static slices of at most _SLICE_IMAGES images.

    XLA's CPU weight gradient slows down more than linearly with the batch; per slice
    it stays fast (benchmarks/NOTES.md, section 1). The slices are unrolled (the last
    may be shorter): inside a `lax.scan` XLA's CPU convolution is much slower.
    """
    parts = [xla_kernel_gradient(x[i:i + _SLICE_IMAGES], dy[i:i + _SLICE_IMAGES],
                                 kernel_shape=kernel_shape, strides=strides, padding=padding)
             for i in range(0, x.shape[0], _SLICE_IMAGES)]
    if len(parts) == 1:
        return parts[0]
    # Summed in float32 at least (bfloat16 slices too), rounded once to dy's dtype.
    total = jnp.promote_types(dy.dtype, jnp.float32)
    return functools.reduce(jnp.add, [p.astype(total) for p in parts]).astype(dy.dtype)
