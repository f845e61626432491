"""Real files written by PyTorch (torchvision, timm) imported into auxtl compute what PyTorch
computed; auxtl's exports re-import bit for bit and load into torchvision (recorded by the
fixture script); an imported trunk goes through `auxtl transfer` and `--search`.

The fixtures and how to regenerate them: tests/fixtures/interop/make_torch_fixtures.py,
make_keras_fixtures.py, make_auxtl_export.py.
"""

import hashlib
import json
import pathlib
import warnings

import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import cli
from auxtl.interop import export_trunk, import_trunk

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "interop"
# The bound on max|auxtl - torch| / max|torch| for a float32 forward pass. The two
# differ by rounding only (reduction order of every conv and BatchNorm); a wrong padding,
# layout or statistic moves the features by far more (checked below).
RELATIVE_TOLERANCE = 1e-4
TORCH_FILES = [("resnet18_w8.pt", "resnet18", "resnet18_w8"),
               ("resnet18_w8.safetensors", "resnet18", "resnet18_w8"),
               ("resnet18_w8_checkpoint.pth", "resnet18", "resnet18_w8"),
               ("resnet50_timm_w4.pt", "resnet50", "resnet50_timm_w4")]


@nnx.jit
def features(trunk, x):
    return trunk(x)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def inputs():
    with np.load(FIXTURES / "inputs.npz") as stored:
        return {name: stored[name] for name in stored.files}


@pytest.mark.parametrize("file, model, outputs", TORCH_FILES)
def test_a_torch_trunk_imports_and_computes_what_torch_computed(file, model, outputs, inputs):
    result = import_trunk(FIXTURES / file, model=model)
    assert result.metadata.config["padding"] == "torch"
    assert result.report.counts()["missing"] == 0 and result.report.counts()["unused"] == 0
    ignored = {r.source for r in result.report.leaves if r.action == "ignored"}
    assert any(name.endswith("num_batches_tracked") for name in ignored)
    assert any(name.endswith("fc.weight") for name in ignored)
    with np.load(FIXTURES / f"{outputs}_outputs.npz") as expected:
        for name, x in inputs.items():
            assert relative_error(features(result.trunk, x), expected[name]) <= RELATIVE_TOLERANCE, name


def test_the_check_fails_where_the_padding_is_not_torchs(inputs):
    result = import_trunk(FIXTURES / "resnet18_w8.pt", model="resnet18",
                          model_args={"padding": "same"})
    with np.load(FIXTURES / "resnet18_w8_outputs.npz") as expected:
        assert relative_error(features(result.trunk, inputs["x80"]), expected["x80"]) > 100 * RELATIVE_TOLERANCE


def _leaves(path):
    params, stats, _ = auxtl.load_trunk_state(path)
    import jax
    return dict(zip(map(str, jax.tree_util.tree_leaves_with_path((params, stats))),
                    map(np.asarray, jax.tree_util.tree_leaves((params, stats)))))


def test_export_then_reimport_is_bit_identical_in_both_formats(tmp_path):
    """(ResNet-50's names and layouts are covered leaf by leaf in test_torchvision_names.)"""
    file, model = "resnet18_w8.pt", "resnet18"
    import_trunk(FIXTURES / file, model=model, out=tmp_path / "trunk")
    original = _leaves(tmp_path / "trunk")
    for format in ("safetensors", "torch-names"):
        with warnings.catch_warnings():  # torch-names: "not torchvision's stock resnet18"
            warnings.simplefilter("ignore", auxtl.errors.AuxtlWarning)
            report = export_trunk(tmp_path / "trunk", tmp_path / f"{format}.safetensors",
                                  format=format)
        again = import_trunk(report.path, model=model, out=tmp_path / f"again-{format}")
        assert again.report.name_map == ("auxtl" if format == "safetensors" else "torchvision")
        reimported = _leaves(tmp_path / f"again-{format}")
        assert reimported.keys() == original.keys()
        for name, value in original.items():
            assert value.dtype == reimported[name].dtype
            assert np.array_equal(value, reimported[name]), (format, name)
        assert auxtl.read_metadata(tmp_path / f"again-{format}").input_shape == \
            auxtl.read_metadata(tmp_path / "trunk").input_shape


