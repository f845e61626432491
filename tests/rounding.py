"""Float64 references for auxtl's float32 convolutions, and bounds on their rounding error
derived from the computation, not measured: they hold on any CPU (AVX2, AVX-512, FMA or
not), for any thread count and any summation order or blocking.

The model (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 2.2 and 3.1):
each float32 operation returns its exact result times (1 + d), |d| <= u = 2**-24. A value
computed by additions and multiplications from its inputs and constants, where each term
(a product of inputs and constants) passes through at most D roundings, differs from the
exact value by at most gamma(D) times the same computation carried out on the absolute
values of every input and constant (all terms added, none cancelling). The bounds below
evaluate that absolute computation in float64 and count D from the algorithm: a direct
convolution sums n = kernel taps x channels products (D = n); Winograd's F(m x m, 3 x 3)
also passes each term through its transforms, so its absolute computation uses |B^T|,
|G|, |A^T| (the transform amplification, explicit) and D adds the transforms' lengths.
The float64 reference's own error (gamma(D, U64) of the same absolute computation) is
added too. Inputs are N(0, 1)-scale, far from float32's underflow and overflow, where the
model holds (flush-to-zero included).
"""

from __future__ import annotations

import re

import numpy as np

from auxtl.cpu import winograd
from conftest import U64, gamma



def _f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def assert_within(got, want, bound, what: str = "") -> None:
    """|got - want| <= bound elementwise (NaN fails), naming the worst element."""
    got, want, bound = _f64(got), _f64(want), _f64(bound)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    error = np.abs(got - want)
    ok = error <= bound
    if not ok.all():
        ratio = np.where(ok, 0.0, np.nan_to_num(error / np.maximum(bound, 1e-300), nan=np.inf))
        worst = np.unravel_index(np.argmax(ratio), ratio.shape)
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.size} elements beyond the rounding bound; "
            f"worst at {worst}: got {got[worst]!r}, float64 {want[worst]!r}, "
            f"|error| {error[worst]:.3g} > bound {bound[worst]:.3g}")


# ---- direct convolutions (NHWC x HWIO), float64 -------------------------------------------

