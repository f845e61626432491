"""Peak FLOP/s of a device, the denominator of MFU (model FLOPs utilisation).

Known accelerators come from a table of vendor dense (no structured sparsity)
peaks, matched by a substring of `jax.Device.device_kind`; anything else (CPUs,
unknown GPUs) gets a measured peak: the FLOP/s of a large jitted matmul in that
dtype, median of a few runs.

float32 is ambiguous on accelerators, and the choice is recorded with each number:
JAX's default precision computes float32 convolutions and dots on the tensor units
in reduced precision (TF32 on NVIDIA Ampere and newer, one bfloat16 pass on TPU;
docs.jax.dev "Matmul precision"), so the attainable float32 peak is the TF32 /
bfloat16 one, not the CUDA-core FP32 number. `f32_peak="auto"` follows
`jax_default_matmul_precision`: the tensor-unit peak unless full float32 was asked
for ("highest" / "float32" / "F32_F32_F32"), then the CUDA-core FP32 peak on
NVIDIA and bf16 peak / 6 on TPU (HIGHEST is six bfloat16 passes).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from auxtl.errors import InputError

F32_PEAK_MODES = ("auto", "tensor", "fp32")
_FULL_F32_PRECISIONS = {"highest", "float32", "f32_f32_f32"}
_THREE_PASS_PRECISIONS = {"high", "bfloat16_3x", "tensorfloat32"}


@dataclasses.dataclass(frozen=True)
class PeakEntry:
    """Dense peaks of one accelerator (FLOP/s per JAX device).

    match: case-insensitive substrings of device_kind (the first entry with one wins).
    bf16: bfloat16 tensor peak. tensor_f32: peak of float32 under JAX's default
    precision (TF32 on NVIDIA, 1-pass bf16 on TPU). fp32: true float32 (NVIDIA
    CUDA cores; on TPU, 6-pass bf16).
    """

    name: str
    match: tuple[str, ...]
    bf16: float
    tensor_f32: float
    fp32: float
    source: str


T = 1e12
# NVIDIA datasheets list tensor-core peaks "with sparsity"; dense is half of that.
# Order matters: more specific substrings first ("H100 PCIe" before "H100", "L40S"
# before "L40" before "L4"; "A100" is the only A10x listed).
PEAK_TABLE: tuple[PeakEntry, ...] = (
    # NVIDIA Blackwell: HGX B200 datasheet (8 GPUs): FP32 600 TF, TF32 18 PF*, BF16 36 PF*;
    # per GPU 1/8, dense = half of * (sparse).
    PeakEntry("NVIDIA B200", ("B200",), 2250 * T, 1125 * T, 75 * T,
              "NVIDIA HGX B200 datasheet, per GPU, dense"),
    # NVIDIA GH200 Grace Hopper datasheet: FP32 67 TF, TF32 494 TF (989* sparse), BF16 990 TF.
    PeakEntry("NVIDIA GH200", ("GH200",), 989.5 * T, 494.7 * T, 67 * T,
              "NVIDIA GH200 datasheet, dense"),
    # NVIDIA H200 datasheet: H200 NVL: FP32 60 TF, TF32 835 TF*, BF16 1,671 TF* (sparse).
    PeakEntry("NVIDIA H200 NVL", ("H200 NVL",), 835.5 * T, 417.5 * T, 60 * T,
              "NVIDIA H200 datasheet (NVL), dense = sparse / 2"),
    # NVIDIA H200 datasheet: H200 SXM: FP32 67 TF, TF32 989 TF*, BF16 1,979 TF* (sparse).
    PeakEntry("NVIDIA H200 SXM", ("H200",), 989.5 * T, 494.7 * T, 67 * T,
              "NVIDIA H200 datasheet (SXM), dense = sparse / 2"),
    # NVIDIA H100 datasheet: PCIe: FP32 51 TF, TF32 756 TF*, BF16 1,513 TF* (sparse).
    PeakEntry("NVIDIA H100 PCIe", ("H100 PCIe",), 756.5 * T, 378 * T, 51 * T,
              "NVIDIA H100 datasheet (PCIe), dense = sparse / 2"),
    # NVIDIA H100 datasheet: NVL: FP32 60 TF, TF32 835 TF*, BF16 1,671 TF* (sparse).
    PeakEntry("NVIDIA H100 NVL", ("H100 NVL",), 835.5 * T, 417.5 * T, 60 * T,
              "NVIDIA H100 datasheet (NVL), dense = sparse / 2"),
    # NVIDIA H100 datasheet: SXM: FP32 67 TF, TF32 989 TF*, BF16 1,979 TF* (sparse).
    PeakEntry("NVIDIA H100 SXM", ("H100",), 989.5 * T, 494.7 * T, 67 * T,
              "NVIDIA H100 datasheet (SXM), dense = sparse / 2"),
    # NVIDIA A100 datasheet (SXM and PCIe): FP32 19.5 TF, TF32 156 TF, BF16 312 TF (dense).
    PeakEntry("NVIDIA A100", ("A100",), 312 * T, 156 * T, 19.5 * T,
              "NVIDIA A100 datasheet, dense"),
    # NVIDIA L40S datasheet: FP32 91.6 TF, TF32 366 TF*, BF16 733 TF* (sparse).
    PeakEntry("NVIDIA L40S", ("L40S",), 366.5 * T, 183 * T, 91.6 * T,
              "NVIDIA L40S datasheet, dense = sparse / 2"),
    # NVIDIA L40 datasheet: FP32 90.5 TF, TF32 181 TF*, BF16 362 TF* (sparse).
    PeakEntry("NVIDIA L40", ("L40",), 181 * T, 90.5 * T, 90.5 * T,
              "NVIDIA L40 datasheet, dense = sparse / 2"),
    # NVIDIA L4 datasheet: FP32 30.3 TF, TF32 120 TF*, BF16 242 TF* (sparse).
    PeakEntry("NVIDIA L4", ("L4",), 121 * T, 60 * T, 30.3 * T,
              "NVIDIA L4 datasheet, dense = sparse / 2"),
    # Cloud TPU system architecture docs, bf16 peak per chip. v2/v3 expose each of a
    # chip's two TensorCores as a JAX device: per device = per chip / 2. v4 and v5p are
    # megacore (one device per chip); v5e and v6e have one TensorCore per chip.
    PeakEntry("TPU v6e (Trillium)", ("v6 lite", "v6e"), 918 * T, 918 * T, 918 * T / 6,
              "Cloud TPU v6e docs: 918 TFLOP/s bf16 per chip"),
    PeakEntry("TPU v5e", ("v5 lite", "v5e"), 197 * T, 197 * T, 197 * T / 6,
              "Cloud TPU v5e docs: 197 TFLOP/s bf16 per chip"),
    PeakEntry("TPU v5p", ("v5p", "tpu v5"), 459 * T, 459 * T, 459 * T / 6,
              "Cloud TPU v5p docs: 459 TFLOP/s bf16 per chip"),
    PeakEntry("TPU v4", ("tpu v4",), 275 * T, 275 * T, 275 * T / 6,
              "Cloud TPU v4 docs: 275 TFLOP/s bf16 per chip"),
    PeakEntry("TPU v3 (per core)", ("tpu v3",), 61.5 * T, 61.5 * T, 61.5 * T / 6,
              "Cloud TPU v3 docs: 123 TFLOP/s bf16 per chip, 2 cores"),
    PeakEntry("TPU v2 (per core)", ("tpu v2",), 22.5 * T, 22.5 * T, 22.5 * T / 6,
              "Cloud TPU v2 docs: 45 TFLOP/s bf16 per chip, 2 cores"),
)


@dataclasses.dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s for one compute dtype and where the number came from."""

    flops_per_s: float
    source: str         # "table" or "measured"
    detail: str         # the table entry and vendor source, or the matmul measured
    precision: str      # what the number is the peak of, e.g. "bf16", "tf32", "fp32"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def find_entry(device_kind: str) -> PeakEntry | None:
    """The first table entry with a substring of `device_kind` (case-insensitive)."""
    kind = device_kind.lower()
    for entry in PEAK_TABLE:
        if any(token.lower() in kind for token in entry.match):
            return entry
    return None


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _full_f32_requested() -> str | None:
    """'full' / 'three_pass' if jax_default_matmul_precision asks for more than default."""
    value = jax.config.jax_default_matmul_precision
    value = str(value).lower() if value is not None else ""
    if value in _FULL_F32_PRECISIONS:
        return "full"
    if value in _THREE_PASS_PRECISIONS:
        return "three_pass"
    return None


