"""The transfer sweep's sources: which trunks it compares (registered tasks, mixes and
the `random`/`scratch` controls), pretraining them (or reusing a finished run), and
loading their checkpoints."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from auxtl import checkpoints
from auxtl.bench import BenchError
from auxtl.bench.transfer_config import MIX, RANDOM, SCRATCH, TransferBenchConfig
from auxtl.bench.transfer_data import BenchData
from auxtl.data import compute_normalization
from auxtl.models import build_trunk, config_to_json, make_config
from auxtl.pretrain import PretrainConfig, TaskConfig, run_pretraining
from auxtl.registry import get_task, list_tasks
from auxtl.trunk_metadata import TrunkMetadata
def expand_sources(names: Sequence[str]) -> tuple[str, ...]:
    """() -> every registered task, MIX, random, scratch; 'tasks' -> every registered task."""
    names = tuple(names) or ("tasks", MIX, RANDOM, SCRATCH)
    out: list[str] = []
    for name in names:
        out += list_tasks() if name == "tasks" else [name]
    return tuple(dict.fromkeys(out))


def source_tasks(name: str) -> tuple[str, ...]:
    """'rotation+jigsaw' -> ('rotation', 'jigsaw'); controls have none."""
    return () if name in (RANDOM, SCRATCH) else tuple(name.split("+"))


def refusal(name: str, image_shape) -> str | None:
    """Why a source cannot pretrain on these images (a task's validate), or None."""
    for task in source_tasks(name):
        if task not in list_tasks():
            raise BenchError(f"unknown source {name!r}: no task {task!r}; registered: "
                             f"{', '.join(list_tasks())}, plus {RANDOM!r} and {SCRATCH!r}")
        try:
            get_task(task).validate(tuple(image_shape))
        except ValueError as error:
            return str(error)
    return None


def pretrain_config(config: TransferBenchConfig, name: str, out: pathlib.Path):
    """The PretrainConfig of source `name` (its tasks, the sweep's model and pretraining
    settings), writing to `out`."""
    budget = ({"steps": config.pretrain_steps} if config.pretrain_steps
              else {"epochs": config.pretrain_epochs})
    return PretrainConfig(tasks=tuple(TaskConfig(t) for t in source_tasks(name)),
                          data=config.data, model=config.model,
                          model_overrides=dict(config.model_overrides),
                          batch_size=config.pretrain_batch_size, **budget,
                          seed=config.pretrain_seed, optimizer=config.pretrain_optimizer,
                          log_every=max(1, min(25, config.pretrain_steps or 25)),
                          out=str(out), progress=config.progress)


def loss_curve(run: pathlib.Path) -> list[list[float]]:
    """[step, training loss] pairs of a pretraining run (its metrics.jsonl)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[r["step"], r["loss"]] for r in records
            if r.get("split") == "train" and "loss" in r]


def pretrain_info(run: pathlib.Path, seconds: float, cached: bool) -> dict:
    """What the sweep records of a source's pretraining: wall-clock, steps, epochs,
    examples seen, held-out metrics and the training loss curve."""
    summary = json.loads((run / "summary.json").read_text())
    return {"cached": cached, "pretrain_s": seconds if not cached else
            summary.get("bench_pretrain_s", 0.0),
            "steps": summary.get("steps"), "epochs": summary.get("epochs"),
            "examples_seen": summary.get("examples_seen"), "eval": summary["eval"],
            "loss_curve": loss_curve(run)}


_IDENTITY_IGNORED = ("out", "progress", "resume", "overwrite", "keep", "log_every")


def _same_run(saved: dict, current: dict) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in _IDENTITY_IGNORED}
    return strip(saved) == strip(current)


def pretrained_trunk(config: TransferBenchConfig, name: str, data: BenchData,
                     log: Callable[[str], None]) -> tuple[pathlib.Path, dict]:
    """out/sources/<name>/trunk, pretrained on the pool; reused when a finished run with
    the same settings is there. Returns (trunk path, info for the JSON)."""
    out = pathlib.Path(config.out) / "sources" / name
    pre = pretrain_config(config, name, out)
    saved = out / "config.json"
    if ((out / "summary.json").is_file() and saved.is_file()
            and _same_run(json.loads(saved.read_text()), pre.to_json())):
        log(f"[transfer] source {name}: reusing {out / 'trunk'}")
        return out / "trunk", pretrain_info(out, 0.0, cached=True)
    shutil.rmtree(out, ignore_errors=True)
    budget = (f"{config.pretrain_steps} steps" if config.pretrain_steps
              else f"{config.pretrain_epochs:g} epochs")
    log(f"[transfer] source {name}: pretraining {budget} (batch "
        f"{config.pretrain_batch_size}) ...")
    start = time.perf_counter()
    result = run_pretraining(pre, data.pretrain)
    seconds = time.perf_counter() - start
    log(f"[transfer] source {name}: pretrained in {seconds:.1f} s, held-out "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.eval_metrics.items()))
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["bench_pretrain_s"] = seconds      # a later sweep reusing the trunk reports it
    summary_path.write_text(json.dumps(summary, indent=2))
    return result.trunk_path, pretrain_info(out, seconds, cached=False)


def random_trunk(config: TransferBenchConfig, data: BenchData) -> tuple[pathlib.Path, dict]:
    """The trunk every pretraining run starts from (same model, same seed), saved as a
    checkpoint with the pool's normalisation."""
    shape = data.pool.image_shape
    model_config = make_config(config.model, shape, **config.model_overrides)
    trunk = build_trunk(config.model, model_config, rngs=nnx.Rngs(config.pretrain_seed))
    metadata = checkpoints.trunk_metadata(
        trunk, config_json=config_to_json(model_config), input_shape=shape,
        normalization=compute_normalization(data.pool.images), tasks=[],
        extra={"data": config.data, "seed": config.pretrain_seed, "steps": 0})
    path = pathlib.Path(config.out).absolute() / "sources" / RANDOM / "trunk"
    checkpoints.save_trunk(path, trunk_params=nnx.to_pure_dict(nnx.state(trunk, nnx.Param)),
                           trunk_batch_stats=nnx.to_pure_dict(nnx.state(trunk, nnx.BatchStat)),
                           metadata=metadata)
    return path, {"cached": False, "pretrain_s": 0.0, "steps": 0, "epochs": 0,
                  "examples_seen": 0, "eval": None, "loss_curve": []}


@dataclasses.dataclass
class Source:
    """A trunk checkpoint loaded once per sweep."""

    name: str
    metadata: TrunkMetadata
    params: Any
    batch_stats: Any


def load_source(name: str, path) -> Source:
    """The trunk checkpoint at `path` (params, batch stats, metadata) as source `name`."""
    params, stats, metadata = checkpoints.load_trunk_state(path)
    return Source(name, metadata, params, stats)
