"""Shared fixtures: small real data and a narrow trunk so tests stay fast on 2 cores."""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile
import textwrap

# One persistent XLA compilation cache for this test session, fresh each session (never
# the user's ~/.cache): the suite's many `auxtl` subprocesses (which inherit it) and its
# tests compile the same steps and initializers over and over. Set before JAX is imported.
_XLA_CACHE = tempfile.mkdtemp(prefix="auxtl-test-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import auxtl  # noqa: E402
from auxtl import models  # noqa: E402

# As the command line does: the suite runs with the same malloc setting, in every order.
auxtl.keep_freed_memory()

TINY_TRUNK = {"widths": [8, 8, 16, 16, 16], "fc_dim": 16}


@pytest.fixture(scope="session")
def mnist() -> auxtl.Dataset:
    return auxtl.load_dataset("mnist5k")


@pytest.fixture(scope="session")
def mnist_small(mnist) -> auxtl.Dataset:
    """600 real MNIST images (deterministic choice)."""
    indices = np.random.default_rng(0).permutation(len(mnist))[:600]
    return mnist.subset(np.sort(indices))


def tiny_config(**overrides) -> auxtl.PretrainConfig:
    values = dict(model_overrides=dict(TINY_TRUNK), steps=6, batch_size=16, log_every=3,
                  eval_batch_size=100, progress=False,
                  optimizer=auxtl.OptimizerConfig(learning_rate=0.05, warmup_steps=2))
    values.update(overrides)
    return auxtl.PretrainConfig(**values)


# NHWC activations, HWIO kernels: the layout auxtl's convolutions use.
CONV_LAYOUT = ("NHWC", "HWIO", "NHWC")


# Unit roundoff of float32 and float64: a correctly rounded operation returns
# (exact result) * (1 + d) with |d| <= u (Higham, Accuracy and Stability of Numerical
# Algorithms, 2nd ed., section 2.2).
U32, U64 = 2.0 ** -24, 2.0 ** -53


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of a product of n
    rounding factors (1 + d_i). A sum of products whose every term passes through at
    most n roundings, in any order, tree or blocking (FMA only removes roundings), is
    within gamma_n * (the same sum of the terms' absolute values) of the exact sum
    (Higham, Lemma 3.1 and eq. 3.5)."""
    if n * u >= 1:
        raise ValueError(f"gamma({n}) is unbounded at u={u}")
    return n * u / (1 - n * u)


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in float64 (Frobenius over all elements). A measure, not a
    tolerance: bound it by one derived from the computation (see tests/rounding.py,
    which the convolution tests use to compare elementwise against float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def leaves_equal(a, b) -> bool:
    import jax
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(flat_a, flat_b))


def assert_loaded(library) -> None:
    """`library` (a path) is mapped into this process: dlopen'ed, not just on disk."""
    maps = pathlib.Path("/proc/self/maps").read_text()
    loaded = sorted({line.split()[-1] for line in maps.splitlines() if "auxtl_" in line})
    assert str(pathlib.Path(library).resolve()) in maps, (
        f"{library} is not loaded; loaded auxtl libraries: {loaded}")


@pytest.fixture
def one_cpu_device() -> None:
    """Skip with several devices: auxtl's custom calls (oneDNN, Winograd) run on one CPU
    device only (GSPMD cannot partition them), so with several
    (XLA_FLAGS=--xla_force_host_platform_device_count) XLA's convolutions are kept by
    design and a test that expects the calls does not apply."""
    import jax
    if jax.device_count() > 1:
        pytest.skip(f"{jax.device_count()} devices: XLA's convolutions by design")


def one_device_env() -> dict[str, str]:
    """XLA_FLAGS without a forced host device count, for a subprocess on one device."""
    import os
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return {"XLA_FLAGS": " ".join(flags)}


# Statuses that mean a kernel cannot be built here (a skip); any other status but
# "available" is a failure: where it could be built, the build is part of what is proved.
CANNOT_BUILD = ("off", "no C++ compiler", "unsupported platform", "not installed")


def require_kernel(name: str) -> None:
    """Skip unless auxtl.cpu's `name` kernel ("winograd" or "onednn") can be built here
    (switched off, no compiler, not Linux, oneDNN not installed); fail where it could
    and was not."""
    from auxtl import cpu
    status = getattr(cpu, name).status()
    if status.startswith(CANNOT_BUILD):
        pytest.skip(f"{name} convolutions: {status}")
    assert status == "available", f"{name} convolutions: {status}"


def require_winograd() -> None:
    require_kernel("winograd")


def require_onednn() -> None:
    require_kernel("onednn")


# A user's own two-layer trunk, registered from a file (tests of the model registry and imports).
USER_MODEL = textwrap.dedent('''
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    import auxtl


    @dataclasses.dataclass(frozen=True)
    class PairConfig:
        in_channels: int = 1
        width: int = 6


    class Block(nnx.Module):
        """conv 3x3 + BatchNorm + ReLU + 2x2 mean pool; `out_dim` for target trunks."""

        def __init__(self, cin, cout, *, rngs):
            self.conv = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(cout, rngs=rngs)
            self.out_dim = cout

        def __call__(self, x, *, train):
            x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
            n, h, w, c = x.shape
            return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


    @auxtl.register_model("user_pair", PairConfig)
    def build_pair(config, *, rngs):
        layers = [Block(config.in_channels, config.width, rngs=rngs),
                  Block(config.width, config.width, rngs=rngs)]
        return auxtl.Trunk(layers, ["low", "high"], feature_dim=config.width,
                           model_name="user_pair", in_channels=config.in_channels)
''')


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "pair_model.py"
    path.write_text(USER_MODEL)
    auxtl.load_model_module(path)
    auxtl.load_model_module(path)  # a second load is a no-op, not a clash
    yield path
    models.MODELS.pop("user_pair", None)
