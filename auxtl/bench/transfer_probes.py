"""The probe modes of the transfer sweep: `linear` at every trunk depth and `knn` at the
top reused depth, on a source trunk's frozen pooled features, seeds vmapped."""

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
def probe_cells(source: Source, data: BenchData, subsets: dict, config: TransferBenchConfig,
                log: Callable[[str], None]) -> list[dict]:
    """linear (every depth) and knn (top reused depth) for every budget, seeds vmapped."""
    trunk = checkpoints.build_checkpoint_trunk(source.metadata)
    nnx.update(trunk, source.params, source.batch_stats)
    norm = source.metadata.normalization
    start = time.perf_counter()
    pool = probes.depth_features(trunk, data.pool.images, norm)
    test = probes.depth_features(trunk, data.test.images, norm)
    log(f"[transfer] {source.name}: features of {len(pool)} depths in "
        f"{time.perf_counter() - start:.1f} s")
    names, depth = trunk.layer_names, config.reuse - 1
    num_classes = data.pool.num_classes
    cells = []
    for budget, per_seed in subsets.items():
        start = time.perf_counter()
        # Identical subsets (budget 'all') give identical probes: compute one, repeat it.
        same = all(np.array_equal(per_seed[0], p) for p in per_seed[1:])
        rows = per_seed[:1] if same else per_seed
        spread = (lambda a: np.repeat(np.asarray(a), len(per_seed))) if same else np.asarray
        labels = np.stack([data.pool.labels[i] for i in rows])
        if "linear" in config.modes:
            for d, name in enumerate(names):
                x = np.stack([pool[d][i] for i in rows])
                accuracy = probes.linear_probe_accuracy(
                    x, labels, test[d], data.test.labels, num_classes=num_classes,
                    steps=config.probe_steps)
                cells.append(cell(source.name, "linear", budget, config.seeds, spread(accuracy),
                                  layer=name, table=d == depth))
        if "knn" in config.modes:
            x = np.stack([pool[depth][i] for i in rows])
            k = min(config.knn_k, len(per_seed[0]) // num_classes)
            accuracy = probes.knn_accuracy(x, labels, test[depth], data.test.labels, k=k,
                                           num_classes=num_classes)
            cells.append(cell(source.name, "knn", budget, config.seeds, spread(accuracy),
                              layer=names[depth], k=k))
        log(f"[transfer] {source.name}: probes at {budget} labels/class in "
            f"{time.perf_counter() - start:.1f} s")
    return cells
