"""auxtl.models.ops: the hooks default to plain XLA, and the trunks reach whatever is
installed when they are traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from auxtl.models import build_trunk, make_config, ops
from auxtl.models.layers import ConvBlock
from conftest import U32
import rounding

TINY = {"widths": (8, 8, 16, 16, 16), "fc_dim": 16}


@pytest.fixture
def plain_hooks():
    """The defaults for the test, then whatever was installed before (auxtl.cpu's)."""
    previous = ops.installed()
    ops.restore()
    yield
    ops.restore(previous)


def trunk_texts(trunk, x) -> dict[str, str]:
    """Lowered text of a training gradient and of inference of `trunk` on `x`."""
    graphdef, state = nnx.split(trunk)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, train=True) ** 2)

    def infer(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    return {"train": jax.jit(jax.grad(loss)).lower(state, x).as_text(),
            "inference": jax.jit(infer).lower(state, x).as_text()}


@pytest.mark.usefixtures("plain_hooks")
def test_with_nothing_installed_a_trunk_lowers_to_xla_alone():
    assert ops.installed() == ops.DEFAULTS
    assert ops.DEFAULTS.conv is lax.conv_general_dilated
    trunk = build_trunk("small_cnn", make_config("small_cnn", (28, 28, 1), **TINY),
                        rngs=nnx.Rngs(0))
    for kind, text in trunk_texts(trunk, jnp.ones((2, 28, 28, 1))).items():
        assert "custom_call" not in text, kind
        assert "stablehlo.convolution" in text, kind


@pytest.mark.usefixtures("plain_hooks")
def test_modules_built_earlier_call_what_is_installed_when_traced():
    block = ConvBlock(8, 16, pool=True, rngs=nnx.Rngs(0))   # built before install
    calls = []

    def conv(*args, **kwargs):
        calls.append("conv")
        return lax.conv_general_dilated(*args, **kwargs)

    def conv_bn_inference(*args, **kwargs):
        calls.append("conv_bn_inference")
        return ops.plain_conv_bn_inference(*args, **kwargs)

    previous = ops.install(conv=conv, conv_bn_inference=conv_bn_inference)
    assert previous == ops.DEFAULTS
    graphdef, state = nnx.split(block)

    def trace(train: bool) -> None:
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=train), state,
                       jnp.ones((2, 6, 6, 8)))

    trace(train=True)
    assert calls == ["conv"]
    trace(train=False)
    assert calls == ["conv", "conv_bn_inference", "conv"]   # the default's conv(x)
    ops.restore(previous)
    trace(train=False)
    assert len(calls) == 3


def test_an_unknown_hook_is_refused():
    with pytest.raises(TypeError, match="pool"):
        ops.install(pool=lambda x: x)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 7, 5, 4)])
def test_max_pool_2x2_is_reduce_window_valid(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    want = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(ops.max_pool_2x2(x), want)


@pytest.mark.usefixtures("plain_hooks")
def test_default_conv_bn_inference_is_the_block_on_running_statistics():
    block = ConvBlock(3, 4, pool=True, rngs=nnx.Rngs(1))
    block.bn.mean[...] = jnp.arange(4.0) / 10
    block.bn.var[...] = jnp.arange(1.0, 5.0)
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    y = lax.conv_general_dilated(x, block.conv.kernel[...], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bn = block.bn
    centred = (y - bn.mean[...]) * (lax.rsqrt(bn.var[...] + bn.epsilon) * bn.scale[...])
    want = ops.max_pool_2x2(jnp.maximum(centred + bn.bias[...], 0))
    got = jax.jit(lambda x: block(x, train=False))(x)
    # flax's formula, the same float32 operations in the same order; compiled, XLA may
    # contract the last multiply and add into one FMA: at most the two roundings of
    # that product and sum apart (ReLU and max-pool are 1-Lipschitz).
    bound = rounding.pool_bound(2 * U32 * (np.abs(centred) + np.abs(bn.bias[...])))
    rounding.assert_within(got, want, bound, "default conv_bn_inference")