def lookup_peak(device_kind: str, dtype, *, f32_peak: str = "auto") -> Peak | None:
    """The table's peak for `device_kind` and compute `dtype` (None if the kind is unknown).

    Args:
      device_kind: `jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite".
      dtype: the compute dtype (bfloat16 or float32; float16 uses the bf16 peak).
      f32_peak: "tensor" (TF32 / 1-pass bf16, JAX's default precision), "fp32" (true
        float32) or "auto" (follows jax_default_matmul_precision).
    """
    if f32_peak not in F32_PEAK_MODES:
        raise InputError(f"f32_peak must be one of {F32_PEAK_MODES}, got {f32_peak!r}")
    entry = find_entry(device_kind)
    if entry is None:
        return None
    name = _dtype_name(dtype)
    is_tpu = "tpu" in entry.name.lower()
    if name in ("bfloat16", "float16"):
        return Peak(entry.bf16, "table", f"{entry.name}: {entry.source}", "bf16")
    if name != "float32":
        raise InputError(f"no peak for compute dtype {name!r}; use float32 or bfloat16")
    mode = f32_peak
    if mode == "auto":
        requested = _full_f32_requested()
        if requested == "three_pass":
            flops = entry.bf16 / 3 if is_tpu else entry.tensor_f32
            precision = "3-pass bf16" if is_tpu else "tf32"
            return Peak(flops, "table", f"{entry.name}: {entry.source}; "
                        f"jax_default_matmul_precision asks for {precision}", precision)
        mode = "fp32" if requested == "full" else "tensor"
    if mode == "fp32":
        precision = "6-pass bf16 (f32)" if is_tpu else "fp32 (CUDA cores)"
        return Peak(entry.fp32, "table", f"{entry.name}: {entry.source}", precision)
    precision = "1-pass bf16 (JAX default f32)" if is_tpu else "tf32 (JAX default f32)"
    return Peak(entry.tensor_f32, "table", f"{entry.name}: {entry.source}", precision)


