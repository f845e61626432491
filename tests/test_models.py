import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import auxtl


def param_count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_small_cnn_is_the_documented_156k_trunk():
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(0), input_shape=(28, 28, 1))
    assert trunk.layer_names == ("conv1", "conv2", "conv3", "conv4", "conv5", "fc")
    assert param_count(trunk) + (128 * 4 + 4) == 156_196
    assert trunk(jnp.zeros((3, 28, 28, 1))).shape == (3, 128)


@pytest.mark.parametrize("size,large_stem", [(28, False), (224, True)])
def test_resnet18_from_28_to_224_pixels(size, large_stem):
    config = auxtl.make_config("resnet18", (size, size, 3), width=8)
    assert config.large_stem is large_stem
    trunk = auxtl.build_trunk("resnet18", config, rngs=nnx.Rngs(0))
    assert len(trunk.layer_names) == 9 and trunk.layer_names[0] == "stem"
    assert trunk(jnp.zeros((2, size, size, 3))).shape == (2, 64)


def test_full_width_resnet18_has_11m_parameters():
    trunk = nnx.eval_shape(lambda: auxtl.build_trunk("resnet18", rngs=nnx.Rngs(0),
                                                     input_shape=(32, 32, 3)))
    assert param_count(trunk) == 11_168_832


def test_any_channel_count_and_a_clear_error_for_the_wrong_one():
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(0), input_shape=(16, 16, 5),
                              widths=(4, 4, 4, 4, 4), fc_dim=4)
    assert trunk(jnp.zeros((1, 16, 16, 5))).shape == (1, 4)
    with pytest.raises(ValueError, match=r"5 channel\(s\), got shape \(1, 16, 16, 3\)"):
        trunk(jnp.zeros((1, 16, 16, 3)))


def test_unknown_model_and_field_are_named():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*small_cnn"):
        auxtl.make_config("vgg")
    with pytest.raises(ValueError, match=r"\['depth'\]"):
        auxtl.make_config("small_cnn", depth=3)


def test_frozen_layers_keep_their_batch_statistics_in_training_mode():
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(0), input_shape=(8, 8, 1),
                              widths=(4, 4, 4, 4, 4), fc_dim=4)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(trunk, nnx.BatchStat)))
    trunk(jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32),
          train=True, frozen=("conv1", "conv2"))
    after = nnx.to_pure_dict(nnx.state(trunk, nnx.BatchStat))
    for index in (0, 1):
        np.testing.assert_array_equal(before["layers"][index]["bn"]["mean"],
                                      after["layers"][index]["bn"]["mean"])
    assert not np.array_equal(before["layers"][2]["bn"]["mean"], after["layers"][2]["bn"]["mean"])


def test_torch_padding_pads_strided_windows_symmetrically_and_bad_options_are_named():
    """At stride 2 on an even input XLA's SAME pads (0, 1), PyTorch (1, 1): the outputs
    have the same size but other values; at stride 1 the two paddings agree."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 3)), jnp.float32)
    same, torch = (auxtl.build_trunk("resnet18", rngs=nnx.Rngs(0), width=4, stage_sizes=(1, 1),
                                     padding=padding) for padding in ("same", "torch"))
    assert torch.layers[2].conv1.padding == ((1, 1), (1, 1)) and same.layers[2].conv1.padding == "SAME"
    low_same, low_torch = same.apply_layers(x, stop=2), torch.apply_layers(x, stop=2)
    assert np.array_equal(low_same, low_torch)                  # stride 1: the same windows
    # the strided conv (same weights: same seed and shapes): same size, shifted windows
    high_same, high_torch = same.layers[2].conv1(low_same), torch.layers[2].conv1(low_torch)
    assert high_same.shape == high_torch.shape == (1, 4, 4, 8)
    assert not np.allclose(high_same, high_torch)
    with pytest.raises(auxtl.BadParameterError, match="padding must be one of same, torch"):
        auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(0), padding="valid")
    with pytest.raises(auxtl.BadParameterError, match="epsilon must be positive"):
        auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(0), bn_epsilon=0.0)