def test_the_recorded_torch_check_is_of_the_committed_export(inputs):
    """make_torch_fixtures.py --check-export loaded the export into torchvision and recorded
    the features' relative error; the record names this very file, and auxtl still
    computes the features it was compared against."""
    record = json.loads((FIXTURES / "export_check.json").read_text())
    export = FIXTURES / "auxtl_export_resnet18_w8.safetensors"
    assert record["export_sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
    assert record["passed"] and record["keys_ok"] and record["unexpected_keys"] == []
    assert all(key.startswith("fc.") for key in record["missing_keys"])
    assert max(record["max_relative_error"].values()) <= RELATIVE_TOLERANCE
    trunk = import_trunk(export, model="resnet18").trunk
    with np.load(FIXTURES / "auxtl_export_features.npz") as stored:
        for name, x in inputs.items():
            assert relative_error(features(trunk, x), stored[f"{name}_features"]) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("file", ["keras_small_cnn.keras", "keras_small_cnn.weights.h5"])
def test_a_keras_trunk_imports_and_computes_what_keras_computed(file, tmp_path):
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always", auxtl.errors.AuxtlWarning)
        result = import_trunk(FIXTURES / file, model="small_cnn")
    assert result.metadata.config["bn_epsilon"] == 1e-3 and result.report.name_map == "keras"
    notes = result.metadata.imported["notes"]
    if file.endswith(".weights.h5"):   # no config in the file: the assumptions are recorded
        assert "assumed" in notes[0] and str(given[0].message) == notes[0]
    else:
        assert notes == [] and given == []
    with np.load(FIXTURES / "keras_inputs.npz") as x, \
            np.load(FIXTURES / "keras_small_cnn_outputs.npz") as y:
        got = features(result.trunk, x[x.files[0]])
        assert relative_error(got, y[y.files[0]]) <= RELATIVE_TOLERANCE


def test_an_imported_torch_trunk_transfers_and_searches_end_to_end(tmp_path, capsys):
    """Imported at 16 px (cheap here), onto 8x8 grey digits: resized, channels adapted;
    `auxtl transfer` trains a head on it, `--search` fine-tunes it (head, then all) with
    scratch beside it."""
    trunk = str(tmp_path / "trunk")
    assert cli.main(["import", str(FIXTURES / "resnet18_w8.pt"), "--model", "resnet18",
                     "--input-shape", "16,16,3", "--out", trunk, "--quiet"]) == 0
    common = ["transfer", "--trunk", trunk, "--data", "digits", "--labels-per-class", "3",
              "--val-per-class", "3", "--batch-size", "10", "--seeds", "2",
              "--min-steps-per-epoch", "1", "--no-progress"]
    assert cli.main(common + ["--phases", "head:2", "--no-baseline",
                              "--out", str(tmp_path / "t")]) == 0
    model = auxtl.read_metadata(tmp_path / "t" / "model")
    assert model.source["path"] == trunk and model.input_shape == (16, 16, 1)
    assert cli.main(common + ["--phases", "head:2,all:2@0.1", "--out", str(tmp_path / "s"),
                              "--search", "--search-reuse", "5", "--search-unfreeze",
                              "0,all"]) == 0
    out = capsys.readouterr().out
    assert "resizing digits images 8x8 -> 16x16" in out and "picked on validation: K=5" in out
    result = json.loads((tmp_path / "s" / "search.json").read_text())
    assert len(result["grid"]) == 2 and result["config"]["trunk"] == trunk
    assert result["resize"]["to"] == [16, 16] and len(result["scratch_accuracies"]) == 2
