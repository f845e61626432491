"""surgery: flatten/unflatten, rules, plan/transplant, reports, channel adaptation."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import surgery
from auxtl.surgery import (Rule, adapt_input_channels, flatten, layer_index,
                           lower_layers_rules, plan, regex_rules, transplant, unflatten)


def conv_tree(seed: int, in_channels: int = 1, widths=(4, 4, 8), dtype=np.float32) -> dict:
    """A combined {"params", "batch_stats"} tree shaped like a small_cnn trunk's."""
    rng = np.random.default_rng(seed)
    params, stats, c = {}, {}, in_channels
    for i, w in enumerate(widths):
        params[i] = {"conv": {"kernel": rng.normal(size=(3, 3, c, w)).astype(dtype)},
                     "bn": {"scale": rng.normal(size=(w,)).astype(dtype),
                            "bias": rng.normal(size=(w,)).astype(dtype)}}
        stats[i] = {"bn": {"mean": rng.normal(size=(w,)).astype(dtype),
                           "var": rng.uniform(1, 2, size=(w,)).astype(dtype)}}
        c = w
    return {"params": {"layers": params}, "batch_stats": {"layers": stats}}


def all_dict_ids(tree) -> set[int]:
    ids = {id(tree)}
    for value in tree.values():
        if isinstance(value, dict):
            ids |= all_dict_ids(value)
    return ids


def trees_equal(a, b) -> bool:
    fa, fb = flatten(a), flatten(b)
    return list(fa) == list(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)


# ------------------------------------------------------------------ paths

def test_flatten_unflatten_round_trip_with_int_keys():
    tree = {"layers": {10: {"w": 1}, 2: {"conv": {"kernel": np.ones(2)}}}, "head": {"b": 3}}
    flat = flatten(tree)
    assert list(flat) == ["head/b", "layers/2/conv/kernel", "layers/10/w"]  # ints numerically
    back = unflatten(flat)
    assert set(back["layers"]) == {2, 10}  # int keys restored
    assert trees_equal(back, tree)
    assert flatten(back).keys() == flat.keys()


def test_flatten_rejects_ambiguous_keys():
    with pytest.raises(ValueError, match="a/b"):
        flatten({"a/b": 1})
    with pytest.raises(ValueError, match="x/0"):
        flatten({"x": {0: 1, "0": 2}})


def test_layer_index():
    assert layer_index("layers/3/conv/kernel") == 3
    assert layer_index("trunk/layers/12/bn/mean") == 12
    assert layer_index("batch_stats/layers/0") == 0
    assert layer_index("head/dense/kernel") is None
    assert layer_index("mylayers/3/w") is None
    assert layer_index("layers/x/3") is None
    assert layer_index("trunk/layers/1/sub/layers/5/w") == 1


@pytest.mark.parametrize("k", [0, 1, 3, 11])
def test_lower_layers_rule_agrees_with_layer_index(k):
    paths = ["layers/0/w", "layers/2/conv/kernel", "trunk/layers/10/bn/scale",
             "params/layers/1/bn/bias", "batch_stats/layers/12/bn/mean", "head/w",
             "layers/1", "a/layers/5/b/layers/0/w", "layers/foo/layers/2/w", "xlayers/0/w"]
    rules = lower_layers_rules(k)
    for path in paths:
        index = layer_index(path)
        expected = "copy" if index is not None and index < k else "keep"
        assert surgery._first_rule(path, rules).action == expected, path


# ------------------------------------------------------------------ transplant

def test_copied_equal_source_kept_equal_target():
    source, target = conv_tree(0), conv_tree(1)
    out, report = transplant(source, target, lower_layers_rules(2))
    fo, fs, ft = flatten(out), flatten(source), flatten(target)
    assert list(fo) == list(ft)
    for entry in report.entries:
        if entry.action == "copied":
            assert np.array_equal(fo[entry.path], fs[entry.source])
        elif entry.action == "kept":
            assert np.array_equal(fo[entry.path], ft[entry.path])
    assert report.counts() == {"copied": 10, "kept": 5, "reinitialised": 0, "adapted": 0,
                               "dropped": 0}


