"""The operations the trunks' layers call, as hooks that default to plain XLA.

Two hooks, looked up when a function is traced (install before tracing; a step
already compiled keeps what it was traced with):

- `conv_general_dilated`: the convolution of every `nnx.Conv` in the trunks (passed as
  `nnx.Conv(conv_general_dilated=ops.conv_general_dilated)`); default
  `jax.lax.conv_general_dilated`.
- `conv_bn_inference(conv, bn, x, relu=, pool=)`: conv -> BatchNorm on its running
  statistics [-> ReLU] [-> 2x2 max-pool], for a block that is not training; default
  the modules' own composition (`plain_conv_bn_inference`).

`max_pool_2x2` is the 2x2 pool the layers use (not a hook). An optional backend
fills the hooks with `install(...)` (auxtl.cpu does, on import of auxtl); `restore()`
puts back what was there, the defaults unless told otherwise. An installed
implementation must compute the same function as the default (to rounding) and may
fall back to the default for inputs it does not take; it keeps the inputs' dtype (a
bfloat16 layer gets bfloat16 back, never a silent float32 upcast). auxtl.cpu's kernels
take float32 only: bfloat16 compute runs XLA's convolutions (tests/test_compute_dtype.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import nnx
from jax import lax


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool (VALID: an odd last row or column is dropped), NHWC, as
    reshape + max: the values of reduce_window, with a cheaper backward pass on XLA:CPU
    than select_and_scatter (benchmarks/NOTES.md, section 4)."""
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def plain_conv_bn_inference(conv: nnx.Conv, bn: nnx.BatchNorm, x: jax.Array, *,
                            relu: bool, pool: bool = False) -> jax.Array:
    """pool(relu(bn(conv(x)))) with BatchNorm on its running statistics: the modules'
    own composition, the default of the `conv_bn_inference` hook."""
    y = bn(conv(x), use_running_average=True)
    y = nnx.relu(y) if relu else y
    return max_pool_2x2(y) if pool else y


@dataclasses.dataclass(frozen=True)
class Hooks:
    """The implementations the hooks dispatch to."""

    conv: Callable[..., jax.Array] = lax.conv_general_dilated
    conv_bn_inference: Callable[..., jax.Array] = plain_conv_bn_inference


DEFAULTS = Hooks()
_hooks = DEFAULTS


def installed() -> Hooks:
    """The implementations the hooks use now."""
    return _hooks


def install(**implementations: Callable[..., jax.Array]) -> Hooks:
    """Fills the named hooks (fields of `Hooks`: conv, conv_bn_inference); returns the
    hooks as they were before, for `restore`. An unknown name raises TypeError."""
    global _hooks
    previous = _hooks
    _hooks = dataclasses.replace(_hooks, **implementations)
    return previous


def restore(hooks: Hooks = DEFAULTS) -> None:
    """Puts `hooks` back (the plain XLA defaults if not given)."""
    global _hooks
    _hooks = hooks


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs) -> jax.Array:
    """`jax.lax.conv_general_dilated` through the installed `conv` hook (same arguments,
    same result to rounding)."""
    return _hooks.conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                       rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                       feature_group_count=feature_group_count,
                       batch_group_count=batch_group_count, precision=precision,
                       preferred_element_type=preferred_element_type, **kwargs)


def conv_bn_inference(conv: nnx.Conv, bn: nnx.BatchNorm, x: jax.Array, *, relu: bool,
                      pool: bool = False) -> jax.Array:
    """pool(relu(bn(conv(x)))) of a block that is not training, through the installed
    `conv_bn_inference` hook."""
    return _hooks.conv_bn_inference(conv, bn, x, relu=relu, pool=pool)
