"""export_trunk: auxtl names (Flax layout, values bit for bit) or torchvision names (torch
layout), self-describing header metadata, an atomic write that keeps an existing file
unless told, and the warnings about what PyTorch would compute differently."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

import auxtl
from auxtl.checkpoints import trunk_metadata
from auxtl.errors import AuxtlWarning, InputError
from auxtl.interop.exporter import export_trunk
from auxtl.interop.importer import import_trunk
from auxtl.interop.name_maps import flat_leaves
from auxtl.interop.torchvision_names import names
from auxtl.models import config_to_json, make_config


def saved_trunk(path, model, **config):
    """A trunk checkpoint at `path` whose every leaf holds distinct random float32 values
    (so a swapped or transposed leaf shows); the module is built abstractly (shapes only)."""
    config = make_config(model, None, **config)
    trunk = nnx.eval_shape(lambda: auxtl.build_trunk(model, config, rngs=nnx.Rngs(0)))
    _, params, stats = nnx.split(trunk, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(3)
    randomized = [{key: randomize(value, rng) for key, value in nnx.to_pure_dict(c).items()}
                  for c in (params, stats)]
    metadata = trunk_metadata(trunk, config_json=config_to_json(config), input_shape=(16, 16, 3),
                              normalization=auxtl.Normalization((0.5,) * config.in_channels,
                                                                (0.25,) * config.in_channels),
                              tasks=[])
    auxtl.save_trunk(path, trunk_params=randomized[0], trunk_batch_stats=randomized[1],
                     metadata=metadata)
    return path


def randomize(node, rng):
    if isinstance(node, dict):
        return {key: randomize(value, rng) for key, value in node.items()}
    return rng.normal(size=node.shape).astype(np.float32)


@pytest.fixture(scope="module")
def trunks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    tiny = {"width": 4, "stage_sizes": (1, 1)}
    return {"torch": saved_trunk(folder / "torch", "resnet18", padding="torch", **tiny),
            "same": saved_trunk(folder / "same", "resnet18", bn_epsilon=1e-3, **tiny),
            "small_cnn": saved_trunk(folder / "cnn", "small_cnn", in_channels=3,
                                     widths=(4, 4), pool_after=(1,), fc_dim=4)}


def header(path):
    with safe_open(str(path), "np") as opened:
        return opened.metadata()


def test_safetensors_holds_every_leaf_bit_for_bit_with_its_metadata(trunks, tmp_path):
    out = tmp_path / "t.safetensors"
    report = export_trunk(trunks["torch"], out)
    params, stats, metadata = auxtl.load_trunk_state(trunks["torch"])
    leaves = flat_leaves(params, stats)
    written = load_file(out)
    assert list(written) == sorted(leaves) and report.count == len(leaves)
    assert report.names == {leaf: leaf for leaf in leaves} and report.format == "safetensors"
    for leaf, array in leaves.items():
        assert written[leaf].dtype == np.float32 and written[leaf].shape == array.shape
        assert np.array_equal(written[leaf].view(np.uint32), array.view(np.uint32)), leaf
    meta = header(out)
    assert meta["auxtl_format"] == "auxtl-trunk" and meta["layout"] == "flax"
    assert meta["auxtl_model"] == "resnet18" and "names" not in meta
    assert json.loads(meta["auxtl_config"]) == metadata.config
    assert json.loads(meta["auxtl_metadata"]) == metadata.to_json()
    assert report.warnings == () and report.path == out


def test_torch_names_are_torchvisions_in_torch_layout(trunks, tmp_path):
    out = tmp_path / "t.safetensors"
    with pytest.warns(AuxtlWarning) as given:  # padding="torch", epsilon 1e-5: the shapes only
        report = export_trunk(trunks["torch"], out, format="torch-names")
    assert [str(w.message) for w in given] == [f"export of {str(trunks['torch'])!r}: "
                                               f"{report.warnings[0]}"]
    assert report.warnings[0].startswith("not torchvision's stock resnet18 (width=4, "
                                         "large_stem=False, stage_sizes=(1, 1))")
    params, stats, metadata = auxtl.load_trunk_state(trunks["torch"])
    leaves = flat_leaves(params, stats)
    written = load_file(out)
    mapping = names("resnet18", metadata.config)
    assert set(written) == set(mapping) and report.names == {v: k for k, v in mapping.items()}
    assert "conv1.weight" in written and "layer2.0.downsample.1.running_var" in written
    assert not any(name.endswith("num_batches_tracked") for name in written)
    assert written["conv1.weight"].shape == (4, 3, 3, 3)              # (O, I, kh, kw)
    assert written["layer2.0.conv1.weight"].shape == (8, 4, 3, 3)
    assert written["layer2.0.downsample.0.weight"].shape == (8, 4, 1, 1)
    kernel = leaves["params/layers/2/conv1/kernel"]                   # (kh, kw, I, O)
    assert np.array_equal(written["layer2.0.conv1.weight"], kernel.transpose(3, 2, 0, 1))
    assert np.array_equal(written["layer1.0.bn2.running_mean"],
                          leaves["batch_stats/layers/1/bn2/mean"])
    meta = header(out)
    assert meta["layout"] == "torch" and meta["names"] == "torchvision"
    assert json.loads(meta["auxtl_metadata"]) == metadata.to_json()


def test_an_existing_file_is_kept_unless_overwrite(trunks, tmp_path):
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="t.safetensors.*exists.*overwrite=True"):
        export_trunk(trunks["torch"], out)
    assert out.read_bytes() == b"precious"
    export_trunk(trunks["torch"], out, overwrite=True)
    assert set(load_file(out)) and os.listdir(tmp_path) == ["t.safetensors"]  # no temp left
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_torch_names_warn_where_pytorch_computes_other_features(trunks, tmp_path):
    with pytest.warns(AuxtlWarning) as given:
        report = export_trunk(trunks["same"], tmp_path / "s.safetensors", format="torch-names")
    shown = [str(w.message) for w in given]
    assert any("padding='same'" in m and "symmetrically" in m for m in shown)
    assert any("epsilon is 0.001" in m for m in shown)
    assert len(report.warnings) == 3 and all(w in " ".join(shown) for w in report.warnings)


def test_a_torch_names_export_reimports_as_the_model_it_was(trunks, tmp_path):
    """Padding and epsilon cannot be read off arrays: the header's config wins."""
    with pytest.warns(AuxtlWarning):
        export_trunk(trunks["same"], tmp_path / "s.safetensors", format="torch-names")
    result = import_trunk(tmp_path / "s.safetensors", model="resnet18")
    assert result.report.name_map == "torchvision"
    saved = auxtl.read_metadata(trunks["same"])
    assert result.metadata.config == saved.config
    assert result.metadata.config["padding"] == "same" and result.metadata.config["bn_epsilon"] == 1e-3
    assert result.metadata.input_shape == saved.input_shape


def test_a_model_without_a_torch_map_exports_only_as_safetensors(trunks, tmp_path):
    with pytest.raises(InputError, match="'small_cnn'.*exported as: safetensors"):
        export_trunk(trunks["small_cnn"], tmp_path / "c.safetensors", format="torch-names")
    assert os.listdir(tmp_path) == []
    report = export_trunk(trunks["small_cnn"], tmp_path / "c.safetensors")
    assert report.count == len(load_file(tmp_path / "c.safetensors"))


def test_an_unknown_format_is_refused(trunks, tmp_path):
    with pytest.raises(InputError, match="'onnx'.*safetensors, torch-names"):
        export_trunk(trunks["torch"], tmp_path / "x", format="onnx")
