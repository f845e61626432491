import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import auxtl
from auxtl.errors import InputError, NonFiniteLossError
from auxtl.reporting import keep_metrics, read_metrics
from auxtl.pretrain_step import init_state, make_train_step, split_model
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
    # the public step's metrics are flat scalars; the run's finiteness report is opt-in
    assert all(jnp.ndim(v) == 0 for v in metrics.values()), sorted(metrics)
    healthy = make_train_step(graphdef, tasks, optimizer,
                              auxtl.data.compute_normalization(mnist_small.images), health=True)
    _, metrics = healthy(state, mnist_small.images[:8])
    assert bool(metrics["_health"]["state_finite"])


def test_whole_numbers_of_any_integer_type_are_accepted_and_bools_are_not():
    tiny_config(steps=np.int64(6), batch_size=np.int32(16)).validate()
    with pytest.raises(auxtl.InputError, match="steps"):
        tiny_config(steps=True).validate()


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
    config = tiny_config(steps=8, checkpoint_every=4, log_every=2, eval_every=4, out=str(out))
    full = auxtl.run_pretraining(config, mnist_small)
    written = read_metrics(out / "metrics.jsonl")
    # Simulate a run interrupted after the step-4 checkpoint.
    shutil.rmtree(out / "checkpoints" / "8")
    shutil.rmtree((out / "trunk").resolve())  # the trunk path links to its version folder
    (out / "trunk").unlink()
    resumed = auxtl.run_pretraining(dataclasses.replace(config, resume=True), mnist_small)
    assert leaves_equal(full.state.params, resumed.state.params)
    assert leaves_equal(full.state.opt_state, resumed.state.opt_state)
    # The records past step 4 were redone, not repeated: the same list as the first run.
    records = read_metrics(out / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [
        (0, "eval"), (2, "train"), (4, "train"), (4, "eval"), (6, "train"), (8, "train"),
        (8, "eval")]
    same = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rs]
    assert same(records) == same(written)


def test_keep_metrics_rewrites_atomically_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert keep_metrics(path, lambda r: r["step"] <= 2) == 2
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp left
    assert keep_metrics(tmp_path / "absent.jsonl", lambda r: True) == 0


def checkpoint_steps(out):
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def restore_checkpoint(out, step, like):
    """The state tree saved at `step`, restored into the structure of TrainState `like`."""
    from auxtl.pretrain import _state_tree
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(like))
    return ocp.StandardCheckpointer().restore(out / "checkpoints" / str(step) / "state",
                                              target)


def test_fresh_run_into_another_run_is_refused_and_overwrite_replaces_it(tmp_path,
                                                                         mnist_small):
    out = tmp_path / "run"
    config = tiny_config(steps=4, checkpoint_every=2, out=str(out))
    first = auxtl.run_pretraining(config, mnist_small)
    other = dataclasses.replace(config, seed=1)
    with pytest.raises(InputError) as refused:
        auxtl.run_pretraining(other, mnist_small)
    message = str(refused.value)
    assert str(out) in message and "checkpoints at steps [2, 4]" in message
    assert "--resume" in message and "--overwrite" in message
    assert json.loads((out / "config.json").read_text())["seed"] == 0  # left untouched

    second = auxtl.run_pretraining(dataclasses.replace(other, overwrite=True), mnist_small)
    assert checkpoint_steps(out) == [2, 4]
    saved = restore_checkpoint(out, 4, second.state)
    assert leaves_equal(saved["params"], second.state.params)
    assert not leaves_equal(saved["params"], first.state.params)
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_overwrite_leaves_files_it_did_not_write(tmp_path, mnist_small):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"also holds \['notes.txt'\]"):
        auxtl.run_pretraining(tiny_config(out=str(out), overwrite=True), mnist_small)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", -1), ("steps", 0), ("log_every", 0),
    ("eval_every", -1), ("checkpoint_every", -1), ("test_fraction", 0.0),
    ("test_fraction", 1.0), ("keep", 0), ("eval_batch_size", 0)])
