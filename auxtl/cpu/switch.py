"""`AUXTL_CPU_KERNELS`: the one switch of auxtl's CPU kernels.

Unset, empty, or 1/true/yes/on: every component is on. 0/false/no/off: every one is
off, and nothing is compiled or configured. Otherwise a comma-separated list of the
components to keep on (the rest are off), from `COMPONENTS`:

- "winograd": Winograd 3x3 convolutions and the fused inference conv + BatchNorm;
- "onednn": oneDNN's convolutions for the training step;
- "sliced": XLA's CPU weight gradient summed over slices of the batch;
- "host_memory": the glibc malloc setting of `keep_freed_memory`.

The variable is read when asked, so a test may change it between calls (a component
that has already set itself up keeps its status for the process).
"""

from __future__ import annotations

import os
import warnings

from auxtl.errors import AuxtlWarning

ENV_VAR = "AUXTL_CPU_KERNELS"
COMPONENTS = ("winograd", "onednn", "sliced", "host_memory")
_ON, _OFF = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def enabled_components(value: str | None) -> frozenset[str]:
    """The components a value of AUXTL_CPU_KERNELS turns on (None: unset, all on).
    Names not in COMPONENTS are ignored with an AuxtlWarning naming them."""
    text = (value or "").strip().lower()
    if text in _ON:
        return frozenset(COMPONENTS)
    if text in _OFF:
        return frozenset()
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(COMPONENTS))
    if unknown:
        warnings.warn(f"{ENV_VAR}={value}: unknown component(s) {', '.join(unknown)} "
                      f"ignored; known: {', '.join(COMPONENTS)}", AuxtlWarning, stacklevel=3)
    return frozenset(names & set(COMPONENTS))


def enabled(component: str) -> bool:
    """Whether `component` (one of COMPONENTS) is switched on in this environment."""
    return component in enabled_components(os.environ.get(ENV_VAR))


def off_reason() -> str:
    """How a component switched off reports itself: "off (AUXTL_CPU_KERNELS=...)"."""
    return f"off ({ENV_VAR}={os.environ.get(ENV_VAR, '')})"


def describe() -> str:
    """The switch in words: "on (default)", "on (AUXTL_CPU_KERNELS=1)", "off (...)",
    or the list of components it keeps on."""
    value = os.environ.get(ENV_VAR)
    on = enabled_components(value)
    if value is None:
        return "on (default)"
    if on == frozenset(COMPONENTS):
        return f"on ({ENV_VAR}={value})"
    if not on:
        return off_reason()
    return f"only {', '.join(c for c in COMPONENTS if c in on)} ({ENV_VAR}={value})"
