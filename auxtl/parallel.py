"""One mesh over every device (all hosts), batch sharded on the 'data' axis.

The same code path serves 1 or N devices: parameters are replicated. Pretraining: each
process feeds its own slice of the global batch (`put_batch`). Fine-tuning: every process
holds the whole (small) labeled set, replicated (`replicate`), and the step's gathered
batch is constrained to the 'data' axis (`constrain_batch`). `mesh_record`,
`array_layout` and `BatchLayout` describe what a run really did, for its summary;
`start_distributed` joins a multi-process run (explicit flags or `--distributed auto`).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from auxtl.errors import AuxtlWarning, InputError

DISTRIBUTED_MODES = ("off", "auto")


def data_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch % devices:
        raise InputError(f"batch size {global_batch} is not divisible by the {devices} "
                         f"devices of the mesh; use a multiple of {devices}")


def process_slice(global_indices: np.ndarray) -> np.ndarray:
    """This process's contiguous share of the global batch's example indices."""
    count = jax.process_count()
    per_process = len(global_indices) // count
    start = jax.process_index() * per_process
    return global_indices[start:start + per_process]


def put_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assembles the global batch array from each process's local rows."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def replicate(tree, mesh: Mesh):
    """`tree` on every device of the mesh (a global array; with several processes each
    must pass the same values, as every process holds the same small labeled set)."""
    return jax.device_put(tree, replicated_sharding(mesh))


_UNSPLIT_WARNED: set[tuple[int, int]] = set()


def constrain_batch(batch, mesh: Mesh):
    """Inside a traced step: `batch` (leading axis = examples) split over the mesh's
    "data" axis (`jax.lax.with_sharding_constraint`), so XLA runs each device on its share
    and reduces (BatchNorm statistics and gradients stay those of the global batch). A
    batch the device count does not divide is left replicated (every device computes the
    whole batch: correct, not faster), with one warning per (size, devices)."""
    devices = mesh.devices.size
    if devices == 1:
        return batch
    if batch.shape[0] % devices:
        if (batch.shape[0], devices) not in _UNSPLIT_WARNED:
            _UNSPLIT_WARNED.add((batch.shape[0], devices))
            warnings.warn(AuxtlWarning(
                f"batch of {batch.shape[0]} is not divisible by the {devices} devices of the "
                f"mesh: it runs replicated on every device (use a multiple of {devices} to "
                f"split it)"), stacklevel=2)
        return batch
    return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


class BatchLayout:
    """How compiled steps laid out their batch: per distinct layout its PartitionSpec
    and how many devices its examples are split over, as `note`d from the sharding XLA
    compiled (`auxtl.seeds.seed_runner` compiles the step's own gather and placement of
    the batch and reads its output sharding). `record()` lists them (empty until a step
    has been compiled)."""

    def __init__(self):
        self._seen: dict[tuple[int, str], dict] = {}

    def note(self, sharding, size: int, examples_axis: int = 0) -> None:
        """Records a batch of `size` examples laid out as `sharding`, its examples on
        `examples_axis` (1 for seeds stacked in front)."""
        spec = getattr(sharding, "spec", None)
        devices = 1
        if not sharding.is_fully_replicated and spec is not None and len(spec) > examples_axis:
            names = spec[examples_axis]
            names = () if names is None else names if isinstance(names, tuple) else (names,)
            devices = int(np.prod([sharding.mesh.shape[n] for n in names]))
        text = str(spec) if spec is not None else type(sharding).__name__
        self._seen[(size, text)] = {"batch": size, "batch_spec": text,
                                    "batch_devices": devices,
                                    "mesh_devices": len(sharding.device_set)}

    def record(self) -> list[dict]:
        return list(self._seen.values())


def array_layout(array: jax.Array) -> dict:
    """A real global batch array's layout, in `BatchLayout.record()`'s terms (e.g. for
    pretraining's summary: `array_layout(images)` of a step's batch)."""
    size = int(array.shape[0])
    spec = getattr(array.sharding, "spec", None)
    return {"batch": size, "batch_spec": str(spec) if spec is not None else
            type(array.sharding).__name__,
            "batch_devices": size // int(array.sharding.shard_shape(array.shape)[0]),
            "mesh_devices": len(array.sharding.device_set)}


def mesh_record(mesh: Mesh) -> dict:
    """The mesh a run used, for its summary: devices, processes, axes, platform."""
    return {"devices": int(mesh.devices.size), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(),
            "axes": {name: int(size) for name, size in mesh.shape.items()},
            "platform": mesh.devices.flat[0].platform}


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process run (one process per host, or several on loopback).

    CPU devices' cross-process collectives go through gloo (GPU/TPU ignore it).
    Call before anything touches a JAX backend.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def initialize_auto() -> None:
    """`jax.distributed.initialize()` with no arguments: JAX finds the coordinator, the
    process count and this process's id in a cluster launcher's environment (Slurm,
    Open MPI, Cloud TPU / GKE, Kubernetes); the coordinator's port may be set with
    `JAX_COORDINATOR_PORT` (the port JAX's Slurm / Open MPI detection would pick
    otherwise), and `JAX_COORDINATOR_ADDRESS` overrides the detected address. InputError
    when it finds no cluster (nothing is changed then).
    """
    try:
        jax.distributed.initialize()
    except ValueError as error:
        if "should be defined" not in str(error) and "must be defined" not in str(error):
            raise
        raise InputError(
            f"--distributed auto found no cluster environment ({error}): run it under a "
            f"launcher JAX detects (Slurm srun: SLURM_JOB_ID, SLURM_STEP_NODELIST, "
            f"SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; Open MPI mpirun; Cloud TPU / GKE "
            f"TPU slices), or pass --coordinator HOST:PORT --num-processes N --process-id I, "
            f"or --distributed off") from None
    # after the cluster was found (the CPU backend, created later, reads it then)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def start_distributed(mode: str, coordinator: str | None, num_processes: int,
                      process_id: int) -> None:
    """The CLI's rule: explicit --coordinator flags start an explicit run; else
    `mode` "auto" detects the cluster (`initialize_auto`), "off" runs one process. A
    process already joined (a second command in one interpreter) stays as it is."""
    if mode not in DISTRIBUTED_MODES:
        raise InputError(f"--distributed must be one of {', '.join(DISTRIBUTED_MODES)}, "
                         f"got {mode!r}")
    if jax.distributed.is_initialized():
        return
    if coordinator:
        initialize_distributed(coordinator, num_processes, process_id)
    elif mode == "auto":
        initialize_auto()
