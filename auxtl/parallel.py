"""One mesh over every device (all hosts), batch sharded on the 'data' axis.

The same code path serves 1 or N devices: parameters are replicated, each
process feeds its own slice of the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from auxtl.errors import InputError


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
    return jax.device_put(tree, replicated_sharding(mesh))


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process run (one process per host, or several on loopback).

    CPU devices' cross-process collectives go through gloo (GPU/TPU ignore it).
    Call before anything touches a JAX backend.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