def test_inputs_unchanged_and_no_shared_dicts():
    source, target = conv_tree(0), conv_tree(1)
    source_before, target_before = copy.deepcopy(source), copy.deepcopy(target)
    out, _ = transplant(source, target, lower_layers_rules(2))
    assert trees_equal(source, source_before) and trees_equal(target, target_before)
    assert not all_dict_ids(out) & (all_dict_ids(source) | all_dict_ids(target))


def test_combined_tree_copies_bn_stats_of_lower_layers_only():
    source, target = conv_tree(0), conv_tree(1)
    out, report = transplant(source, target, lower_layers_rules(2))
    stats_out, stats_src = out["batch_stats"]["layers"], source["batch_stats"]["layers"]
    stats_tgt = target["batch_stats"]["layers"]
    for i in (0, 1):
        for name in ("mean", "var"):
            assert np.array_equal(stats_out[i]["bn"][name], stats_src[i]["bn"][name])
    for name in ("mean", "var"):
        assert np.array_equal(stats_out[2]["bn"][name], stats_tgt[2]["bn"][name])
    by_path = {e.path: e.action for e in report.entries}
    assert by_path["batch_stats/layers/1/bn/mean"] == "copied"
    assert by_path["batch_stats/layers/2/bn/var"] == "kept"


def test_shape_mismatch_error_names_path_and_both_shapes():
    source, target = conv_tree(0, in_channels=1), conv_tree(1, in_channels=3)
    with pytest.raises(ValueError) as info:
        transplant(source, target, lower_layers_rules(2))
    message = str(info.value)
    assert "params/layers/0/conv/kernel" in message
    assert "(3, 3, 3, 4)" in message and "(3, 3, 1, 4)" in message
    assert message == ("params/layers/0/conv/kernel: target shape (3, 3, 3, 4) != "
                       "source shape (3, 3, 1, 4)")


def test_shape_mismatch_reinit_keeps_target():
    source, target = conv_tree(0, in_channels=1), conv_tree(1, in_channels=3)
    out, report = transplant(source, target, lower_layers_rules(2, on_mismatch="reinit"))
    path = "params/layers/0/conv/kernel"
    assert np.array_equal(flatten(out)[path], flatten(target)[path])
    entries = {(e.path, e.action): e for e in report.entries}
    entry = entries[(path, "reinitialised")]
    assert entry.shape == (3, 3, 3, 4) and entry.source_shape == (3, 3, 1, 4)
    assert [e.path for e in report.entries].count(path) == 1  # no separate "dropped" row


def test_dtype_mismatch_error():
    source = conv_tree(0, dtype=np.float32)
    target = conv_tree(1, dtype=np.float16)
    with pytest.raises(ValueError, match="float16") as info:
        transplant(source, target, lower_layers_rules(1))
    assert "params/layers/0/conv/kernel: target dtype float16 != source dtype float32" \
        in str(info.value)


def test_all_problems_reported_at_once():
    source, target = conv_tree(0, dtype=np.float32), conv_tree(1, dtype=np.float16)
    with pytest.raises(ValueError) as info:
        plan(source, target, lower_layers_rules(2))
    assert str(info.value).count("!= source dtype") == 10


def test_missing_source_error_and_reinit():
    source, target = conv_tree(0, widths=(4, 4)), conv_tree(1, widths=(4, 4, 8))
    rules = [Rule("layers/", "copy")]
    with pytest.raises(ValueError) as info:
        transplant(source, target, rules)
    assert "params/layers/2/conv/kernel: source path 'params/layers/2/conv/kernel' not found" \
        in str(info.value)
    out, report = transplant(source, target, [Rule("layers/", "copy", on_missing="reinit")])
    assert trees_equal(out["params"]["layers"][2], target["params"]["layers"][2])
    assert report.counts()["reinitialised"] == 5 and report.counts()["copied"] == 10


def test_missing_error_names_mapped_source_path():
    source, target = conv_tree(0), conv_tree(1)
    rules = [Rule("^params/", "copy", source="weights/"), Rule(".*", "keep")]
    with pytest.raises(ValueError, match="params/layers/0/bn/bias: source path "
                                         "'weights/layers/0/bn/bias' not found"):
        plan(source, target, rules)


def test_source_mapping_renames():
    source = {"backbone": conv_tree(0)["params"]}
    target = conv_tree(1)
    rules = [Rule("^params/", "copy", source="backbone/"), Rule(".*", "keep")]
    out, report = transplant(source, target, rules)
    assert trees_equal(out["params"], source["backbone"])
    assert trees_equal(out["batch_stats"], target["batch_stats"])
    entry = next(e for e in report.entries if e.path == "params/layers/0/conv/kernel")
    assert entry.source == "backbone/layers/0/conv/kernel"
    assert report.counts()["dropped"] == 0