def test_bad_config_is_named_before_anything_is_built(tmp_path, field, value):
    out = tmp_path / "run"
    config = tiny_config(out=str(out), data="no-such-data", **{field: value})
    with pytest.raises(InputError, match=rf"^{field} \(--.*\) must be .*got {value}$"):
        auxtl.run_pretraining(config)  # the data is not even loaded
    assert not out.exists()


@pytest.mark.parametrize("keep, expected", [(3, [4, 5, 6]), (1, [6])])
def test_keep_is_the_number_of_step_checkpoints_kept(tmp_path, mnist_small, keep, expected):
    out = tmp_path / "run"
    auxtl.run_pretraining(tiny_config(steps=6, checkpoint_every=1, keep=keep, out=str(out)),
                          mnist_small)
    assert checkpoint_steps(out) == expected


class Counter(nnx.Module):
    def __init__(self):
        self.value = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, features):
        return self.value[...]


@auxtl.register_task("nan_past_half")
@dataclasses.dataclass(frozen=True)
class NaNPastHalf(auxtl.TaskBase):
    """Loss -c for a parameter c that plain SGD raises by the learning rate each step;
    NaN once c > 0.45: with lr 0.1 the loss of step 6 (c = 0.5) is the first NaN."""

    def make_examples(self, key, images):
        return images, jnp.zeros(())

    def make_head(self, feature_dim, *, image_shape, rngs):
        return Counter()

    def loss_and_metrics(self, c, targets):
        loss = -c + jnp.where(c > 0.45, jnp.nan, 0.0)
        return loss, {"loss": loss}


def test_nan_loss_stops_the_run_naming_task_and_step_and_keeps_good_checkpoints(
        tmp_path, mnist_small):
    out = tmp_path / "run"
    config = tiny_config(
        tasks=(auxtl.TaskConfig("rotation"), auxtl.TaskConfig("nan_past_half")), steps=10,
        log_every=4, checkpoint_every=2, keep=5, out=str(out),
        optimizer=auxtl.OptimizerConfig(learning_rate=0.1, momentum=0.0, weight_decay=0.0,
                                        warmup_steps=0, schedule="constant"))
    with pytest.raises(NonFiniteLossError) as stopped:
        auxtl.run_pretraining(config, mnist_small)
    like = auxtl.run_pretraining(dataclasses.replace(config, steps=1, out=None),
                                 mnist_small).state
    message = str(stopped.value)
    assert message.startswith("loss of task 'nan_past_half' is NaN at step 6 "
                              "(first seen between steps 5 and 6)")
    assert f"last good checkpoint: step 4 at {out / 'checkpoints' / '4'}" in message
    assert "--lr" in message
    assert checkpoint_steps(out) == [2, 4]  # none at or after step 6
    for step in (2, 4):
        saved = restore_checkpoint(out, step, like)
        assert int(saved["step"]) == step and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved)
                   if np.issubdtype(np.asarray(x).dtype, np.inexact))
    assert not (out / "trunk").exists() and not (out / "summary.json").exists()
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 4


def test_non_finite_state_with_finite_losses_is_named():
    from auxtl.pretrain import _first_nonfinite
    ok = {"losses": {"a": np.float32(0.5), "b": np.float32(1.0)}, "state_finite": np.True_}
    bad_state = {**ok, "state_finite": np.False_}
    inf_loss = {"losses": {"a": np.float32(0.5), "b": np.float32(np.inf)},
                "state_finite": np.False_}
    assert _first_nonfinite([(1, ok), (2, ok)], ["a", "b"]) is None
    assert _first_nonfinite([(1, ok), (2, bad_state), (3, inf_loss)], ["a", "b"])[:2] == (2, None)
    assert _first_nonfinite([(1, ok), (2, inf_loss)], ["a", "b"]) == (2, "b", np.inf)


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
    from auxtl.pretrain_step import evaluate
    images = np.arange(10, dtype=np.float32)
    fake_step = lambda params, stats, chunk, key: {"mean": jax.numpy.mean(chunk)}
    assert evaluate(fake_step, None, None, images, batch_size=4)["mean"] == pytest.approx(4.5)
    with pytest.raises(ValueError, match="empty"):
        evaluate(fake_step, None, None, images[:0], batch_size=4)
