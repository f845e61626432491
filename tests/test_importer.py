"""The importer: auxtl-named and rule-mapped arrays onto a trunk, strictly, with a report
in the checkpoint; every mismatch named with both sides' shapes; a user's own trunk too."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import auxtl
from auxtl import cli
from auxtl.errors import InputError, MissingFileError, UnknownNameError
from auxtl.interop.importer import import_trunk
from auxtl.interop.name_maps import flat_leaves
from auxtl.interop.report import ImportMismatchError

SMALL = {"widths": (4, 4, 8, 8, 8), "fc_dim": 8}


def _flat(trunk) -> dict[str, np.ndarray]:
    _, params, stats = nnx.split(trunk, nnx.Param, nnx.BatchStat)
    return {k: np.asarray(v) for k, v in flat_leaves(nnx.to_pure_dict(params),
                                                     nnx.to_pure_dict(stats)).items()}


@pytest.fixture(scope="module")
def trunk():
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(3), **SMALL)
    _, _, stats = nnx.split(trunk, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)   # statistics a trained trunk would have, not 0 and 1
    nnx.update(trunk, nnx.State(jax_tree_map_stats(stats, rng)))
    return trunk


def jax_tree_map_stats(stats, rng):
    import jax
    return jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype), stats)


@pytest.fixture
def npz(trunk, tmp_path):
    path = tmp_path / "trunk.npz"
    np.savez(path, **_flat(trunk))
    return path


def test_auxtl_names_import_bit_identical_with_a_report_in_the_checkpoint(trunk, npz, tmp_path):
    result = import_trunk(npz, model="small_cnn", model_args=SMALL, out=tmp_path / "ck")
    loaded = auxtl.load_trunk(tmp_path / "ck")
    for name, value in _flat(trunk).items():
        assert np.array_equal(_flat(loaded)[name], value), name
    x = jnp.linspace(0, 1, 2 * 28 * 28).reshape(2, 28, 28, 1)
    assert np.array_equal(loaded(x), trunk(x))
    imported = auxtl.read_metadata(tmp_path / "ck").imported
    assert imported["counts"]["loaded"] == len(_flat(trunk)) and imported["name_map"] == "auxtl"
    assert imported["sha256"] == result.report.sha256 and len(imported["sha256"]) == 64
    assert {r["leaf"] for r in imported["leaves"]} == set(_flat(trunk))


def test_an_auxtl_checkpoint_imports_as_orbax_under_its_trunk_prefix(trunk, npz, tmp_path):
    import_trunk(npz, model="small_cnn", model_args=SMALL, out=tmp_path / "a")
    result = import_trunk(tmp_path / "a", model="small_cnn")   # config read from its metadata
    assert result.report.prefix == "trunk/" and result.report.format == "orbax"
    assert result.metadata.config["widths"] == list(SMALL["widths"])
    x = jnp.ones((1, 28, 28, 1))
    assert np.array_equal(result.trunk(x), trunk(x))


def test_missing_surplus_and_misshaped_leaves_each_are_named_in_one_error(trunk, tmp_path):
    arrays = _flat(trunk)
    arrays.pop("params/layers/2/conv/kernel")                        # missing
    arrays["params/layers/1/extra"] = np.zeros(3, np.float32)         # names no leaf
    arrays["head/kernel"] = np.zeros((8, 10), np.float32)             # surplus
    arrays["batch_stats/layers/0/bn/mean"] = np.zeros(5, np.float32)  # mis-shaped
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ImportMismatchError) as error:
        import_trunk(tmp_path / "bad.npz", model="small_cnn", model_args=SMALL,
                     out=tmp_path / "never")
    message = str(error.value)
    assert "params/layers/2/conv/kernel (3, 3, 4, 8)" in message
    assert "head/kernel (8, 10)" in message and "--ignore" in message
    assert "batch_stats/layers/0/bn/mean (5,) vs batch_stats/layers/0/bn/mean (4,)" in message
    assert "params/layers/1/extra" in message
    assert not (tmp_path / "never").exists()


def test_ignore_and_no_strict_are_reported_leaf_by_leaf(trunk, tmp_path):
    arrays = _flat(trunk)
    arrays.pop("params/layers/5/dense/kernel")
    arrays["head/kernel"] = np.zeros((8, 10), np.float32)
    np.savez(tmp_path / "part.npz", **arrays)
    result = import_trunk(tmp_path / "part.npz", model="small_cnn", model_args=SMALL,
                          ignore=[r"^head/"], strict=False)
    actions = {(r.action, r.leaf or r.source) for r in result.report.leaves}
    assert ("ignored", "head/kernel") in actions
    assert ("missing", "params/layers/5/dense/kernel") in actions
    assert result.report.counts()["missing"] == 1
    with pytest.raises(ImportMismatchError, match="params/layers/5/dense/kernel"):
        import_trunk(tmp_path / "part.npz", model="small_cnn", model_args=SMALL,
                     ignore=[r"^head/"])


def test_dtypes_are_cast_and_reported(trunk, tmp_path):
    arrays = {k: v.astype(np.float16) if k.endswith("kernel") else v
              for k, v in _flat(trunk).items()}
    np.savez(tmp_path / "half.npz", **arrays)
    result = import_trunk(tmp_path / "half.npz", model="small_cnn", model_args=SMALL)
    notes = {r.leaf: r.note for r in result.report.leaves if r.action == "converted"}
    assert notes["params/layers/0/conv/kernel"] == "float16->float32"


def test_bad_input_is_named_before_anything_is_written(npz, tmp_path):
    with pytest.raises(MissingFileError, match="absent.pt"):
        import_trunk(tmp_path / "absent.pt", model="small_cnn")
    (tmp_path / "weights.xyz").write_bytes(b"0")
    with pytest.raises(InputError, match="--format"):
        import_trunk(tmp_path / "weights.xyz", model="small_cnn")
    with pytest.raises(InputError, match="no_such_model"):
        import_trunk(npz, model="no_such_model")
    with pytest.raises(UnknownNameError, match="no_such_map"):
        import_trunk(npz, model="small_cnn", name_map="no_such_map")
    with pytest.raises(InputError, match="input shape"):
        import_trunk(npz, model="small_cnn", model_args={**SMALL, "in_channels": 1},
                     input_shape=(28, 28, 3))
    with pytest.raises(InputError, match="normalisation has 3 channel"):
        import_trunk(npz, model="small_cnn", model_args=SMALL,
                     normalization=auxtl.Normalization((0.5,) * 3, (0.2,) * 3))
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="overwrite"):
        import_trunk(npz, model="small_cnn", model_args=SMALL, out=tmp_path / "taken")
    np.savez(tmp_path / "foreign.npz", **{"Conv_0.w": np.zeros(3, np.float32)})
    with pytest.raises(InputError, match="recognizes.*Conv_0.w"):
        import_trunk(tmp_path / "foreign.npz", model="small_cnn")


def test_a_user_registered_trunk_imports_from_torch_named_safetensors_by_rules(
        user_model, tmp_path):
    trunk = auxtl.build_trunk("user_pair", rngs=nnx.Rngs(1), width=5)
    flat = _flat(trunk)
    torch_names = {"params/layers/0/conv/kernel": "low.conv.weight",
                   "params/layers/0/conv/bias": "low.conv.bias",
                   "params/layers/0/bn/scale": "low.bn.weight",
                   "params/layers/0/bn/bias": "low.bn.bias",
                   "batch_stats/layers/0/bn/mean": "low.bn.running_mean",
                   "batch_stats/layers/0/bn/var": "low.bn.running_var"}
    torch_names.update({k.replace("/0/", "/1/"): v.replace("low", "high")
                        for k, v in torch_names.items()})
    tensors = {name: (np.transpose(flat[leaf], (3, 2, 0, 1)) if name.endswith("conv.weight")
                      else flat[leaf]).copy() for leaf, name in torch_names.items()}
    tensors["low.bn.num_batches_tracked"] = np.array(7, np.int64)
    safetensors.numpy.save_file(tensors, tmp_path / "pair.safetensors")
    rules = (r"^low\.=params/layers/0/;^high\.=params/layers/1/;"
             r"params/(.*)\.weight$=params/\1/kernel;"        # conv weight -> kernel
             r"params/(.*bn)/kernel$=params/\1/scale;"         # bn weight -> scale
             r"params/(.*)\.bias$=params/\1/bias;"
             r"params/(.*)\.running_(mean|var)$=batch_stats/\1/\2")
    result = import_trunk(tmp_path / "pair.safetensors", model="user_pair", name_map=rules,
                          ignore=["num_batches_tracked"], model_args={"width": 5},
                          input_shape=(8, 8, 1), out=tmp_path / "ck")
    assert result.report.layout == "torch"
    assert result.report.counts() == {"loaded": 10, "converted": 2, "ignored": 1,
                                      "missing": 0, "unused": 0}
    loaded = auxtl.load_trunk(tmp_path / "ck")
    x = jnp.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8, 1)
    assert np.array_equal(loaded(x), trunk(x))
    assert loaded.layer_names == ("low", "high")


def test_the_cli_imports_and_prints_the_report(npz, tmp_path, capsys):
    argv = ["import", str(npz), "--model", "small_cnn", "--out", str(tmp_path / "ck")]
    argv += [f"--model-arg=widths={list(SMALL['widths'])}", "--model-arg=fc_dim=8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"loaded +params/layers/0/conv/kernel +\(3, 3, 1, 4\) +<- "
                     r"params/layers/0/conv/kernel", out)
    assert "into small_cnn: 27 loaded" in out
    assert cli.main(argv) == 2 and "exists" in capsys.readouterr().err


def test_another_jax_codebases_orbax_tree_imports_by_prefix_and_rules(trunk, tmp_path):
    """A Flax (linen-style) training state saved with orbax: the model's collections under
    'state/', optimizer state beside them, linen module names renamed by rules."""
    import orbax.checkpoint as ocp
    flat = _flat(trunk)
    linen = {}
    for leaf, value in flat.items():   # params/layers/2/bn/scale -> params/Block_2/BatchNorm_0/scale
        collection, _, index, module, name = leaf.split("/")
        kind = {"conv": "Conv_0", "bn": "BatchNorm_0", "dense": "Dense_0"}[module]
        linen.setdefault(collection, {}).setdefault(f"Block_{index}", {}).setdefault(
            kind, {})[name] = value
    tree = {"state": linen, "opt_state": {"mu": np.zeros(3, np.float32)}, "step": np.int64(9)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "linen", tree)
    rules = (r"/Block_(\d+)/Conv_0/=/layers/\1/conv/;/Block_(\d+)/BatchNorm_0/=/layers/\1/bn/;"
             r"/Block_(\d+)/Dense_0/=/layers/\1/dense/")
    result = import_trunk(tmp_path / "linen", model="small_cnn", prefix="state/",
                          name_map=rules, model_args=SMALL)
    assert result.report.format == "orbax" and result.report.counts()["loaded"] == len(flat)
    outside = {r.source for r in result.report.leaves if r.note == "outside prefix 'state/'"}
    assert outside == {"opt_state/mu", "step"}
    x = jnp.ones((1, 28, 28, 1))
    assert np.array_equal(result.trunk(x), trunk(x))


def test_values_that_are_not_real_floats_or_do_not_fit_are_refused(trunk, tmp_path):
    for name, bad in (("complex", lambda v: v.astype(np.complex64)),
                      ("int", lambda v: v.astype(np.int32)),
                      ("overflow", lambda v: np.full(v.shape, 1e300))):
        arrays = _flat(trunk)
        arrays["params/layers/0/conv/kernel"] = bad(arrays["params/layers/0/conv/kernel"])
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(InputError, match="params/layers/0/conv/kernel"):
            import_trunk(tmp_path / f"{name}.npz", model="small_cnn", model_args=SMALL)


def test_a_bad_ignore_regex_is_named_before_the_file_is_read(tmp_path):
    with pytest.raises(InputError, match=r"--ignore '\('"):
        import_trunk(tmp_path / "absent.npz", model="small_cnn", ignore=["("])


def test_arrays_outside_an_automatic_prefix_are_named_in_a_warning(trunk, tmp_path):
    arrays = {f"trunk/{k}": v for k, v in _flat(trunk).items()}
    arrays["heads/rotation/kernel"] = np.zeros((8, 4), np.float32)
    np.savez(tmp_path / "wrapped.npz", **arrays)
    with pytest.warns(auxtl.errors.AuxtlWarning, match="1 array.*heads/rotation/kernel.*--prefix"):
        result = import_trunk(tmp_path / "wrapped.npz", model="small_cnn", model_args=SMALL)
    assert result.report.prefix == "trunk/"
