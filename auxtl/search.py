"""Transfer-depth search: reuse depth K x unfrozen top reused layers N, chosen on validation.

A cell (K, N) reuses the source's lowest K layers (the config's TargetSpec with reuse=K)
and fine-tunes with the TransferConfig's recipe: phase 1 is the config's first phase (it
must train the "head"); phase 2, only when N > 0, is the config's second phase (its
epochs, lr_scale and patience) training the head plus the top N reused layers
("head+topN"; "all" when N = K). The engine keeps each seed's best validation epoch
across both phases, so a cell with N > 0 keeps the head-phase model wherever unfreezing
did not improve validation. Every cell runs every seed of `config.seeds` on the labeled
and validation subsets `run_transfer` uses; its score is the mean over seeds of the best
validation accuracy. The pick is the best score, ties to the simpler cell (smaller N,
then smaller K). Only then is test scored, for the picked cell alone (and its scratch
baseline), unless `hindsight` asks for every cell too: an analysis, never the choice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import pathlib
from typing import Any, Callable

import jax

from auxtl import checkpoints
from auxtl.data import Dataset, Normalization, load_dataset
from auxtl.errors import InputError
from auxtl.finetune import FinetuneConfig, FinetuneResult, StepCache, finetune, score
from auxtl.models.target import TargetSpec
from auxtl.stats import mean_interval, paired_difference
from auxtl.target_data import prepare_target, seed_splits
from auxtl.transfer import TransferConfig, scratch_config
from auxtl.transplant import build_transfer_model, plan_surgery
from auxtl.trunk_metadata import TrunkMetadata


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The grid: reuse depths K (None: every K from 1 to the trunk's layer count that the
    target spec can build) and unfrozen top reused layers N (0: the reused layers stay
    frozen, only the head trains; "all": every reused layer fine-tuned). Per K, N is
    capped at K and cells that coincide after capping run once."""

    reuse: tuple[int, ...] | None = None
    unfreeze: tuple[int | str, ...] = (0, 1, 2, "all")

    def __post_init__(self):
        for field, flag, least, words in (("reuse", "--search-reuse", 1, ()),
                                          ("unfreeze", "--search-unfreeze", 0, ("all",))):
            values = getattr(self, field)
            if values is None and field == "reuse":
                continue   # every K the target allows
            values = tuple(values)
            bad = [v for v in values if v not in words and (isinstance(v, bool) or not
                                                            isinstance(v, numbers.Integral)
                                                            or v < least)]
            if not values or bad:
                raise InputError(f"{field} ({flag}) must list whole numbers >= {least}"
                                 f"{' or ' + repr(words[0]) if words else ''}, got "
                                 f"{bad[0] if bad else list(values)!r}")
            object.__setattr__(self, field, tuple(dict.fromkeys(  # in order, once each
                v if v in words else int(v) for v in values)))

    @classmethod
    def from_flags(cls, reuse: str | None = None, unfreeze: str | None = None) -> SearchSpace:
        """From --search-reuse "1,2,3" and --search-unfreeze "0,1,all" (None: default)."""
        def numbers_in(text: str, flag: str, words: tuple[str, ...] = ()) -> tuple:
            try:
                return tuple(w if w in words else int(w)
                             for w in (part.strip() for part in text.split(",")) if w)
            except ValueError:
                raise InputError(f"{flag} must list whole numbers{' or ' if words else ''}"
                                 f"{', '.join(map(repr, words))}, comma-separated, got "
                                 f"{text!r}") from None
        return cls(None if reuse is None else numbers_in(reuse, "--search-reuse"),
                   cls.unfreeze if unfreeze is None else
                   numbers_in(unfreeze, "--search-unfreeze", ("all",)))

    def to_json(self) -> dict[str, Any]:
        return {"reuse": None if self.reuse is None else list(self.reuse),
                "unfreeze": list(self.unfreeze)}


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    """Reuse the lowest `reuse` layers; fine-tune the top `unfreeze` of them in phase 2."""

    reuse: int
    unfreeze: int

    @property
    def train(self) -> str | None:
        """Phase 2's train spec (None: no second phase)."""
        if self.unfreeze == 0:
            return None
        return "all" if self.unfreeze == self.reuse else f"head+top{self.unfreeze}"

    @property
    def label(self) -> str:
        n = "all" if self.unfreeze and self.unfreeze == self.reuse else self.unfreeze
        return f"K={self.reuse} N={n}"

    def to_json(self) -> dict[str, Any]:
        return {"reuse": self.reuse, "unfreeze": self.unfreeze, "train": self.train}


