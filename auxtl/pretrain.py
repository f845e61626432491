"""Pretraining a shared trunk on one or several auxiliary tasks, end to end.

data -> held-out split -> normalisation -> trunk + heads -> jitted steps (metrics
pulled to the host every `log_every` steps) -> evaluation -> self-describing
trunk checkpoint, metrics.jsonl, metrics.png, summary.json.

The budget is `steps`, or `epochs` (passes over the training split, after the held-out
split): steps = ceil(epochs * n_train / batch_size), resolved before anything is
written (`PretrainConfig.resolved`), so config.json and the resume check hold the
steps; summary.json records steps, examples_seen (steps * batch_size) and epochs.

Reliability: the config is checked before anything is built or written; a fresh
run refuses a folder holding another run (--resume continues it, --overwrite
replaces it); a run stops at the first NaN/Inf loss without checkpointing it; and
SIGTERM saves a checkpoint and stops (Preempted) so --resume continues exactly.

Input (`pretrain_data`): in memory by default, or streamed with grain (`stream`, see
`auxtl.streaming`); step t+1's batch is put on the devices while step t runs. Step
checkpoints (`pretrain_checkpoint`) hold the train state and the input state and are
saved asynchronously: the loop waits only before the trunk save, a preemption or a NaN
stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from auxtl import checkpoints, parallel, pretrain_checkpoint
from auxtl.data import Dataset
from auxtl.errors import InputError, Preempted
from auxtl.models import check_compute_dtype, config_to_json, make_config, with_compute_dtype
from auxtl.optim import OptimizerConfig, make_optimizer
from auxtl.pretrain_data import check_record, load_pretrain_data, write_record
from auxtl.pretrain_model import WeightedTask, build_pretrain_model, task_json
from auxtl.registry import get_task
from auxtl.reporting import MetricsLog, keep_metrics, plot_metrics, read_metrics
from auxtl.run_folder import check_out_folder, kept_on_resume, remove_run_outputs
from auxtl.splits import SplitRecord
from auxtl.streaming import device_prefetch
from auxtl.pretrain_step import (HEALTH, TrainState, evaluate, init_state, make_eval_step,
                         make_train_step, split_model)

SPLIT_SEED = 0  # the held-out split is the same for every training seed
DEFAULT_STEPS = 300  # the budget when neither steps nor epochs is given


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
    compute_dtype: str = "float32"  # or "bfloat16"; params and optimizer state stay float32
    loss_weighting: str = "fixed"   # or "uncertainty": learned per-task weights
    steps: int | None = None     # None: DEFAULT_STEPS, or from `epochs`
    epochs: float | None = None  # passes over the training split (after the held-out split)
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
    overwrite: bool = False      # a fresh run into `out` first removes the old run there
    keep: int = 2                # step checkpoints kept in out/checkpoints
    progress: bool = True
    stream: bool = False         # stream the data with grain (folder:/npz-shards:/arrayrecord:)
    image_size: tuple[int, ...] | None = None  # streamed (H, W[, C]); None: the first file's
    workers: int | None = None   # grain decoding processes; None: min(4, cpu count)
    eval_examples: int | None = None  # held-out images evaluated; None: all (streamed: 10,000)

    def validate(self) -> None:
        """Raises InputError naming the first setting that cannot run (before any work)."""
        def refuse(field: str, rule: str) -> None:
            raise InputError(f"{field} (--{field.replace('_', '-')}) must be {rule}, "
                             f"got {getattr(self, field)!r}")

        if self.steps is not None and self.epochs is not None:
            raise InputError(f"give the budget as steps (--steps {self.steps}) or as epochs "
                             f"(--epochs {self.epochs}), not both")
        if self.epochs is not None and not (isinstance(self.epochs, numbers.Real)
                                            and not isinstance(self.epochs, bool)
                                            and 0 < self.epochs < math.inf):
            refuse("epochs", "a positive number")
        for field in ("steps", "batch_size", "log_every", "eval_batch_size", "keep"):
            value = getattr(self, field)
            if (value is not None or field != "steps") and (not _is_whole(value) or value < 1):
                refuse(field, "a positive integer")
        for field in ("workers", "eval_examples"):
            value = getattr(self, field)
            if value is not None and (not _is_whole(value) or value < (field == "eval_examples")):
                refuse(field, "a whole number >= 0" if field == "workers" else "positive")
        for field in ("eval_every", "checkpoint_every"):
            value = getattr(self, field)
            if not _is_whole(value) or value < 0:
                refuse(field, "0 (off) or a positive integer")
        if not (isinstance(self.test_fraction, (int, float))
                and 0.0 < self.test_fraction < 1.0):
            refuse("test_fraction", "between 0 and 1 (exclusive)")
        if not self.tasks:
            raise InputError("tasks: at least one task is needed")
        check_compute_dtype(self.compute_dtype)
        if self.resume and self.overwrite:
            raise InputError("--resume continues the run in --out and --overwrite deletes "
                             "it; give one of them")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def canonical(self) -> "PretrainConfig":
        """The compute dtype as `compute_dtype` alone: a `--model-arg dtype=X` with the
        default compute dtype (how bfloat16 was asked for before the flag) moves there."""
        return dataclasses.replace(self, **_canonical_dtype(dataclasses.asdict(self)))

    def resolved(self, n_train: int) -> "PretrainConfig":
        """This config with `steps` set: ceil(epochs * n_train / batch_size) when `epochs`
        is given (`n_train`: the training split's size), else `steps` or DEFAULT_STEPS.
        The run, its config.json and the resume check use this form."""
        if self.epochs is not None:
            return dataclasses.replace(self, steps=max(
                1, math.ceil(self.epochs * n_train / self.batch_size)))
        return dataclasses.replace(self, steps=self.steps or DEFAULT_STEPS)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "PretrainConfig":
        raw = dict(raw)
        raw["tasks"] = tuple(TaskConfig(**t) for t in raw.get("tasks", ()))
        raw["optimizer"] = OptimizerConfig(**raw.get("optimizer", {}))
        if raw.get("image_size") is not None:
            raw["image_size"] = tuple(raw["image_size"])
        return cls(**raw)


@dataclasses.dataclass
class PretrainResult:
    state: TrainState
    graphdef: Any
    eval_metrics: dict[str, float]
    trunk_path: pathlib.Path | None
    out: pathlib.Path | None
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)  # steps, examples, epochs


# Fields that must match for --resume to continue the same run exactly.
_RESUME_FIELDS = ("tasks", "data", "model", "model_overrides", "compute_dtype",
                  "loss_weighting", "steps", "batch_size", "seed", "optimizer",
                  "test_fraction", "stream", "image_size")


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def _is_whole(value) -> bool:
    """An integer (NumPy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _canonical_dtype(raw: dict[str, Any]) -> dict[str, Any]:
    """{"compute_dtype", "model_overrides"} of a config's fields (`PretrainConfig.canonical`)."""
    overrides = dict(raw.get("model_overrides") or {})
    compute = raw.get("compute_dtype", "float32")
    if "dtype" in overrides and compute == "float32":
        compute = overrides.pop("dtype")
    return {"compute_dtype": compute, "model_overrides": overrides}


def _check_resume_config(out: pathlib.Path, config: PretrainConfig) -> None:
    saved_path = out / "config.json"
    if not saved_path.exists():
        return
    saved, current = json.loads(saved_path.read_text()), config.to_json()
    saved.update(_canonical_dtype(saved))   # an older run's --model-arg dtype=...
    defaults = PretrainConfig().to_json()  # a field an older config.json lacks: its default
    changed = [k for k in _RESUME_FIELDS if saved.get(k, defaults.get(k)) != current.get(k)]
    if changed:
        raise InputError(f"cannot resume {str(out)!r}: {changed} differ from the saved "
                         f"config.json; resume needs the same run settings")


def _first_nonfinite(unchecked: list[tuple[int, Any]],
                     task_names: Sequence[str]) -> tuple[int, str | None, float] | None:
    """(step, task or None for the state, value) of the first non-finite step, if any."""
    host = jax.device_get([health for _, health in unchecked])
    for (done, _), health in zip(unchecked, host):
        for name in task_names:
            value = float(health["losses"][name])
            if not math.isfinite(value):
                return done, name, value
        if not bool(health["state_finite"]):
            return done, None, math.nan
    return None


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
    """Trains the trunk as `config` says; writes outputs under `config.out` if set.

    Raises:
      InputError: a setting that cannot run, or an --out holding another run.
      NonFiniteLossError: a task's loss (or the state) became NaN/Inf; nothing from
        that step on is checkpointed.
      Preempted: SIGTERM arrived; a checkpoint of the step reached was saved.
    """
    config.validate()
    config = config.canonical()
    out = pathlib.Path(config.out).absolute() if config.out else None
    if out is not None:
        check_out_folder(out, resume=config.resume, overwrite=config.overwrite)
        if jax.process_count() > 1:  # every process has looked before any writes there
            multihost_utils.sync_global_devices(f"auxtl-pretrain-checked-{out}")
    data = load_pretrain_data(
        config.data, stream=config.stream, test_fraction=config.test_fraction,
        split_seed=SPLIT_SEED, batch_size=config.batch_size, seed=config.seed,
        image_size=config.image_size, workers=config.workers,
        eval_examples=config.eval_examples, dataset=dataset,
        log=print if jax.process_index() == 0 else (lambda *_: None))
    config = config.resolved(data.n_train)
    if out is not None and config.resume:   # the resolved steps, before anything is written
        _check_resume_config(out, config)
        check_record(out, data)
    normalization = data.normalization
    tasks = [WeightedTask(t.name, get_task(t.name, **t.params), float(t.weight))
             for t in config.tasks]
    if config.batch_size > data.n_train:
        raise InputError(f"batch size {config.batch_size} exceeds the {data.n_train} "
                         f"training images of {config.data!r}")
    input_shape = data.input_shape
    model_config = make_config(config.model, input_shape, **with_compute_dtype(
        config.model, config.compute_dtype, config.model_overrides))
    model = build_pretrain_model(config.model, model_config, tasks, input_shape,
                                 seed=config.seed, loss_weighting=config.loss_weighting)
    graphdef, params, batch_stats = split_model(model)
    optimizer = make_optimizer(config.optimizer, config.steps)
    mesh = parallel.data_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    state = parallel.replicate(init_state(params, batch_stats, optimizer, config.seed), mesh)

    manager, input_state = None, None
    is_main = jax.process_index() == 0
    if out is not None:
        if config.overwrite and out.is_dir() and is_main:
            remove_run_outputs(out)
        if jax.process_count() > 1:  # the others wait until process 0 has cleared it
            multihost_utils.sync_global_devices(f"auxtl-pretrain-out-{out}")
        out.mkdir(parents=True, exist_ok=True)
        manager = pretrain_checkpoint.open_manager(out / "checkpoints", keep=config.keep)
        if config.resume and manager.latest_step() is not None:
            restored, input_state = pretrain_checkpoint.restore(
                manager, manager.latest_step(), _state_tree(state))
            state = TrainState(**restored)
        if is_main:
            (out / "config.json").write_text(json.dumps(config.to_json(), indent=2))
            write_record(out, data)
    start_step = int(jax.device_get(state.step))
    log = None
    if out is not None and is_main:
        if config.resume:  # drop what the run wrote past its checkpoint: it is redone
            keep_metrics(out / "metrics.jsonl",
                         lambda r: kept_on_resume(r, start_step, config.steps))
        log = MetricsLog(out / "metrics.jsonl", append=config.resume)

    train_step = make_train_step(graphdef, tasks, optimizer, normalization, health=True)
    eval_step = make_eval_step(graphdef, tasks, normalization)
    run_eval = lambda: evaluate(eval_step, state.params, state.batch_stats, data.eval_images,
                                batch_size=config.eval_batch_size, seed=SPLIT_SEED)

    if config.eval_every and start_step == 0 and log:
        log.write({"step": 0, "split": "eval", **run_eval()})  # the untrained baseline
    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and is_main),
               desc="pretrain", unit="step", dynamic_ncols=True)
    pending: list[dict[str, jax.Array]] = []
    unchecked: list[tuple[int, Any]] = []  # (step, device-side health) since the last check
    task_names = [t.name for t in tasks]

    def check_finite() -> None:
        """At a point that syncs anyway: stop at the first non-finite step since the last."""
        if unchecked:
            found = _first_nonfinite(unchecked, task_names)
            if found is not None:
                raise pretrain_checkpoint.nonfinite_error(
                    found, (unchecked[0][0], unchecked[-1][0]), manager, out, config.optimizer)
            unchecked.clear()

    blocked: list[float] = []  # seconds each checkpoint save held the loop
    save = lambda done, force=False: blocked.append(pretrain_checkpoint.save(
        manager, done, _state_tree(state), input_state, force=force))
    batches = device_prefetch(data.batches(config.steps, start_step, input_state),
                              lambda local: parallel.put_batch(local, mesh))
    last_time, last_step, layout = time.perf_counter(), start_step, None
    with (pretrain_checkpoint.stop_requests(manager is not None) as stop, contextlib.closing(bar),
          contextlib.closing(batches), pretrain_checkpoint.closing_call(data.close)):
        for step, (images, input_state) in zip(range(start_step, config.steps), batches):
            layout = layout or parallel.array_layout(images)   # the batch as the step gets it
            state, metrics = train_step(state, images)
            done = step + 1
            unchecked.append((done, metrics.pop(HEALTH)))
            pending.append(metrics)
            if done % config.log_every == 0 or done == config.steps:
                check_finite()
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
                check_finite()
                record = {"step": done, "split": "eval", **run_eval()}
                if log:
                    log.write(record)
            saved = False
            if manager and config.checkpoint_every and done % config.checkpoint_every == 0:
                check_finite()  # never checkpoint a non-finite state
                save(done)
                saved = True
            if stop.is_set() and done < config.steps:
                check_finite()
                if not saved:
                    save(done, force=True)
                manager.wait_until_finished()
                raise Preempted(f"preempted at step {done} of {config.steps}; checkpoint "
                                f"saved at {out / 'checkpoints' / str(done)}; rerun with "
                                f"--resume to continue")

    eval_metrics = run_eval()
    budget = {"steps": config.steps, "examples_seen": config.steps * config.batch_size,
              "epochs": config.steps * config.batch_size / data.n_train}
    trunk_path = None
    if out is not None:
        if manager.latest_step() != config.steps:
            save(config.steps)
        manager.wait_until_finished()
        if log:
            log.write({"step": config.steps, "split": "eval", **eval_metrics})
        trunk_path = save_pretrained_trunk(out / "trunk", state, model.trunk, config,
                                           model_config, input_shape, normalization, tasks,
                                           eval_metrics, dataset=data.dataset,
                                           stream=data.stream)
        if is_main:
            plot_metrics(read_metrics(out / "metrics.jsonl"), out / "metrics.png",
                         title=f"pretrain {'+'.join(t.name for t in tasks)} on {config.data}")
            (out / "summary.json").write_text(json.dumps(
                {"eval": eval_metrics, "trunk": str(trunk_path), **budget,
                 "mesh": {**parallel.mesh_record(mesh), "steps": [layout] if layout else []},
                 "checkpoint_save_blocked_s": {"saves": len(blocked), "total": sum(blocked),
                                               "max": max(blocked, default=0.0)}}, indent=2))
    return PretrainResult(state, graphdef, eval_metrics, trunk_path, out, budget)


