"""The throughput benchmark on a tiny configuration, the peak table and the torch option."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl.bench import BenchError, peaks, throughput, throughput_input, throughput_measure
from auxtl.bench.throughput_cases import STEP_KINDS, layers_to_freeze
from auxtl.bench.throughput_timing import cost_flops
from auxtl.streaming.pipeline import LoadBatch, prepare_stream

ROW_FIELDS = (
    "model", "kind", "dtype", "param_dtype", "image_shape", "batch_size", "examples_per_step",
    "devices", "warmup_steps", "timed_steps", "compile_s", "step_time_median_s",
    "step_time_min_s", "step_time_max_s", "step_time_p25_s", "step_time_p75_s",
    "step_time_iqr_s", "step_times_s", "examples_per_s", "images_per_s", "flops_per_step",
    "flops_source", "flops_per_example", "achieved_flops_per_s", "peak_flops_per_s",
    "peak_source", "peak_detail", "peak_precision", "mfu", "params", "trainable_params",
    "frozen_layers", "start_layer", "device_kind", "backend", "jax_version",
    "step_images_per_s", "input_images_per_s", "input_batch_time_median_s", "input_source",
    "input_shape", "input_pipeline")
TINY_ARGS = ["--models", "small_cnn", "--tiny", "--batch-size", "8", "--warmup", "1",
             "--steps", "2", "--dtypes", "float32,bfloat16", "--peak-matmul-size", "128"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = throughput.main(TINY_ARGS + ["--out", str(out)])
    return result, out, printed.getvalue()


def test_tiny_run_returns_and_writes_every_field(tiny_run):
    result, out, _ = tiny_run
    rows = result["results"]
    assert [(r["dtype"], r["kind"]) for r in rows] == [
        (d, k) for d in ("float32", "bfloat16") for k in STEP_KINDS]
    for row in rows:
        assert "error" not in row, row["error"]
        missing = [f for f in ROW_FIELDS if f not in row or row[f] is None]
        assert not missing, (row["kind"], missing)
        assert row["model"] == "small_cnn" and row["batch_size"] == 8
        assert row["param_dtype"] == "float32"               # bf16 is compute only
        assert row["step_time_min_s"] <= row["step_time_median_s"] <= row["step_time_max_s"]
        assert row["step_time_min_s"] > 0 and len(row["step_times_s"]) == 2
        assert row["examples_per_s"] > 0 and row["flops_per_step"] > 0
        assert row["achieved_flops_per_s"] > 0 and row["mfu"] > 0
        assert row["peak_source"] == "measured"          # CPU: measured matmul peak
        assert row["backend"] == jax.default_backend()
        assert row["jax_version"] == jax.__version__
    assert rows[0]["examples_per_step"] == 4 * 8         # pretraining: 4 rotations per image
    written = json.loads((out / "throughput.json").read_text())
    assert written["results"] == json.loads(json.dumps(rows))
    assert set(written["meta"]["peaks"]) == {"float32", "bfloat16"}
    assert written["meta"]["environment"]["jax_version"] == jax.__version__
    assert written["torch"] is None
    markdown = (out / "throughput.md").read_text()
    assert markdown.count("| small_cnn |") == len(rows)
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_the_input_rate_is_beside_the_step_rate(tiny_run):
    """Every row carries the in-memory input pipeline's images/s (measured once per model,
    so the same in every row) beside the step's, and which bounds; table, JSON and MD."""
    result, out, printed = tiny_run
    rows = result["results"]
    rates = {r["input_images_per_s"] for r in rows}
    assert len(rates) == 1 and rates.pop() > 0
    for row in rows:
        assert row["step_images_per_s"] == row["images_per_s"]
        assert row["input_shape"] == row["image_shape"] == [28, 28, 1]
        assert row["input_source"] == "synthetic uint8 (1024, 28, 28, 1)"
        expected = None if row["kind"] == "cached_features" else (
            "input" if row["input_images_per_s"] < row["step_images_per_s"] else "step")
        assert row["bound"] == expected
    header = next(line for line in printed.splitlines() if line.startswith("model "))
    assert "step img/s" in header and "input img/s" in header and "bound" in header
    assert "input small_cnn: in-memory (batch_indices, process_slice, put_batch)" in printed
    markdown = (out / "throughput.md").read_text()
    assert "| step img/s | input img/s | bound |" in markdown
    assert "- input small_cnn: in-memory" in markdown


