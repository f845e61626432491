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

The three variables it replaces (`REPLACED`: AUXTL_WINOGRAD, AUXTL_ONEDNN,
AUXTL_KEEP_FREED_MEMORY) are still honoured when set to an off value, turning off
their component, with an AuxtlWarning naming the one switch to use instead.
"""

from __future__ import annotations

import os
import warnings

from auxtl.errors import AuxtlWarning

ENV_VAR = "AUXTL_CPU_KERNELS"
COMPONENTS = ("winograd", "onednn", "sliced", "host_memory")
_ON, _OFF = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")
REPLACED = {"AUXTL_WINOGRAD": "winograd", "AUXTL_ONEDNN": "onednn",
            "AUXTL_KEEP_FREED_MEMORY": "host_memory"}
_warned: set[str] = set()


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


def replaced_off() -> frozenset[str]:
    """Components a replaced variable (REPLACED) turns off; warns once per variable."""
    off = set()
    for variable, component in REPLACED.items():
        value = os.environ.get(variable)
        if value is None:
            continue
        if variable not in _warned:
            _warned.add(variable)
            warnings.warn(f"{variable} is replaced by {ENV_VAR} (0 turns every CPU kernel "
                          f"off; a comma list of {', '.join(COMPONENTS)} keeps those on); "
                          f"{variable}={value} is honoured for now", AuxtlWarning,
                          stacklevel=3)
        if value.strip().lower() in _OFF:
            off.add(component)
    return frozenset(off)


def enabled(component: str) -> bool:
    """Whether `component` (one of COMPONENTS) is switched on in this environment."""
    return (component in enabled_components(os.environ.get(ENV_VAR))
            and component not in replaced_off())


def off_reason(component: str | None = None) -> str:
    """How a component switched off reports itself: "off (AUXTL_CPU_KERNELS=...)", or
    the replaced variable that turned `component` off."""
    for variable, replaced in REPLACED.items():
        value = os.environ.get(variable)
        if replaced == component and value is not None and value.strip().lower() in _OFF:
            return f"off ({variable}={value}; use {ENV_VAR})"
    return f"off ({ENV_VAR}={os.environ.get(ENV_VAR, '')})"


def describe() -> str:
    """The switch in words: "on (default)", "on (AUXTL_CPU_KERNELS=1)", "off (...)",
    or the list of components it keeps on."""
    value = os.environ.get(ENV_VAR)
    on = enabled_components(value) - replaced_off()
    if value is None and on == frozenset(COMPONENTS):
        return "on (default)"
    if value is None:
        return (f"only {', '.join(c for c in COMPONENTS if c in on)} (replaced variables: "
                + ", ".join(f"{v}={os.environ[v]}" for v in REPLACED if v in os.environ) + ")")
    if on == frozenset(COMPONENTS):
        return f"on ({ENV_VAR}={value})"
    if not on:
        return off_reason()
    return f"only {', '.join(c for c in COMPONENTS if c in on)} ({ENV_VAR}={value})"
