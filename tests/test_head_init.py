"""The probe-initialised head (LP-FT): the ridge fit folded into a linear head, its L2 and
logit scale chosen on validation, and the engine starting from it; the step-per-epoch cap."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from auxtl import finetune as ft
from auxtl import head_init, probes
from auxtl.errors import InputError
from auxtl.freezing import Phase
import test_finetune
from test_finetune import small_model

data = test_finetune.data   # the same module-scoped fixture: 300 MNIST images split three ways


def features(seed, n, d=6, classes=3):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.normal(size=(n, d)).astype(np.float32) + 2.0 * np.eye(classes, d)[labels]
    x[:, -1] = 5.0                                    # a constant feature: ignored by the fit
    return x, labels


def test_the_folded_head_gives_the_scaled_ridge_scores_on_raw_features():
    x, y = features(0, 30)
    vx, vy = features(1, 15)
    head = head_init.ridge_head(x, y, vx, vy, num_classes=3)
    fit = probes.ridge_fit(jnp.asarray(x), jnp.asarray(y), num_classes=3, l2=head["l2"])
    finite = np.isfinite(np.asarray(fit.scale))
    assert not finite[-1] and finite[:-1].all()
    w, m, sd = (np.asarray(v, np.float64)[finite] for v in (fit.weights, fit.mean, fit.scale))
    x64, bias = vx[:, finite].astype(np.float64), np.asarray(fit.bias, np.float64)
    expected = head["scale"] * (((x64 - m) / sd) @ w + bias)          # float64: no evaluation error
    kernel = np.asarray(head["kernel"], np.float64)
    logits = vx.astype(np.float64) @ kernel + np.asarray(head["bias"], np.float64)
    # Both sides in float64, so only the stored float32 head differs: each kernel entry is
    # scale * W/s rounded twice (2u relative), the bias scale * (b - m @ W/s) summed over d
    # terms in float32 ((d + 3)u of the absolute terms).
    u, d = np.finfo(np.float32).eps / 2, int(finite.sum())
    ws = np.abs(w / sd[:, None])
    bound = head["scale"] * (2 * u * (np.abs(x64) @ ws)
                             + (d + 3) * u * (np.abs(bias) + np.abs(m) @ ws))
    assert np.all(np.abs(logits - expected) <= bound)
    assert np.asarray(head["kernel"])[-1].tolist() == [0.0, 0.0, 0.0]


def test_l2_and_scale_are_the_validation_choices():
    x, y = features(0, 30)
    vx, vy = features(1, 15)
    head = head_init.ridge_head(x, y, vx, vy, num_classes=3)
    probe = probes.ridge_probe(x[None], y[None], vx[None], vy[None], vx, vy, num_classes=3)
    assert head["l2"] == float(probe.hyperparameter[0])
    assert head["val_accuracy"] == float(probe.val_accuracy[0])
    logits = vx @ np.asarray(head["kernel"]) / head["scale"] + np.asarray(head["bias"]) / head["scale"]
    ce = [float(-jnp.mean(jax.nn.log_softmax(s * logits)[np.arange(len(vy)), vy]))
          for s in head_init.LOGIT_SCALES]
    assert head["scale"] == head_init.LOGIT_SCALES[int(np.argmin(ce))]


def test_the_engine_starts_each_seed_from_its_ridge_head(data, monkeypatch):
    """Before any step, each seed's head is the ridge head of its own subset's pooled
    features; the test split is not consulted (the engine only sees train and val)."""
    starts = []
    real = head_init.init_heads

    def recording(pooled, params, batch_stats, **kwargs):
        out, chosen = real(pooled, params, batch_stats, **kwargs)
        starts.append((out, chosen, kwargs))
        return out, chosen

    monkeypatch.setattr(ft, "init_heads", recording)
    models = [small_model(0), small_model(1)]
    x, y = data["train"]
    subsets = [np.arange(0, 40), np.arange(40, 80)]
    config = ft.FinetuneConfig(phases=(Phase(1, "head"),), batch_size=10, head_init="ridge")
    ft.finetune_seeds(models, 6, config, images=x, labels=y, subsets=subsets, seeds=[0, 1],
                      normalization=data["normalization"], val=data["val"])
    (params, chosen, kwargs), = starts
    graphdef = nnx.split(models[0])[0]
    pooled = head_init.pooled_features_fn(graphdef)
    norm = ft.norm_stats(data["normalization"])
    for s, model in enumerate(models):
        _, p, b = nnx.split(model, nnx.Param, nnx.BatchStat)
        p, b = nnx.to_pure_dict(p), nnx.to_pure_dict(b)
        head = head_init.ridge_head(pooled(p, b, jnp.asarray(x[subsets[s]]), norm), y[subsets[s]],
                                    pooled(p, b, jnp.asarray(data["val"][0]), norm),
                                    data["val"][1], num_classes=10)
        np.testing.assert_array_equal(params[s]["head"]["kernel"], head["kernel"])
        assert chosen[s]["l2"] == head["l2"]
    assert "test" not in kwargs
    steps = dataclasses.replace(config, phases=(Phase(steps=2, train="head"),))
    with pytest.raises(InputError, match="chooses the probe's L2 on validation"):
        ft.finetune_seeds(models, 6, steps, images=x, labels=y, subsets=subsets,
                          seeds=[0, 1], normalization=data["normalization"])
    with pytest.raises(InputError, match="--head-init"):
        ft.FinetuneConfig(head_init="probe")


def test_max_steps_per_epoch_caps_the_epoch(data):
    x, y = data["train"]
    config = ft.FinetuneConfig(phases=(Phase(2, "head"),), batch_size=10,
                               max_steps_per_epoch=3)
    result = ft.finetune(small_model(), 6, config, train=(x, y), val=data["val"],
                         normalization=data["normalization"])
    assert [h["step"] for h in result.history] == [3, 6]        # 100 images: 10 steps uncapped
    with pytest.raises(InputError, match="--max-steps-per-epoch"):
        dataclasses.replace(config, min_steps_per_epoch=4)