def capped(n: int | str, k: int) -> int:
    """N for a cell of depth K: "all" is K, larger counts are capped at K."""
    return k if n == "all" else min(int(n), k)


def search_cells(space: SearchSpace, layers: int,
                 buildable: Callable[[int], str | None] = lambda k: None) -> tuple[Cell, ...]:
    """The cells of `space` for a trunk of `layers` layers, sorted by (K, N).

    `buildable(k)`: None when the target spec can be built on the lowest k layers, else
    the reason. Default K: every buildable K in 1..layers; a K listed in `space.reuse`
    that is out of range or not buildable raises InputError naming --search-reuse.
    """
    if space.reuse is None:
        depths = [k for k in range(1, layers + 1) if buildable(k) is None]
        if not depths:
            raise InputError(f"no reuse depth in 1..{layers} can be built for this target "
                             f"(--search-reuse): {buildable(layers)}")
    else:
        depths = list(space.reuse)
        for k in depths:
            reason = (f"outside 1..{layers}, the trunk's number of layers" if k > layers
                      else buildable(k))
            if reason is not None:
                raise InputError(f"reuse (--search-reuse) {k} cannot be used: {reason}")
    return tuple(sorted({Cell(k, capped(n, k)) for k in depths for n in space.unfreeze}))


def check_recipe(config: FinetuneConfig, cells) -> None:
    """Refuses phases the search cannot take its recipe from (InputError naming --phases):
    epoch budgets (cells are scored on validation), a first phase training the head, a
    second phase when some cell unfreezes (N > 0), and no more than two."""
    phases = config.phases
    if any(p.steps is not None for p in phases):
        raise InputError("--phases: the search scores cells on validation: count epochs")
    if phases[0].train != "head":
        raise InputError(f"--phases: the search's first phase must be 'head', got "
                         f"{phases[0].train!r}")
    if len(phases) > 2 or (len(phases) < 2 and any(c.unfreeze for c in cells)):
        raise InputError(f"--phases: the search takes a head phase and one unfreezing phase "
                         f"(e.g. head:40,head+top2:40@0.1; one phase with --search-unfreeze 0),"
                         f" got {len(phases)}")


def cell_recipe(config: FinetuneConfig, cell: Cell) -> FinetuneConfig:
    """The config's recipe for one cell: its head phase, then (N > 0) its second phase
    training `cell.train`."""
    phases = (config.phases[0],)
    if cell.unfreeze:
        phases += (dataclasses.replace(config.phases[1], train=cell.train),)
    return dataclasses.replace(config, phases=phases)


@dataclasses.dataclass(frozen=True)
class CellScore:
    """A cell's best validation accuracy per seed and their mean and 95% interval."""

    cell: Cell
    val_accuracies: tuple[float, ...]
    steps: tuple[int, ...]

    @property
    def val(self) -> dict[str, float]:
        return named(mean_interval(self.val_accuracies))

    def to_json(self) -> dict[str, Any]:
        return {**self.cell.to_json(), "val_accuracies": list(self.val_accuracies),
                "steps": list(self.steps), "val": self.val}


def choice_key(mean: float, cell: Cell) -> tuple:
    """Sorts the best first: highest mean, then the simpler cell (smaller N, smaller K)."""
    return (-mean, cell.unfreeze, cell.reuse)