@functools.lru_cache(maxsize=None)
def _measured(device, dtype_name: str, size: int, repeats: int) -> float:
    dtype = jnp.dtype(dtype_name)
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.float32).astype(dtype),
                           device) for k in keys)
    matmul = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - start)
    return 2.0 * size ** 3 / statistics.median(times)


def measure_matmul_peak(dtype, *, device=None, size: int | None = None,
                        repeats: int = 5) -> Peak:
    """FLOP/s of a jitted size x size matmul in `dtype` on `device` (median of `repeats`).

    Cached per (device, dtype, size, repeats) within the process. Default size:
    2048 on CPU, 8192 on accelerators.
    """
    device = device or jax.devices()[0]
    size = size or (2048 if device.platform == "cpu" else 8192)
    name = _dtype_name(dtype)
    flops = _measured(device, name, size, repeats)
    return Peak(flops, "measured",
                f"jitted {size}x{size} {name} matmul on {device.device_kind}, "
                f"median of {repeats}", name)


def device_peak(dtype, device=None, *, f32_peak: str = "auto",
                measure_size: int | None = None, repeats: int = 5) -> Peak:
    """Table peak for known accelerators; otherwise (CPU, unknown kinds) a measured one."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        peak = lookup_peak(device.device_kind, dtype, f32_peak=f32_peak)
        if peak is not None:
            return peak
    return measure_matmul_peak(dtype, device=device, size=measure_size, repeats=repeats)


def table_rows() -> list[dict]:
    """The peak table as JSON-able rows (FLOP/s per JAX device)."""
    return [dataclasses.asdict(entry) for entry in PEAK_TABLE]
