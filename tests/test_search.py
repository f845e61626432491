"""Transfer-depth search: the grid's cells, the pick made on validation only, test scored
for the picked cell alone (every cell only with hindsight, after the pick)."""

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import checkpoints, cli, search
from auxtl.data import compute_normalization
from auxtl.finetune import FinetuneConfig
from auxtl.freezing import Phase
from auxtl.models import config_to_json, make_config
from auxtl.search import Cell, CellScore, SearchSpace, cell_recipe, pick, search_cells
from auxtl.transplant import variables

TINY = dict(widths=(4, 4, 8, 8, 8), fc_dim=8)   # small_cnn: conv1..conv5, fc (6 layers)


@pytest.fixture(scope="module")
def trunk(tmp_path_factory, mnist):
    """A randomly initialised tiny small_cnn saved as a trunk checkpoint for MNIST."""
    config = make_config("small_cnn", mnist.image_shape, **TINY)
    module = auxtl.build_trunk("small_cnn", config, rngs=nnx.Rngs(0))
    metadata = checkpoints.trunk_metadata(
        module, config_json=config_to_json(config), input_shape=mnist.image_shape,
        normalization=compute_normalization(mnist.images), tasks=[],
        extra={"data": "random-init"})   # not the target's data: the default test split
    tree = variables(module)
    path = tmp_path_factory.mktemp("search") / "trunk"
    checkpoints.save_trunk(path, trunk_params=tree["params"],
                           trunk_batch_stats=tree["batch_stats"], metadata=metadata)
    return str(path)


def flags(trunk, out, *extra):
    return ["transfer", "--trunk", trunk, "--data", "mnist5k", "--labels-per-class", "3",
            "--val-per-class", "3", "--phases", "head:3,head+top1:3@0.3", "--lr", "0.03",
            "--batch-size", "10", "--seeds", "2", "--no-progress", "--out", str(out),
            "--search", "--search-reuse", "1,2", "--search-unfreeze", "0,1,all", *extra]


@pytest.fixture(scope="module")
def cli_run(trunk, tmp_path_factory):
    """`auxtl transfer --search` end to end, with every fine-tuning run and every test
    scoring recorded (which cell, which test set)."""
    out = tmp_path_factory.mktemp("search_cli") / "out"
    runs, scored, printed = {}, [], io.StringIO()
    real_finetune, real_score = search.finetune, search.score

    def finetune(model, reuse, config, **kwargs):
        result = real_finetune(model, reuse, config, **kwargs)
        runs[id(result)] = (kwargs["desc"], reuse, kwargs.get("test"), result)
        return result

    def score(model, result, images, labels, **kwargs):
        scored.append(runs[id(result)][0])
        return real_score(model, result, images, labels, **kwargs)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(search, "finetune", finetune)
        patch.setattr(search, "score", score)
        code = cli.main(flags(trunk, out))
    return {"code": code, "out": out, "printed": printed.getvalue(), "scored": scored,
            "runs": list(runs.values()), "summary": json.loads((out / "search.json").read_text())}


def by_cell(summary):
    return {Cell(c["reuse"], c["unfreeze"]): c for c in summary["grid"]}


def test_cli_search_writes_search_json_and_prints_the_grid(cli_run):
    assert cli_run["code"] == 0
    summary, printed = cli_run["summary"], cli_run["printed"]
    # N capped at K: K=1 runs N=0 and N=1 (= all); K=2 runs N=0, 1, 2 (= all)
    assert sorted(by_cell(summary)) == [Cell(1, 0), Cell(1, 1), Cell(2, 0), Cell(2, 1),
                                        Cell(2, 2)]
    assert summary["space"] == {"reuse": [1, 2], "unfreeze": [0, 1, "all"]}
    lines = printed.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("K \\ N")))
    assert lines[header].split()[3:] == ["N=0", "N=1", "N=all"]
    row1, row2 = lines[header + 1].split(), lines[header + 2].split()
    assert row1[0] == "1" and row1[3] == "=" and row2[0] == "2" and "=" not in row2
    chosen = Cell(summary["pick"]["reuse"], summary["pick"]["unfreeze"])
    assert f"picked on validation: {chosen.label}" in printed
    assert "difference (picked - scratch, paired by seed)" in printed
    assert "hindsight" not in printed and summary["hindsight"] is None


