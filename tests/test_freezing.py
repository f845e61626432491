import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from auxtl import freezing
from auxtl.freezing import Phase
from auxtl.models import make_config
from auxtl.models.target import TargetSpec, TransferModel, build_target_trunk

NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc")


def model_params(seed=0):
    config = make_config("small_cnn", (12, 12, 1), widths=(4, 4, 4, 4, 4), fc_dim=4)
    model = TransferModel(build_target_trunk("small_cnn", config, TargetSpec(),
                                             rngs=nnx.Rngs(seed)), 3, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_parse_phases():
    assert freezing.parse_phases("head:5,head+top2:10@0.1") == (
        Phase(5, "head"), Phase(10, "head+top2", lr_scale=0.1))
    with pytest.raises(ValueError, match="TRAIN:EPOCHS"):
        freezing.parse_phases("head")
    with pytest.raises(ValueError, match="unknown phase spec 'tail'"):
        freezing.parse_phases("tail:3")


@pytest.mark.parametrize("text,phases", [
    ("head+re:conv[12],conv3:2", (Phase(2, "head+re:conv[12],conv3"),)),
    ("head:1,head+re:(conv1|fc){1,2}:2@0.5,all:3",
     (Phase(1, "head"), Phase(2, "head+re:(conv1|fc){1,2}", 0.5), Phase(3, "all"))),
    ("head:1,head+re:(conv,all):2", (Phase(1, "head"), Phase(2, "head+re:(conv,all)"))),
    ("head+re:[,(]x:2, all:1,", (Phase(2, "head+re:[,(]x"), Phase(1, "all"))),
    ("head+re:^conv[0-9]{1,3}$:4", (Phase(4, "head+re:^conv[0-9]{1,3}$"),)),
])
def test_commas_inside_a_phase_regex_survive(text, phases):
    assert freezing.parse_phases(text) == phases


@pytest.mark.parametrize("text,message", [
    ("head:x", "EPOCHS 'x' is not a whole number"),
    ("head:1@fast", "LR_SCALE 'fast' is not a number"),
    ("head+re:(:1", "bad regex"),
    ("head:1,tail:3", "a comma starts a new phase only where 'head' or 'all' follows"),
    ("", "no phases"),
])
def test_bad_phase_text_is_named(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        freezing.parse_phases(text)


def test_top_n_beyond_the_reused_layers_is_refused():
    reused = ("conv1", "conv2", "conv3")
    assert freezing.trainable_reused_layers("head+top3", reused) == reused
    with pytest.raises(ValueError, match=re.escape(
            "phase 'head+top4' unfreezes the top 4 reused layers, but only 3 layer(s) are "
            "reused (conv1, conv2, conv3); use 'all' or head+top3")):
        freezing.trainable_reused_layers("head+top4", reused)
    with pytest.raises(ValueError, match="'head\\+top4'"):
        freezing.check_phases(freezing.parse_phases("head:1,head+top4:1"), reused)
    freezing.check_phases(freezing.parse_phases("head:1,head+top3:1,all:1"), reused)
    assert Phase(1, "head+top9").train == "head+top9"  # checked against a target later


def test_a_phase_regex_matching_no_reused_layer_is_refused():
    reused = ("conv1", "conv2", "conv3")
    freezing.check_phases(freezing.parse_phases("head:1,head+re:conv[23]:1"), reused)
    with pytest.raises(ValueError, match=re.escape(
            "phase 'head+re:cnv[23]' matches none of the reused layers (conv1, conv2, conv3)")):
        freezing.check_phases(freezing.parse_phases("head:1,head+re:cnv[23]:1"), reused)


@pytest.mark.parametrize("train,unfrozen", [
    ("head", ()), ("head+top2", ("conv5", "fc")), ("all", NAMES),
    ("head+re:conv[34]", ("conv3", "conv4")), ("head+top0", ())])
def test_which_reused_layers_train(train, unfrozen):
    assert freezing.trainable_reused_layers(train, NAMES) == unfrozen


def test_labels_cover_every_parameter_and_first_rule_wins():
    params = model_params()
    labels = freezing.phase_labels(params, NAMES, 6, Phase(1, "head+top2"))
    flat = {freezing.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert flat["trunk/layers/0/conv/kernel"] == "frozen"
    assert flat["trunk/layers/4/bn/scale"] == "reused"
    assert flat["trunk/layers/5/dense/kernel"] == "reused"
    assert flat["head/kernel"] == "head"
    with pytest.raises(ValueError, match="no freezing rule covers parameter 'head/bias'"):
        freezing.label_by_rules(params, [("^trunk/", "frozen"), ("kernel$", "head")])


def test_new_layers_above_the_reused_ones_train_with_the_head():
    groups = freezing.phase_layer_groups(NAMES, 4, Phase(1, "head"))
    assert groups == {"conv1": "frozen", "conv2": "frozen", "conv3": "frozen",
                      "conv4": "frozen", "conv5": "new", "fc": "new"}


def test_frozen_leaves_have_no_optimizer_state():
    params = model_params()
    labels = freezing.phase_labels(params, NAMES, 6, Phase(1, "head+top2"))
    optimizer = freezing.partitioned_optimizer(labels, {"head": 1e-3, "reused": 1e-4})
    state = optimizer.init(params)
    trainable = sum(x.size for x, m in zip(jax.tree.leaves(params),
                                           jax.tree.leaves(freezing.trainable_mask(labels))) if m)
    state_numbers = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert state_numbers == 2 * trainable  # Adam's mu and nu, for trainable leaves only


def test_unfreezing_changes_the_rate_of_exactly_the_named_layers():
    params = model_params()
    ones = jax.tree.map(jnp.ones_like, params)
    rates = {"head": 1.0, "reused": 0.1}

    def first_update(phase):
        labels = freezing.phase_labels(params, NAMES, 6, phase)
        optimizer = freezing.partitioned_optimizer(labels, rates, name="sgd", weight_decay=0.0)
        updates, _ = optimizer.update(ones, optimizer.init(params), params)
        return {freezing.path_str(p): float(jnp.abs(u).max())
                for p, u in jax.tree_util.tree_leaves_with_path(updates)}

    before, after = first_update(Phase(1, "head")), first_update(Phase(1, "head+top2", 0.1))
    changed = {p for p in before if before[p] != after[p]}
    assert changed == {p for p in before if p.startswith(("trunk/layers/4/", "trunk/layers/5/"))}
    for path in changed:
        assert before[path] == 0.0
        assert after[path] == pytest.approx(0.1 * after["head/kernel"])


def test_weight_decay_never_touches_a_frozen_leaf():
    # The optimizer's own updates, not the parameters after keep_frozen (which would
    # restore a frozen leaf whatever the optimizer did): nonzero gradients, nonzero
    # parameters and a weight decay that would move every leaf it reached.
    params = model_params()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    labels = freezing.phase_labels(params, NAMES, 6, Phase(1, "head+top2"))
    mask = freezing.trainable_mask(labels)
    for name in ("adamw", "sgd"):
        optimizer = freezing.partitioned_optimizer(labels, {"head": 0.1, "reused": 0.01},
                                                   weight_decay=10.0, name=name)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        flat = jax.tree_util.tree_leaves_with_path(updates)
        frozen = [(freezing.path_str(p), u) for (p, u), m in zip(flat, jax.tree.leaves(mask))
                  if not m]
        trainable = [u for (_, u), m in zip(flat, jax.tree.leaves(mask)) if m]
        assert frozen and trainable
        for path, update in frozen:
            assert np.all(np.asarray(update) == 0), (name, path)
        assert all(np.any(np.asarray(u) != 0) for u in trainable), name
    # the decay itself moves a trainable kernel that has a zero gradient
    zeros = jax.tree.map(jnp.zeros_like, params)
    optimizer = freezing.partitioned_optimizer(labels, {"head": 0.1, "reused": 0.01},
                                               weight_decay=10.0)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    assert np.any(np.asarray(updates["head"]["kernel"]) != 0)


def test_head_state_carries_over_when_layers_unfreeze():
    params = model_params()
    grads = jax.tree.map(jnp.ones_like, params)
    first = freezing.phase_labels(params, NAMES, 6, Phase(1, "head"))
    opt1 = freezing.partitioned_optimizer(first, {"head": 1e-3, "reused": 1e-4})
    _, state1 = opt1.update(grads, opt1.init(params), params)
    second = freezing.phase_labels(params, NAMES, 6, Phase(1, "head+top2", 0.1))
    opt2 = freezing.partitioned_optimizer(second, {"head": 1e-3, "reused": 1e-4})
    state2 = freezing.carry_over_state(state1, first, opt2.init(params), second)
    assert state2.inner_states["head"] is state1.inner_states["head"]
    assert int(state2.inner_states["head"].inner_state[0].count) == 1
    assert int(state2.inner_states["reused"].inner_state[0].count) == 0


def test_split_and_merge_trainable_round_trip():
    params = model_params()
    labels = freezing.phase_labels(params, NAMES, 6, Phase(1, "head+top2"))
    mask = freezing.trainable_mask(labels)
    trainable, frozen = freezing.split_trainable(params, mask)
    merged = freezing.merge_trainable(jax.tree.structure(params), mask, trainable, frozen)
    assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))


def test_layerwise_decay():
    scales = freezing.layerwise_lr_scales(NAMES, 0.5)
    assert scales["fc"] == 1.0 and scales["conv5"] == 0.5 and scales["conv1"] == 0.5 ** 5


def test_layer_decay_gives_each_unfrozen_layer_its_own_rate():
    params = model_params()
    phase = Phase(1, "head+top3", lr_scale=0.5)
    labels = freezing.phase_labels(params, NAMES, 6, phase, per_layer=True)
    rates = freezing.group_learning_rates(1.0, phase, NAMES, layer_decay=0.1)
    optimizer = freezing.partitioned_optimizer(labels, rates, name="sgd", weight_decay=0.0)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(ones, optimizer.init(params), params)
    top = float(jnp.abs(updates["head"]["kernel"]).max())
    size = lambda i: float(jnp.abs(jax.tree.leaves(updates["trunk"]["layers"][i])[0]).max())
    assert size(5) == pytest.approx(0.5 * top)
    assert size(4) == pytest.approx(0.05 * top)
    assert size(3) == pytest.approx(0.005 * top)
    assert size(2) == 0.0


@pytest.mark.parametrize("phase,layer_decay,optimizer", [
    (Phase(1, "head"), None, "adamw"), (Phase(1, "head+top2", 0.1), 0.5, "sgd"),
    (Phase(1, "head+re:conv[13]", 0.3), None, "adamw"), (Phase(steps=2, train="all"), 0.7, "sgd")])
def test_plan_phase_agrees_with_its_pieces(phase, layer_decay, optimizer):
    params = model_params()
    plan = freezing.plan_phase(params, NAMES, 5, phase, learning_rate=0.1, weight_decay=1e-3,
                               optimizer=optimizer, layer_decay=layer_decay)
    labels = freezing.phase_labels(params, NAMES, 5, phase, per_layer=layer_decay is not None)
    frozen = freezing.frozen_layer_names(NAMES, 5, phase)
    rates = freezing.group_learning_rates(0.1, phase, NAMES[:5], layer_decay=layer_decay)
    assert jax.tree.leaves(plan.labels) == jax.tree.leaves(labels)
    assert jax.tree.leaves(plan.mask) == jax.tree.leaves(freezing.trainable_mask(labels))
    assert plan.frozen == frozen and plan.rates == rates
    assert plan.start == freezing.frozen_prefix_length(NAMES, frozen)
    uncached = freezing.plan_phase(params, NAMES, 5, phase, learning_rate=0.1,
                                   weight_decay=1e-3, optimizer=optimizer,
                                   layer_decay=layer_decay, cache_prefix=False)
    assert uncached.start == 0 and (plan.key == uncached.key) == (plan.start == 0)
    hash(plan.key)
    other = freezing.plan_phase(params, NAMES, 5, phase, learning_rate=0.2, weight_decay=1e-3,
                                optimizer=optimizer, layer_decay=layer_decay)
    assert other.key != plan.key   # a different rate is a different compiled step
    # the plan's optimizer is the partitioned optimizer of those labels and rates
    built = freezing.partitioned_optimizer(labels, rates, name=optimizer, weight_decay=1e-3)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    ours, _ = plan.optimizer.update(grads, plan.optimizer.init(params), params)
    theirs, _ = built.update(grads, built.init(params), params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours),
                                                    jax.tree.leaves(theirs)))