def test_uncovered_path_error():
    source, target = conv_tree(0), conv_tree(1)
    with pytest.raises(ValueError, match="no rule covers batch_stats/layers/0/bn/mean"):
        transplant(source, target, [Rule("^params/", "copy")])


def test_dropped_source_leaves_reported():
    source = conv_tree(0, widths=(4, 4, 8, 8))
    source["params"]["head"] = {"kernel": np.zeros((8, 4), np.float32)}
    target = conv_tree(1, widths=(4, 4))
    out, report = transplant(source, target, lower_layers_rules(2))
    dropped = {e.path for e in report.entries if e.action == "dropped"}
    assert dropped == {p for p in flatten(source)
                       if "head" in p or layer_index(p) in (2, 3)}
    assert all(e.reason == "not used by the target" for e in report.entries
               if e.action == "dropped")
    assert trees_equal(out, {"params": {"layers": {i: source["params"]["layers"][i]
                                                   for i in (0, 1)}},
                             "batch_stats": {"layers": {i: source["batch_stats"]["layers"][i]
                                                        for i in (0, 1)}}})


def test_regex_rules_first_match_wins():
    source, target = conv_tree(0), conv_tree(1)
    rules = [Rule(r"layers/0/bn", "keep"), Rule(r"layers/0/", "copy"), Rule(".*", "reinit")]
    out, report = transplant(source, target, rules)
    actions = {e.path: e.action for e in report.entries if e.action != "dropped"}
    assert actions["params/layers/0/bn/scale"] == "kept"
    assert actions["batch_stats/layers/0/bn/mean"] == "kept"
    assert actions["params/layers/0/conv/kernel"] == "copied"
    assert actions["params/layers/1/conv/kernel"] == "reinitialised"
    rules = regex_rules([r"conv/kernel$", r"layers/0/"])
    _, report = transplant(source, target, rules)
    copied = {e.path for e in report.entries if e.action == "copied"}
    assert copied == {p for p in flatten(target)
                      if p.endswith("conv/kernel") or "layers/0/" in p}


def test_rule_validates_options():
    with pytest.raises(ValueError, match="action"):
        Rule(".*", "move")
    with pytest.raises(ValueError, match="on_mismatch"):
        Rule(".*", "copy", on_mismatch="ignore")


def test_adapt_channels_rule():
    source, target = conv_tree(0, in_channels=1), conv_tree(1, in_channels=3)
    rules = lower_layers_rules(2, on_mismatch="adapt_channels")
    out, report = transplant(source, target, rules)
    path = "params/layers/0/conv/kernel"
    entry = next(e for e in report.entries if e.path == path)
    assert entry.action == "adapted" and entry.source_shape == (3, 3, 1, 4)
    np.testing.assert_array_equal(flatten(out)[path],
                                  adapt_input_channels(flatten(source)[path], 3))
    # BN vectors of different width cannot be adapted: still an error naming both shapes.
    wide = conv_tree(1, widths=(8, 4, 8))
    with pytest.raises(ValueError, match=r"target shape \(8,\) != source shape \(4,\)"):
        plan(source, wide, rules)


# ------------------------------------------------------------------ plan & report

def test_plan_equals_transplant_report_and_raises_same_errors():
    source, target = conv_tree(0), conv_tree(1)
    for rules in (lower_layers_rules(2), regex_rules(["bn"]), lower_layers_rules(0)):
        assert plan(source, target, rules) == transplant(source, target, rules)[1]
    bad = conv_tree(1, in_channels=3)
    for rules in (lower_layers_rules(1), [Rule("^params", "copy")]):
        with pytest.raises(ValueError) as from_plan:
            plan(source, bad, rules)
        with pytest.raises(ValueError) as from_transplant:
            transplant(source, bad, rules)
        assert str(from_plan.value) == str(from_transplant.value)


def test_plan_works_on_abstract_trees():
    source = conv_tree(0)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), conv_tree(1))
    assert plan(source, target, lower_layers_rules(2)).counts()["copied"] == 10