def test_the_pick_is_the_validation_argmax(cli_run):
    cells = by_cell(cli_run["summary"])
    means = {c: float(np.mean(v["val_accuracies"])) for c, v in cells.items()}
    for cell, entry in cells.items():   # the grid's means are the seeds' best val epochs
        assert entry["val"]["mean"] == pytest.approx(means[cell], rel=1e-12)
    best = max(means.values())
    simplest = min((c for c in means if means[c] == best), key=lambda c: (c.unfreeze, c.reuse))
    pick_json = cli_run["summary"]["pick"]
    assert Cell(pick_json["reuse"], pick_json["unfreeze"]) == simplest


def test_only_the_picked_cell_is_scored_on_test(cli_run):
    summary = cli_run["summary"]
    chosen = Cell(summary["pick"]["reuse"], summary["pick"]["unfreeze"])
    cells = [r for r in cli_run["runs"] if not r[0].startswith("scratch")]
    scratch = [r for r in cli_run["runs"] if r[0].startswith("scratch")]
    assert len(cells) == 5 * 2 and all(test is None for _, _, test, _ in cells)
    # test scores: the picked cell's kept params, once per seed; then its scratch baseline
    assert cli_run["scored"] == [f"{chosen.label} seed {s}" for s in (0, 1)]
    assert [(desc, reuse) for desc, reuse, _, _ in scratch] == [
        ("scratch seed 0", chosen.reuse), ("scratch seed 1", chosen.reuse)]
    assert all(test is not None for _, _, test, _ in scratch)
    assert summary["scratch_accuracies"] == [r.test_accuracy for *_, r in scratch]
    difference = [a - b for a, b in zip(summary["test_accuracies"],
                                        summary["scratch_accuracies"])]
    assert summary["difference"]["mean"] == pytest.approx(np.mean(difference), abs=1e-12)


def test_scrambled_test_labels_change_no_choice_and_hindsight_is_apart(trunk, cli_run,
                                                                       tmp_path, monkeypatch):
    """Every test label moved to another class: the validation grid and the pick are the
    CLI run's, bit for bit; hindsight scores every cell on that test set after the pick."""
    args = cli.build_parser().parse_args(flags(trunk, tmp_path / "h"))
    config = cli.transfer_config_from_args(args)
    real, prepared = search.seed_data, []

    def scrambled(*a, **k):
        data = real(*a, **k)
        prepared.append(data.seed)
        images, labels = data.test
        return dataclasses.replace(data, test=(images, (labels + 1) % 10))

    monkeypatch.setattr(search, "seed_data", scrambled)
    result = search.search_transfer(config, cli.search_space_from_args(args),
                                    hindsight=True, log=lambda _: None)
    assert prepared == [0, 1]
    cells = by_cell(cli_run["summary"])
    assert {s.cell: list(s.val_accuracies) for s in result.grid} == {
        c: v["val_accuracies"] for c, v in cells.items()}
    assert result.pick.to_json() == cli_run["summary"]["pick"]
    hindsight = result.hindsight
    assert hindsight["note"] == "hindsight: not used for the choice"
    tests = {Cell(c["reuse"], c["unfreeze"]): c["test"] for c in hindsight["cells"]}
    assert sorted(tests) == sorted(cells)
    assert tests[result.pick]["mean"] == pytest.approx(result.test["mean"], abs=1e-12)
    best = min(tests, key=lambda c: (-tests[c]["mean"], c.unfreeze, c.reuse))
    assert Cell(hindsight["best"]["reuse"], hindsight["best"]["unfreeze"]) == best
    within = tests[best]["low"] <= tests[result.pick]["mean"] <= tests[best]["high"]
    assert hindsight["pick_within_best_interval"] == within
    printed = "\n".join(result.lines())
    assert "hindsight: not used for the choice" in printed and f"best {best.label}" in printed


def score_of(reuse, unfreeze, *val):
    return CellScore(Cell(reuse, unfreeze), tuple(val), (1,) * len(val))


def test_ties_go_to_the_simpler_cell():
    assert pick([score_of(1, 1, .5, .7), score_of(3, 0, .6, .6), score_of(2, 0, .7, .5)]
                ) == Cell(2, 0)                                  # smaller N, then smaller K
    assert pick([score_of(1, 0, .5, .5), score_of(4, 4, .5, .75)]) == Cell(4, 4)  # best mean