def pick(scores) -> Cell:
    """The cell to keep: the best validation mean; ties go to the simpler cell."""
    return min(scores, key=lambda s: choice_key(s.val["mean"], s.cell)).cell


@dataclasses.dataclass(frozen=True)
class SeedData:
    """One seed's data, prepared as `run_transfer` prepares it."""

    seed: int
    train: tuple
    val: tuple
    test: tuple
    normalization: Normalization
    in_channels: int


def seed_data(target, config: TransferConfig, seed: int) -> SeedData:
    """The labeled/validation subsets of `seed` and the shared test split of the prepared
    target (`auxtl.target_data.prepare_target`), exactly as run_transfer's."""
    splits = seed_splits(target, config, seed)
    return SeedData(seed, (splits.train.images, splits.train.labels),
                    (splits.val.images, splits.val.labels),
                    (splits.test.images, splits.test.labels),
                    target.normalization, splits.train.image_shape[-1])


def named(values: tuple[float, float, float] | None) -> dict[str, float] | None:
    return None if values is None else dict(zip(("mean", "low", "high"), values))


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The validation grid, the pick, and test of the pick only: per seed, its scratch
    baseline's (None without one); `hindsight`: every cell on test (None unless asked)."""

    grid: tuple[CellScore, ...]
    pick: Cell
    unfreeze: tuple[int | str, ...]
    test_accuracies: tuple[float, ...] = ()
    scratch_accuracies: tuple[float, ...] | None = None
    hindsight: dict[str, Any] | None = None

    @property
    def test(self) -> dict[str, float]:
        return named(mean_interval(self.test_accuracies))

    @property
    def scratch(self) -> dict[str, float] | None:
        return self.scratch_accuracies and named(mean_interval(self.scratch_accuracies))

    @property
    def difference(self) -> dict[str, float] | None:
        return self.scratch_accuracies and named(paired_difference(self.test_accuracies,
                                                                   self.scratch_accuracies))

    def to_json(self) -> dict[str, Any]:
        return {**json.loads(json.dumps(dataclasses.asdict(self))),   # tuples as lists
                "grid": [s.to_json() for s in self.grid], "pick": self.pick.to_json(),
                "test": self.test, "scratch": self.scratch, "difference": self.difference}

    def lines(self) -> list[str]:  # what the command line prints after the grid
        out = [f"picked on validation: {self.pick.label}",
               f"picked test accuracy: {_interval(self.test)} over "
               f"{len(self.test_accuracies)} seed(s)"]
        if self.scratch is not None:
            out += [f"scratch test accuracy: {_interval(self.scratch)}",
                    f"difference (picked - scratch, paired by seed): "
                    f"{_interval(self.difference)}"]
        if self.hindsight is not None:
            best = Cell(self.hindsight["best"]["reuse"], self.hindsight["best"]["unfreeze"])
            out += [hindsight_table(self), f"hindsight (not used for the choice): best "
                    f"{best.label}; picked test mean within its 95% interval: "
                    f"{self.hindsight['pick_within_best_interval']}"]
        return out


def run_cell(cell: Cell, models, data: list[SeedData], config: TransferConfig,
             cache: StepCache) -> list[FinetuneResult]:
    """One cell's fine-tuning, one result per seed; no test set is passed."""
    recipe = cell_recipe(config.finetune, cell)
    return [finetune(model, cell.reuse, dataclasses.replace(recipe, seed=d.seed), train=d.train,
                     val=d.val, normalization=d.normalization, cache=cache,
                     progress=config.progress, desc=f"{cell.label} seed {d.seed}")
            for model, d in zip(models, data)]


def scored_on_test(models, results, data: list[SeedData], cache: StepCache) -> tuple[float, ...]:
    """Each seed's kept params scored on the test split."""
    return tuple(score(m, r, *d.test, normalization=d.normalization, cache=cache)
                 for m, r, d in zip(models, results, data))


