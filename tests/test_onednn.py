"""auxtl.cpu.onednn: oneDNN's convolutions through XLA's FFI match XLA's, and are used only
where they can be (differentiated float32 convolutions on one CPU device)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from auxtl.cpu import conv as auxtl_conv
from auxtl.cpu import native_build, onednn
from conftest import CONV_LAYOUT as LAYOUT
from conftest import assert_loaded, one_device_env, require_onednn
import rounding


@pytest.fixture
def _onednn_built() -> None:
    """Skip where oneDNN cannot be built (not installed, no compiler, switched off);
    installed but not built is a failure: the build is what these prove."""
    require_onednn()


needs_onednn = pytest.mark.usefixtures("_onednn_built")


@needs_onednn
def test_the_library_of_this_source_compiler_and_onednn_is_built_and_loaded():
    assert onednn.status() == "available"
    include, libdir = onednn.onednn_paths()
    command = onednn.build_command(native_build.compiler(), include, libdir)
    library = native_build.library_path(onednn.SOURCE, command, key_parts=onednn.key_parts())
    assert library.is_file() and library.parent == native_build.cache_dir()
    assert_loaded(library)


@needs_onednn
@pytest.mark.parametrize("strides,padding", [((1, 1), ((0, 0), (0, 0))),
                                             ((1, 1), ((2, 0), (1, 2))),
                                             ((2, 1), ((1, 1), (0, 1))),
                                             ((3, 2), ((0, 2), (1, 1)))])
def test_primitives_match_xla_for_explicit_padding_and_uneven_strides(strides, padding):
    assert onednn.status() == "available"   # builds and registers the handlers
    kx, kk, kd = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (5, 10, 11, 6))
    kernel = jax.random.normal(kk, (3, 2, 6, 7))

    def xla(x, kernel):
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=LAYOUT,
                                        precision="highest")
    y, vjp = jax.vjp(xla, x, kernel)
    dy = jax.random.normal(kd, y.shape)
    dx, dkernel = vjp(dy)
    # Against float64, within the rounding bound of a direct convolution summed in any
    # order (tests/rounding.py), as XLA's own convolution is.
    bounds = rounding.direct_bounds(x, kernel, dy, strides, padding)
    for what, ours, xla_value in (
            ("output", onednn.conv_forward(x, kernel, strides, padding, y.shape), y),
            ("input gradient", onednn.conv_input_grad(dy, kernel, strides, padding, x.shape),
             dx),
            ("kernel gradient",
             onednn.conv_weight_grad(x, dy, strides, padding, kernel.shape), dkernel)):
        rounding.assert_within(ours, *bounds[what], f"oneDNN {what}")
        rounding.assert_within(xla_value, *bounds[what], f"XLA {what}")


def _lowered(fn, *args, platform="cpu") -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _conv(x, kernel):
    return auxtl_conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=LAYOUT)


@pytest.mark.usefixtures("one_cpu_device")
@needs_onednn
def test_training_uses_onednn_and_inference_keeps_xla():
    x, kernel = jnp.ones((4, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    grads = _lowered(jax.grad(lambda x, k: jnp.sum(_conv(x, k) ** 2), argnums=(0, 1)), x, kernel)
    for target in onednn.TARGETS.values():
        assert target in grads
    assert "convolution" not in grads
    inference = _lowered(_conv, x, kernel)
    assert "convolution" in inference and "AuxtlOneDnn" not in inference
    # A frozen layer: differentiated only with respect to what comes after it.
    frozen = _lowered(jax.grad(lambda w: jnp.sum(_conv(x, kernel) * w)), jnp.ones((4, 6, 6, 4)))
    assert "AuxtlOneDnn" not in frozen
    try:
        gpu = _lowered(jax.grad(lambda x, k: jnp.sum(_conv(x, k)), argnums=(0, 1)), x, kernel,
                       platform="cuda")
    except Exception as error:  # noqa: BLE001 - a jax without GPU lowering rules
        pytest.skip(f"cannot lower for cuda here: {error}")
    assert "AuxtlOneDnn" not in gpu and "convolution" in gpu


@needs_onednn
def test_bfloat16_keeps_xla():
    x, kernel = jnp.ones((2, 6, 6, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 4), jnp.bfloat16)
    text = _lowered(jax.grad(lambda x, k: jnp.sum(_conv(x, k).astype(jnp.float32)),
                             argnums=(0, 1)), x, kernel)
    assert "AuxtlOneDnn" not in text


def _run(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


USES_ONEDNN = """
import jax, jax.numpy as jnp
from auxtl.cpu import conv, onednn
x = jnp.ones((4, 6, 6, 3))
print(onednn.status(), "|", conv.use_onednn(x, jnp.ones((3, 3, 3, 4)), ((1, 1), (1, 1))))
"""


def test_turned_off_by_the_switch_alone():
    assert _run(USES_ONEDNN, AUXTL_CPU_KERNELS="winograd,sliced") == (
        "off (AUXTL_CPU_KERNELS=winograd,sliced) | False")


@needs_onednn
def test_several_devices_keep_xla():
    # GSPMD cannot partition the custom calls: a sharded step keeps XLA's convolutions.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    assert _run(USES_ONEDNN, XLA_FLAGS=flags) == "available | False"
    assert _run(USES_ONEDNN, **one_device_env()) == "available | True"


@pytest.mark.usefixtures("one_cpu_device")
@needs_onednn
@pytest.mark.parametrize("strides,padding", [((1, 1), ((1, 1), (1, 1))),
                                             ((2, 1), ((1, 1), (0, 1))),
                                             ((3, 2), ((0, 2), (1, 1)))])
def test_flops_are_counted_as_xla_counts_a_convolution(strides, padding):
    x, kernel = jnp.ones((5, 10, 11, 6)), jnp.ones((3, 2, 6, 7))

    def loss(x, k):
        return jnp.sum(auxtl_conv.conv_general_dilated(x, k, strides, padding,
                                                       dimension_numbers=LAYOUT) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile()
    xla = jax.jit(lambda x, k: lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=LAYOUT)).lower(x, kernel).compile()
    # forward, input gradient and weight gradient: three convolutions' worth
    assert compiled.as_text().count("custom_call_target=\"AuxtlOneDnn") == 3
    assert onednn.convolution_flops(compiled.as_text()) == 3 * xla.cost_analysis()["flops"]


@needs_onednn
def test_a_failed_build_is_reported_and_training_falls_back(tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")
    code = ("import warnings, jax, jax.numpy as jnp\n"
            "from auxtl.cpu import conv, onednn\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))\n"
            "    g = jax.grad(lambda k: jnp.sum(conv.conv_general_dilated(\n"
            "        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2))(k)\n"
            "assert g.shape == k.shape\n"
            "assert any('oneDNN convolutions unavailable' in str(w.message) for w in caught)\n"
            "print(onednn.status())\n")
    assert _run(code, AUXTL_CACHE_DIR=str(not_a_dir), **one_device_env()).startswith(
        "build failed:")
