"""Compiling a throughput case, counting its FLOPs, and timing its calls."""

from __future__ import annotations

import time
from typing import Any

import jax

from auxtl.bench.machine import custom_call_flops
from auxtl.bench.throughput_cases import Case
def cost_flops(analysis) -> float | None:
    """'flops' from a cost analysis that may be a dict, a list of dicts (older JAX) or None."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops and flops > 0 else None


def compiled_step_flops(compiled) -> tuple[float | None, float]:
    """(FLOPs per device of a compiled step, or None, and the part of them that is
    auxtl.cpu's convolution kernels): XLA counts no custom calls, so those are
    counted from the compiled HLO the way XLA counts a convolution and added."""
    text = compiled.as_text()
    custom = custom_call_flops(text)
    flops = cost_flops(_safe(compiled.cost_analysis))
    return (None if flops is None else flops + custom), custom


def compile_case(case: Case) -> tuple[Any, float, dict[str, Any]]:
    """(compiled step, compile seconds, FLOP counts).

    The compiled executable's cost analysis is per device (the SPMD-partitioned
    module), so it is multiplied by the device count. The lowered (pre-optimisation,
    global) module's count is kept beside it as a cross-check, and used when the
    backend gives no compiled count. XLA counts no custom calls, so the FLOPs of
    auxtl.cpu's convolution kernels are counted from the compiled HLO and added.
    """
    start = time.perf_counter()
    lowered = case.fn.lower(*case.args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    devices = len(jax.tree.leaves(case.args)[0].sharding.device_set)
    compiled_flops, custom_flops = compiled_step_flops(compiled)
    lowered_flops = cost_flops(_safe(lowered.cost_analysis))
    if compiled_flops is not None:
        flops, source = compiled_flops * devices, "xla compiled cost_analysis"
        if custom_flops:
            source += " + auxtl.cpu convolutions counted from the compiled HLO"
    elif lowered_flops is not None:
        flops, source = lowered_flops, "xla lowered cost_analysis"
    else:
        flops, source = None, None
    return compiled, seconds, {"flops_per_step": flops, "flops_source": source,
                               "flops_per_step_lowered": lowered_flops}


def _safe(call):
    try:
        return call()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return None


def timed_calls(compiled, case: Case, args: tuple, steps: int) -> tuple[tuple, list[float]]:
    """(the args for the next call, seconds per call) of `steps` calls, each run to
    completion; a state-threading step's returned state replaces its donated one."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        if case.threads_state:
            args = (out[0], *args[1:])
    return args, times


def time_case(compiled, case: Case, *, warmup: int, steps: int) -> list[float]:
    """Seconds per call, each call run to completion, after `warmup` untimed calls."""
    args, _ = timed_calls(compiled, case, case.args, warmup)
    return timed_calls(compiled, case, args, steps)[1]
