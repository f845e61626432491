"""The examples run end to end (tiny settings) and write what their READMEs promise."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest

import auxtl

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def keras_flow():
    return load_example("keras_flow")


@pytest.fixture(scope="module")
def tiny_run(keras_flow, tmp_path_factory):
    out = tmp_path_factory.mktemp("keras_flow")
    lines: list[str] = []
    result = keras_flow.main(["--tiny", "--out", str(out)], log=lines.append)
    return out, result, "\n".join(lines)


def in_unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_keras_flow_tiny_writes_every_field(tiny_run):
    out, result, printed = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved) >= {"config", "data", "model_a", "surgery", "seeds", "test", "rest",
                          "runtime_s"}
    assert saved["config"]["tiny"] is True and saved["config"]["seeds"] == [0, 1]
    assert saved["data"]["a_classes"] == list(range(8)) and saved["data"]["b_classes"] == [8, 9]
    assert saved["data"]["b_train"] == 200 and saved["data"]["b_val"] == 100
    assert saved["data"]["b_test"] == 100 and saved["data"]["a_test"] == 400
    assert in_unit(saved["model_a"]["test_accuracy"]) and in_unit(saved["model_a"]["val_accuracy"])
    assert [row["seed"] for row in saved["seeds"]] == [0, 1]
    for row in saved["seeds"]:
        for arm in ("b_on_a", "b_scratch"):
            for which in ("test", "val", "rest"):
                assert in_unit(row[f"{arm}_{which}_accuracy"]), (arm, which, row)
        # Same budget: B from scratch trains head + unfreeze epochs in one phase.
        assert row["b_on_a_steps"] == row["b_scratch_steps"] == 2 * (200 // 32)
        assert row["b_rest_size"] == 900 - 300
    for which in ("test", "rest"):
        summary = saved[which]
        assert set(summary) == {"b_on_a", "b_scratch", "difference", "error_rate",
                                "seeds_on_a_better", "seeds_tied"}
        for arm in ("b_on_a", "b_scratch"):
            assert set(summary[arm]) == {"mean", "low", "high"}
            assert in_unit(summary[arm]["mean"])
            assert summary[arm]["low"] <= summary[arm]["mean"] <= summary[arm]["high"]
        diffs = [r[f"b_on_a_{which}_accuracy"] - r[f"b_scratch_{which}_accuracy"]
                 for r in saved["seeds"]]
        assert math.isclose(summary["difference"]["mean"], sum(diffs) / len(diffs),
                            abs_tol=1e-9)
        assert summary["difference"]["low"] <= summary["difference"]["high"]
        errors = summary["error_rate"]
        assert math.isclose(errors["b_on_a"], 1 - summary["b_on_a"]["mean"], abs_tol=1e-9)
        ratio = errors["scratch_over_on_a"]
        assert ratio is None or math.isclose(ratio, errors["b_scratch"] / errors["b_on_a"])
    assert "B on A" in printed and "scratch/B-on-A" in printed


def test_keras_flow_reuses_all_of_model_a_through_a_real_checkpoint(tiny_run):
    out, result, _ = tiny_run
    counts = result["surgery"]["counts"]
    assert counts["copied"] > 0 and counts["reinitialised"] == counts["adapted"] == 0
    assert result["surgery"]["copied_params"] == result["surgery"]["total_params"]
    metadata = auxtl.read_metadata(out / "model_a_trunk")
    assert metadata["layer_names"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc"]
    assert metadata["config"]["widths"] == [8, 8, 16, 16, 16]
    assert metadata["tasks"][0]["params"]["num_classes"] == 8
    assert "params/layers/5/dense/kernel" in (out / "surgery_report.txt").read_text()
    history = result["b_on_a_history_seed0"]
    assert [h["train"] for h in history] == ["head", "all"]


def test_keras_flow_rejects_malformed_epochs(keras_flow):
    with pytest.raises(SystemExit):
        keras_flow.parse_args(["--epochs-b", "4"])
    args = keras_flow.parse_args(["--epochs-b", "2,3", "--seeds", "7"])
    assert args.epochs_b == (2, 3) and args.seeds == 7 and args.epochs_a == 3