def _pad(x, padding, strides, kernel_hw):
    (top, bottom), (left, right) = padding
    xp = np.pad(_f64(x), ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (xp.shape[1] - kernel_hw[0]) // strides[0] + 1
    out_w = (xp.shape[2] - kernel_hw[1]) // strides[1] + 1
    return xp, out_h, out_w


def _window(xp, p, q, strides, out_h, out_w):
    return xp[:, p:p + strides[0] * (out_h - 1) + 1:strides[0],
              q:q + strides[1] * (out_w - 1) + 1:strides[1], :]


def conv(x, kernel, strides, padding) -> np.ndarray:
    """The convolution in float64, explicit padding ((top, bottom), (left, right))."""
    kernel = _f64(kernel)
    kh, kw, _, cout = kernel.shape
    xp, out_h, out_w = _pad(x, padding, strides, (kh, kw))
    y = np.zeros((xp.shape[0], out_h, out_w, cout))
    for p in range(kh):
        for q in range(kw):
            y += _window(xp, p, q, strides, out_h, out_w) @ kernel[p, q]
    return y


def weight_grad(x, dy, strides, padding, kernel_shape) -> np.ndarray:
    """d/dkernel of sum(dy * conv(x, kernel)) in float64."""
    kh, kw, cin, cout = kernel_shape
    dy = _f64(dy)
    xp, out_h, out_w = _pad(x, padding, strides, (kh, kw))
    dk = np.zeros(kernel_shape)
    for p in range(kh):
        for q in range(kw):
            window = _window(xp, p, q, strides, out_h, out_w).reshape(-1, cin)
            dk[p, q] = window.T @ dy.reshape(-1, cout)
    return dk


def input_grad(dy, kernel, strides, padding, x_shape) -> np.ndarray:
    """d/dx of sum(dy * conv(x, kernel)) in float64."""
    kernel, dy = _f64(kernel), _f64(dy)
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    n, h, w, c = x_shape
    dxp = np.zeros((n, h + top + bottom, w + left + right, c))
    out_h, out_w = dy.shape[1:3]
    for p in range(kh):
        for q in range(kw):
            _window(dxp, p, q, strides, out_h, out_w)[...] += dy @ kernel[p, q].T
    return dxp[:, top:top + h, left:left + w]


def direct_bounds(x, kernel, dy, strides, padding):
    """For a direct (any-order) convolution y = conv(x, kernel) and its gradients for the
    output gradient dy: {"output", "input gradient", "kernel gradient"} -> (float64
    reference, rounding bound). Each element of y sums kh kw Cin products, of dx at most
    kh kw Cout, of dk N OH OW: D = that count (a product's rounding and the additions)."""
    x, kernel, dy = _f64(x), _f64(kernel), _f64(dy)
    kh, kw, cin, cout = kernel.shape
    n, out_h, out_w = dy.shape[:3]
    absx, absk, absdy = np.abs(x), np.abs(kernel), np.abs(dy)
    out = {}
    for what, ref, magnitude, terms in (
            ("output", conv(x, kernel, strides, padding),
             conv(absx, absk, strides, padding), kh * kw * cin),
            ("input gradient", input_grad(dy, kernel, strides, padding, x.shape),
             input_grad(absdy, absk, strides, padding, x.shape), kh * kw * cout),
            ("kernel gradient", weight_grad(x, dy, strides, padding, kernel.shape),
             weight_grad(absx, absdy, strides, padding, kernel.shape), n * out_h * out_w)):
        out[what] = (ref, (gamma(terms) + gamma(terms, U64)) * magnitude)
    return out


# ---- Winograd F(m x m, 3 x 3), as auxtl/cpu/native/winograd_conv.cc computes it --------

def _matrix(text: str, name: str) -> np.ndarray:
    body = re.search(rf"\b{name}\[\d+\]\[\d+\] = (\{{.*?\}}\}});", text, re.S).group(1)
    return np.array([[float(v) for v in row.split(",")]
                     for row in re.findall(r"\{([^{}]*)\}", body)])


def transforms(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, A^T, G) of F(tile x tile, 3 x 3): B^T and A^T read from the compiled source
    (so the bound follows the code), G from auxtl.cpu.winograd."""
    text = winograd.SOURCE.read_text()
    block = re.search(rf"struct Transform<{tile}> \{{(.*?)\n\}};", text, re.S).group(1)
    return _matrix(block, "BT"), _matrix(block, "AT"), np.asarray(winograd.G[tile], np.float64)


def _stage(matrix: np.ndarray) -> int:
    """Roundings one transform stage (Left or Right in the .cc) adds to a term: a product
    and the additions of a row's nonzero coefficients: the most nonzeros in a row."""
    return int((matrix != 0).sum(axis=1).max())


# The kernel transform U = G (k s) G^T in JAX: each term is rounded when its two G
# entries are stored as float32 (2), by its products (2, and 1 more for the folded
# scale s), and by the additions of a sum of 9 terms in any order (8).
KERNEL_TRANSFORM = 2 + 3 + 8


def _tiles(x, padding, conv_hw, tile):
    """Each output tile's (tile + 2)^2 input patch, [N, tiles_h, tiles_w, T, T, C], zero
    outside the input, as the .cc reads them."""
    n, h, w, c = x.shape
    th, tw = -(-conv_hw[0] // tile), -(-conv_hw[1] // tile)
    side = tile + 2
    xp = np.zeros((n, th * tile + 2, tw * tile + 2, c))
    (top, _), (left, _) = padding
    rows, cols = min(h, xp.shape[1] - top), min(w, xp.shape[2] - left)
    xp[:, top:top + rows, left:left + cols] = x[:, :rows, :cols]
    windows = np.lib.stride_tricks.sliding_window_view(xp, (side, side), axis=(1, 2))
    return windows[:, ::tile, ::tile][:, :th, :tw].transpose(0, 1, 2, 4, 5, 3)


def winograd_conv(x, kernel, padding, conv_hw, *, absolute: bool = True):
    """The Winograd forward pass in float64, A^T [(G k G^T) . (B^T d B)] A summed over
    channels for each output tile; `absolute`: on the absolute values of x, the kernel and
    the transforms (the magnitude the rounding bound scales). Returns it and D, the
    roundings a term passes through: kernel transform, input transform, the Cin-long
    channel sum, output transform, the shift."""
    tile = winograd.tile_for(*conv_hw)
    bt, at, g = (np.abs(m) if absolute else m for m in transforms(tile))
    x, kernel = (np.abs(_f64(a)) if absolute else _f64(a) for a in (x, kernel))
    d = _tiles(x, padding, conv_hw, tile)
    v = np.einsum("ka,nyxabc,lb->klnyxc", bt, d, bt, optimize=True)
    u = np.einsum("ap,pqco,bq->abco", g, kernel, g, optimize=True)
    m = np.einsum("klnyxc,klco->klnyxo", v, u, optimize=True)
    y = np.einsum("ik,klnyxo,jl->nyixjo", at, m, at, optimize=True)
    n, th, _, tw, _, cout = y.shape
    y = y.reshape(n, th * tile, tw * tile, cout)[:, :conv_hw[0], :conv_hw[1]]
    depth = KERNEL_TRANSFORM + 2 * _stage(bt) + x.shape[3] + 2 * _stage(at) + 1
    return y, depth


def winograd_conv_bound(x, kernel, padding, scale=None, shift=None, *, extra_depth=0,
                        shift_magnitude=None):
    """(float64 reference, rounding bound) of winograd.conv(x, kernel, padding,
    scale=scale, shift=shift) before ReLU and pooling (both 1-Lipschitz: apply ReLU to the
    reference and `pool_bound` to both after). `extra_depth`: roundings already in
    `scale` and `shift` when they were computed in float32 (BatchNorm's folding), whose
    absolute computation is then `shift_magnitude` (default |shift|)."""
    x, kernel = _f64(x), _f64(kernel)
    cout = kernel.shape[3]
    scale = np.ones(cout) if scale is None else _f64(scale)
    shift = np.zeros(cout) if shift is None else _f64(shift)
    conv_hw = (x.shape[1] + sum(padding[0]) - 2, x.shape[2] + sum(padding[1]) - 2)
    ref = conv(x, kernel, (1, 1), padding) * scale + shift
    magnitude, depth = winograd_conv(x, kernel * scale, padding, conv_hw)
    magnitude = magnitude + (np.abs(shift) if shift_magnitude is None else shift_magnitude)
    depth += extra_depth
    reference_depth = 9 * x.shape[3] + 2
    return ref, (gamma(depth) + gamma(reference_depth, U64)) * magnitude


def pool_bound(values) -> np.ndarray:
    """2x2/2 max-pool: the pooled error is at most the largest error in the window."""
    n, h, w, c = values.shape
    values = values[:, :h - h % 2, :w - w % 2]
    return values.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
