import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from auxtl import finetune as ft
from auxtl import freezing
from auxtl.bench.throughput_timing import compiled_step_flops
from auxtl.data import compute_normalization
from auxtl.freezing import Phase
from auxtl.models import make_config
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk
from auxtl.train import TrainState
from conftest import leaves_equal


def small_model(seed=0, widths=(4, 4, 8, 8, 8)):
    config = make_config("small_cnn", (28, 28, 1), widths=widths, fc_dim=8)
    return TransferModel(build_target_trunk("small_cnn", config, TargetSpec(),
                                            rngs=nnx.Rngs(seed)), 10, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def data(mnist_small):
    images, labels = mnist_small.images, mnist_small.labels
    return dict(train=(images[:100], labels[:100]), val=(images[100:200], labels[100:200]),
                test=(images[200:300], labels[200:300]),
                normalization=compute_normalization(images))


def snapshot(model):
    return (jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param))),
            jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))


def test_frozen_parameters_and_statistics_stay_bit_identical(data):
    model = small_model()
    params0, stats0 = snapshot(model)
    config = ft.FinetuneConfig(phases=(Phase(2, "head"), Phase(2, "head+top2", 0.1)),
                               batch_size=20)
    result = ft.finetune(model, 6, config, **data)
    frozen_layers = range(4)  # conv1..conv4 frozen in both phases
    for i in frozen_layers:
        assert leaves_equal(result.params["trunk"]["layers"][i], params0["trunk"]["layers"][i])
        assert leaves_equal(result.batch_stats["trunk"]["layers"][i],
                            stats0["trunk"]["layers"][i])
    # conv5 and fc were unfrozen in phase 2 and did move; the head moved
    assert not leaves_equal(result.params["trunk"]["layers"][4], params0["trunk"]["layers"][4])
    assert not leaves_equal(result.batch_stats["trunk"]["layers"][4],
                            stats0["trunk"]["layers"][4])
    assert not leaves_equal(result.params["head"], params0["head"])
    assert [h["phase"] for h in result.history] == [0, 0, 1, 1]


def test_feature_cache_matches_running_the_frozen_prefix(data):
    config = ft.FinetuneConfig(phases=(Phase(3, "head+top2"),), batch_size=20)
    cached = ft.finetune(small_model(), 6, config, **data)
    direct = ft.finetune(small_model(), 6, dataclasses.replace(config, cache_features=False),
                         **data)
    for a, b in zip(jax.tree.leaves(cached.params), jax.tree.leaves(direct.params)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert cached.test_accuracy == pytest.approx(direct.test_accuracy, abs=0.02)


def step_flops(model, phase, data):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    names = model.trunk.layer_names
    labels = freezing.phase_labels(params, names, len(names), phase)
    optimizer = freezing.partitioned_optimizer(labels, {"head": 1e-3, "reused": 1e-3})
    step = ft.make_finetune_step(graphdef, freezing.trainable_mask(labels),
                                 freezing.frozen_layer_names(names, len(names), phase),
                                 optimizer, 0, data["normalization"])
    state = TrainState(step=np.int32(0), params=params, batch_stats=stats,
                       opt_state=optimizer.init(params), rng=np.zeros(2, np.uint32))
    images = np.zeros((64, 28, 28, 1), np.uint8)
    labels_ = np.zeros((64,), np.int32)
    return compiled_step_flops(step.lower(state, images, labels_).compile())[0]


def test_frozen_prefix_step_does_less_work(data):
    model = small_model(widths=(32, 32, 64, 64, 128))
    full = step_flops(model, Phase(1, "all"), data)
    frozen4 = step_flops(model, Phase(1, "head+re:conv5|fc"), data)
    assert frozen4 < 0.6 * full, (frozen4, full)


def test_scratch_baseline_has_the_same_budget():
    config = ft.FinetuneConfig(phases=(Phase(3, "head"), Phase(4, "head+top2", 0.1)))
    from auxtl.transfer import scratch_config
    scratch = scratch_config(config)
    assert scratch.phases == (Phase(7, "all"),)


@pytest.mark.parametrize("cache_features", [True, False])
def test_a_shared_step_cache_uses_each_calls_own_normalization(data, cache_features):
    """Seeds share one StepCache; a later call with another normalization must not run
    with the first call's statistics (they were closed over in the cached steps)."""
    from auxtl.data import Normalization
    config = ft.FinetuneConfig(phases=(Phase(1, "head"), Phase(1, "head+top2", 0.1)),
                               batch_size=20, cache_features=cache_features)
    first, second = Normalization((0.1,), (0.3,)), Normalization((0.6,), (0.05,))
    data = {k: v for k, v in data.items() if k != "normalization"}
    shared = ft.StepCache()
    ft.finetune(small_model(), 6, config, normalization=first, cache=shared, **data)
    reused = ft.finetune(small_model(), 6, config, normalization=second, cache=shared, **data)
    alone = ft.finetune(small_model(), 6, config, normalization=second, cache=ft.StepCache(),
                        **data)
    # the same program on the same inputs: bit-identical (the old cache gave the first
    # call's statistics, a different model)
    for a, b in zip(jax.tree.leaves(reused.params), jax.tree.leaves(alone.params)):
        np.testing.assert_array_equal(a, b)
    assert reused.best_val_accuracy == alone.best_val_accuracy
    assert reused.test_accuracy == alone.test_accuracy
    assert ft.score(small_model(), alone, *data["test"], normalization=second,
                    cache=shared) == alone.test_accuracy


def test_phases_that_do_not_fit_the_reused_layers_fail_before_training(data):
    config = ft.FinetuneConfig(phases=(Phase(1, "head"), Phase(1, "head+top4")))
    with pytest.raises(ValueError, match=r"'head\+top4'.*only 3 layer\(s\) are reused "
                                         r"\(conv1, conv2, conv3\).*'all' or head\+top3"):
        ft.finetune(small_model(), 3, config, **data)


@pytest.mark.parametrize("field,value,flag", [("batch_size", 0, "--batch-size"),
                                              ("phases", (), "--phases"),
                                              ("learning_rate", 0.0, "--lr")])
def test_bad_finetune_config_fields_are_named(field, value, flag):
    with pytest.raises(ValueError, match=f"{flag}.*{value!r}" if value != () else flag):
        ft.FinetuneConfig(**{field: value})