def test_frozen_leaves_stay_bit_identical_after_an_engine_run(mnist_small):
    """Two seeds, fixed-step phases: every leaf frozen in every phase (conv1..conv3 and
    their BatchNorm statistics) ends exactly as it began, in each seed."""
    from auxtl import finetune as ft
    from auxtl.data import compute_normalization
    images, labels = mnist_small.images[:120], mnist_small.labels[:120]
    config_ = make_config("small_cnn", (28, 28, 1), widths=(4, 4, 4, 4, 4), fc_dim=4)
    models = [TransferModel(build_target_trunk("small_cnn", config_, TargetSpec(),
                                               rngs=nnx.Rngs(s)), 10, rngs=nnx.Rngs(s))
              for s in (0, 1)]
    before = [(jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(m, nnx.Param))),
               jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))))
              for m in models]
    config = ft.FinetuneConfig(
        phases=(Phase(steps=3, train="head"), Phase(steps=3, train="head+top2", lr_scale=0.5)),
        batch_size=16, learning_rate=0.05)
    results = ft.finetune_seeds(models, 5, config, images=images, labels=labels,
                                subsets=[np.arange(0, 80), np.arange(40, 120)], seeds=[0, 1],
                                normalization=compute_normalization(images), vmap=False)
    for (params, stats), result in zip(before, results):
        for i in range(3):
            for a, b in ((params, result.params), (stats, result.batch_stats)):
                assert all(np.array_equal(x, y) for x, y in zip(
                    jax.tree.leaves(a["trunk"]["layers"][i]),
                    jax.tree.leaves(b["trunk"]["layers"][i])))
        assert not np.array_equal(params["trunk"]["layers"][3]["conv"]["kernel"],
                                  result.params["trunk"]["layers"][3]["conv"]["kernel"])
