"""A pretraining run's folder: what a run writes there, when a fresh run may use it,
what --overwrite removes, and which metrics records a resumed run keeps.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

from auxtl.errors import InputError

# What a run writes into its folder; --overwrite removes these and nothing else.
RUN_OUTPUTS = ("checkpoints", "trunk", "config.json", "data.json", "metrics.jsonl",
               "metrics.png", "summary.json")
RUN_LEFTOVERS = (".trunk.", ".metrics.jsonl.")  # an interrupted atomic save's temporaries


def _is_run_output(name: str) -> bool:
    return name in RUN_OUTPUTS or name.startswith(RUN_LEFTOVERS)


def _checkpoint_steps(folder: pathlib.Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _describe_folder(out: pathlib.Path, names: Sequence[str]) -> str:
    parts = []
    for name in names:
        steps = _checkpoint_steps(out / name) if name == "checkpoints" else []
        parts.append(f"checkpoints at steps {steps}" if steps else name)
    return ", ".join(parts)


def check_out_folder(out: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a fresh run into a folder that holds something (another run's outputs).

    Orbax skips saving a step at or below the latest step already in the folder, so a
    fresh run there would silently keep the old run's checkpoints under its own
    config.json, and a later --resume would continue the wrong weights.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder")
    if resume or not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    if overwrite:
        foreign = [name for name in names if not _is_run_output(name)]
        if foreign:
            raise InputError(f"--overwrite removes only a run's outputs "
                             f"({', '.join(RUN_OUTPUTS)}), and {str(out)!r} also holds "
                             f"{foreign}; move them away or choose another --out")
        return
    raise InputError(f"run folder {str(out)!r} is not empty: it holds "
                     f"{_describe_folder(out, names)}; add --resume to continue that run, "
                     f"--overwrite to delete it and start afresh, or choose another --out")


def remove_run_outputs(out: pathlib.Path) -> None:
    """Deletes what a run wrote into `out` (RUN_OUTPUTS and leftovers), nothing else."""
    for path in sorted(out.iterdir()):
        if _is_run_output(path.name):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def kept_on_resume(record: dict[str, Any], start: int, final: int) -> bool:
    """Whether a metrics record stays when a run resumes at step `start`.

    Records past the restored step are rewritten by the resumed run, and so are the
    eval records it writes at `start` itself: the untrained baseline (start 0) and
    the final evaluation (start == final).
    """
    step = record.get("step")
    if not isinstance(step, int) or step > start:
        return False
    return not (step == start and record.get("split") == "eval" and start in (0, final))
