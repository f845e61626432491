"""Pretraining a shared trunk on one or several auxiliary tasks, end to end.

data -> held-out split -> normalisation -> trunk + heads -> jitted steps (metrics
pulled to the host every `log_every` steps) -> evaluation -> self-describing
trunk checkpoint, metrics.jsonl, metrics.png, summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from auxtl import checkpoints, parallel
from auxtl.data import (Dataset, SplitRecord, compute_normalization, load_dataset,
                        batch_indices, train_test_split)
from auxtl.errors import InputError
from auxtl.models import config_to_json, make_config
from auxtl.optim import OptimizerConfig, make_optimizer
from auxtl.pretrain_model import WeightedTask, build_pretrain_model, task_json
from auxtl.registry import get_task
from auxtl.reporting import MetricsLog, plot_metrics, read_metrics
from auxtl.train import (TrainState, evaluate, init_state, make_eval_step, make_train_step,
                         split_model)

SPLIT_SEED = 0  # the held-out split is the same for every training seed


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str
    weight: float = 1.0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    tasks: tuple[TaskConfig, ...] = (TaskConfig("rotation"),)
    data: str = "mnist5k"
    model: str = "small_cnn"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss_weighting: str = "fixed"   # or "uncertainty": learned per-task weights
    steps: int = 300
    batch_size: int = 64
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    test_fraction: float = 0.1
    log_every: int = 25
    eval_every: int = 0          # 0: evaluate only at the end
    checkpoint_every: int = 0    # 0: checkpoint only at the end
    eval_batch_size: int = 250
    out: str | None = None
    resume: bool = False
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "PretrainConfig":
        raw = dict(raw)
        raw["tasks"] = tuple(TaskConfig(**t) for t in raw.get("tasks", ()))
        raw["optimizer"] = OptimizerConfig(**raw.get("optimizer", {}))
        return cls(**raw)


@dataclasses.dataclass
class PretrainResult:
    state: TrainState
    graphdef: Any
    eval_metrics: dict[str, float]
    trunk_path: pathlib.Path | None
    out: pathlib.Path | None


# Fields that must match for --resume to continue the same run exactly.
_RESUME_FIELDS = ("tasks", "data", "model", "model_overrides", "loss_weighting", "steps",
                  "batch_size", "seed", "optimizer", "test_fraction")


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def _check_resume_config(out: pathlib.Path, config: PretrainConfig) -> None:
    saved_path = out / "config.json"
    if not saved_path.exists():
        return
    saved, current = json.loads(saved_path.read_text()), config.to_json()
    changed = [k for k in _RESUME_FIELDS if saved.get(k) != current.get(k)]
    if changed:
        raise InputError(f"cannot resume {str(out)!r}: {changed} differ from the saved "
                         f"config.json; resume needs the same run settings")


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(pending)
    return {name: float(np.mean([m[name] for m in host])) for name in host[0]}


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    """Total loss, then each task's loss and accuracy (when it has one)."""
    shown = {"loss": metrics["loss"]}
    for key, value in metrics.items():
        task, _, metric = key.partition("/")
        if metric in ("loss", "accuracy") and task:
            shown[f"{task}_{'acc' if metric == 'accuracy' else 'loss'}"] = value
    if sum(k.endswith("_loss") for k in shown) == 1:  # one task: its loss is the total
        shown = {k: v for k, v in shown.items() if not k.endswith("_loss")}
    return {k: f"{v:.3f}" for k, v in shown.items()}