def run_scratch(cell: Cell, metadata, config: TransferConfig, data: list[SeedData],
                num_classes: int, cache: StepCache) -> tuple[float, ...]:
    """The picked architecture from scratch, as `run_transfer`'s baseline: the same budget,
    everything trainable, early stopping on the same validation; test accuracy per seed."""
    recipe = scratch_config(cell_recipe(config.finetune, cell))
    spec = dataclasses.replace(config.target, reuse=cell.reuse)
    accuracies = []
    for d in data:
        fresh, _ = build_transfer_model(metadata, None, None, spec, num_classes=num_classes,
                                        in_channels=d.in_channels, seed=d.seed, transplant=False,
                                        compute_dtype=recipe.compute_dtype)
        accuracies.append(finetune(fresh, cell.reuse, dataclasses.replace(recipe, seed=d.seed),
                                   train=d.train, val=d.val, test=d.test, cache=cache,
                                   normalization=d.normalization, progress=config.progress,
                                   desc=f"scratch seed {d.seed}").test_accuracy)
    return tuple(accuracies)


def hindsight_summary(tests: dict[Cell, tuple[float, ...]], chosen: Cell) -> dict[str, Any]:
    """Every cell's test mean and interval, the best in hindsight (ties: simpler cell) and
    whether the picked cell's test mean lies in that best cell's 95% interval (None with
    one seed: no interval)."""
    intervals = {c: named(mean_interval(v)) for c, v in tests.items()}
    best = min(intervals, key=lambda c: choice_key(intervals[c]["mean"], c))
    low, high, mean = intervals[best]["low"], intervals[best]["high"], intervals[chosen]["mean"]
    return {"note": "hindsight: not used for the choice", "best": best.to_json(),
            "cells": [{**c.to_json(), "test_accuracies": list(tests[c]), "test": intervals[c]}
                      for c in sorted(tests)],
            "pick_within_best_interval": None if math.isnan(low) else bool(low <= mean <= high)}


def buildable_for(metadata: TrunkMetadata, target: TargetSpec, num_classes: int,
                  in_channels: int) -> Callable[[int], str | None]:
    """`search_cells`' test: the surgery plan of depth k (shapes only), or the reason."""
    def reason(k: int) -> str | None:
        try:
            plan_surgery(metadata, dataclasses.replace(target, reuse=k), num_classes=num_classes,
                         in_channels=in_channels)
        except InputError as error:
            return str(error)
        return None
    return reason


def plan_search(config: TransferConfig, space: SearchSpace, dataset: Dataset) -> tuple[Cell, ...]:
    """The cells a search would run, checked (data, depths, recipe) before anything trains."""
    if dataset.labels is None:
        raise InputError(f"transfer needs labeled data; {config.data!r} has no labels")
    metadata = checkpoints.read_metadata(config.trunk)
    cells = search_cells(space, len(metadata.layer_names), buildable_for(
        metadata, config.target, dataset.num_classes, dataset.image_shape[-1]))
    check_recipe(config.finetune, cells)
    return cells


