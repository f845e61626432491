"""One trunk, several tasks: every task's held-out metric improves; the trunk transfers."""

import json

import pytest

import auxtl
from auxtl.finetune import FinetuneConfig
from auxtl.freezing import Phase
from auxtl.models.target import TargetSpec
from auxtl.transfer import TransferConfig, run_transfer
from conftest import tiny_config

MIX = (auxtl.TaskConfig("rotation", 1.0), auxtl.TaskConfig("jigsaw", 0.5),
       auxtl.TaskConfig("masked_inpainting", 1.0))


@pytest.mark.slow
def test_multitask_run_improves_every_task_and_transfers(tmp_path, mnist_small, mnist):
    out = tmp_path / "mix"
    config = tiny_config(tasks=MIX, steps=40, log_every=20, eval_every=40, out=str(out),
                         model_overrides={"widths": [16, 16, 32, 32, 32], "fc_dim": 32})
    auxtl.run_pretraining(config, mnist_small)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"split": "eval"' in line]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 40
    assert last["rotation/accuracy"] > first["rotation/accuracy"] + 0.1
    assert last["jigsaw/accuracy"] > first["jigsaw/accuracy"] + 0.05
    assert last["masked_inpainting/loss"] < 0.9 * first["masked_inpainting/loss"]
    metadata = auxtl.read_metadata(out / "trunk")
    assert [(t["name"], t["weight"]) for t in metadata["tasks"]] == [
        ("rotation", 1.0), ("jigsaw", 0.5), ("masked_inpainting", 1.0)]
    summary = run_transfer(TransferConfig(
        trunk=str(out / "trunk"), labels_per_class=3, val_per_class=3, seeds=(0,),
        baseline=False, target=TargetSpec(reuse=3, top="replace"), progress=False,
        finetune=FinetuneConfig(phases=(Phase(3, "head"), Phase(3, "head+top1", 0.1)),
                                batch_size=10)), mnist, log=lambda _: None)
    assert summary["surgery"]["copied"] > 0
    assert summary["transfer"]["mean"] > 0.1
