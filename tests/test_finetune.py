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
from auxtl.seeds import batch_schedule
from auxtl.train_state import TrainState
from conftest import gamma, leaves_equal
from rounding import assert_within


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
    plan = freezing.plan_phase(params, names, len(names), phase, learning_rate=1e-3,
                               weight_decay=1e-4, cache_prefix=False)
    step = ft.make_finetune_step(graphdef, plan)
    state = TrainState(step=np.int32(0), params=params, batch_stats=stats,
                       opt_state=plan.optimizer.init(params), rng=np.zeros(2, np.uint32))
    images = np.zeros((64, 28, 28, 1), np.uint8)
    labels_ = np.zeros((64,), np.int32)
    norm = ft.norm_stats(data["normalization"])
    return compiled_step_flops(step.lower(state, images, labels_, norm).compile())[0]


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
    steps = ft.FinetuneConfig(phases=(Phase(steps=30, train="head"), Phase(steps=20)))
    assert scratch_config(steps).phases == (Phase(steps=50, train="all"),)


def test_step_cache_remembers_features_per_key_and_data_object():
    cache, calls = ft.StepCache(keep_features=2), []
    compute = lambda x: calls.append(x) or x.sum()   # noqa: E731
    a, b, c = np.ones(3), np.ones(3), np.zeros(3)
    assert cache.features(("k",), a, compute) == 3 and cache.features(("k",), a, compute) == 3
    assert len(calls) == 1                       # same key, same object: computed once
    cache.features(("k",), b, compute)           # equal values, another object: computed
    cache.features(("other",), a, compute)       # another key (other weights): computed
    assert len(calls) == 3
    cache.features(("k",), c, compute)           # a third entry evicts the oldest, ("k", a)
    cache.features(("k",), a, compute)
    assert len(calls) == 5


def test_a_shared_cache_computes_the_frozen_prefix_once_for_the_same_data(data, monkeypatch):
    """Two engine calls with the same images, frozen weights and normalization (the
    benchmark's budgets of one source) share the prefix output; another normalization
    does not."""
    computed = []
    real = ft.StepCache.features

    def counting(self, key, x, compute):
        return real(self, key, x, lambda d: computed.append(key) or compute(d))

    monkeypatch.setattr(ft.StepCache, "features", counting)
    config = ft.FinetuneConfig(phases=(Phase(1, "head"),), batch_size=20)
    cache = ft.StepCache()
    first = ft.finetune(small_model(), 6, config, cache=cache, **data)
    again = ft.finetune(small_model(), 6, config, cache=cache, **data)
    assert len(computed) == 2                    # train and val, once
    assert_same_result(first, again)
    from auxtl.data import Normalization
    ft.finetune(small_model(), 6, config, cache=cache, **{
        **data, "normalization": Normalization((0.5,), (0.2,))})
    assert len(computed) == 4


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


# ---- the engine over S seeds ---------------------------------------------------------------

def seed_runs(data, config, count=3, **engine):
    """(images, labels, subsets, kwargs) for `count` seeds on equal-size, different subsets."""
    images, labels = data["train"]
    pool = (np.concatenate([images, data["val"][0]]), np.concatenate([labels, data["val"][1]]))
    subsets = [np.arange(40 * s, 40 * s + 90) for s in range(count)]
    return dict(images=pool[0], labels=pool[1], subsets=subsets, seeds=list(range(count)),
                normalization=data["normalization"], test=data["test"], **engine)


def assert_same_result(a: ft.FinetuneResult, b: ft.FinetuneResult):
    assert leaves_equal(a.params, b.params) and leaves_equal(a.batch_stats, b.batch_stats)
    assert (a.best_val_accuracy, a.test_accuracy, a.steps) == (
        b.best_val_accuracy, b.test_accuracy, b.steps)
    assert a.history == b.history


@pytest.mark.parametrize("budget", ["epochs", "steps"])
def test_seeds_in_one_run_equal_one_seed_runs_exactly(data, budget):
    """Seed after seed (loop mode), S seeds together give each seed's own run bit for
    bit: batches, shared frozen prefix, per-seed early stopping and best epoch."""
    if budget == "epochs":
        phases = (Phase(6, "head", patience=2), Phase(2, "head+top2", 0.1))
        engine = dict(val=data["val"])
    else:
        phases = (Phase(steps=7, train="head"), Phase(steps=5, train="head+top2", lr_scale=0.1))
        engine = {}
    config = ft.FinetuneConfig(phases=phases, batch_size=16, learning_rate=0.05)
    kwargs = seed_runs(data, config, **engine)
    together = ft.finetune_seeds([small_model(s) for s in range(3)], 6, config, vmap=False,
                                 **kwargs)
    for s in range(3):
        alone = ft.finetune_seeds([small_model(s)], 6, config, vmap=False, **{
            **kwargs, "subsets": kwargs["subsets"][s:s + 1], "seeds": [s]})[0]
        assert_same_result(together[s], alone)
    if budget == "steps":
        for result in together:
            assert result.best_val_accuracy is None and result.steps == 12
            assert [(h["phase"], h["step"]) for h in result.history] == [(0, 7), (1, 12)]
            assert result.test_accuracy == result.history[-1]["test_accuracy"]
    else:   # the seeds stopped at different epochs: per-seed early stopping was exercised
        assert len({len(r.history) for r in together}) > 1, [r.history for r in together]


