"""auxtl.transplant: the model-aware rules, without training (shapes only, fast)."""

from collections.abc import Mapping

import pytest
from flax import nnx

import auxtl
from auxtl import checkpoints, freezing, transfer, transplant
from auxtl.data import Normalization
from auxtl.freezing import Phase
from auxtl.models import config_to_json, make_config
from auxtl.models.target import TargetSpec

SMALL = dict(widths=(4, 4, 8, 8, 8), fc_dim=8)


def metadata_of(channels: int, **overrides) -> auxtl.TrunkMetadata:
    config = make_config("small_cnn", (16, 16, channels), **{**SMALL, **overrides})
    trunk = nnx.eval_shape(lambda: auxtl.build_trunk("small_cnn", config, rngs=nnx.Rngs(0)))
    return checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(config), input_shape=(16, 16, channels),
        normalization=Normalization((0.5,) * channels, (0.25,) * channels), tasks=[])


def test_the_public_names_come_from_transplant():
    assert auxtl.build_transfer_model is transplant.build_transfer_model
    assert auxtl.plan_transfer is transfer.plan_transfer


def test_input_kernels_are_traced_once_per_architecture(monkeypatch):
    """Every seed of a transfer asks for the rules again; the architecture is traced for
    the first only (issue 14: it was traced twice per seed)."""
    transplant._changed_paths.cache_clear()
    traced = []
    real = transplant._trunk_shapes
    monkeypatch.setattr(transplant, "_trunk_shapes",
                        lambda *args: traced.append(args[2]) or real(*args))
    metadata = metadata_of(1)
    rules = [transplant.rules_for(metadata, TargetSpec(reuse=2), 3) for _seed in range(3)]
    assert traced == [1, 3] and rules[0] == rules[1] == rules[2]
    assert rules[0][0].label == "input channels of params/layers/0/conv/kernel"
    # another architecture (a wider first layer) is traced anew
    transplant.rules_for(metadata_of(1, widths=(6, 4, 8, 8, 8)), TargetSpec(reuse=2), 3)
    assert traced == [1, 3, 1, 3]
    # same channels: nothing to adapt, nothing traced
    assert transplant.input_channel_paths(metadata, 1) == ()
    assert traced == [1, 3, 1, 3]


def test_reused_layers_and_phases_follow_the_spec():
    metadata = metadata_of(1)
    assert transplant.reused_layers(metadata, TargetSpec(reuse=2)) == ("conv1", "conv2")
    assert transplant.reused_layers(metadata, TargetSpec()) == metadata.layer_names
    reused = transplant.reused_layers(metadata, TargetSpec(reuse=2))
    # a script passing the JSON dict (what read_metadata returned before) still works
    assert transplant.reused_layers(metadata.to_json(), TargetSpec(reuse=2)) == reused
    assert isinstance(metadata, Mapping) and dict(metadata) == metadata.to_json()
    freezing.check_phases((Phase(1, "head+top2"),), reused)
    with pytest.raises(auxtl.InputError, match="top3"):
        freezing.check_phases((Phase(1, "head+top3"),), reused)
    with pytest.raises(auxtl.InputError, match="reuse=7 is outside 0..6"):
        transplant.rules_for(metadata, TargetSpec(reuse=7), 1)


def test_target_config_takes_the_target_channels():
    metadata = metadata_of(1)
    config = transplant.target_config(metadata, 3)
    assert config.in_channels == 3 and config.widths == SMALL["widths"]