def search_transfer(config: TransferConfig, space: SearchSpace = SearchSpace(),
                    dataset: Dataset | None = None, *, hindsight: bool = False,
                    log=print) -> SearchResult:
    """Runs every cell of `space` on validation, picks one, and scores the pick on test.

    `config` gives the trunk, data, labels, seeds, target top/add, recipe and baseline;
    its `target.reuse` is replaced per cell. Writes `config.out`/search.json when
    `config.out` is set. Only the best cell so far keeps its models and params (every
    cell's, with `hindsight`, which then scores all of them on test after the pick).
    """
    dataset = load_dataset(config.data) if dataset is None else dataset
    cells = plan_search(config, space, dataset)
    source_params, source_stats, metadata = checkpoints.load_trunk_state(config.trunk)
    target = prepare_target(metadata, dataset, config, log)
    data = [seed_data(target, config, seed) for seed in config.seeds]
    cache = StepCache(keep_features=2 * len(data))   # every seed's train and val prefix
    scores, kept, best = [], {}, None
    for depth in sorted({c.reuse for c in cells}):
        spec = dataclasses.replace(config.target, reuse=depth)
        models = [build_transfer_model(
            metadata, source_params, source_stats, spec, num_classes=dataset.num_classes,
            in_channels=d.in_channels, seed=d.seed, compute_dtype=config.finetune.compute_dtype)[0]
            for d in data]
        for cell in (c for c in cells if c.reuse == depth):
            results = run_cell(cell, models, data, config, cache)
            scored = CellScore(cell, tuple(r.best_val_accuracy for r in results),
                               tuple(r.steps for r in results))
            scores.append(scored)
            log(f"{cell.label}: validation {_interval(scored.val)}")
            if hindsight:
                kept[cell] = (models, results)
            if best is None or pick([best[0], scored]) != best[0].cell:
                best = (scored, models, results)
    chosen = pick(scores)
    assert chosen == best[0].cell   # the running best is the pick
    log(grid_table(SearchResult(tuple(scores), chosen, space.unfreeze)))
    # the choice is made: from here on, test is scored
    result = SearchResult(
        tuple(scores), chosen, space.unfreeze, scored_on_test(best[1], best[2], data, cache),
        run_scratch(chosen, metadata, config, data, dataset.num_classes, cache)
        if config.baseline else None,
        hindsight_summary({c: scored_on_test(*kept[c], data, cache) for c in kept}, chosen)
        if hindsight else None)
    if config.out and jax.process_index() == 0:   # every process searched alike
        out = pathlib.Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps(
            {"config": config.to_json(), "space": space.to_json(),
             "split": {**target.split.to_json(), "test_examples": len(data[0].test[1]),
                       "note": target.split_note},
             "normalization": target.normalization_record, "resize": target.resize,
             **result.to_json()}, indent=2))
    return result


def _interval(stats: dict[str, float]) -> str:
    if math.isnan(stats["low"]):   # one seed
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} (95% CI {stats['low']:.4f} .. {stats['high']:.4f})"


def _table(means: dict[Cell, float], unfreeze, star: Cell, title: str) -> str:
    """K rows x one column per requested N: the mean of cell (K, N capped at K), '=' where
    the cap makes it the cell of a column to its left, '*' on `star`."""
    rows = {}
    for k in sorted({c.reuse for c in means}):
        cells = [Cell(k, capped(n, k)) for n in unfreeze]
        rows[k] = ["=" if c in cells[:i] else f"{means[c]:.4f}{'*' if c == star else ''}"
                   for i, c in enumerate(cells)]
    width = max(8, *(len(v) for r in rows.values() for v in r)) + 2
    lines = [title, "K \\ N " + "".join(f"{f'N={n}':>{width}}" for n in unfreeze)]
    return "\n".join(lines + [f"{k:<6}" + "".join(f"{v:>{width}}" for v in r)
                              for k, r in rows.items()])


def grid_table(result: SearchResult) -> str:
    """The validation means as K rows x N columns; the pick starred."""
    return _table({s.cell: s.val["mean"] for s in result.grid}, result.unfreeze, result.pick,
                  "validation accuracy (mean over seeds; * picked; = capped at K)")


def hindsight_table(result: SearchResult) -> str:
    """Every cell's test mean (hindsight: not used for the choice); the best starred."""
    best = result.hindsight["best"]
    return _table({Cell(c["reuse"], c["unfreeze"]): c["test"]["mean"]
                   for c in result.hindsight["cells"]}, result.unfreeze,
                  Cell(best["reuse"], best["unfreeze"]),
                  "hindsight: not used for the choice. test accuracy (mean over seeds; "
                  "* best in hindsight)")