def test_a_batch_iterator_factory_plugs_in():
    """The seam a streaming pipeline uses: any factory(start_step) -> iterator of batches."""
    started = []

    def factory(start_step):
        started.append(start_step)
        while True:
            yield jax.numpy.zeros((4, 2, 2, 1), jax.numpy.uint8)

    timed = throughput_input.time_input(factory, batch_size=4, warmup=1, steps=3)
    assert started == [0] and timed["input_timed_batches"] == 3
    assert timed["input_images_per_s"] > 0
    assert throughput_input.bound(100.0, 50.0) == "input"
    assert throughput_input.bound(100.0, 500.0) == "step"
    assert throughput_input.bound(None, 500.0) is None
    with pytest.raises(BenchError, match="--data: .*no such path"):
        throughput_input.input_source("npz:/no/such.npz", (8, 8, 1), num_images=8)
    images = np.arange(6 * 2 * 2 * 1, dtype=np.uint8).reshape(6, 2, 2, 1)
    mesh = auxtl.parallel.data_mesh(jax.devices()[:1])
    batches = throughput_input.in_memory_batches(images, 3, mesh, seed=5)(2)
    expected = images[auxtl.data.batch_indices(6, 3, seed=5, step=2)]
    np.testing.assert_array_equal(np.asarray(next(batches)), expected)   # the loop's batch 2


