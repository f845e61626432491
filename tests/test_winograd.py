"""auxtl.cpu.winograd and auxtl.cpu.fused: the Winograd kernel matches XLA's convolution
(with its epilogue), a frozen or evaluated block runs as one call, and gradients
through a block in inference mode are the unfused ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from auxtl import user_cache
from auxtl.cpu import conv as auxtl_conv
from auxtl.cpu import fused, native_build, winograd
from auxtl.models import build_trunk, make_config, ops
from auxtl.models.layers import ConvBlock
from conftest import CONV_LAYOUT as LAYOUT
from conftest import U64, assert_loaded, gamma, require_winograd
import rounding


# Tests of the transforms and tile choice alone: they need no library.
WITHOUT_LIBRARY = {"test_the_bounds_follow_a_winograd_algorithm",
                   "test_tile_is_4_unless_the_output_is_smaller"}


@pytest.fixture(autouse=True)
def _built(request):
    if request.function.__name__ not in WITHOUT_LIBRARY:
        require_winograd()


def reference(x, kernel, padding, scale, shift, relu, pool):
    y = lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=LAYOUT,
                                 precision="highest") * scale + shift
    y = jnp.maximum(y, 0) if relu else y
    return ops.max_pool_2x2(y) if pool else y


def test_the_library_of_this_source_compiler_and_cpu_is_built_and_loaded():
    library = native_build.library_path(winograd.SOURCE,
                                        winograd.build_command(native_build.compiler()),
                                        key_parts=winograd.key_parts())
    assert user_cache.cpu_signature() in winograd.key_parts()
    assert library.is_file() and library.parent == native_build.cache_dir()
    assert_loaded(library)


# (batch, height, width, in, out, padding): odd sizes, channels that fill no whole
# vector or column block, asymmetric and zero padding, outputs under 4 pixels (F(2x2)).
SHAPES = [(3, 9, 11, 8, 5, ((1, 1), (1, 1))),
          (2, 28, 28, 32, 32, ((1, 1), (1, 1))),
          (4, 7, 7, 64, 128, ((1, 1), (1, 1))),
          (2, 10, 13, 13, 20, ((2, 0), (0, 2))),
          (3, 6, 5, 3, 17, ((0, 0), (2, 1))),
          (2, 3, 5, 9, 16, ((1, 1), (1, 1))),
          (1, 2, 2, 24, 40, ((1, 1), (1, 1)))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("relu,pool", [(False, False), (True, False), (True, True)])
def test_matches_xla_with_scale_shift_relu_pool(shape, relu, pool):
    n, h, w, cin, cout, padding = shape
    kx, kk, ks, kt = jax.random.split(jax.random.key(cin * 100 + cout), 4)
    x = jax.random.normal(kx, (n, h, w, cin))
    kernel = jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin)
    scale = jax.random.uniform(ks, (cout,), minval=0.5, maxval=2.0)
    shift = jax.random.normal(kt, (cout,))
    got = jax.jit(lambda *a: winograd.conv(*a, padding, scale=scale, shift=shift, relu=relu,
                                           pool=pool))(x, kernel)
    # float64 reference; bound from Winograd's rounding (tests/rounding.py). ReLU and
    # max-pool are 1-Lipschitz: the error after them is at most the largest before.
    want, bound = rounding.winograd_conv_bound(x, kernel, padding, scale, shift)
    want = np.maximum(want, 0) if relu else want
    if pool:
        want, bound = rounding.pool_bound(want), rounding.pool_bound(bound)
    rounding.assert_within(got, want, bound, "winograd.conv")


@pytest.mark.parametrize("relu,pool", [(True, False), (True, True)])
def test_a_nan_in_the_input_is_not_dropped_by_relu_or_pool(relu, pool):
    # Winograd spreads a NaN over the output tiles it touches, so its NaN are a superset
    # of the direct convolution's; what must not happen is ReLU or max-pool zeroing them
    # (XLA:CPU's own max-pool does drop them, so the mask comes from the unpooled conv).
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8)).at[1, 5, 6, 3].set(jnp.nan)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 16)) / 8
    ones, zeros = jnp.ones((16,)), jnp.zeros((16,))
    padding = ((1, 1), (1, 1))
    nan = np.isnan(reference(x, kernel, padding, ones, zeros, relu, pool=False))
    if pool:
        nan = nan.reshape(2, 6, 2, 6, 2, 16).any(axis=(2, 4))
    got = winograd.conv(x, kernel, padding, scale=ones, shift=zeros, relu=relu, pool=pool)
    assert nan.any() and got.shape == nan.shape
    assert np.isnan(got)[nan].all()
    assert not np.isnan(got[0]).any()


def test_the_bounds_follow_a_winograd_algorithm():
    # The transforms read from the .cc compute the convolution exactly (float64 rounding
    # only), so the rounding bounds derived from them describe this computation.
    x = np.random.default_rng(0).normal(size=(2, 10, 13, 5))
    kernel = np.random.default_rng(1).normal(size=(3, 3, 5, 7))
    for padding in (((1, 1), (1, 1)), ((2, 0), (0, 2))):
        for conv_hw in ((x.shape[1] + sum(padding[0]) - 2, x.shape[2] + sum(padding[1]) - 2),
                        (3, 3)):   # F(2x2)
            cut = x[:, :conv_hw[0] + 2 - sum(padding[0]), :conv_hw[1] + 2 - sum(padding[1])]
            signed, _ = rounding.winograd_conv(cut, kernel, padding, conv_hw, absolute=False)
            magnitude, depth = rounding.winograd_conv(cut, kernel, padding, conv_hw)
            direct = rounding.conv(cut, kernel, (1, 1), padding)
            # both in float64: each within gamma(its depth, U64) of the exact convolution
            bound = (gamma(depth, U64) + gamma(9 * x.shape[3], U64)) * magnitude
            rounding.assert_within(signed, direct, bound, f"{padding} {conv_hw}")


def test_tile_is_4_unless_the_output_is_smaller():
    assert winograd.tile_for(28, 28) == 4 and winograd.tile_for(4, 7) == 4
    assert winograd.tile_for(3, 28) == 2 and winograd.tile_for(2, 2) == 2


def test_bad_shapes_are_an_error_naming_them():
    x = jnp.ones((2, 8, 8, 4))
    u = winograd.transform_kernel(jnp.ones((3, 3, 4, 6)), 4)
    call = jax.ffi.ffi_call(winograd.TARGET, jax.ShapeDtypeStruct((2, 8, 8, 6), jnp.float32))
    with pytest.raises(Exception, match="shapes do not match.*2x8x8x4"):
        jax.block_until_ready(call(x, u, jnp.zeros((5,)), tile=np.int64(4), pad_top=np.int64(1),
                                   pad_left=np.int64(1), conv_h=np.int64(8),
                                   conv_w=np.int64(8), relu=False, pool=False))


def test_flops_are_counted_as_xla_counts_the_direct_convolution():
    x, kernel = jnp.ones((3, 9, 10, 8)), jnp.ones((3, 3, 8, 20))
    padding = ((2, 0), (1, 1))
    ours = jax.jit(lambda x, k: winograd.conv(x, k, padding, relu=True)).lower(x, kernel)
    xla = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), padding,
                                                        dimension_numbers=LAYOUT))
    want = xla.lower(x, kernel).compile().cost_analysis()["flops"]
    assert winograd.convolution_flops(ours.compile().as_text()) == pytest.approx(want,
                                                                                rel=0.01)


def _block(pool: bool) -> ConvBlock:
    block = ConvBlock(16, 24, pool=pool, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(5), 4)   # BatchNorm as after training
    block.bn.mean[...] = jax.random.normal(keys[0], (24,)) * 0.1
    block.bn.var[...] = jax.random.uniform(keys[1], (24,), minval=0.5, maxval=2.0)
    block.bn.scale[...] = jax.random.uniform(keys[2], (24,), minval=0.5, maxval=1.5)
    block.bn.bias[...] = jax.random.normal(keys[3], (24,)) * 0.1
    return block


def _unfused(monkeypatch):
    monkeypatch.setattr(fused, "applies", lambda *args: False)


# Roundings BatchNorm's folding adds to the kernel's path: epsilon stored as float32,
# var + eps, rsqrt (counted as 4: correctly rounded sqrt and division are 2; a fast
# rsqrt is within a few ulps), times scale; the shift bias - mean * s adds 2 more on its
# own, shorter path.
BN_FOLD = 1 + 1 + 4 + 1


def _block_reference(block: ConvBlock, x):
    """(float64 pool(relu(BN(conv(x)))) of a 3x3 stride-1 SAME ConvBlock in inference,
    rounding bound of its fused Winograd call) (tests/rounding.py)."""
    bn = block.bn
    mean, var, gamma_, beta = (np.asarray(v[...], np.float64)
                               for v in (bn.mean, bn.var, bn.scale, bn.bias))
    s = gamma_ / np.sqrt(var + bn.epsilon)
    want, bound = rounding.winograd_conv_bound(
        x, block.conv.kernel[...], ((1, 1), (1, 1)), s, beta - mean * s,
        extra_depth=BN_FOLD, shift_magnitude=np.abs(beta) + np.abs(mean * s))
    want = np.maximum(want, 0)
    if block.pool:
        want, bound = rounding.pool_bound(want), rounding.pool_bound(bound)
    return want, bound


@pytest.mark.usefixtures("one_cpu_device")
@pytest.mark.parametrize("pool", [False, True])
def test_block_in_inference_is_one_fused_call_with_the_unfused_values(pool):
    block = _block(pool)
    x = jax.random.normal(jax.random.key(6), (4, 10, 10, 16))
    run = nnx.jit(lambda block, x: block(x, train=False))
    text = jax.jit(lambda x: block(x, train=False)).lower(x).as_text()
    assert text.count(winograd.TARGET) == 1 and "convolution" not in text
    rounding.assert_within(run(block, x), *_block_reference(block, x), "fused block")


def test_gradients_through_a_block_in_inference_are_the_unfused_ones(monkeypatch):
    block = _block(pool=True)
    x = jax.random.normal(jax.random.key(7), (4, 10, 10, 16))
    graphdef, state = nnx.split(block)

    def loss(state, x):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, state)(x, train=False)))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    _unfused(monkeypatch)
    want = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want) == 6   # x, kernel, BN scale, bias, mean, var
    # Differentiated, the fused block's custom_vjp runs the plain composition forward
    # and backward: the same operations on the same values, so the same numbers.
    for a, b in zip(flat_got, flat_want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.usefixtures("one_cpu_device")
def test_frozen_trunk_features_match_the_unfused_trunk(monkeypatch):
    # Layer by layer, each fed the unfused trunk's activation: a fused block is within
    # its own rounding bound of the float64 block (errors of earlier layers are not
    # compounded into a bound); the layers that are not fused are the same computation.
    trunk = build_trunk("small_cnn", make_config("small_cnn", (28, 28, 1)), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(8), (8, 28, 28, 1))
    text = jax.jit(lambda x: trunk(x, train=False)).lower(x).as_text()
    assert text.count(winograd.TARGET) == 4   # conv2-conv5; conv1 has one input channel
    layer_fn = nnx.jit(lambda layer, x: layer(x, train=False))
    fused_layers = 0
    for layer in trunk.layers:
        is_fused = isinstance(layer, ConvBlock) and fused.applies(layer.conv, layer.bn, x)
        got = layer_fn(layer, x)
        with monkeypatch.context() as patch:
            _unfused(patch)
            unfused_out = nnx.jit(lambda layer, x: layer(x, train=False))(layer, x)
        if is_fused:
            rounding.assert_within(got, *_block_reference(layer, x), f"fused {type(layer)}")
            fused_layers += 1
        else:
            np.testing.assert_array_equal(got, unfused_out)
        x = unfused_out
    assert fused_layers == 4


def _lowered(fn, *args, platform: str) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.usefixtures("one_cpu_device")
def test_gpu_lowering_keeps_xla_convolutions():
    block = _block(pool=True)
    x = jnp.ones((2, 8, 8, 16))

    def train_grad(x):
        return jax.grad(lambda x, k: jnp.sum(auxtl_conv.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=LAYOUT)), (0, 1))(x, block.conv.kernel[...])

    for fn, targets in ((lambda x: block(x, train=False), [winograd.TARGET]),
                        (train_grad, [winograd.TARGET])):
        cpu = _lowered(fn, x, platform="cpu")
        assert all(target in cpu for target in targets)
        try:
            gpu = _lowered(fn, x, platform="cuda")
        except Exception as error:  # noqa: BLE001 - a jax without GPU lowering rules
            pytest.skip(f"cannot lower for cuda here: {error}")
        assert "AuxtlWinograd" not in gpu and "convolution" in gpu


@pytest.mark.usefixtures("one_cpu_device")
def test_not_used_below_eight_channels_strided_or_in_bfloat16():
    x8, k8 = jnp.ones((1, 6, 6, 8)), jnp.ones((3, 3, 8, 4))
    same = ((1, 1), (1, 1))
    assert auxtl_conv.use_winograd(x8, k8, (1, 1), same)
    assert not auxtl_conv.use_winograd(jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 4, 4)),
                                       (1, 1), same)
    assert not auxtl_conv.use_winograd(x8, k8, (2, 2), same)
    assert not auxtl_conv.use_winograd(x8, jnp.ones((5, 5, 8, 4)), (1, 1), same)
    assert not auxtl_conv.use_winograd(x8.astype(jnp.bfloat16), k8.astype(jnp.bfloat16),
                                       (1, 1), same)
    assert not auxtl_conv.use_winograd(x8, jnp.ones((3, 3, 8, 4)), (1, 1), same,
                                       input_gradient=True)   # dx has 4 input channels
