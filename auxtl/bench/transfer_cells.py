"""One cell of the transfer sweep (source, mode, budget): per-seed accuracies with a 95%
interval, and each cell's paired difference to its control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from auxtl.bench.transfer_config import PROBE_MODES, RANDOM, SCRATCH
from auxtl.stats import mean_interval, paired_difference


def cell(source: str, mode: str, budget, seeds: Sequence[int], accuracy, **extra) -> dict:
    """One (source, mode, budget): per-seed test accuracies, mean and 95% t-interval."""
    values = [float(a) for a in np.asarray(accuracy)]
    mean, low, high = mean_interval(values)
    return {"source": source, "mode": mode, "budget": budget, "seeds": list(seeds),
            "accuracy": values, "mean": mean, "low": low, "high": high, **extra}


def reference_for(mode: str) -> str:
    """The control a mode's cells are compared to: the random trunk for the probes, scratch
    for the trained modes (and for `best`, the mode each seed keeps)."""
    return RANDOM if mode in PROBE_MODES else SCRATCH


def _key(c: dict) -> tuple:
    """A cell's identity: a depth-only probe cell is keyed by its layer; a chosen-depth cell
    (a layer per seed) and every trained cell by None."""
    return (c["source"], c["mode"], c["budget"], c["layer"] if c.get("depth_only") else None)


def add_differences(cells: list[dict]) -> None:
    """Each cell's paired difference to its reference (same seed, same labeled subset):
    the random trunk's cell at the same depth (or its own chosen depth) for the probes,
    scratch's cell for the trained modes."""
    index = {_key(c): c for c in cells}
    for c in cells:
        ref_name = reference_for(c["mode"])
        source, mode, budget, layer = _key(c)
        ref = index.get((ref_name, mode, budget, layer))
        c["reference"] = ref_name if ref is not None and source != ref_name else None
        c["difference"] = None
        if c["reference"]:
            per_seed = [a - b for a, b in zip(c["accuracy"], ref["accuracy"])]
            mean, low, high = paired_difference(c["accuracy"], ref["accuracy"])
            c["difference"] = {"mean": mean, "low": low, "high": high, "per_seed": per_seed}
