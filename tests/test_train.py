import dataclasses
import shutil

import jax
import numpy as np
import pytest

import auxtl
from auxtl.train import init_state, make_train_step, split_model
from conftest import leaves_equal, tiny_config

TRACES = []


@auxtl.register_task("rotation_traced")
@dataclasses.dataclass(frozen=True)
class CountingRotation(type(auxtl.get_task("rotation"))):
    """Rotation that records each trace of its example maker."""

    def make_examples(self, key, images):
        TRACES.append(images.shape)
        return super().make_examples(key, images)


def test_step_is_traced_once_for_a_fixed_shape(mnist_small):
    tasks = [auxtl.WeightedTask("rotation_traced", auxtl.get_task("rotation_traced"))]
    config = auxtl.make_config("small_cnn", (28, 28, 1), widths=(4, 4, 4, 4, 4), fc_dim=4)
    model = auxtl.build_pretrain_model("small_cnn", config, tasks, (28, 28, 1), seed=0)
    graphdef, params, stats = split_model(model)
    optimizer = auxtl.make_optimizer(auxtl.OptimizerConfig(), total_steps=10)
    state = init_state(params, stats, optimizer, seed=0)
    step = make_train_step(graphdef, tasks, optimizer,
                           auxtl.data.compute_normalization(mnist_small.images))
    TRACES.clear()
    for i in range(4):
        state, metrics = step(state, mnist_small.images[i * 8:(i + 1) * 8])
    jax.block_until_ready(state)
    assert TRACES == [(8, 28, 28, 1)]
    assert int(state.step) == 4


def test_same_seed_gives_bit_identical_params(mnist_small):
    first = auxtl.run_pretraining(tiny_config(seed=3), mnist_small)
    second = auxtl.run_pretraining(tiny_config(seed=3), mnist_small)
    other = auxtl.run_pretraining(tiny_config(seed=4), mnist_small)
    assert leaves_equal(first.state.params, second.state.params)
    assert leaves_equal(first.state.batch_stats, second.state.batch_stats)
    assert not leaves_equal(first.state.params, other.state.params)


def test_training_lowers_the_rotation_loss(mnist_small):
    result = auxtl.run_pretraining(tiny_config(steps=40, log_every=40), mnist_small)
    # chance level for 4 classes: loss ln 4 = 1.386, accuracy 0.25
    assert result.eval_metrics["rotation/loss"] < 1.2
    assert result.eval_metrics["rotation/accuracy"] > 0.4


def test_resume_continues_exactly(tmp_path, mnist_small):
    out = tmp_path / "run"
    config = tiny_config(steps=8, checkpoint_every=4, out=str(out))
    full = auxtl.run_pretraining(config, mnist_small)
    # Simulate a run interrupted after the step-4 checkpoint.
    shutil.rmtree(out / "checkpoints" / "8")
    shutil.rmtree((out / "trunk").resolve())  # the trunk path links to its version folder
    (out / "trunk").unlink()
    resumed = auxtl.run_pretraining(dataclasses.replace(config, resume=True), mnist_small)
    assert leaves_equal(full.state.params, resumed.state.params)
    assert leaves_equal(full.state.opt_state, resumed.state.opt_state)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"split": "train"' in line for line in lines) >= 2


def test_resume_refuses_a_changed_config(tmp_path, mnist_small):
    out = tmp_path / "run"
    auxtl.run_pretraining(tiny_config(steps=4, out=str(out)), mnist_small)
    with pytest.raises(ValueError, match=r"\['batch_size'\] differ"):
        auxtl.run_pretraining(tiny_config(steps=4, batch_size=8, out=str(out), resume=True),
                              mnist_small)


def test_wrong_image_shape_is_named(tmp_path):
    path = tmp_path / "wide.npz"
    np.savez(path, images=np.zeros((40, 28, 20, 1), np.uint8))
    with pytest.raises(ValueError, match="height 28 != width 20"):
        auxtl.run_pretraining(tiny_config(data=f"npz:{path}"))


def test_nan_input_is_named(tmp_path):
    images = np.random.default_rng(0).random((40, 28, 28, 1)).astype(np.float32)
    images[7, 3, 3, 0] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, images=images)
    with pytest.raises(ValueError, match="NaN"):
        auxtl.run_pretraining(tiny_config(data=f"npz:{path}"))


def test_batch_larger_than_data_is_named(mnist_small):
    with pytest.raises(ValueError, match="batch size 4096"):
        auxtl.run_pretraining(tiny_config(batch_size=4096), mnist_small)


def test_uncertainty_weighting_learns_a_weight_per_task(mnist_small):
    config = tiny_config(tasks=(auxtl.TaskConfig("rotation", 1.0),
                                auxtl.TaskConfig("rotation_traced", 0.5,
                                                 {"all_rotations": False})),
                         loss_weighting="uncertainty", steps=8, log_every=4)
    result = auxtl.run_pretraining(config, mnist_small)
    log_vars = result.state.params["log_vars"]
    assert set(log_vars) == {"rotation", "rotation_traced"}
    assert all(float(v) != 0.0 for v in log_vars.values())
    assert {"rotation/learned_weight", "rotation_traced/learned_weight",
            "rotation/accuracy", "rotation_traced/accuracy"} <= set(result.eval_metrics)


def test_progress_shows_each_task_separately():
    from auxtl.pretrain import _postfix
    shown = _postfix({"loss": 1.0, "a/loss": 0.4, "a/accuracy": 0.5, "b/loss": 0.6})
    assert shown == {"loss": "1.000", "a_loss": "0.400", "a_acc": "0.500", "b_loss": "0.600"}


def test_evaluate_weights_each_chunk_by_its_size():
    from auxtl.train import evaluate
    images = np.arange(10, dtype=np.float32)
    fake_step = lambda params, stats, chunk, key: {"mean": jax.numpy.mean(chunk)}
    assert evaluate(fake_step, None, None, images, batch_size=4)["mean"] == pytest.approx(4.5)
    with pytest.raises(ValueError, match="empty"):
        evaluate(fake_step, None, None, images[:0], batch_size=4)
