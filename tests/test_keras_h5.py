"""The Keras 3 reader (`read_keras`) and the "keras" name map on the committed fixtures
(tests/fixtures/interop/make_keras_fixtures.py wrote them with keras 3.15.1): both files
read alike, the map infers small_cnn's config and covers its leaves, and the imported
trunk computes what Keras computed. Variants (a conv with a bias, a broken structure)
are written here with h5py and zipfile, no Keras needed."""

from __future__ import annotations

import json
import pathlib
import shutil
import zipfile

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl.errors import AuxtlWarning, InputError
from auxtl.interop.importer import import_trunk
from auxtl.interop.keras_h5 import MAX_ZIP_RATIO, natural_key, read_keras
from auxtl.interop.keras_names import KERAS, fold_conv_biases, infer_config, names
from auxtl.interop.name_maps import get_name_map
from auxtl.models.small_cnn import SmallCNNConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "interop"
KERAS_FILE = FIXTURES / "keras_small_cnn.keras"
WEIGHTS_FILE = FIXTURES / "keras_small_cnn.weights.h5"
WIDTHS = (8, 8, 16, 16, 32)


def _leaves(config) -> set[str]:
    trunk = nnx.eval_shape(lambda: auxtl.build_trunk("small_cnn", config, rngs=nnx.Rngs(0)))
    _, params, stats = nnx.split(trunk, nnx.Param, nnx.BatchStat)
    return {f"{collection}/{path}" for collection, state in
            (("params", params), ("batch_stats", stats))
            for path in _flat(nnx.to_pure_dict(state))}


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix.rstrip("/"): tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}/"))
    return out


def _set(tree, path: list[str], value) -> None:
    key = next(k for k in tree if str(k) == path[0])
    if len(path) == 1:
        tree[key] = jnp.asarray(value)
    else:
        _set(tree[key], path[1:], value)


def _imported(source):
    """The small_cnn trunk of the inferred config with every mapped leaf set (built
    abstract, then filled: no random initialisation to compute)."""
    config = SmallCNNConfig(**infer_config("small_cnn", source))
    graphdef, params, stats = nnx.split(
        nnx.eval_shape(lambda: auxtl.build_trunk("small_cnn", config, rngs=nnx.Rngs(0))),
        nnx.Param, nnx.BatchStat)
    trees = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
    for foreign, leaf in names("small_cnn", config, source).items():
        collection, *path = leaf.split("/")
        _set(trees[collection], path, source.tensors[foreign])
    nnx.replace_by_pure_dict(params, trees["params"])
    nnx.replace_by_pure_dict(stats, trees["batch_stats"])
    return nnx.merge(graphdef, params, stats)


def test_both_files_hold_the_same_arrays_named_from_the_config_or_by_position():
    archive, weights = read_keras(KERAS_FILE), read_keras(WEIGHTS_FILE)
    assert archive.format == weights.format == "keras"
    assert archive.layout == weights.layout == "flax"
    assert archive.info["keras_version"] == "3.15.1" and archive.info["layer_order"] == "config"
    assert weights.info == {"layer_order": "natural"}
    assert list(archive.tensors)[:6] == [
        "conv2d/kernel", "batch_normalization/gamma", "batch_normalization/beta",
        "batch_normalization/moving_mean", "batch_normalization/moving_variance",
        "conv2d_1/kernel"]
    positional = {"kernel": 0, "bias": 1, "gamma": 0, "beta": 1, "moving_mean": 2,
                  "moving_variance": 3}
    assert len(archive.tensors) == len(weights.tensors) == 5 * 5 + 2
    for name, array in archive.tensors.items():
        layer, variable = name.rsplit("/", 1)
        np.testing.assert_array_equal(weights.tensors[f"{layer}/vars/{positional[variable]}"],
                                      array)
    classes = [layer["class_name"] for layer in archive.info["layers"]]
    assert classes[:5] == ["InputLayer", "Conv2D", "BatchNormalization", "ReLU", "Conv2D"]
    assert archive.info["layers"][2]["epsilon"] == pytest.approx(1e-3)


