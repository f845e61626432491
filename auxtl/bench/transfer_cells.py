"""One cell of the transfer sweep (source, mode, budget): per-seed accuracies with a 95%
interval, and each cell's paired difference to its control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from auxtl.bench.transfer_config import RANDOM, SCRATCH, TRAINED_MODES
from auxtl.stats import mean_interval, paired_difference
def cell(source: str, mode: str, budget, seeds: Sequence[int], accuracy, **extra) -> dict:
    """One (source, mode, budget): per-seed test accuracies, mean and 95% t-interval."""
    values = [float(a) for a in np.asarray(accuracy)]
    mean, low, high = mean_interval(values)
    return {"source": source, "mode": mode, "budget": budget, "seeds": list(seeds),
            "accuracy": values, "mean": mean, "low": low, "high": high, **extra}


def reference_for(mode: str) -> str:
    """The control a mode's cells are compared to: scratch for head/staged, the random
    trunk for the probes."""
    return SCRATCH if mode in TRAINED_MODES else RANDOM


def add_differences(cells: list[dict]) -> None:
    """Each cell's paired difference to its reference (same seed, same labeled subset):
    scratch for head/staged, the random trunk for linear/knn."""
    index = {(c["source"], c["mode"], c["budget"], c.get("layer")): c for c in cells}
    for c in cells:
        ref_name = reference_for(c["mode"])
        layer = c.get("layer") if c["mode"] in ("linear", "knn") else None
        ref = index.get((ref_name, c["mode"], c["budget"], layer))
        c["reference"] = ref_name if ref is not None and c["source"] != ref_name else None
        c["difference"] = None
        if c["reference"]:
            per_seed = [a - b for a, b in zip(c["accuracy"], ref["accuracy"])]
            mean, low, high = paired_difference(c["accuracy"], ref["accuracy"])
            c["difference"] = {"mean": mean, "low": low, "high": high, "per_seed": per_seed}
