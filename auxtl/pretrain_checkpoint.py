"""Pretraining's step checkpoints (the train state and the input pipeline's state, saved
asynchronously by one orbax CheckpointManager) and the stops that leave one: SIGTERM
(`stop_requests`) and a NaN/Inf loss (`nonfinite_error`).

A step checkpoint is a composite of two items: `state` (the TrainState tree,
StandardSave) and `data` (the input iterator's state through grain's orbax handler:
one JSON file per process). Saves are asynchronous (`enable_async_checkpointing`,
orbax's default made explicit): `save` returns once the arrays are copied off the
device and writes them in a background thread; the loop waits for them only before
the final trunk save, a preemption stop or a NaN stop (`manager.wait_until_finished`).

Run folders written before this layout hold single-item step checkpoints (the state
under `default/`); `restore` reads those too (with no input state: the pipeline then
starts at the step, which the stateless order makes exact).
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from auxtl.errors import NonFiniteLossError

STATE, DATA = "state", "data"
LEGACY_ITEM = "default"


class InputState:
    """The input iterator's state at a step, in the shape grain's orbax handler saves and
    restores (`get_state` -> bytes, `set_state(bytes)`, `start_prefetch`)."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw.decode())

    def start_prefetch(self) -> None:
        """Nothing to start: the loop builds its iterator from the restored state."""


def open_manager(directory: pathlib.Path, *, keep: int) -> ocp.CheckpointManager:
    """The run's CheckpointManager: `keep` step checkpoints, asynchronous saves."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=True))


def save(manager: ocp.CheckpointManager, step: int, state_tree: dict[str, Any],
         input_state: dict[str, Any] | None, *, force: bool = False) -> float:
    """Starts saving step `step` (returns before the files are written); the seconds the
    call blocked the caller."""
    start = time.perf_counter()
    manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state_tree),
        DATA: grain.checkpoint.CheckpointSave(InputState(input_state))}), force=force)
    return time.perf_counter() - start


def restore(manager: ocp.CheckpointManager, step: int,
            like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state tree shaped and sharded as `like`, the input state or None) of step `step`;
    a single-item checkpoint of an older run gives its state and None."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    step_dir = pathlib.Path(manager.directory) / str(step)
    if (step_dir / LEGACY_ITEM).is_dir() and not (step_dir / STATE).is_dir():
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(step_dir / LEGACY_ITEM, target), None
    if not (step_dir / DATA / _input_file()).is_file():
        # saved by another number of processes: the state alone (each process's input
        # state was for its own slice; starting at the step is exact for the new slices)
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(target)}))
        return restored[STATE], None
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(target),
        DATA: grain.checkpoint.CheckpointRestore(InputState())}))
    return restored[STATE], restored[DATA].state


def _input_file() -> str:
    """The name grain's handler gives this process's input state."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def nonfinite_error(found: tuple[int, str | None, float], window: tuple[int, int],
                    manager, out: pathlib.Path | None, opt) -> NonFiniteLossError:
    """The error of a NaN/Inf stop, naming the last good checkpoint (saves finished)."""
    done, task, value = found
    if task is None:
        what = (f"the training state (parameters, batch statistics or optimizer state) "
                f"became NaN/Inf at step {done} while every task's loss was finite")
    else:
        kind = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
        what = f"loss of task {task!r} is {kind} at step {done}"
    what += f" (first seen between steps {window[0]} and {window[1]})"
    if manager is None:
        saved = "no checkpoint (no --out)"
    else:
        manager.wait_until_finished()
        last = manager.latest_step()
        saved = ("no checkpoint was saved before it" if last is None else
                 f"last good checkpoint: step {last} at {out / 'checkpoints' / str(last)}")
    return NonFiniteLossError(
        f"{what}; stopped without saving it; {saved}; try a lower --lr (now "
        f"{opt.learning_rate:g}) or more --warmup-steps (now {opt.warmup_steps})")


@contextlib.contextmanager
def stop_requests(enabled: bool) -> Iterator[threading.Event]:
    """An event SIGTERM sets while the block runs; the previous handler comes back after.

    Signal handlers can only be installed from the main thread; elsewhere (or when
    not `enabled`) the event is never set and SIGTERM keeps its old meaning.
    """
    requested = threading.Event()
    # With several processes each host would stop at its own step and meet the others
    # at different collectives (a hang), and jax.distributed has its own SIGTERM notice:
    # there a preempted run resumes from its last periodic checkpoint instead.
    if (not enabled or jax.process_count() > 1
            or threading.current_thread() is not threading.main_thread()):
        yield requested
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def closing_call(close) -> Iterator[None]:
    """Calls `close()` when the block ends, however it ends."""
    try:
        yield
    finally:
        close()
