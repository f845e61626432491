import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import checkpoints
from auxtl.models.target import TargetSpec
from auxtl.pretrain_step import split_model
from auxtl.tasks.gan_discriminator import in_range_of
from conftest import TINY_TRUNK, gamma, leaves_equal, tiny_config

NAME = "gan_discriminator"


def _model(image_shape=(28, 28, 1)):
    tasks = [auxtl.WeightedTask(NAME, auxtl.get_task(NAME, latent_dim=8, generator_width=4))]
    config = auxtl.make_config("small_cnn", image_shape, **TINY_TRUNK)
    return tasks[0].task, auxtl.build_pretrain_model("small_cnn", config, tasks, image_shape,
                                                      seed=0)


def _term_grads(images, train):
    """Gradients of d_loss and of g_loss w.r.t. all parameters, separately."""
    task, model = _model(images.shape[1:])
    graphdef, params, stats = split_model(model)

    def term(params, name):
        model = nnx.merge(graphdef, params, stats)
        inputs, targets = task.make_examples(jax.random.key(0), images)
        outputs = task.forward(model.trunk, model.heads[NAME], inputs, train=train)
        return task.loss_and_metrics(outputs, targets)[1][name]

    grad = jax.jit(jax.grad(term), static_argnums=1)
    return {name: grad(params, name) for name in ("d_loss", "g_loss")}


def _all_zero(tree):
    return all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(tree))


def _all_nonzero(tree):
    return all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("train", [True, False])
def test_each_loss_term_reaches_only_its_own_player(train):
    images = jnp.asarray(np.random.default_rng(0).normal(size=(6, 12, 12, 1)), jnp.float32)
    grads = _term_grads(images, train)
    d, g = grads["d_loss"], grads["g_loss"]
    # D's term trains the trunk and the output layer, never the generator ...
    assert _all_zero(d["heads"][NAME]["generator"])
    assert _all_nonzero(d["trunk"]) and _all_nonzero(d["heads"][NAME]["critic"])
    # ... and G's term trains the generator only, through a stop-gradient copy of D.
    assert _all_zero(g["trunk"]) and _all_zero(g["heads"][NAME]["critic"])
    generator = g["heads"][NAME]["generator"]
    # (biases feeding a BatchNorm get exactly zero gradient in training mode; kernels don't)
    assert _all_nonzero([generator[layer]["kernel"] for layer in ("dense", "conv1", "conv2")])


def _batch_stats(module):
    return nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))


def _inputs(task, seed, shape=(12, 12, 1)):
    images = jnp.asarray(np.random.default_rng(seed).normal(size=(6, *shape)), jnp.float32)
    return task.make_examples(jax.random.key(seed), images)[0]


def _fakes(model, real, z, *, train):
    return in_range_of(model.heads[NAME].generator(z, train=train), real)


def test_running_statistics_come_from_the_real_images_only():
    task, model = _model((12, 12, 1))
    real, z = _inputs(task, 0)
    before = _batch_stats(model.trunk)
    task.forward(model.trunk, model.heads[NAME], (real, z), train=True)
    _, alone = _model((12, 12, 1))      # the same initial trunk, run on the reals alone
    alone.trunk(real, train=True)
    assert not leaves_equal(_batch_stats(model.trunk), before)
    assert leaves_equal(_batch_stats(model.trunk), _batch_stats(alone.trunk))
    # (one mixed real+fake batch, whose statistics collapsed real-image features, differs)
    _, mixed = _model((12, 12, 1))
    mixed.trunk(jnp.concatenate([real, _fakes(mixed, real, z, train=True)]), train=True)
    assert not leaves_equal(_batch_stats(mixed.trunk), _batch_stats(alone.trunk))


@pytest.mark.parametrize("train", [True, False])
def test_reals_and_fakes_run_as_separate_batches(train):
    task, model = _model((12, 12, 1))
    real, z = _inputs(task, 0)
    _, other_z = _inputs(task, 1)
    head = model.heads[NAME]
    first = task.forward(model.trunk, head, (real, z), train=train)
    second = task.forward(model.trunk, head, (real, other_z), train=train)
    # D's score of a real image does not depend on the fakes generated beside it ...
    assert np.array_equal(first["d_real"], second["d_real"])
    assert not np.array_equal(first["d_fake"], second["d_fake"])
    # ... the stop-gradient copy scores the fakes exactly as D does ...
    assert np.array_equal(first["g_fake"], first["d_fake"])
    # ... and the fakes are normalised by their own batch, in evaluation too.
    alone = head.critic(model.trunk(_fakes(model, real, z, train=train), train=True))
    assert np.array_equal(first["d_fake"], alone[:, 0])


