"""Transfer inputs: channel adaptation for every trunk, and bad flags refused early."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import checkpoints, surgery
from auxtl.data import Normalization
from auxtl.models import config_to_json, make_config
from auxtl.models.target import TargetSpec
from auxtl.transfer import build_transfer_model, new_transfer_model, rules_for, variables
from conftest import relative_error

SMALL = {"small_cnn": dict(widths=(4, 4, 4, 4, 4), fc_dim=4),
         "nin": dict(width=8, num_blocks=2),
         "resnet18": dict(width=4, stage_sizes=(1, 1)),
         "resnet50": dict(width=4, stage_sizes=(1, 1))}
FIRST_CONV = {"nin": "params/layers/0/convs/0/conv/kernel"}
SIZE = 16


def source_trunk(model: str, channels: int, seed: int = 0):
    config = make_config(model, (SIZE, SIZE, channels), **SMALL.get(model, {}))
    trunk = auxtl.build_trunk(model, config, rngs=nnx.Rngs(seed))
    # non-trivial statistics, so copying them (or not) shows in the features
    rng = np.random.default_rng(seed)
    stats = nnx.state(trunk, nnx.BatchStat)
    flat = surgery.flatten(nnx.to_pure_dict(stats))
    nnx.replace_by_pure_dict(stats, surgery.unflatten({
        path: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if path.endswith("var")
                          else rng.normal(0.0, 0.05, x.shape), x.dtype)
        for path, x in flat.items()}))
    nnx.update(trunk, stats)
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(config), input_shape=(SIZE, SIZE, channels),
        normalization=Normalization((0.5,) * channels, (0.25,) * channels), tasks=[])
    return trunk, metadata


@pytest.mark.parametrize("model", auxtl.list_models())
@pytest.mark.parametrize("source_channels,target_channels", [(1, 3), (3, 1)])
def test_every_trunk_adapts_its_first_convolution(model, source_channels, target_channels):
    trunk, metadata = source_trunk(model, source_channels)
    tree = variables(trunk)
    expected = FIRST_CONV.get(model, "params/layers/0/conv/kernel")
    # planned (shapes only) and transplanted: one adapted kernel, every other leaf copied
    target = nnx.eval_shape(lambda: new_transfer_model(
        metadata, TargetSpec(), num_classes=3, in_channels=target_channels, seed=1))
    rules = rules_for(metadata, TargetSpec(), target_channels)
    planned = surgery.plan(tree, variables(target.trunk), rules)
    model_out, report = build_transfer_model(
        metadata, tree["params"], tree["batch_stats"], TargetSpec(), num_classes=3,
        in_channels=target_channels, seed=1)
    assert report == planned
    assert [e.path for e in report.entries if e.action == "adapted"] == [expected]
    assert report.counts()["kept"] == 0 and report.counts()["dropped"] == 0
    adapted = surgery.flatten(variables(model_out.trunk))[expected]
    assert adapted.shape[2] == target_channels

    # adapt_channels semantics: a grey image replicated over the channels gives the
    # source's features
    grey = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 1)).astype(np.float32)
    source_features = trunk(jnp.repeat(grey, source_channels, axis=-1))
    target_features = model_out.trunk(jnp.repeat(grey, target_channels, axis=-1))
    assert float(jnp.abs(source_features).max()) > 0
    assert relative_error(target_features, source_features) < 1e-4


@pytest.mark.parametrize("model", auxtl.list_models())
def test_the_input_kernels_are_found_from_the_architecture(model):
    from auxtl.transfer import input_channel_paths
    _, metadata = source_trunk(model, 1)
    assert input_channel_paths(metadata, 3) == (
        FIRST_CONV.get(model, "params/layers/0/conv/kernel"),)
    assert input_channel_paths(metadata, 1) == ()


def test_partial_reuse_adapts_only_reused_layers():
    _, metadata = source_trunk("nin", 1)
    assert [r.label for r in rules_for(metadata, TargetSpec(reuse=0), 3)] == ["rest"]
    rules = rules_for(metadata, TargetSpec(reuse=1), 3)
    assert rules[0].on_mismatch == "adapt_channels"
    assert rules[0].source_path(FIRST_CONV["nin"]) == FIRST_CONV["nin"]