def test_layers_without_a_config_come_in_natural_order(tmp_path):
    assert sorted(["conv2d_10", "conv2d", "conv2d_9", "conv2d_1"], key=natural_key) == [
        "conv2d", "conv2d_1", "conv2d_9", "conv2d_10"]
    path = tmp_path / "m.weights.h5"
    with h5py.File(path, "w") as f:
        for index in (10, 9):
            f.create_dataset(f"layers/conv2d_{index}/vars/0", data=np.full((1, 1, 1, 1), index))
        f.create_group("vars")
    assert list(read_keras(path).tensors) == ["conv2d_9/vars/0", "conv2d_10/vars/0"]


def test_the_map_infers_small_cnns_config_from_the_keras_config():
    source = read_keras(KERAS_FILE)
    assert get_name_map("keras") is KERAS and KERAS.recognizes(source)
    assert infer_config("small_cnn", source) == {
        "in_channels": 1, "widths": WIDTHS, "pool_after": (2, 4), "fc_dim": 32,
        "padding": "same", "bn_epsilon": pytest.approx(1e-3)}


def test_without_a_config_pool_after_is_left_to_the_default_and_the_assumption_said():
    with pytest.warns(AuxtlWarning, match="no Keras config.*pool_after"):
        values = infer_config("small_cnn", read_keras(WEIGHTS_FILE))
    assert values == {"in_channels": 1, "widths": WIDTHS, "fc_dim": 32, "padding": "same",
                      "bn_epsilon": 1e-3}


def test_both_files_map_the_same_arrays_onto_every_leaf_of_the_trunk():
    config = SmallCNNConfig(widths=WIDTHS, fc_dim=32, bn_epsilon=1e-3)
    by_leaf = []
    for path in (KERAS_FILE, WEIGHTS_FILE):
        source = read_keras(path)
        mapping = names("small_cnn", config, source)
        assert set(mapping) == set(source.tensors)
        assert sorted(mapping.values()) == sorted(_leaves(config))
        by_leaf.append({leaf: source.tensors[foreign] for foreign, leaf in mapping.items()})
    for leaf, array in by_leaf[0].items():
        np.testing.assert_array_equal(by_leaf[1][leaf], array)
    mapped = names("small_cnn", config, read_keras(KERAS_FILE))
    assert mapped["batch_normalization_4/moving_variance"] == "batch_stats/layers/4/bn/var"
    assert mapped["dense/kernel"] == "params/layers/5/dense/kernel"
    with pytest.raises(InputError, match="Keras export is not supported"):
        names("small_cnn", config, None)


def test_the_imported_trunk_computes_what_keras_computed():
    """Keras (torch backend) and XLA sum the same float32 products in different orders;
    their results differ by rounding, relative to the size of the terms summed, not of a
    near-cancelled output, so atol is rtol times the outputs' scale."""
    got, want = _forward(read_keras(KERAS_FILE))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _forward(source):
    """The imported trunk's outputs on the fixture inputs, and Keras's."""
    x = np.load(FIXTURES / "keras_inputs.npz")["x"]
    want = np.load(FIXTURES / "keras_small_cnn_outputs.npz")["y"]
    trunk = _imported(source)
    return np.asarray(nnx.jit(lambda model, x: model(x, train=False))(trunk, jnp.asarray(x))), want