def test_fakes_stay_in_each_channel_range_of_the_real_batch():
    rng = np.random.default_rng(0)
    real = jnp.asarray(rng.normal(size=(4, 5, 5, 2)) * [1.0, 3.0] + [0.0, 10.0], jnp.float32)
    raw = jnp.asarray(rng.normal(size=(3, 5, 5, 2)) * 100.0, jnp.float32)
    fake = np.asarray(in_range_of(raw, real), np.float64)
    low, high = np.asarray(real).min(axis=(0, 1, 2)), np.asarray(real).max(axis=(0, 1, 2))
    # low + (high - low) * s, s in [0, 1]: three float32 roundings of terms <= |low|, |high - low|
    slack = gamma(3) * (2 * np.abs(low) + np.abs(high))
    assert np.all(fake >= low - slack) and np.all(fake <= high + slack)
    # (raw this large saturates the sigmoid: both ends are reached)
    assert np.all(np.abs(fake.min(axis=(0, 1, 2)) - low) <= slack)
    assert np.all(np.abs(fake.max(axis=(0, 1, 2)) - high) <= slack)
    # the generator's output gets the gradient; the real batch (a constant range) none
    grad_raw, grad_real = jax.grad(lambda r, x: jnp.sum(in_range_of(r * 0.01, x)),
                                   argnums=(0, 1))(raw, real)
    assert np.all(np.asarray(grad_raw) > 0) and not np.any(np.asarray(grad_real))


def test_examples_are_the_images_and_fresh_noise():
    task = auxtl.get_task(NAME, latent_dim=5)
    images = jnp.ones((3, 8, 8, 2))
    (real, z), _ = jax.jit(task.make_examples)(jax.random.key(0), images)
    assert real.shape == (3, 8, 8, 2) and z.shape == (3, 5)
    (_, other), _ = task.make_examples(jax.random.key(1), images)
    assert not np.allclose(z, other)


def test_the_generator_makes_images_of_the_input_shape():
    for shape in [(28, 28, 1), (9, 7, 3)]:
        task, model = _model(shape)
        fake = model.heads[NAME].generator(jnp.zeros((2, 8)), train=False)
        assert fake.shape == (2, *shape)


def test_images_too_small_for_the_trunk_are_refused_at_build_time():
    tasks = [auxtl.WeightedTask(NAME, auxtl.get_task(NAME))]
    config = auxtl.make_config("small_cnn", (3, 28, 1), widths=(4, 4, 4, 4, 4), fc_dim=4)
    with pytest.raises(ValueError, match=r"'gan_discriminator' on 3x28 images: small_cnn: "
                                         r"a 3x28 px input is too small; layer 'conv4' leaves 0x7"):
        auxtl.build_pretrain_model("small_cnn", config, tasks, (3, 28, 1), seed=0)


@pytest.mark.slow
def test_adversarial_run_stays_finite_and_the_trunk_transplants(tmp_path, mnist_small):
    config = tiny_config(tasks=(auxtl.TaskConfig(NAME, 1.0, {"latent_dim": 16}),), steps=60,
                         batch_size=32, log_every=5, eval_batch_size=100, out=str(tmp_path),
                         optimizer=auxtl.OptimizerConfig(learning_rate=0.05, warmup_steps=5))
    result = auxtl.run_pretraining(config, mnist_small)
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"split": "train"' in line]
    assert len(train) == 12
    for record in train + [result.eval_metrics]:
        values = [v for k, v in record.items() if k.startswith(NAME)]
        assert values and all(math.isfinite(v) for v in values), record
    # GANs oscillate, so ask only that D beat chance at some point of the run.
    assert max(r[f"{NAME}/accuracy"] for r in train) > 0.6

    # The discriminator body is an ordinary trunk: transplant its lowest layers.
    metadata = auxtl.read_metadata(result.trunk_path)
    source_params, source_stats, _ = checkpoints.load_trunk_state(result.trunk_path)
    model, report = auxtl.build_transfer_model(metadata, source_params, source_stats,
                                               TargetSpec(reuse=3), num_classes=10,
                                               in_channels=1, seed=0)
    copied = nnx.to_pure_dict(nnx.state(model.trunk, nnx.Param))
    assert report.counts()["copied"] > 0
    for i in range(3):
        assert leaves_equal(copied["layers"][i], source_params["layers"][i])
    assert model(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