def test_n_is_capped_at_k_and_duplicates_run_once():
    space = SearchSpace(reuse=(3, 1, 3), unfreeze=(0, 1, 2, "all", 2))
    assert space.reuse == (3, 1) and space.unfreeze == (0, 1, 2, "all")
    assert search_cells(space, 6) == (Cell(1, 0), Cell(1, 1), Cell(3, 0), Cell(3, 1),
                                      Cell(3, 2), Cell(3, 3))
    # default depths: every K the target can be built on
    assert {c.reuse for c in search_cells(SearchSpace(unfreeze=(0,)), 4,
                                          lambda k: "cut" if k == 2 else None)} == {1, 3, 4}
    assert [Cell(3, n).train for n in range(4)] == [None, "head+top1", "head+top2", "all"]
    recipe = FinetuneConfig(phases=(Phase(3, "head", patience=2), Phase(4, "head+top2", 0.1, 1)))
    assert cell_recipe(recipe, Cell(3, 0)).phases == (recipe.phases[0],)
    assert cell_recipe(recipe, Cell(3, 3)).phases == (recipe.phases[0],
                                                      Phase(4, "all", 0.1, 1))


@pytest.mark.parametrize("make,fragments", [
    (lambda: SearchSpace(reuse=(0,)), ["--search-reuse", ">= 1", "0"]),
    (lambda: SearchSpace(reuse=()), ["--search-reuse"]),
    (lambda: SearchSpace(unfreeze=(-1,)), ["--search-unfreeze", "-1"]),
    (lambda: SearchSpace(unfreeze=("top",)), ["--search-unfreeze", "'top'"]),
    (lambda: SearchSpace.from_flags("1,two"), ["--search-reuse", "'1,two'"]),
    (lambda: SearchSpace.from_flags(None, "0,any"), ["--search-unfreeze", "'0,any'"]),
    (lambda: search_cells(SearchSpace(reuse=(7,)), 6), ["--search-reuse", "outside 1..6"]),
    (lambda: search_cells(SearchSpace(reuse=(2,)), 6, lambda k: "no out_dim"),
     ["--search-reuse", "no out_dim"]),
    (lambda: search.check_recipe(FinetuneConfig(phases=(Phase(1, "all"),)), ()),
     ["--phases", "'head'"]),
    (lambda: search.check_recipe(FinetuneConfig(phases=(Phase(1),)), (Cell(1, 1),)),
     ["--phases", "--search-unfreeze 0"]),
    (lambda: search.check_recipe(FinetuneConfig(phases=(Phase(steps=5),)), ()),
     ["--phases", "epochs"]),
])
def test_bad_values_raise_input_errors_naming_the_flag(make, fragments):
    with pytest.raises(auxtl.InputError) as error:
        make()
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


@pytest.mark.parametrize("extra,fragments", [
    (["--search-unfreeze", "0,x"], ["--search-unfreeze", "'0,x'"]),
    (["--search-reuse", "9"], ["--search-reuse", "outside 1..6"]),
    (["--reuse", "2"], ["--reuse 2", "--search-reuse"]),
])
def test_cli_refuses_bad_search_flags_before_training(trunk, tmp_path, capsys, extra,
                                                      fragments):
    assert cli.main(flags(trunk, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err
    assert not (tmp_path / "out").exists()


def test_search_flags_need_search(trunk, tmp_path, capsys):
    assert cli.main(["transfer", "--trunk", trunk, "--search-hindsight",
                     "--out", str(tmp_path / "out")]) == 2
    assert "--search-hindsight needs --search" in capsys.readouterr().err


def test_cli_search_dry_run_lists_the_cells_and_trains_nothing(trunk, tmp_path, capsys):
    assert cli.main(flags(trunk, tmp_path / "out", "--dry-run")) == 0
    assert capsys.readouterr().out.strip() == (
        "search: 5 cells x 2 seed(s), chosen on validation: K=1 N=0, K=1 N=all, K=2 N=0, "
        "K=2 N=1, K=2 N=all")
    assert not (tmp_path / "out").exists()