def test_report_table_and_json():
    source = conv_tree(0, widths=(4, 4, 8, 8))
    target = conv_tree(1, widths=(4, 4, 8))
    report = transplant(source, target, lower_layers_rules(2))[1]
    table = report.table()
    assert str(report) == table
    lines = table.splitlines()
    assert len(lines) == 1 + len(report.entries) + 1
    for path in set(flatten(source)) | set(flatten(target)):
        assert sum(line.split()[0] == path for line in lines) == 1, path
        assert table.count(path) == 1, path
    # Layers 0 and 1: conv kernel plus four BN vectors (scale, bias, mean, var) each.
    copied_params = (9 * 1 * 4 + 4 * 4) + (9 * 4 * 4 + 4 * 4)
    assert lines[-1].startswith("total: 10 copied, 5 kept, 0 reinitialised, 0 adapted, "
                                "5 dropped")
    assert f"{copied_params} of " in lines[-1]
    # Aligned: the action column starts at the same offset on every row.
    offsets = {line.index(action) for line in lines[1:-1]
               for action in ("copied", "kept", "dropped") if f"  {action}  " in line}
    assert len(offsets) == 1
    entries = report.to_json()
    assert json.loads(json.dumps(entries)) == entries
    assert entries[0]["path"] == report.entries[0].path
    assert isinstance(entries[0]["shape"], list)


# ------------------------------------------------------------------ adapt_input_channels

def _conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("old, new", [(1, 3), (3, 1), (2, 5)])
def test_adapt_input_channels_grey_image_property(old, new):
    rng = np.random.default_rng(old * 10 + new)
    kernel = jnp.asarray(rng.normal(size=(3, 3, old, 6)), jnp.float32)
    grey = jnp.asarray(rng.uniform(size=(2, 7, 7, 1)), jnp.float32)
    adapted = adapt_input_channels(kernel, new)
    assert adapted.shape == (3, 3, new, 6) and adapted.dtype == kernel.dtype
    before = _conv(jnp.repeat(grey, old, axis=-1), kernel)
    after = _conv(jnp.repeat(grey, new, axis=-1), adapted)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_adapt_input_channels_documented_cases():
    kernel = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2)
    summed = adapt_input_channels(kernel, 1)
    assert isinstance(summed, np.ndarray)
    np.testing.assert_array_equal(summed, kernel.sum(axis=2, keepdims=True))
    single = kernel[:, :, :1]
    np.testing.assert_allclose(adapt_input_channels(single, 3),
                               np.repeat(single, 3, axis=2) / 3)
    with pytest.raises(ValueError, match="rank 4"):
        adapt_input_channels(np.zeros((3, 3)), 2)


# ------------------------------------------------------------------ real trunks

def _trunk_tree(seed: int) -> dict:
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(seed), input_shape=(28, 28, 1),
                              widths=(4, 4, 8, 8, 8), fc_dim=8)
    return {"params": nnx.to_pure_dict(nnx.state(trunk, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(trunk, nnx.BatchStat))}


def test_real_trunks_transplant_lower_three_layers():
    source, target = _trunk_tree(0), _trunk_tree(1)
    # Make the statistics differ too, so copying them is observable.
    source = jax.tree.map(lambda x: x + 1.0, source)
    out, report = transplant(source, target, lower_layers_rules(3))
    fo, fs, ft = flatten(out), flatten(source), flatten(target)
    assert list(fo) == list(ft)
    for path in fo:
        expected = fs if layer_index(path) < 3 else ft
        assert np.array_equal(fo[path], expected[path]), path
    assert report.counts() == {"copied": 3 * 5, "kept": 2 * 5 + 2, "reinitialised": 0,
                               "adapted": 0, "dropped": 0}
    assert plan(source, target, lower_layers_rules(3)) == report
    # The result loads back into a module of the target's layout and runs.
    trunk = auxtl.build_trunk("small_cnn", rngs=nnx.Rngs(2), input_shape=(28, 28, 1),
                              widths=(4, 4, 8, 8, 8), fc_dim=8)
    nnx.replace_by_pure_dict(params := nnx.state(trunk, nnx.Param), out["params"])
    nnx.update(trunk, params)
    np.testing.assert_array_equal(trunk.layers[2].conv.kernel[...],
                                  fs["params/layers/2/conv/kernel"])
    assert trunk(jnp.zeros((1, 28, 28, 1))).shape == (1, 8)