def save_pretrained_trunk(path, state: TrainState, trunk, config: PretrainConfig, model_config,
                          input_shape, normalization, tasks, eval_metrics, *,
                          dataset: Dataset | None = None,
                          stream: dict | None = None) -> pathlib.Path:
    """The trunk checkpoint; its metadata records the held-out split of `dataset` (the data
    pretraining split, content-hashed) so that transfer can keep those images for test.
    Without `dataset` no split is recorded, and transfer warns that it cannot honour one;
    a streamed run records `stream` (spec, listing hash, file count, split seed) instead."""
    split = None if dataset is None else SplitRecord.of(
        dataset, data=config.data, test_fraction=config.test_fraction, seed=SPLIT_SEED)
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(model_config), input_shape=input_shape,
        normalization=normalization, tasks=task_json(tasks),
        extra={"data": config.data, **({"split": split.to_json()} if split else {}),
               **({"stream": stream} if stream else {}),
               "steps": config.steps,
               "seed": config.seed, "loss_weighting": config.loss_weighting,
               "eval": eval_metrics})
    params = jax.device_get(state.params)
    return checkpoints.save_trunk(
        path, trunk_params=params["trunk"],
        trunk_batch_stats=jax.device_get(state.batch_stats)["trunk"],
        head_params=params["heads"], metadata=metadata)