def run_pretraining(config: PretrainConfig, dataset: Dataset | None = None) -> PretrainResult:
    """Trains the trunk as `config` says; writes outputs under `config.out` if set."""
    if config.steps <= 0:
        raise InputError(f"steps must be positive, got {config.steps}")
    dataset = load_dataset(config.data) if dataset is None else dataset
    train_set, test_set = train_test_split(dataset, test_fraction=config.test_fraction,
                                           seed=SPLIT_SEED)
    normalization = compute_normalization(train_set.images)
    tasks = [WeightedTask(t.name, get_task(t.name, **t.params), float(t.weight))
             for t in config.tasks]
    if config.batch_size > len(train_set):
        raise InputError(f"batch size {config.batch_size} exceeds the {len(train_set)} "
                         f"training images of {config.data!r}")
    input_shape = train_set.image_shape
    model_config = make_config(config.model, input_shape, **config.model_overrides)
    model = build_pretrain_model(config.model, model_config, tasks, input_shape,
                                 seed=config.seed, loss_weighting=config.loss_weighting)
    graphdef, params, batch_stats = split_model(model)
    optimizer = make_optimizer(config.optimizer, config.steps)
    mesh = parallel.data_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    state = parallel.replicate(init_state(params, batch_stats, optimizer, config.seed), mesh)

    out = pathlib.Path(config.out).absolute() if config.out else None
    manager = None
    is_main = jax.process_index() == 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if config.resume:
            _check_resume_config(out, config)
        manager = ocp.CheckpointManager(
            out / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        if config.resume and manager.latest_step() is not None:
            restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(
                jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))))
            state = TrainState(**restored)
        if is_main:
            (out / "config.json").write_text(json.dumps(config.to_json(), indent=2))
    start_step = int(jax.device_get(state.step))
    log = MetricsLog(out / "metrics.jsonl", append=config.resume) if (out and is_main) else None

    train_step = make_train_step(graphdef, tasks, optimizer, normalization)
    eval_step = make_eval_step(graphdef, tasks, normalization)
    run_eval = lambda: evaluate(eval_step, state.params, state.batch_stats, test_set.images,
                                batch_size=config.eval_batch_size, seed=SPLIT_SEED)

    if config.eval_every and start_step == 0 and log:
        log.write({"step": 0, "split": "eval", **run_eval()})  # the untrained baseline
    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and is_main),
               desc="pretrain", unit="step", dynamic_ncols=True)
    pending: list[dict[str, jax.Array]] = []
    last_time, last_step = time.perf_counter(), start_step
    for step in range(start_step, config.steps):
        indices = parallel.process_slice(
            batch_indices(len(train_set), config.batch_size, seed=config.seed, step=step))
        images = parallel.put_batch(train_set.images[indices], mesh)
        state, metrics = train_step(state, images)
        pending.append(metrics)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            averaged = _mean_metrics(pending)
            pending.clear()
            now = time.perf_counter()
            record = {"step": done, "split": "train", **averaged,
                      "steps_per_s": (done - last_step) / max(now - last_time, 1e-9)}
            last_time, last_step = now, done
            if log:
                log.write(record)
            bar.set_postfix(_postfix(averaged), refresh=False)
            bar.update(done - bar.n)
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
            record = {"step": done, "split": "eval", **run_eval()}
            if log:
                log.write(record)
        if manager and config.checkpoint_every and done % config.checkpoint_every == 0:
            manager.save(done, args=ocp.args.StandardSave(_state_tree(state)))
    bar.close()

    eval_metrics = run_eval()
    trunk_path = None
    if out is not None:
        if manager.latest_step() != config.steps:
            manager.save(config.steps, args=ocp.args.StandardSave(_state_tree(state)))
        manager.wait_until_finished()
        if log:
            log.write({"step": config.steps, "split": "eval", **eval_metrics})
        trunk_path = save_pretrained_trunk(out / "trunk", state, model.trunk, config,
                                           model_config, input_shape, normalization, tasks,
                                           eval_metrics, dataset=dataset)
        if is_main:
            plot_metrics(read_metrics(out / "metrics.jsonl"), out / "metrics.png",
                         title=f"pretrain {'+'.join(t.name for t in tasks)} on {config.data}")
            (out / "summary.json").write_text(json.dumps(
                {"eval": eval_metrics, "trunk": str(trunk_path), "steps": config.steps},
                indent=2))
    return PretrainResult(state, graphdef, eval_metrics, trunk_path, out)


def save_pretrained_trunk(path, state: TrainState, trunk, config: PretrainConfig, model_config,
                          input_shape, normalization, tasks, eval_metrics, *,
                          dataset: Dataset) -> pathlib.Path:
    """The trunk checkpoint; its metadata records the held-out split of `dataset` (the data
    pretraining split, content-hashed) so that transfer can keep those images for test."""
    split = SplitRecord.of(dataset, data=config.data, test_fraction=config.test_fraction,
                           seed=SPLIT_SEED)
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(model_config), input_shape=input_shape,
        normalization=normalization, tasks=task_json(tasks),
        extra={"data": config.data, "split": split.to_json(), "steps": config.steps,
               "seed": config.seed, "loss_weighting": config.loss_weighting,
               "eval": eval_metrics})
    params = jax.device_get(state.params)
    return checkpoints.save_trunk(
        path, trunk_params=params["trunk"],
        trunk_batch_stats=jax.device_get(state.batch_stats)["trunk"],
        head_params=params["heads"], metadata=metadata)
