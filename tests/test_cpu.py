"""auxtl.cpu: one switch (AUXTL_CPU_KERNELS) turns every component off, and then nothing
is compiled and the trunks lower to XLA alone; install() is idempotent; status()
speaks for every component; convolution_flops counts both kernels."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from auxtl import cpu
from auxtl.cpu import switch
from auxtl.errors import AuxtlWarning
from auxtl.models import ops
from conftest import CONV_LAYOUT as LAYOUT
from conftest import one_device_env, require_onednn, require_winograd


def test_switch_values():
    every = frozenset(switch.COMPONENTS)
    for value in (None, "", "1", "true", "ON", " yes "):
        assert switch.enabled_components(value) == every, value
    for value in ("0", "false", "No", "off"):
        assert switch.enabled_components(value) == frozenset(), value
    assert switch.enabled_components("onednn, sliced") == {"onednn", "sliced"}
    with pytest.warns(AuxtlWarning, match="unknown component.*winogard.*known: winograd"):
        assert switch.enabled_components("winogard,onednn") == {"onednn"}


def test_a_replaced_variable_still_turns_its_component_off_and_names_the_switch(monkeypatch):
    monkeypatch.setattr(switch, "_warned", set())
    monkeypatch.delenv(switch.ENV_VAR, raising=False)
    monkeypatch.setenv("AUXTL_ONEDNN", "0")
    with pytest.warns(AuxtlWarning, match="AUXTL_ONEDNN is replaced by AUXTL_CPU_KERNELS"):
        assert not switch.enabled("onednn")
    assert switch.enabled("winograd") and switch.enabled("sliced")
    assert switch.off_reason("onednn") == "off (AUXTL_ONEDNN=0; use AUXTL_CPU_KERNELS)"
    assert "AUXTL_ONEDNN=0" in switch.describe()
    monkeypatch.setenv("AUXTL_ONEDNN", "1")      # on: nothing changes (warned once already)
    assert switch.enabled("onednn")


@pytest.fixture
def reinstall(monkeypatch):
    """Lets a test change AUXTL_CPU_KERNELS and install(); puts back the environment
    and the hooks it found afterwards."""
    previous = ops.installed()
    yield monkeypatch
    monkeypatch.undo()
    ops.restore(previous)


def test_install_is_idempotent_and_follows_the_switch(reinstall):
    reinstall.delenv(switch.ENV_VAR, raising=False)
    cpu.install()
    first = ops.installed()
    assert first.conv is cpu.conv.conv_general_dilated
    assert first.conv_bn_inference is cpu.fused.conv_bn
    cpu.install()
    assert ops.installed() == first
    reinstall.setenv(switch.ENV_VAR, "onednn")
    cpu.install()
    assert ops.installed().conv is cpu.conv.conv_general_dilated
    assert ops.installed().conv_bn_inference is ops.DEFAULTS.conv_bn_inference
    reinstall.setenv(switch.ENV_VAR, "0")
    cpu.install()
    assert ops.installed() == ops.DEFAULTS
    reinstall.setenv(switch.ENV_VAR, "host_memory")   # no hook of its own
    cpu.install()
    assert ops.installed() == ops.DEFAULTS


def test_status_names_every_component():
    status = cpu.status()
    assert set(status) == {"switch", *switch.COMPONENTS}
    assert all(isinstance(v, str) and v for v in status.values())


# A trunk's training gradient and inference, lowered in a fresh process; the status
# and the custom calls they hold.
LOWER_A_TRUNK = """
import json, jax, jax.numpy as jnp, re
from flax import nnx
import auxtl
trunk = auxtl.build_trunk("small_cnn", input_shape=(28, 28, 1), rngs=nnx.Rngs(0),
                          widths=[8, 8, 16, 16, 16], fc_dim=16)
graphdef, state = nnx.split(trunk)
x = jnp.ones((2, 28, 28, 1))
loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x, train=True) ** 2)
infer = lambda s, x: nnx.merge(graphdef, s)(x, train=False)
texts = [jax.jit(jax.grad(loss)).lower(state, x).as_text(),
         jax.jit(infer).lower(state, x).as_text()]
print(json.dumps({"status": auxtl.cpu.status(),
                  "calls": [sorted(set(re.findall(r"custom_call @(\\w+)", t))) for t in texts],
                  "convolutions": [t.count("stablehlo.convolution") for t in texts]}))
"""


def lower_a_trunk(cache, switch_value: str) -> dict:
    env = {**os.environ, **one_device_env(), "JAX_PLATFORMS": "cpu",
           "AUXTL_CACHE_DIR": str(cache), switch.ENV_VAR: switch_value}
    out = subprocess.run([sys.executable, "-c", LOWER_A_TRUNK], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_switched_off_nothing_is_compiled_and_a_trunk_lowers_to_xla_alone(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    result = lower_a_trunk(cache, "0")
    assert result["status"] == {"switch": "off (AUXTL_CPU_KERNELS=0)",
                                **{name: "off (AUXTL_CPU_KERNELS=0)"
                                   for name in switch.COMPONENTS}}
    assert result["calls"] == [[], []]
    assert result["convolutions"][0] > 0 and result["convolutions"][1] > 0
    assert list(cache.iterdir()) == []


@pytest.mark.usefixtures("one_cpu_device")
def test_switched_on_the_same_trunk_uses_the_kernels(tmp_path):
    # The control of the test above: where the kernels can be built, the same program
    # with the switch on does compile them and lower to their calls.
    require_winograd()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    result = lower_a_trunk(cache, "1")
    assert result["status"]["winograd"] == "available"
    train, inference = result["calls"]
    assert "AuxtlWinogradConv" in train and inference == ["AuxtlWinogradConv"]
    assert list((cache / "native").glob("auxtl_winograd_conv-*.so"))


@pytest.mark.usefixtures("one_cpu_device")
def test_convolution_flops_counts_both_kernels():
    require_winograd()
    require_onednn()
    x, kernel = jnp.ones((3, 9, 10, 8)), jnp.ones((3, 3, 8, 20))

    def loss(x, k):
        return jnp.sum(cpu.conv.conv_general_dilated(x, k, (1, 1), "SAME",
                                                     dimension_numbers=LAYOUT) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
    xla = jax.jit(lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=LAYOUT)).lower(x, kernel).compile()
    one = xla.cost_analysis()["flops"]
    # forward and input gradient by Winograd, weight gradient by oneDNN
    assert cpu.winograd.convolution_flops(text) == pytest.approx(2 * one, rel=0.01)
    assert cpu.onednn.convolution_flops(text) == pytest.approx(one, rel=0.01)
    assert cpu.convolution_flops(text) == pytest.approx(3 * one, rel=0.01)
