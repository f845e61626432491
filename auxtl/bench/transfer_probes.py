"""The probe modes of the transfer sweep, on a source trunk's frozen pooled features at
every depth, seeds vmapped: `linear` (closed-form ridge, its L2 strength chosen on
validation, `auxtl.probes.ridge_probe`) and `knn` (temperature-weighted vote on
L2-normalised features, k chosen on validation, `auxtl.probes.knn_probe`). Each seed's
depth is chosen on validation too (`auxtl.probes.choose_depth`); the table cell is the
chosen depth's test accuracy, and every depth's cell goes to the JSON."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flax import nnx

from auxtl import checkpoints, probes
from auxtl.bench.transfer_cells import cell
from auxtl.bench.transfer_config import TransferBenchConfig
from auxtl.bench.transfer_data import BenchData
from auxtl.bench.transfer_sources import Source


def _probe(mode: str, config: TransferBenchConfig, num_classes: int):
    if mode == "linear":
        return lambda *a: probes.ridge_probe(*a, num_classes=num_classes)
    return lambda *a: probes.knn_probe(*a, num_classes=num_classes,
                                       temperature=config.knn_temperature)


def probe_cells(source: Source, data: BenchData, splits: dict, config: TransferBenchConfig,
                log: Callable[[str], None]) -> list[dict]:
    """linear and knn at every depth and at each seed's validation-chosen depth, for every
    budget. Depth cells carry `depth_only=True`; the chosen-depth cell `layer` per seed."""
    trunk = checkpoints.build_checkpoint_trunk(source.metadata)
    nnx.update(trunk, source.params, source.batch_stats)
    norm = source.metadata.normalization
    start = time.perf_counter()
    pool = probes.depth_features(trunk, data.pool.images, norm)
    test = probes.depth_features(trunk, data.test.images, norm)
    log(f"[transfer] {source.name}: features of {len(pool)} depths in "
        f"{time.perf_counter() - start:.1f} s")
    names = trunk.layer_names
    num_classes = data.pool.num_classes
    labels = data.pool.labels
    cells = []
    for budget, per_seed in splits.items():
        start = time.perf_counter()
        train_y = np.stack([labels[s.train] for s in per_seed])
        val_y = np.stack([labels[s.val] for s in per_seed])
        for mode in ("linear", "knn"):
            if mode not in config.modes:
                continue
            probe = _probe(mode, config, num_classes)
            results = [probe(np.stack([pool[d][s.train] for s in per_seed]), train_y,
                             np.stack([pool[d][s.val] for s in per_seed]), val_y,
                             test[d], data.test.labels)
                       for d in range(len(names))]
            val = np.stack([np.asarray(r.val_accuracy) for r in results])      # (D, S)
            tests = np.stack([np.asarray(r.test_accuracy) for r in results])
            chosen = np.asarray(probes.choose_depth(val))
            seeds = np.arange(len(per_seed))
            for d, name in enumerate(names):
                cells.append(cell(source.name, mode, budget, config.seeds, tests[d],
                                  val_accuracy=val[d].tolist(), layer=name, depth_only=True))
            cells.append(cell(source.name, mode, budget, config.seeds, tests[chosen, seeds],
                              val_accuracy=val[chosen, seeds].tolist(),
                              layer=[names[d] for d in chosen]))
        log(f"[transfer] {source.name}: probes at {budget} labels/class in "
            f"{time.perf_counter() - start:.1f} s")
    return cells
