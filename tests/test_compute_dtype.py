"""--compute-dtype: bfloat16 pretraining and transfer compute in bfloat16 and keep float32
master weights (parameters, optimizer state, BatchNorm statistics); bad values are named."""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import auxtl
from auxtl import freezing
from auxtl import pretrain as pretrain_module
from auxtl.cli import main
from auxtl.data import compute_normalization
from auxtl.errors import InputError
from auxtl.finetune import FinetuneConfig
from auxtl.finetune_step import make_finetune_step, make_logits_fn, norm_stats
from auxtl.freezing import Phase
from auxtl.models import with_compute_dtype
from auxtl.models.target import TargetSpec
from auxtl.optim import make_optimizer
from auxtl.pretrain_model import WeightedTask, build_pretrain_model
from auxtl.pretrain_step import make_train_step, task_losses
from auxtl.registry import get_task
from auxtl.train_state import TrainState
from auxtl.transfer import TransferConfig, run_transfer
from auxtl.transplant import build_transfer_model
from conftest import TINY_TRUNK, tiny_config

CONVOLUTION = re.compile(r"stablehlo\.convolution\(.*")


def float_leaves(tree) -> dict[str, jnp.dtype]:
    """path -> dtype of every inexact leaf (optax's step counts are int32: left out)."""
    return {jax.tree_util.keystr(path): jnp.asarray(leaf).dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)}


def assert_master_float32(tree, what: str) -> None:
    leaves = float_leaves(tree)
    assert leaves, what
    wrong = {path: dtype for path, dtype in leaves.items() if dtype != jnp.float32}
    assert not wrong, f"{what}: not float32: {wrong}"


def assert_computes_in_bfloat16(lowered_text: str, what: str) -> None:
    """Every convolution of the lowered step reads and writes bfloat16 tensors, and none
    went to auxtl's float32 CPU kernels (custom calls named Auxtl...): XLA's instead."""
    convolutions = CONVOLUTION.findall(lowered_text)
    assert convolutions, f"{what}: no convolution in the lowered step"
    for line in convolutions:
        types = re.findall(r"tensor<[^>]*>", line)
        assert types and all(t.endswith("xbf16>") for t in types), (what, line)
    assert "@Auxtl" not in lowered_text, what


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    config = tiny_config(data="digits", steps=2, batch_size=16, log_every=1,
                         compute_dtype="bfloat16", out=str(out / "pretrain"))
    return config, auxtl.run_pretraining(config), out


def test_bfloat16_pretraining_keeps_float32_master_weights(bf16_run):
    config, result, out = bf16_run
    state = result.state
    assert int(state.step) == 2
    assert_master_float32(state.params, "params")
    assert_master_float32(state.batch_stats, "batch statistics")
    assert_master_float32(state.opt_state, "optimizer state")
    assert result.eval_metrics and all(math.isfinite(v) for v in result.eval_metrics.values())
    # Recorded: the run's config and the checkpoint's model config (its weights float32).
    assert json.loads((out / "pretrain" / "config.json").read_text())["compute_dtype"] == "bfloat16"
    assert auxtl.read_metadata(result.trunk_path).config["dtype"] == "bfloat16"
    params, stats, _ = auxtl.checkpoints.load_trunk_state(result.trunk_path)
    assert_master_float32((params, stats), "trunk checkpoint")
    # The step itself computes in bfloat16: lowered on the real state, as the run traced it.
    dataset = auxtl.load_dataset("digits")
    tasks = [WeightedTask(t.name, get_task(t.name, **t.params), t.weight) for t in config.tasks]
    step = make_train_step(result.graphdef, tasks, make_optimizer(config.optimizer, 2),
                           compute_normalization(dataset.images))
    lowered = step.lower(state, dataset.images[:16]).as_text()
    assert_computes_in_bfloat16(lowered, "pretraining step")


def test_bfloat16_transfer_trains_in_bfloat16_on_float32_weights(bf16_run, tmp_path):
    _, result, _ = bf16_run
    finetune = FinetuneConfig(phases=(Phase(steps=2, train="all"),), batch_size=10,
                              compute_dtype="bfloat16")
    config = TransferConfig(trunk=str(result.trunk_path), data="digits", labels_per_class=3,
                            val_per_class=3, seeds=(0,), baseline=False, finetune=finetune,
                            target=TargetSpec(reuse=3, add=(8,)), out=str(tmp_path / "t"),
                            progress=False)
    summary = run_transfer(config, log=lambda _: None)
    assert summary["config"]["finetune"]["compute_dtype"] == "bfloat16"
    assert 0.0 <= summary["transfer"]["mean"] <= 1.0
    saved = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert saved["config"]["finetune"]["compute_dtype"] == "bfloat16"
    assert auxtl.read_metadata(tmp_path / "t" / "model").config["dtype"] == "bfloat16"
    params, stats, _ = auxtl.checkpoints.load_trunk_state(tmp_path / "t" / "model")
    assert_master_float32((params, stats), "saved transfer model")

    # One step of the engine's own compiled step on the transplanted model: everything
    # trainable, so every convolution and its gradients are in the step.
    source_params, source_stats, metadata = auxtl.checkpoints.load_trunk_state(
        result.trunk_path)
    model, _ = build_transfer_model(metadata, source_params, source_stats, config.target,
                                    num_classes=10, in_channels=1, seed=0,
                                    compute_dtype="bfloat16")
    assert model.head.dtype == model.trunk.layers[-1].dense.dtype == jnp.bfloat16
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    assert_master_float32((params, stats), "transplanted model")
    plan = freezing.plan_phase(params, model.trunk.layer_names, 3, Phase(1, "all"),
                               learning_rate=1e-3, weight_decay=1e-4)
    state = TrainState(step=np.int32(0), params=params, batch_stats=stats,
                       opt_state=plan.optimizer.init(params), rng=np.zeros(2, np.uint32))
    dataset = auxtl.load_dataset("digits")
    images, labels = dataset.images[:10], dataset.labels[:10].astype(np.int32)
    norm = norm_stats(compute_normalization(dataset.images))
    step = make_finetune_step(graphdef, plan)
    assert_computes_in_bfloat16(step.lower(state, images, labels, norm).as_text(),
                                "fine-tuning step")
    logits = make_logits_fn(graphdef, 0)
    assert_computes_in_bfloat16(logits.lower(params, stats, images, norm).as_text(),
                                "inference (conv + BatchNorm hook)")
    state, metrics = step(state, images, labels, norm)
    assert math.isfinite(float(metrics["loss"])) and metrics["loss"].dtype == jnp.float32
    assert_master_float32(state.params, "fine-tuned params")
    assert_master_float32(state.batch_stats, "fine-tuned batch statistics")
    assert_master_float32(state.opt_state, "fine-tuned optimizer state")


