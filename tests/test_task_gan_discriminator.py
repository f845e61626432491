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
from conftest import TINY_TRUNK, leaves_equal, tiny_config

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