def test_the_streamed_pipeline_is_measured_as_pretraining_streams(tmp_path):
    """--data stream:SPEC: the batches are the streamed pretraining loop's (same split,
    order and crops), on the device, and a bad spec stops before any step."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(24):
        size = (int(rng.integers(10, 20)), int(rng.integers(10, 20)))
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    mesh = auxtl.parallel.data_mesh(jax.devices()[:1])
    factory = throughput_input.streamed_batches(f"folder:{tmp_path}", (12, 12, 1), 4, mesh,
                                                steps=3, workers=0, seed=1)
    batch = next(factory(1))
    stream = prepare_stream(f"folder:{tmp_path}", test_fraction=0.1, split_seed=0,
                            image_size=(12, 12, 1), log=lambda *_: None)
    expected = LoadBatch(stream, batch_size=4, seed=1)(1)["images"]
    assert isinstance(batch, jax.Array) and batch.shape == (4, 12, 12, 1)
    np.testing.assert_array_equal(np.asarray(batch), expected)   # the loop's streamed batch 1
    timed = throughput_input.measure_streamed(f"folder:{tmp_path}", (12, 12, 1), 4, devices=1,
                                              warmup=1, steps=2, workers=0)
    assert timed["input_source"] == f"stream:folder:{tmp_path}" and timed["input_images_per_s"] > 0
    with pytest.raises(BenchError, match="--data stream:folder:/no/such"):
        throughput_input.streamed_batches("folder:/no/such", (12, 12, 1), 4, mesh, steps=1)


def test_freezing_and_caching_cut_flops(tiny_run):
    rows = {(r["dtype"], r["kind"]): r for r in tiny_run[0]["results"]}
    for dtype in ("float32", "bfloat16"):
        full = rows[dtype, "pretrain"]["flops_per_step"]
        frozen = rows[dtype, "frozen_prefix"]
        cached = rows[dtype, "cached_features"]
        assert frozen["flops_per_step"] < full
        assert cached["flops_per_step"] < frozen["flops_per_step"]
        assert frozen["frozen_layers"] == ["conv1", "conv2", "conv3", "conv4"]
        assert frozen["start_layer"] == 0 and cached["start_layer"] == 4
        assert frozen["trainable_params"] < frozen["params"]


def test_frozen_prefix_is_all_but_the_last_stage():
    assert layers_to_freeze(
        ("conv1", "conv2", "conv3", "conv4", "conv5", "fc")) == 4
    for name, first_of_last_stage in (("resnet18", 7), ("resnet50", 14)):
        trunk = nnx.eval_shape(lambda: auxtl.build_trunk(
            name, rngs=nnx.Rngs(0), input_shape=(32, 32, 3)))
        prefix = layers_to_freeze(trunk.layer_names)
        assert prefix == first_of_last_stage
        assert trunk.layer_names[prefix] == "stage4_block1"


def test_resnet50_trunk_is_the_standard_one():
    config = auxtl.make_config("resnet50", (224, 224, 3))
    assert config.large_stem and config.stage_sizes == (3, 4, 6, 3)
    trunk = nnx.eval_shape(lambda: auxtl.build_trunk("resnet50", config, rngs=nnx.Rngs(0)))
    params = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(trunk, nnx.Param)))
    assert params == 23_508_032            # torchvision resnet50 without its 1000-way fc
    assert trunk.feature_dim == 2048 and trunk.layers[-1].out_dim == 2048
    features = nnx.eval_shape(lambda: auxtl.build_trunk(   # traced, shapes only: no compile
        "resnet50", rngs=nnx.Rngs(0), input_shape=(32, 32, 3), width=4)(
            np.zeros((2, 32, 32, 3), np.float32)))
    assert features.shape == (2, 4 * 8 * 4)


def test_peak_table_lookup():
    h100 = peaks.lookup_peak("NVIDIA H100 80GB HBM3", "bfloat16")
    assert h100.flops_per_s == pytest.approx(989.5e12) and h100.source == "table"
    assert peaks.lookup_peak("NVIDIA H200", "float32", f32_peak="fp32").flops_per_s == 67e12
    assert peaks.lookup_peak("NVIDIA H200", "float32", f32_peak="tensor").precision.startswith(
        "tf32")
    assert peaks.lookup_peak("NVIDIA A100-SXM4-40GB", "bfloat16").flops_per_s == 312e12
    assert peaks.lookup_peak("NVIDIA H100 PCIe", "bfloat16").flops_per_s == 756.5e12
    assert peaks.lookup_peak("NVIDIA H100 PCIe", "float32").flops_per_s == 378e12    # TF32
    assert peaks.lookup_peak("NVIDIA H100 80GB HBM3", "float32", f32_peak="fp32").flops_per_s \
        == 67e12                                                                  # SXM
    assert peaks.lookup_peak("NVIDIA H200", "bfloat16").flops_per_s == 989.5e12     # SXM
    assert peaks.lookup_peak("NVIDIA H200 NVL", "bfloat16").flops_per_s == 835.5e12
    assert peaks.lookup_peak("NVIDIA L40", "bfloat16").flops_per_s == 181e12   # not the L4
    assert peaks.lookup_peak("TPU v5 lite", "bfloat16").flops_per_s == 197e12
    assert peaks.lookup_peak("TPU v5p", "bfloat16").flops_per_s == 459e12
    assert peaks.lookup_peak("TPU v6 lite", "bfloat16").flops_per_s == 918e12
    assert peaks.lookup_peak("TPU v4", "float32").flops_per_s == 275e12       # 1-pass bf16
    assert peaks.lookup_peak("Some New Accelerator", "bfloat16") is None
    with pytest.raises(ValueError, match="f32_peak"):
        peaks.lookup_peak("TPU v4", "float32", f32_peak="tf64")


def test_cpu_peak_falls_back_to_a_measured_matmul():
    peak = peaks.device_peak("float32", jax.devices("cpu")[0], measure_size=128, repeats=2)
    assert peak.source == "measured" and peak.flops_per_s > 0
    assert "128x128 float32 matmul" in peak.detail


def test_cost_flops_handles_every_shape():
    assert cost_flops({"flops": 5.0}) == 5.0
    assert cost_flops([{"flops": 7.0}]) == 7.0
    assert cost_flops(None) is None
    assert cost_flops([]) is None
    assert cost_flops({"flops": 0.0}) is None


def test_model_args_and_batch_sizes_parse():
    parsed = throughput.parse_model_args(
        ["small_cnn:widths=8,8,16,16,16", "width=8", "fc_dim=16"], ["small_cnn", "resnet18"])
    assert parsed == {"small_cnn": {"widths": (8, 8, 16, 16, 16), "fc_dim": 16},
                      "resnet18": {"width": 8}}
    with pytest.raises(BenchError, match="no field"):
        throughput.parse_model_args(["small_cnn:width=8"], ["small_cnn"])
    assert throughput.parse_batch_sizes("small_cnn=64,resnet50=4") == {"small_cnn": 64,
                                                                       "resnet50": 4}
    assert throughput.parse_batch_sizes("16") == {"*": 16}
    with pytest.raises(BenchError, match="unknown model"):
        throughput.main(["--models", "vgg"])


def test_compare_torch_with_a_bogus_interpreter_fails_clearly(tmp_path):
    with pytest.raises(BenchError, match="/nonexistent/python3.11.*no such"):
        throughput.main(TINY_ARGS + ["--compare-torch", "--torch-python", "/nonexistent/python3.11",
                                     "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())          # failed before benchmarking anything


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is importable by this interpreter")
def test_compare_torch_names_an_interpreter_without_torch(tmp_path):
    with pytest.raises(BenchError, match="cannot import torch"):
        throughput.main(TINY_ARGS + ["--compare-torch", "--torch-python", sys.executable,
                                     "--out", str(tmp_path)])
    with pytest.raises(BenchError, match="--torch-python PATH"):
        throughput.main(TINY_ARGS + ["--compare-torch", "--out", str(tmp_path)])


def test_a_failing_case_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    real_measure = throughput_measure.measure

    def flaky(model, dtype, kind, case, **kwargs):
        if kind == "cached_features":
            raise RuntimeError("RESOURCE_EXHAUSTED: pretend the device ran out of memory")
        return real_measure(model, dtype, kind, case, **kwargs)

    monkeypatch.setattr(throughput_measure, "measure", flaky)
    result = throughput.main(["--models", "small_cnn", "--tiny", "--batch-size", "4",
                              "--warmup", "0", "--steps", "1", "--dtypes", "float32",
                              "--kinds", "cached_features,inference",
                              "--peak-matmul-size", "64", "--no-plot", "--data", "none",
                              "--out", str(tmp_path)])
    failed, ok = result["results"]
    assert "RESOURCE_EXHAUSTED" in failed["error"] and "error" not in ok
    assert ok["input_images_per_s"] is None and ok["bound"] is None     # --data none
    assert "FAILED small_cnn float32 cached_features" in capsys.readouterr().out
    assert "FAILED" in (tmp_path / "throughput.md").read_text()
