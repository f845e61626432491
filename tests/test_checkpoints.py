
import jax
import numpy as np
import pytest

import auxtl
from auxtl import checkpoints
from conftest import leaves_equal, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_small):
    out = tmp_path_factory.mktemp("pretrain")
    return auxtl.run_pretraining(tiny_config(out=str(out)), mnist_small)


def test_load_trunk_restores_identical_outputs(trained, mnist_small):
    trunk = auxtl.load_trunk(trained.trunk_path)
    model = auxtl.train.nnx.merge(trained.graphdef, trained.state.params,
                                  trained.state.batch_stats)
    metadata = auxtl.read_metadata(trained.trunk_path)
    norm = auxtl.Normalization.from_json(metadata["normalization"])
    x = auxtl.normalize(mnist_small.images[:32], norm)
    np.testing.assert_array_equal(np.asarray(trunk(x)), np.asarray(model.trunk(x)))


def test_metadata_describes_the_trunk(trained):
    metadata = auxtl.read_metadata(trained.trunk_path)
    assert metadata["model"] == "small_cnn"
    assert metadata["layer_names"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc"]
    assert metadata["input_shape"] == [28, 28, 1]
    assert metadata["tasks"] == [{"name": "rotation", "weight": 1.0,
                                  "params": {"all_rotations": True}}]
    assert metadata["config"]["widths"] == [8, 8, 16, 16, 16]
    assert len(metadata["normalization"]["mean"]) == 1
    assert metadata["auxtl_version"] == auxtl.__version__


def test_a_failed_save_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    path = tmp_path / "trunk"
    checkpoints.save_trunk(path, trunk_params=params, trunk_batch_stats=stats,
                           metadata=metadata)
    bad = jax.tree.map(lambda x: x + 1, params)

    def broken_json_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.ocp.args, "JsonSave", broken_json_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_trunk(path, trunk_params=bad, trunk_batch_stats=stats,
                               metadata=metadata)
    restored, _, _ = checkpoints.load_trunk_state(path)
    assert leaves_equal(restored, params)
    assert [p.name for p in tmp_path.iterdir()] == ["trunk"]


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        auxtl.read_metadata(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an auxtl trunk checkpoint"):
        auxtl.read_metadata(tmp_path / "empty")


def test_unknown_model_in_metadata_is_refused(trained, tmp_path):
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    checkpoints.save_trunk(tmp_path / "t", trunk_params=params, trunk_batch_stats=stats,
                           metadata={**metadata, "model": "evil_model"})
    with pytest.raises(ValueError, match="evil_model"):
        auxtl.load_trunk(tmp_path / "t")
