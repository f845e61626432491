"""auxtl's optional CPU kernels, behind the `auxtl.models.ops` hooks.

On one CPU device in one process, float32: Winograd 3x3 convolutions (training
forward pass and input gradient, and a conv + BatchNorm [+ ReLU] [+ 2x2 pool] block
in inference as one call), oneDNN's convolutions (the other training convolutions
and every weight gradient), XLA's weight gradient over slices of the batch where
oneDNN is missing, and a glibc malloc setting that keeps XLA:CPU's per-step buffers
mapped. The C++ kernels (`native/`) are compiled on first use (the first trace that
can use them, or `status()`), never at import. GPU and TPU lowerings keep XLA's own
operations. Measurements: benchmarks/NOTES.md, sections 5-7.

`install()` fills the hooks (auxtl's __init__ calls it); `AUXTL_CPU_KERNELS=0` turns
everything off (`auxtl.cpu.switch`: a comma list keeps only the named components on).
`status()` says per component what is active and why not.
"""

from __future__ import annotations

from auxtl.cpu import conv, fused, host_memory, onednn, switch, winograd
from auxtl.cpu.host_memory import keep_freed_memory
from auxtl.models import ops

__all__ = ["install", "status", "convolution_flops", "keep_freed_memory"]


def install() -> None:
    """Sets the `auxtl.models.ops` hooks as the switch says now: the training
    convolution (`conv.conv_general_dilated`) if any of winograd, onednn, sliced is on,
    the fused inference block (`fused.conv_bn`) if winograd is, the plain XLA default
    for a hook whose components are all off. Cheap (nothing is compiled) and
    idempotent."""
    training = any(switch.enabled(name) for name in ("winograd", "onednn", "sliced"))
    ops.install(conv=conv.conv_general_dilated if training else ops.DEFAULTS.conv,
                conv_bn_inference=(fused.conv_bn if switch.enabled("winograd")
                                   else ops.DEFAULTS.conv_bn_inference))


def status() -> dict[str, str]:
    """What is active, per component, in words: "switch" (the AUXTL_CPU_KERNELS
    setting), "winograd" and "onednn" ("available" or why not; asking builds them on
    first use), "sliced" ("active" or "off (...)"; used where oneDNN is not), and
    "host_memory" (what `keep_freed_memory` did, or "not configured")."""
    return {"switch": switch.describe(), "winograd": winograd.status(),
            "onednn": onednn.status(),
            "sliced": "active" if switch.enabled("sliced") else switch.off_reason("sliced"),
            "host_memory": host_memory.status()}


def convolution_flops(hlo_text: str) -> float:
    """FLOPs of every auxtl custom call (oneDNN and Winograd convolutions) in a compiled
    module's HLO text, counted as XLA counts the direct convolution each computes;
    XLA's own cost analysis leaves custom calls out."""
    return onednn.convolution_flops(hlo_text) + winograd.convolution_flops(hlo_text)