def test_a_file_that_is_not_keras_is_refused_naming_it(tmp_path):
    text = tmp_path / "notes.keras"
    text.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.keras: not a Keras file"):
        read_keras(text)
    empty_zip = tmp_path / "empty.keras"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(InputError, match=r"empty\.keras: a zip without model\.weights\.h5"):
        read_keras(empty_zip)
    legacy = tmp_path / "old.h5"
    with h5py.File(legacy, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
    with pytest.raises(InputError, match=r"old\.h5: unknown layout.*Keras 2"):
        read_keras(legacy)


def _with_third_conv_bias(tmp_path, value: float) -> pathlib.Path:
    """The .weights.h5 fixture with a bias (all `value`) on its third Conv2D."""
    path = tmp_path / "bias.weights.h5"
    shutil.copy(WEIGHTS_FILE, path)
    with h5py.File(path, "r+") as f:
        f.create_dataset("layers/conv2d_2/vars/1", data=np.full(16, value, np.float32))
    return path


def test_a_conv_bias_is_left_out_of_the_map_for_the_importer_to_name(tmp_path):
    source = read_keras(_with_third_conv_bias(tmp_path, 0.0))
    mapping = names("small_cnn", SmallCNNConfig(widths=WIDTHS, fc_dim=32), source)
    assert set(source.tensors) - set(mapping) == {"conv2d_2/vars/1"}


def _edited_archive(tmp_path, edit, edit_weights=None) -> pathlib.Path:
    """The .keras fixture with its config.json's layer list passed through `edit` and its
    weights HDF5 (opened r+) through `edit_weights`."""
    path, weights = tmp_path / "edited.keras", tmp_path / "model.weights.h5"
    with zipfile.ZipFile(KERAS_FILE) as src, zipfile.ZipFile(path, "w") as dst:
        for entry in src.namelist():
            data = src.read(entry)
            if entry == "config.json":
                config = json.loads(data)
                config["config"]["layers"] = edit(config["config"]["layers"])
                data = json.dumps(config)
            elif entry == "model.weights.h5" and edit_weights:
                weights.write_bytes(data)
                with h5py.File(weights, "r+") as f:
                    edit_weights(f)
                data = weights.read_bytes()
            dst.writestr(entry, data)
    return path


def _remove(name):
    return lambda layers: [layer for layer in layers if layer["config"]["name"] != name]


def _set_conv(**settings):
    def edit(layers):
        layers[1]["config"].update(settings)
        return layers
    return edit


def _second_dense(layers):
    extra = json.loads(json.dumps(layers[-1]))
    extra["config"]["name"] = "dense_1"
    return layers + [extra]


def _swap_names(first: str, second: str):
    def edit(layers):
        for layer in layers:
            name = layer["config"]["name"]
            layer["config"]["name"] = {first: second, second: first}.get(name, name)
        return layers
    return edit


def test_layers_are_found_where_keras_stores_them_not_by_their_names(tmp_path):
    """Keras stores the k-th Conv2D under layers/conv2d_<k> whatever its name: with the
    first and last convs' names swapped, each still reads its own kernel."""
    source = read_keras(_edited_archive(tmp_path, _swap_names("conv2d", "conv2d_4")))
    assert list(source.tensors)[0] == "conv2d_4/kernel"
    assert source.tensors["conv2d_4/kernel"].shape == (3, 3, 1, 8)
    assert source.tensors["conv2d/kernel"].shape == (3, 3, 16, 32)
    assert infer_config("small_cnn", source)["widths"] == WIDTHS


@pytest.mark.parametrize("edit, message", [
    (_remove("batch_normalization_1"), r"needs a bn after Keras layer 'conv2d_1'.*'re_lu_1'"),
    (_second_dense, r"'dense_1' \(Dense\) follows the Dense 'dense'"),
    (_set_conv(padding="valid"), r"'conv2d' \(Conv2D\) has padding 'valid'"),
    (_set_conv(strides=[2, 2]), r"'conv2d' \(Conv2D\) has strides \[2, 2\]"),
])
def test_a_structure_small_cnn_cannot_compute_is_refused_naming_the_layer(tmp_path, edit, message):
    source = read_keras(_edited_archive(tmp_path, edit))
    with pytest.raises(InputError, match=message):
        infer_config("small_cnn", source)


def test_a_conv_bias_stated_in_the_config_is_named_and_left_out_of_the_map(tmp_path):
    def add_bias(f):
        f.create_dataset("layers/conv2d/vars/1", data=np.zeros(8, np.float32))

    path = _edited_archive(tmp_path, _set_conv(use_bias=True), add_bias)
    source = read_keras(path)
    assert list(source.tensors)[:2] == ["conv2d/kernel", "conv2d/bias"]
    mapping = names("small_cnn", SmallCNNConfig(widths=WIDTHS, fc_dim=32), source)
    assert set(source.tensors) - set(mapping) == {"conv2d/bias"}


def test_a_nested_model_reads_as_outer_inner_and_a_selected_prefix_maps(tmp_path):
    def nest(layers):
        return [{"module": "keras", "class_name": "Sequential",
                 "config": {"name": "backbone", "layers": layers}}]

    def nest_weights(f):   # Keras stores a nested model's layers under its own layers/
        f.move("layers", "inner")
        f.create_group("layers/sequential")
        f.move("inner", "layers/sequential/layers")

    source = read_keras(_edited_archive(tmp_path, nest, nest_weights))
    assert list(source.tensors)[0] == "backbone/conv2d/kernel"
    selected = source.select("backbone/")
    assert infer_config("small_cnn", source) == infer_config("small_cnn", selected)
    config = SmallCNNConfig(**infer_config("small_cnn", selected))
    assert config.widths == WIDTHS and config.pool_after == (2, 4)
    whole, part = names("small_cnn", config, source), names("small_cnn", config, selected)
    assert sorted(part.values()) == sorted(_leaves(config))
    assert {f"backbone/{foreign}": leaf for foreign, leaf in part.items()} == whole
    with pytest.raises(InputError, match="maps small_cnn, not 'resnet18'"):
        infer_config("resnet18", selected)


def _move_first_pool_after_block(block: int):
    def edit(layers):
        pool = next(layer for layer in layers if layer["class_name"] == "MaxPooling2D")
        layers.remove(pool)
        relus = [i for i, layer in enumerate(layers) if layer["class_name"] == "ReLU"]
        layers.insert(relus[block - 1] + 1, pool)
        return layers
    return edit


@pytest.mark.parametrize("edit, pool_after", [
    (_move_first_pool_after_block(1), (1, 4)),
    (_move_first_pool_after_block(3), (3, 4)),
    (lambda layers: [layer for layer in layers if layer["class_name"] != "MaxPooling2D"], ()),
])
def test_pool_after_is_read_from_where_the_config_puts_the_pools(tmp_path, edit, pool_after):
    source = read_keras(_edited_archive(tmp_path, edit))
    assert infer_config("small_cnn", source)["pool_after"] == pool_after


def _biased(tmp_path, seed=0) -> pathlib.Path:
    """The .keras fixture with a nonzero bias on every Conv2D (use_bias=True) and each
    following moving mean raised by that bias: Keras computes (conv + b) - (mean + b),
    the fixture's outputs, so a correct fold reproduces them and a dropped bias does not."""
    rng = np.random.default_rng(seed)

    def use_bias(layers):
        for layer in layers:
            if layer["class_name"] == "Conv2D":
                layer["config"]["use_bias"] = True
        return layers

    def add_biases(f):
        for k, suffix in enumerate(["", "_1", "_2", "_3", "_4"]):
            mean = f[f"layers/batch_normalization{suffix}/vars/2"]
            bias = rng.normal(size=mean.shape).astype(np.float32)
            f.create_dataset(f"layers/conv2d{suffix}/vars/1", data=bias)
            mean[...] = mean[...] + bias

    return _edited_archive(tmp_path, use_bias, add_biases)


def test_conv_biases_fold_into_the_moving_means_and_compute_what_keras_computed(tmp_path):
    """Tolerance as in the unbiased forward test: the fold adds one float32 rounding of
    (mean + b) - b per channel, far below the summation-order rounding."""
    source = read_keras(_biased(tmp_path))
    assert "conv2d_3/bias" in source.tensors
    folded = fold_conv_biases(source)
    assert not [name for name in folded.tensors if name.endswith("/bias")
                and name.startswith("conv2d")]
    assert folded.info["notes"][0] == "conv2d/bias folded into batch_normalization/moving_mean"
    assert len(folded.info["notes"]) == 5 and "notes" not in source.info
    assert set(names("small_cnn", SmallCNNConfig(widths=WIDTHS, fc_dim=32), folded)) == set(
        folded.tensors)
    got, want = _forward(folded)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    dropped, _ = _forward(source)   # the bias left out of the map: outputs shift
    assert not np.allclose(dropped, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_importer_folds_keras_conv_biases_and_records_it(tmp_path):
    result = import_trunk(_biased(tmp_path), model="small_cnn", out=tmp_path / "trunk")
    notes = auxtl.read_metadata(tmp_path / "trunk").imported["notes"]
    assert "conv2d/bias folded into batch_normalization/moving_mean" in notes
    assert result.report.counts()["unused"] == 0
    with np.load(FIXTURES / "keras_inputs.npz") as x, \
            np.load(FIXTURES / "keras_small_cnn_outputs.npz") as y:
        got, want = np.asarray(nnx.jit(lambda t, v: t(v))(result.trunk, x["x"])), y["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fold_reads_unnamed_variables_and_leaves_a_bias_free_source_alone(tmp_path):
    source = read_keras(_with_third_conv_bias(tmp_path, 1.0))
    folded = fold_conv_biases(source)
    assert set(source.tensors) - set(folded.tensors) == {"conv2d_2/vars/1"}
    np.testing.assert_array_equal(folded.tensors["batch_normalization_2/vars/2"],
                                  source.tensors["batch_normalization_2/vars/2"] - 1)
    assert folded.info["notes"] == ["conv2d_2/vars/1 folded into batch_normalization_2/vars/2"]
    plain = read_keras(WEIGHTS_FILE)
    assert fold_conv_biases(plain) is plain


def _weights_copy(tmp_path) -> pathlib.Path:
    path = tmp_path / "m.weights.h5"
    shutil.copy(WEIGHTS_FILE, path)
    return path


def _external_link(f, tmp_path):
    other = tmp_path / "secret.h5"
    with h5py.File(other, "w") as g:
        g.create_dataset("data", data=np.arange(4.0))
    f["layers/conv2d/vars/extra"] = h5py.ExternalLink(str(other), "/data")


def _soft_link(f, tmp_path):
    f["layers/conv2d/vars/extra"] = h5py.SoftLink("/layers/conv2d_1/vars/0")


def _external_storage(f, tmp_path):
    (tmp_path / "raw.bin").write_bytes(bytes(64))
    f.create_dataset("layers/conv2d/vars/extra", shape=(8,), dtype="f8",
                     external=[(str(tmp_path / "raw.bin"), 0, 64)])


def _virtual(f, tmp_path):
    layout = h5py.VirtualLayout(shape=(8,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(tmp_path / "elsewhere.h5"), "data", shape=(8,))
    f["layers/conv2d"].create_virtual_dataset("vars/extra", layout)


def _huge(f, tmp_path):
    f.create_dataset("layers/conv2d/vars/extra", shape=(32768, 32768), dtype="f4")


@pytest.mark.parametrize("edit, message", [
    (_external_link, r"/layers/conv2d/vars/extra is a ExternalLink"),
    (_soft_link, r"/layers/conv2d/vars/extra is a SoftLink"),
    (_external_storage, r"dataset /layers/conv2d/vars/extra keeps its bytes outside.*external"),
    (_virtual, r"dataset /layers/conv2d/vars/extra keeps its bytes outside.*virtual"),
    (_huge, r"dataset /layers/conv2d/vars/extra declares shape \(32768, 32768\)"),
])
def test_links_outside_storage_and_unwritten_giants_are_refused(tmp_path, edit, message):
    path = _weights_copy(tmp_path)
    with h5py.File(path, "r+") as f:
        edit(f, tmp_path)
    with pytest.raises(InputError, match=r"m\.weights\.h5: HDF5 .*" + message):
        read_keras(path)


def test_a_keras_archive_checks_its_embedded_weights_and_its_zip_ratio(tmp_path):
    archive = _edited_archive(tmp_path, lambda layers: layers, lambda f: _huge(f, tmp_path))
    with pytest.raises(InputError, match=r"edited\.keras: HDF5 dataset .*more than the \d+ "
                                         r"bytes of the HDF5 file"):
        read_keras(archive)
    bomb = tmp_path / "bomb.keras"
    size = MAX_ZIP_RATIO * 2000
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr("model.weights.h5", bytes(size))
    assert bomb.stat().st_size * MAX_ZIP_RATIO < size
    with pytest.raises(InputError, match=rf"bomb\.keras: its model\.weights\.h5 declares {size} "
                                         r"bytes.*zip bomb"):
        read_keras(bomb)
