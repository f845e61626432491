"""Run outputs: JSON Lines metrics and a PNG of each metric against the step."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any


class MetricsLog:
    """Appends one JSON object per line to `path`."""

    def __init__(self, path: str | pathlib.Path, *, append: bool = False):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def keep_metrics(path: str | pathlib.Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrites the JSON Lines file at `path` with only the records `keep` accepts.

    A line that does not parse (one cut short when a run was killed mid-write) is
    dropped. The new file replaces the old by rename, so a crash here leaves one or
    the other whole. Returns the number of records kept; a missing file is left so.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return len(kept)


def plot_metrics(records: list[dict[str, Any]], path: str | pathlib.Path, *,
                 title: str = "") -> pathlib.Path:
    """One panel for losses, one for accuracies; train and eval series per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for name, value in record.items():
            if name in ("step", "split", "time", "steps_per_s") or not isinstance(value, (int, float)):
                continue
            key = f"{record.get('split', 'train')}/{name}"
            series.setdefault(key, ([], []))
            series[key][0].append(record["step"])
            series[key][1].append(value)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, (steps, values) in sorted(series.items()):
        axis = ax_acc if key.endswith("accuracy") else ax_loss
        style = "o-" if key.startswith("eval") else "-"
        axis.plot(steps, values, style, label=key, markersize=3)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for axis in (ax_loss, ax_acc):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
