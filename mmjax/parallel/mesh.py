"""Device mesh, batch sharding and the one gather helper.

Today the mesh has one `data` axis over every device (pure data parallelism:
params replicated, batch split). Arrays that span processes are built with
`jax.make_array_from_process_local_data`, the path a multi-host pod uses.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
    """A mesh from `{"data": -1}`-style shapes; -1 takes the remaining devices."""
    shape = dict(shape or {DATA: -1})
    devices = list(devices if devices is not None else jax.devices())
    if set(shape) != {DATA}:
        raise ValueError(f"mesh axes {sorted(shape)} are not supported yet; valid: {{'data': -1}}")
    n = shape[DATA]
    if n == -1:
        n = len(devices)
    if n != len(devices):
        raise ValueError(f"mesh data axis {n} != number of devices {len(devices)}")
    return Mesh(np.asarray(devices).reshape(n), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Process-local numpy arrays -> global jax arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def identity_gather(x):
    """Under jit on a mesh arrays are already global: gathering is a no-op."""
    return x


def pmap_gather(axis_name: str = DATA):
    """Under pmap each device holds its rows: gather them into the global batch."""
    return lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
