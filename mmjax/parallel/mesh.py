"""Device meshes, batch layouts and the pmap <-> mesh state conversions.

The mesh always has the three axes `data`, `fsdp`, `tensor` (size 1 when unused),
from `parallel.mesh = {"data": -1, "fsdp": 4, "tensor": 1}`; -1 takes the devices
left over. Batches are split over `data` x `fsdp`. Arrays that span processes are
built with `jax.make_array_from_process_local_data`, the path a multi-host pod uses.

In `parallel.mode = "pmap"` the state is stacked on a leading axis of the local
devices; `to_pmap` / `from_pmap` convert between that and the mesh layout without
leaving the devices, so checkpoints are written and read in one (mesh) form.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)


def mesh_shape(shape: dict | None, n_devices: int) -> tuple[int, ...]:
    """`{"data": -1, "fsdp": 2}` -> (data, fsdp, tensor) sizes whose product is n_devices."""
    shape = dict(shape or {DATA: -1})
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"parallel.mesh has unknown axes {sorted(unknown)}; valid axes: {', '.join(AXES)}")
    sizes = [int(shape.get(a, 1)) for a in AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"parallel.mesh={shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if n_devices % known:
            raise ValueError(f"parallel.mesh={shape}: {n_devices} devices do not divide by {known}")
        sizes[free[0]] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(
            f"parallel.mesh={shape} needs {math.prod(sizes)} devices, but there are {n_devices}; "
            "use -1 for one axis to take the rest"
        )
    return tuple(sizes)


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(shape, len(devices))
    if devices == list(jax.devices()):
        try:  # topology-aware device order (TPU slices, multi-host)
            return jax.make_mesh(sizes, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
        except Exception:  # noqa: BLE001 - fall back to the plain order
            pass
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` x `fsdp`, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return int(mesh.shape[DATA] * mesh.shape[FSDP])


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Process-local numpy arrays -> global jax arrays sharded over data x fsdp."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


# ----------------------------------------------------------------------------- pmap


def pmap_mesh() -> Mesh:
    """The 1-D mesh of this process's devices that `jax.pmap` maps over."""
    return Mesh(np.asarray(jax.local_devices()), (DATA,))


def pmap_batch(local_batch: dict) -> dict:
    """[b_local, ...] numpy -> [local devices, b_local / local devices, ...]."""
    n = jax.local_device_count()
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        if v.shape[0] % n:
            raise ValueError(f"batch field {k!r} has {v.shape[0]} rows, not divisible by {n} local devices")
        out[k] = v.reshape(n, v.shape[0] // n, *v.shape[1:])
    return out


def to_pmap(tree):
    """Replicated mesh arrays -> pmap layout [local devices, ...], device to device."""
    devs = jax.local_devices()
    sharding = NamedSharding(pmap_mesh(), P(DATA))

    def one(x):
        shards = {s.device: s.data for s in x.addressable_shards}
        missing = [d for d in devs if d not in shards]
        if missing or not x.sharding.is_fully_replicated:
            raise ValueError(
                "to_pmap needs an array replicated on every local device (restore the "
                "checkpoint with replicated shardings first)"
            )
        return jax.make_array_from_single_device_arrays(
            (len(devs),) + x.shape, sharding, [shards[d][None] for d in devs]
        )

    return jax.tree_util.tree_map(one, tree)


def from_pmap(tree, mesh: Mesh):
    """pmap layout -> arrays replicated over `mesh` (each device keeps its own copy)."""
    rep = replicated(mesh)

    def one(x):
        shards = {s.device: s.data for s in x.addressable_shards}
        shape = x.shape[1:]
        return jax.make_array_from_single_device_arrays(
            shape, rep, [shards[d].reshape(shape) for d in mesh.local_devices]
        )

    return jax.tree_util.tree_map(one, tree)


def unreplicate_metrics(metrics):
    """Per-device metrics of a pmapped step (equal after pmean) -> one value each."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], metrics)


# ------------------------------------------------------------------- prefetch


class prefetch_to_device:
    """Iterator of `put(b)` for each `b` of `batches`, with up to `size` batches
    converted and transferred ahead by a background thread, so the host-to-device
    copy of batch k+1 overlaps step k. `size=0`: no thread, `put` inline.

    Order is preserved; an exception in `batches` or `put` is raised by `next` at
    the position it happened; exhaustion ends the iteration. Batches prefetched
    but never taken are dropped (a resumed run restarts from its data position).
    """

    _END = object()

    def __init__(self, batches, put, size: int = 2):
        import queue
        import threading

        self._batches, self._put, self._size = iter(batches), put, int(size)
        if self._size > 0:
            self._queue = queue.Queue(maxsize=self._size)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._fill, name="mmjax-prefetch", daemon=True)
            self._thread.start()

    def _fill(self):
        import queue

        while not self._stop.is_set():
            try:
                item = (self._put(next(self._batches)), None)
            except StopIteration:
                item = (self._END, None)
            except BaseException as e:  # re-raised in the consumer
                item = (None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] is self._END or item[1] is not None:
                return

    def __iter__(self):
        return self

    def __next__(self):
        if self._size <= 0:
            return self._put(next(self._batches))
        value, err = self._queue.get()
        if err is not None:
            raise err
        if value is self._END:
            raise StopIteration
        return value

    def close(self):
        """Stops the background thread (it may hold one batch in flight)."""
        if self._size > 0:
            self._stop.set()
