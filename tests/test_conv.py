"""auxtl.cpu.conv: gradients equal jax.grad of XLA's convolution for every conv the
trunks use; XLA's native convolution is kept off CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from auxtl.cpu import conv as auxtl_conv
from auxtl.cpu import switch
from auxtl.models import build_trunk, list_models, make_config
from conftest import CONV_LAYOUT as LAYOUT
from conftest import gamma, require_onednn, require_winograd
import rounding

# Inputs the trunks are used at: ResNet-50 at 224 px has the 7x7/2 stem.
INPUTS = {"small_cnn": (28, 28, 1), "resnet18": (32, 32, 3), "resnet50": (224, 224, 3)}


def trunk_convs(name: str) -> set[tuple[int, int, int, int, tuple[int, int], str]]:
    """(kernel_h, kernel_w, in, out, strides, padding) of every nnx.Conv in a trunk."""
    trunk = build_trunk(name, make_config(name, INPUTS.get(name, (32, 32, 3))),
                        rngs=nnx.Rngs(0))
    found = set()
    for _, module in nnx.iter_graph(trunk):
        if isinstance(module, nnx.Conv):
            kh, kw, cin, cout = module.kernel[...].shape
            found.add((kh, kw, cin, cout, tuple(module.strides), module.padding))
    return found


ALL_CONVS = sorted(set().union(*(trunk_convs(name) for name in list_models())),
                   key=lambda c: (c[0], c[2] * c[3], c[4]))


def loss_of(conv_fn, strides, padding):
    def loss(x, kernel, weights):
        y = conv_fn(x, kernel, strides, padding, dimension_numbers=LAYOUT)
        return jnp.sum(weights * jnp.tanh(y))
    return loss


def output_and_gradients(conv_fn, x, kernel, strides, padding, cotangent):
    """The convolution's output as differentiated (the custom_vjp's forward rule) and
    the vjp of `cotangent` with respect to the input and the kernel."""
    def run(x, kernel, cotangent):
        y, vjp = jax.vjp(lambda x, k: conv_fn(x, k, strides, padding,
                                              dimension_numbers=LAYOUT), x, kernel)
        return (y, *vjp(cotangent))
    return jax.jit(run)(x, kernel, cotangent)


def test_the_trunks_use_convs_this_file_covers():
    strides = {c[4] for c in ALL_CONVS}
    kernels = {c[0] for c in ALL_CONVS}
    assert (1, 1) in strides and (2, 2) in strides
    assert {1, 3, 7} <= kernels
    assert all(c[5] == "SAME" for c in ALL_CONVS)


@pytest.fixture(params=["winograd", "onednn", "sliced"])
def cpu_path(request, monkeypatch):
    """Each CPU path: Winograd forward and input gradient with oneDNN's weight gradient
    (the default where both are built), oneDNN's three kernels, and XLA's with the
    sliced weight gradient."""
    if request.param == "winograd":
        require_winograd()
    if request.param != "winograd":
        monkeypatch.setattr(auxtl_conv, "use_winograd", lambda *args, **kwargs: False)
    if request.param == "onednn":
        require_onednn()
    if request.param == "sliced":
        require_sliced()
        monkeypatch.setattr(auxtl_conv, "use_onednn", lambda *args: False)
    return request.param


def require_sliced() -> None:
    if not switch.enabled("sliced"):
        pytest.skip(f"sliced weight gradient: {switch.off_reason()}")


@pytest.mark.parametrize("spec", ALL_CONVS, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}-s{c[4][0]}")
def test_gradients_match_xla_for_every_trunk_conv(spec, cpu_path):
    kh, kw, cin, cout, strides, padding = spec
    size = 9 if kh < 7 else 12   # odd and even sizes: SAME pads asymmetrically at stride 2
    batch = 3 if cin * cout < 64 * 64 else 2
    kx, kk, kw_ = jax.random.split(jax.random.key(cin * 1000 + cout), 3)
    x = jax.random.normal(kx, (batch, size, size, cin))
    kernel = jax.random.normal(kk, (kh, kw, cin, cout)) / np.sqrt(kh * kw * cin)
    out_shape = jax.eval_shape(lambda: lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=LAYOUT)).shape
    cotangent = jax.random.normal(kw_, out_shape)

    ours = output_and_gradients(auxtl_conv.conv_general_dilated, x, kernel, strides, padding,
                                cotangent)
    # Against float64, within the rounding bound of the kernel that computed each value
    # (tests/rounding.py): a direct convolution's (oneDNN, XLA), or Winograd's, whose
    # input gradient convolves dy with the flipped kernel, padded by 2 - padding.
    pads = tuple(lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding))
    bounds = rounding.direct_bounds(x, kernel, cotangent, strides, pads)
    if auxtl_conv.use_winograd(x, kernel, strides, pads):
        bounds["output"] = rounding.winograd_conv_bound(x, kernel, pads)
    if auxtl_conv.use_winograd(x, kernel, strides, pads, input_gradient=True):
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        bounds["input gradient"] = rounding.winograd_conv_bound(
            cotangent, flipped, tuple((2 - low, 2 - high) for low, high in pads))
    for what, value in zip(("output", "input gradient", "kernel gradient"), ours):
        rounding.assert_within(value, *bounds[what], f"{cpu_path} {what}")


@pytest.mark.parametrize("strides,padding", [((1, 1), ((0, 0), (0, 0))),
                                             ((1, 1), ((2, 0), (1, 2))),
                                             ((2, 1), ((1, 1), (0, 1))),
                                             ((3, 2), ((0, 2), (1, 1)))])
def test_kernel_gradient_for_explicit_padding_and_uneven_strides(strides, padding):
    kx, kk, kd = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (131, 10, 11, 6))   # slices of 64, 64 and 3 images
    kernel_shape = (3, 2, 6, 7)
    y_shape = jax.eval_shape(lambda: lax.conv_general_dilated(
        x, jnp.zeros(kernel_shape), strides, padding, dimension_numbers=LAYOUT)).shape
    dy = jax.random.normal(kd, y_shape)
    got = jax.jit(lambda x, dy: auxtl_conv.sliced_kernel_gradient(
        x, dy, kernel_shape=kernel_shape, strides=strides, padding=padding))(x, dy)
    assert got.shape == kernel_shape
    # Slices summed are one more order of the same N OH OW products: the direct bound.
    want, bound = rounding.direct_bounds(x, jnp.zeros(kernel_shape), dy, strides,
                                         padding)["kernel gradient"]
    rounding.assert_within(got, want, bound, "sliced kernel gradient")


def test_bfloat16_gradients_keep_their_dtypes_and_values():
    kx, kk = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (4, 8, 8, 16)).astype(jnp.bfloat16)
    kernel = (jax.random.normal(kk, (3, 3, 16, 8)) / 12).astype(jnp.bfloat16)
    loss = loss_of(auxtl_conv.conv_general_dilated, (1, 1), "SAME")
    weights = jnp.ones((4, 8, 8, 8), jnp.bfloat16)
    dx, dk = jax.grad(loss, argnums=(0, 1))(x, kernel, weights)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    # float64 of the same bfloat16 inputs: y = conv(x, k), g = 1 - tanh(y)^2 (the weights
    # are ones), dk = sum x g. bfloat16 rounds each stored value by u_b = 2**-8 relative;
    # XLA:CPU accumulates a bfloat16 convolution in float32 and rounds its result:
    #   |dy| <= u_b |y| + gamma(144) conv(|x|, |k|)        (3 x 3 x 16 products)
    #   |dt| <= |dy| + 2 u_b                               (tanh 1-Lipschitz, |t| <= 1)
    #   |dg| <= 2 |dt| + dt^2 + 2 u_b                      (g = 1 - t t, two roundings)
    #   |d dk| <= sum |x| |dg| + (u_b + gamma(4 8 8)) sum |x| |g|
    pads = ((1, 1), (1, 1))
    u_b = 2.0 ** -8
    x64, k64 = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    y = rounding.conv(x64, k64, (1, 1), pads)
    g = 1 - np.tanh(y) ** 2
    dy_bound = u_b * np.abs(y) + gamma(3 * 3 * 16) * rounding.conv(np.abs(x64), np.abs(k64),
                                                                   (1, 1), pads)
    dt = dy_bound + 2 * u_b
    dg = 2 * dt + dt ** 2 + 2 * u_b
    shape = kernel.shape
    want = rounding.weight_grad(x64, g, (1, 1), pads, shape)
    bound = (rounding.weight_grad(np.abs(x64), dg, (1, 1), pads, shape)
             + (u_b + gamma(4 * 8 * 8)) * rounding.weight_grad(np.abs(x64), g, (1, 1), pads,
                                                               shape))
    rounding.assert_within(dk.astype(jnp.float32), want, bound, "bfloat16 kernel gradient")


def test_uncovered_convolutions_go_to_xla_unchanged():
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    kernel = jax.random.normal(jax.random.key(4), (3, 3, 2, 6))
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=LAYOUT,
                feature_group_count=2)
    np.testing.assert_array_equal(auxtl_conv.conv_general_dilated(x, kernel, **args),
                                  lax.conv_general_dilated(x, kernel, **args))


def _lowered_text(platform: str, batch: int) -> str:
    x = jnp.ones((batch, 6, 6, 3))
    kernel = jnp.ones((3, 3, 3, 4))
    grad = jax.grad(lambda k: jnp.sum(auxtl_conv.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=LAYOUT)))
    return jax.jit(grad).trace(kernel).lower(lowering_platforms=(platform,)).as_text()


def test_only_cpu_slices_the_weight_gradient(monkeypatch):
    require_sliced()
    monkeypatch.setattr(auxtl_conv, "use_onednn", lambda *args: False)
    monkeypatch.setattr(auxtl_conv, "use_winograd", lambda *args, **kwargs: False)
    assert _lowered_text("cpu", batch=130).count("convolution") == 3   # 64 + 64 + 2 images
    try:
        gpu = _lowered_text("cuda", batch=130)
    except Exception as error:  # noqa: BLE001 - a jax without GPU lowering rules
        pytest.skip(f"cannot lower for cuda here: {error}")
    assert gpu.count("convolution") == 1          # XLA's whole-batch weight gradient