def test_every_built_in_task_head_computes_in_bfloat16_and_loses_in_float32():
    names = [n for n in auxtl.list_tasks()   # not the ones other test files register
             if auxtl.registry.task_class(n).__module__.startswith("auxtl.tasks.")]
    assert len(names) >= 8
    tasks = [WeightedTask(name, get_task(name)) for name in names]
    config = auxtl.make_config("small_cnn", (32, 32, 3),
                               **with_compute_dtype("small_cnn", "bfloat16", TINY_TRUNK))
    model = nnx.eval_shape(  # shapes only: nothing is initialised or run
        lambda: build_pretrain_model("small_cnn", config, tasks, (32, 32, 3), seed=0))
    for name in names:
        layers = [m for _, m in nnx.iter_modules(model.heads[name]) if "param_dtype" in vars(m)]
        assert layers and all(m.dtype == jnp.bfloat16 for m in layers), name
    graphdef, state = nnx.split(model)

    def losses(state, images, key):
        return task_losses(nnx.merge(graphdef, state), tasks, images, key, train=True)

    total, metrics = jax.eval_shape(losses, state, jax.ShapeDtypeStruct((4, 32, 32, 3),
                                                                        jnp.float32),
                                    jax.random.key(0))
    assert total.dtype == jnp.float32
    assert all(metrics[f"{name}/loss"].dtype == jnp.float32 for name in names
               if f"{name}/loss" in metrics)


def test_bad_compute_dtypes_are_named(tmp_path, capsys, user_model):
    with pytest.raises(InputError, match=r"--compute-dtype.*float32, bfloat16.*'float64'"):
        tiny_config(compute_dtype="float64").validate()
    with pytest.raises(InputError, match=r"--compute-dtype.*'bf16'"):
        FinetuneConfig(compute_dtype="bf16")
    with pytest.raises(InputError, match=r"dtype=bfloat16 disagrees with --compute-dtype float32"):
        with_compute_dtype("small_cnn", "float32", {"dtype": "bfloat16"})
    with pytest.raises(InputError, match=r"'user_pair'.*no `dtype` field.*bfloat16"):
        with_compute_dtype("user_pair", "bfloat16")
    assert with_compute_dtype("user_pair", "float32", {"width": 4}) == {"width": 4}
    assert main(["pretrain", "--compute-dtype", "fp8", "--out", str(tmp_path / "p")]) == 2
    assert main(["transfer", "--trunk", str(tmp_path), "--compute-dtype", "half"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "'fp8'" in err[0] and "'half'" in err[1], err
    assert not (tmp_path / "p").exists()


def test_resume_refuses_another_compute_dtype(bf16_run):
    config, _, _ = bf16_run
    with pytest.raises(InputError, match="compute_dtype"):
        auxtl.run_pretraining(dataclasses.replace(config, compute_dtype="float32",
                                                  resume=True))


def test_bfloat16_asked_for_as_a_model_arg_is_the_compute_dtype(bf16_run, tmp_path):
    """--model-arg dtype=bfloat16 (how it was asked for before --compute-dtype) is the
    compute dtype, and a run that recorded it so still passes the resume check."""
    config, _, out = bf16_run
    old_style = dataclasses.replace(config, compute_dtype="float32", model_overrides={
        **config.model_overrides, "dtype": "bfloat16"})
    assert old_style.canonical() == config.canonical()
    assert config.canonical() == config
    saved = json.loads((out / "pretrain" / "config.json").read_text())
    del saved["compute_dtype"]
    saved["model_overrides"]["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resolved = dataclasses.replace(config, steps=saved["steps"])
    pretrain_module._check_resume_config(tmp_path, resolved)            # passes
    with pytest.raises(InputError, match="compute_dtype"):
        pretrain_module._check_resume_config(
            tmp_path, dataclasses.replace(resolved, compute_dtype="float32"))
