"""Frozen-parameter masks, fine-tuning phases and the optimizer built from them.

Frozen means: no update (optax.set_to_zero inside optax.partition, never
optax.masked's pass-through), no optimizer state, no weight decay, and no
gradient computed (the step differentiates only the trainable leaves, see
`split_trainable`). BatchNorm of frozen layers runs in inference mode; that is
the model's business, driven by `frozen_layer_names`.

Parameter trees are plain nested dicts; paths are '/'-joined ("trunk/layers/2/conv/kernel").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from auxtl.errors import InputError
from auxtl.optim import build_optimizer, phase_schedule, restart_schedules

FROZEN = "frozen"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def label_by_rules(params, rules: Sequence[tuple[str, str]]):
    """A tree of group labels: the first rule (regex, label) whose regex searches the path wins.

    Every leaf must be covered; an uncovered path raises ValueError naming it.
    """
    compiled = [(re.compile(pattern), label) for pattern, label in rules]

    def label(path, _):
        text = path_str(path)
        for regex, group in compiled:
            if regex.search(text):
                return group
        raise InputError(f"no freezing rule covers parameter {text!r}; rules: "
                         f"{[p for p, _ in rules]}")

    return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(labels):
    return jax.tree.map(lambda group: group != FROZEN, labels)


# ---- phases -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Phase:
    """One fine-tuning phase.

    `train` says what learns: "head" (new layers only), "head+topN" (plus the top N
    reused layers), "all", or "head+re:REGEX" (plus reused layers whose name matches).
    `lr_scale` multiplies the learning rate of the unfrozen reused layers only.
    The budget is either `epochs` (validation after each; `patience`: stop the phase
    after that many epochs without validation gain) or `steps` (a fixed number of
    steps, no validation). Exactly one of them is given.
    """

    epochs: int | None = None
    train: str = "head"
    lr_scale: float = 1.0
    patience: int | None = None
    steps: int | None = None

    def __post_init__(self):
        if (self.epochs is None) == (self.steps is None):
            raise InputError(f"a phase needs either epochs or steps, got epochs={self.epochs!r}"
                             f", steps={self.steps!r}")
        budget, count = ("epochs", self.epochs) if self.steps is None else ("steps", self.steps)
        if count <= 0:
            raise InputError(f"a phase needs a positive number of {budget}, got {count}")
        if self.steps is not None and self.patience:
            raise InputError(f"patience needs validation epochs; a {self.steps}-step phase "
                             f"has none")
        if self.lr_scale <= 0:
            raise InputError(f"lr_scale must be positive, got {self.lr_scale}")
        _parse_train(self.train)  # validates the spec; counts are checked against a target

    def to_json(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if self.steps is None:   # epoch phases keep the form older reports hold
            del raw["steps"]
        return raw


PHASES_GRAMMAR = (
    "PHASE[,PHASE...] where PHASE is TRAIN:EPOCHS[@LR_SCALE] and TRAIN is 'head' (new "
    "layers only), 'head+topN' (plus the top N reused layers), 'all', or 'head+re:REGEX' "
    "(plus the reused layers whose name REGEX searches); a comma starts a new phase only "
    "where 'head' or 'all' follows it, outside brackets, so a REGEX may hold commas "
    "(head+re:^conv[0-9]{1,2}$:5) and colons (the last ':' ends TRAIN); "
    "e.g. head:40,head+top2:40@0.1")

# After a comma: the start of a phase ('head...' or 'all...'), or nothing (an empty part).
_PHASE_START = re.compile(r"\s*(?:(?:head|all)\b|,|$)")
_OPENING = {"(": ")", "{": "}"}   # '[' opens a character class, handled apart


def split_phases(text: str) -> list[str]:
    """`text` cut at the commas that begin a new phase (see `PHASES_GRAMMAR`).

    A comma cuts only outside (), [] and {} (backslash escapes and character classes
    honoured) and only where 'head' or 'all' (the start of a phase) or nothing follows.
    """
    parts, start, stack, index, in_class = [], 0, [], 0, False
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            if char == "]":
                in_class = False
        elif char == "[":
            in_class = True
            # a ']' right after '[' or '[^' is a literal member of the class
            if text.startswith("]", index + 1):
                index += 1
            elif text.startswith("^]", index + 1):
                index += 2
        elif char in _OPENING:
            stack.append(_OPENING[char])
        elif stack and char == stack[-1]:
            stack.pop()
        elif char == "," and not stack and _PHASE_START.match(text, index + 1):
            parts.append(text[start:index])
            start = index + 1
        index += 1
    parts.append(text[start:])
    return parts


def parse_phases(text: str) -> tuple[Phase, ...]:
    """'head:5,head+top2:10@0.1' -> phases; the grammar is `PHASES_GRAMMAR`."""
    phases = []
    for part in filter(None, (p.strip() for p in split_phases(text))):
        spec, sep, rest = part.rpartition(":")
        if not sep or not spec:
            raise InputError(f"phase {part!r} must look like TRAIN:EPOCHS[@LR_SCALE], "
                             f"e.g. head:5 or head+top2:10@0.1")
        epochs, _, scale = rest.partition("@")
        try:
            epochs = int(epochs)
        except ValueError:
            raise InputError(f"phase {part!r}: EPOCHS {epochs!r} is not a whole number "
                             f"(TRAIN:EPOCHS[@LR_SCALE])") from None
        try:
            lr_scale = float(scale) if scale else 1.0
        except ValueError:
            raise InputError(f"phase {part!r}: LR_SCALE {scale!r} is not a number "
                             f"(TRAIN:EPOCHS[@LR_SCALE])") from None
        try:
            phases.append(Phase(epochs=epochs, train=spec.strip(), lr_scale=lr_scale))
        except ValueError as error:
            raise InputError(f"phase {part!r}: {error}") from error
    if not phases:
        raise InputError(f"no phases in {text!r}")
    return tuple(phases)


def _unknown_spec(train: str) -> InputError:
    hint = (" (a comma starts a new phase only where 'head' or 'all' follows it)"
            if "," in train else "")
    return InputError(f"unknown phase spec {train!r}; use 'head', 'head+topN', 'all' or "
                      f"'head+re:REGEX'{hint}")


def _parse_train(train: str) -> tuple[str, Any]:
    """('all' | 'head' | 'top' | 're', N or compiled regex or None) of a TRAIN spec."""
    if train in ("all", "head"):
        return train, None
    head, plus, extra = train.partition("+")
    if head != "head" or not plus:
        raise _unknown_spec(train)
    if extra.startswith("top") and extra[3:].isdigit():
        return "top", int(extra[3:])
    if extra.startswith("re:"):
        try:
            return "re", re.compile(extra[3:])
        except re.error as error:
            raise InputError(f"phase spec {train!r}: bad regex {extra[3:]!r}: {error}") from None
    raise _unknown_spec(train)


def trainable_reused_layers(train: str, reused: Sequence[str]) -> tuple[str, ...]:
    """Names of the reused layers that `train` unfreezes (the rest of the reused stay frozen).

    'head+topN' with N larger than the number of reused layers is refused: asking for
    more layers than there are is most likely a mistake ('all' unfreezes every one).
    """
    kind, value = _parse_train(train)
    if kind == "all":
        return tuple(reused)
    if kind == "head":
        return ()
    if kind == "top":
        if value > len(reused):
            raise InputError(
                f"phase {train!r} unfreezes the top {value} reused layers, but only "
                f"{len(reused)} layer(s) are reused ({', '.join(reused) or 'none'}); "
                f"use 'all' or head+top{len(reused)}")
        return tuple(reused[len(reused) - value:]) if value else ()
    return tuple(name for name in reused if value.search(name))


def check_phases(phases: Sequence[Phase], reused: Sequence[str]) -> None:
    """Refuses phases that do not fit the reused layers (e.g. head+top4 of 3), before
    anything trains; raises InputError naming the phase and the reused layers. A
    'head+re:REGEX' that matches no reused layer is refused too: it would silently
    train the head alone (a typo in the regex, most likely)."""
    for phase in phases:
        unfrozen = trainable_reused_layers(phase.train, reused)
        if not unfrozen and _parse_train(phase.train)[0] == "re":
            raise InputError(f"phase {phase.train!r} matches none of the reused layers "
                             f"({', '.join(reused) or 'none'}); use 'head' to train the "
                             f"head alone")


def phase_layer_groups(layer_names: Sequence[str], num_reused: int,
                       phase: Phase) -> dict[str, str]:
    """Layer name -> 'frozen', 'reused' (unfrozen reused layer) or 'new' for one phase."""
    reused = tuple(layer_names[:num_reused])
    unfrozen = set(trainable_reused_layers(phase.train, reused))
    groups = {}
    for index, name in enumerate(layer_names):
        if index >= num_reused:
            groups[name] = "new"
        else:
            groups[name] = "reused" if name in unfrozen else FROZEN
    return groups


def phase_labels(params, layer_names: Sequence[str], num_reused: int, phase: Phase,
                 *, per_layer: bool = False, trunk_prefix: str = "trunk/layers/"):
    """Label tree for a transfer model's params: 'head', 'reused' or 'frozen' per leaf.

    New trunk layers (above the reused ones) and the head learn at the base rate
    ('head'); unfrozen reused layers at base * lr_scale ('reused', or
    'reused/<layer>' with `per_layer`, for layer-wise rates).
    """
    groups = phase_layer_groups(layer_names, num_reused, phase)

    def label(name: str) -> str:
        group = groups[name]
        if group == "new":
            return "head"
        return f"reused/{name}" if (group == "reused" and per_layer) else group

    rules = [(f"^{re.escape(trunk_prefix)}{i}/", label(n)) for i, n in enumerate(layer_names)]
    rules.append(("^head/", "head"))
    return label_by_rules(params, rules)


def frozen_layer_names(layer_names: Sequence[str], num_reused: int,
                       phase: Phase) -> tuple[str, ...]:
    groups = phase_layer_groups(layer_names, num_reused, phase)
    return tuple(name for name in layer_names if groups[name] == FROZEN)


def frozen_prefix_length(layer_names: Sequence[str], frozen: Sequence[str]) -> int:
    """How many of the lowest layers are frozen in a row (their output can be cached)."""
    count = 0
    for name in layer_names:
        if name not in frozen:
            break
        count += 1
    return count


def layerwise_lr_scales(layer_names: Sequence[str], decay: float) -> dict[str, float]:
    """Discriminative fine-tuning: the top layer gets 1, each layer below `decay` times less."""
    top = len(layer_names) - 1
    return {name: decay ** (top - index) for index, name in enumerate(layer_names)}


def group_learning_rates(base: float, phase: Phase, reused: Sequence[str], *,
                         layer_decay: float | None = None) -> dict[str, float]:
    """Rates per label: head at `base`; unfrozen reused layers at base * lr_scale, times
    layer_decay ** (distance from the top reused layer) when `layer_decay` is set."""
    rates = {"head": base, "reused": base * phase.lr_scale}
    if layer_decay is not None:
        for name, scale in layerwise_lr_scales(reused, layer_decay).items():
            rates[f"reused/{name}"] = base * phase.lr_scale * scale
    return rates


# ---- optimizer assembly ----------------------------------------------------------------

def partitioned_optimizer(labels, group_learning_rates: Mapping[str, float], *,
                          weight_decay: float = 1e-4, name: str = "adamw",
                          schedule: str = "constant", warmup: float = 0.0,
                          total_steps: int = 1) -> optax.GradientTransformation:
    """optax.partition: each label its own optimizer and rate; 'frozen' gets set_to_zero.
    Each group's rate follows `optim.phase_schedule(rate, schedule, warmup, total_steps)`
    over the phase (a plain float for "constant" without warmup)."""
    used = set(jax.tree.leaves(labels))
    missing = used - set(group_learning_rates) - {FROZEN}
    if missing:
        raise InputError(f"no learning rate for parameter group(s) {sorted(missing)}")
    transforms = {group: build_optimizer(name, phase_schedule(rate, schedule, warmup,
                                                              total_steps),
                                         weight_decay=weight_decay)
                  for group, rate in group_learning_rates.items() if group in used}
    transforms[FROZEN] = optax.set_to_zero()
    return optax.partition(transforms, labels)


def carry_over_state(old_state, old_labels, new_state, new_labels):
    """Keeps each group's optimizer state whose leaves are unchanged between phases; a
    kept state's schedule counts restart at 0 (`optim.restart_schedules`): each phase
    runs its own schedule from its start, while moments carry over."""
    if old_state is None:
        return new_state
    inner = dict(new_state.inner_states)
    for group, state in old_state.inner_states.items():
        if group == FROZEN or group not in inner:
            continue
        same_leaves = (jax.tree.map(lambda g: g == group, old_labels)
                       == jax.tree.map(lambda g: g == group, new_labels))
        if same_leaves and (jax.tree.structure(state) == jax.tree.structure(inner[group])):
            inner[group] = restart_schedules(state)
    return new_state._replace(inner_states=inner)


# ---- the phase plan: everything one phase's step is built from ---------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class PhasePlan:
    """One phase's set-up for a transfer model.

    labels: group label per parameter leaf ('head', 'reused[/<layer>]', 'frozen');
    mask: True where a leaf trains; frozen: names of the frozen trunk layers (their
    BatchNorm runs in inference mode); start: how many of the lowest layers are frozen
    in a row, whose output may be computed once and trained on (0 when not cached);
    rates: learning rate per group (a schedule's peak); optimizer: the optax.partition
    built from them; augment: (augmentation, max_shift) the step applies to raw images
    (`finetune_step.augment_images`; ("none", 0): none). key: a hashable summary of
    everything a step compiled from this plan closes over (labels, frozen, start, rates,
    optimizer name and weight decay, schedule, augmentation), for step caches; add the
    model's graphdef to it.
    """

    labels: Any
    mask: Any
    frozen: tuple[str, ...]
    start: int
    rates: Mapping[str, float]
    optimizer: optax.GradientTransformation
    key: tuple
    augment: tuple[str, int] = ("none", 0)


def plan_phase(params, layer_names: Sequence[str], num_reused: int, phase: Phase, *,
               learning_rate: float, weight_decay: float, optimizer: str = "adamw",
               layer_decay: float | None = None, cache_prefix: bool = True,
               schedule: str = "constant", warmup: float = 0.0, total_steps: int = 1,
               augment: str = "none", max_shift: int = 0) -> PhasePlan:
    """The phase plan of `phase` for params of a transfer model whose lowest `num_reused`
    trunk layers (of `layer_names`) are reused: labels (per layer with `layer_decay`),
    mask, frozen layers, frozen prefix (0 unless `cache_prefix`, and 0 with an
    `augment` other than "none": the images change every step), group rates
    (`group_learning_rates`) and the partitioned `optimizer` ('adamw' or 'sgd'), its
    rates following `schedule` with `warmup` over the phase's `total_steps` steps."""
    labels = phase_labels(params, layer_names, num_reused, phase,
                          per_layer=layer_decay is not None)
    frozen = frozen_layer_names(layer_names, num_reused, phase)
    cache_prefix = cache_prefix and augment == "none"
    start = frozen_prefix_length(layer_names, frozen) if cache_prefix else 0
    rates = group_learning_rates(learning_rate, phase, layer_names[:num_reused],
                                 layer_decay=layer_decay)
    built = partitioned_optimizer(labels, rates, name=optimizer, weight_decay=weight_decay,
                                  schedule=schedule, warmup=warmup, total_steps=total_steps)
    timing = (schedule, warmup, total_steps) if (schedule, warmup) != ("constant", 0) else ()
    augmented = (augment, max_shift if "shift" in augment else 0)
    key = (tuple(jax.tree.leaves(labels)), frozen, start, tuple(sorted(rates.items())),
           optimizer, weight_decay, timing, augmented)
    return PhasePlan(labels, trainable_mask(labels), frozen, start, dict(rates), built, key,
                     augmented)


# ---- gradients for the trainable partition only ------------------------------------------

def split_trainable(params, mask) -> tuple[list, list]:
    """Leaves of `params` split by a same-shaped bool mask: (trainable, frozen) lists."""
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves(mask)
    return ([x for x, m in zip(leaves, flags) if m], [x for x, m in zip(leaves, flags) if not m])


def merge_trainable(treedef, mask, trainable: Sequence, frozen: Sequence):
    """Inverse of split_trainable."""
    trainable, frozen = iter(trainable), iter(frozen)
    leaves = [next(trainable) if m else next(frozen) for m in jax.tree.leaves(mask)]
    return jax.tree.unflatten(treedef, leaves)


def keep_frozen(old_params, new_params, mask):
    """New values for trainable leaves, the exact old arrays for frozen ones."""
    return jax.tree.map(lambda m, old, new: new if m else old, mask, old_params, new_params)


def zeros_for(frozen: Sequence) -> list:
    return [jnp.zeros_like(x) for x in frozen]