def test_one_seed_engine_is_finetune(data):
    config = ft.FinetuneConfig(phases=(Phase(2, "head"), Phase(1, "head+top2", 0.1)),
                               batch_size=20, seed=5)
    direct = ft.finetune(small_model(), 6, config, **data)
    images, labels = data["train"]
    engine = ft.finetune_seeds([small_model()], 6, config, images=images, labels=labels,
                               subsets=[np.arange(len(images))], seeds=[5], val=data["val"],
                               test=data["test"], normalization=data["normalization"])[0]
    assert_same_result(direct, engine)
    assert direct.test_accuracy * len(data["test"][1]) == round(
        direct.test_accuracy * len(data["test"][1]))   # a count over N, exactly rounded


def test_budgets_are_checked(data):
    kwargs = seed_runs(data, None, count=2)
    epochs = ft.FinetuneConfig(phases=(Phase(1, "head"),))
    with pytest.raises(ValueError, match="pass val="):
        ft.finetune_seeds([small_model(0), small_model(1)], 6, epochs, **kwargs)
    mixed = ft.FinetuneConfig(phases=(Phase(1, "head"), Phase(steps=2)))
    with pytest.raises(ValueError, match="all count epochs or all count steps"):
        ft.finetune_seeds([small_model(0), small_model(1)], 6, mixed, val=data["val"], **kwargs)
    with pytest.raises(ValueError, match="subset sizes differ"):
        ft.finetune_seeds([small_model(0), small_model(1)], 6, epochs, val=data["val"],
                          **{**kwargs, "subsets": [np.arange(10), np.arange(12)]})
    with pytest.raises(ValueError, match="either epochs or steps"):
        Phase(3, steps=3)
    with pytest.raises(ValueError, match="patience needs validation"):
        Phase(steps=3, patience=2)


def test_vmapped_seeds_match_the_float64_step_within_rounding(data):
    """One SGD step of the head on cached features (all six trunk layers frozen), vmapped
    over seeds and seed after seed, each within a derived float32 rounding bound of the
    float64 step (so within twice the bound of each other).

    The step: z = x W + b (D products + D adds: gamma(D + 1) of |x||W| + |b|); p =
    softmax(z), whose relative error is exp(2 max|dz|) - 1 from the logits plus the
    rounding of softmax itself (subtract the max, exp within EXP_ULPS ulps, a C-term
    sum, a division: bounded by gamma(C + EXP_ULPS + 3 + max|z - m|)); d = (p - y) / B
    (two roundings); g = x^T d (B products, B adds: gamma(B + 2)); then g + wd W,
    times (1 + momentum) and lr, added to W: four roundings of the update, one of W'.
    """
    exp_ulps = 4   # XLA CPU's float32 exp is within a few ulps (it is not correctly rounded)
    lr, wd, momentum, batch = 0.5, 1e-4, 0.9, 16
    config = ft.FinetuneConfig(phases=(Phase(steps=1, train="head"),), batch_size=batch,
                               learning_rate=lr, weight_decay=wd, optimizer="sgd")
    kwargs = {**seed_runs(data, config), "test": None}
    models = [small_model(s) for s in range(3)]
    trunk = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(models[0], nnx.Param))["trunk"])
    for s in (1, 2):   # one transplanted trunk, different heads: the prefix is shared
        nnx.update(models[s].trunk, nnx.state(models[0].trunk))
    heads = [jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(m, nnx.Param))["head"])
             for m in models]
    assert leaves_equal(trunk, nnx.to_pure_dict(nnx.state(models[2], nnx.Param))["trunk"])
    graphdef, params, stats = nnx.split(models[0], nnx.Param, nnx.BatchStat)
    prefix = ft.make_prefix_fn(graphdef, 6)
    norm = ft.norm_stats(data["normalization"])
    x_all = np.asarray(prefix(nnx.to_pure_dict(params), nnx.to_pure_dict(stats),
                              kwargs["images"], norm), np.float64)
    index = batch_schedule(kwargs["subsets"], batch, 1, seeds=kwargs["seeds"])[:, 0]
    results = {vmap: ft.finetune_seeds(models, 6, config, vmap=vmap, **kwargs)
               for vmap in (False, True)}
    u = 2.0 ** -24   # float32's unit roundoff
    for s, head in enumerate(heads):
        x, y = x_all[index[s]], np.eye(10)[kwargs["labels"][index[s]]]
        w, b = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
        z = x @ w + b
        dz = gamma(x.shape[1] + 1) * (np.abs(x) @ np.abs(w) + np.abs(b))
        zc = z - z.max(-1, keepdims=True)
        p = np.exp(zc) / np.exp(zc).sum(-1, keepdims=True)
        p_rel = (np.expm1(2 * dz.max(-1, keepdims=True))
                 + gamma(10 + exp_ulps + 3 + int(np.ceil(np.abs(zc).max()))))
        d = (p - y) / batch
        d_err = p * p_rel / batch + gamma(2) * np.abs(d)
        g_w, g_b = x.T @ d, d.sum(0)
        g_w_err = np.abs(x).T @ d_err + gamma(batch + 2) * (np.abs(x).T @ np.abs(d))
        g_b_err = d_err.sum(0) + gamma(batch + 2) * np.abs(d).sum(0)
        for name, g, err, decay in (("kernel", g_w, g_w_err, wd * w), ("bias", g_b, g_b_err, 0)):
            param = w if name == "kernel" else b
            update = lr * (1 + momentum) * (g + decay)
            new = param - update
            bound = ((1 + u) * lr * (1 + momentum) * (err + gamma(4) * (np.abs(g) + np.abs(decay)))
                     + u * np.abs(new))
            for vmap, per_seed in results.items():
                assert_within(per_seed[s].params["head"][name], new, bound,
                              f"seed {s} head {name} vmap={vmap}")
        for vmap, per_seed in results.items():   # the frozen trunk did not move at all
            assert leaves_equal(per_seed[s].params["trunk"], trunk)
