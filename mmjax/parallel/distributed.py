"""Multi-host start-up and hang protection, on JAX's own runtime (no home-made group).

`initialize()` calls `jax.distributed.initialize` once per process, before anything
touches a device:

* explicit: `--coordinator host:port --num-processes N --process-id I` (or the env
  variables MMJAX_COORDINATOR, MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID);
* SLURM (SLURM_JOB_ID, SLURM_NTASKS > 1, ...), Cloud TPU VMs with several workers,
  or MMJAX_DISTRIBUTED=auto: JAX detects the coordinator, process count and id;
  MMJAX_LOCAL_DEVICE_IDS=0,1,.. picks this process's accelerators (SLURM with one
  process per node: JAX would otherwise keep only GPU SLURM_LOCALID);
* otherwise a single process: nothing to do.

On CPU the cross-process collectives are gloo's. Failures are bounded:

* a peer that never starts: `initialization_timeout` (then JAX aborts the process);
* a peer that dies: the coordination service stops hearing its heartbeat and aborts
  every other process after `heartbeat_timeout_seconds` (exit 134, "tasks are
  unhealthy (stopped sending heartbeats)");
* a peer that is alive but stuck (heartbeats keep coming, a collective never
  completes): `StepWatchdog` exits the process with code 3 and a message when no
  step finishes for `parallel.step_timeout_s`; the others then see it die as above.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import jax

log = logging.getLogger(__name__)
WATCHDOG_EXIT = 3


def _cluster_env() -> bool:
    """True on a multi-process SLURM step or a multi-worker Cloud TPU VM slice."""
    if os.environ.get("MMJAX_DISTRIBUTED", "").lower() == "auto":
        return True
    if all(k in os.environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")):
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    init_timeout_s: int = 300,
    heartbeat_timeout_s: int = 60,
    local_device_ids=None,
) -> bool:
    """Joins this process to the job; returns True when it is multi-process.

    Must run before any JAX call that creates a backend (`jax.devices()`, ...).
    Flags win over MMJAX_* env variables, which win over cluster auto-detection.
    """
    env = os.environ
    coordinator = coordinator or env.get("MMJAX_COORDINATOR") or None
    num_processes = (
        num_processes
        if num_processes is not None
        else (int(env["MMJAX_NUM_PROCESSES"]) if env.get("MMJAX_NUM_PROCESSES") else None)
    )
    process_id = (
        process_id
        if process_id is not None
        else (int(env["MMJAX_PROCESS_ID"]) if env.get("MMJAX_PROCESS_ID") else None)
    )
    explicit = coordinator is not None or (num_processes or 1) > 1
    if not explicit and not _cluster_env():
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError(
            "multi-process runs need all of --coordinator HOST:PORT, --num-processes N and "
            f"--process-id I (got {coordinator!r}, {num_processes!r}, {process_id!r})"
        )
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must lie in [0, {num_processes})")
    # gloo is JAX's CPU default today; set it so an older default cannot bite.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Let SIGTERM (SLURM's scancel, `timeout`) end the process instead of being
    # swallowed by JAX's preemption notifier; peers then fail on the heartbeat.
    jax.config.update("jax_enable_preemption_service", False)
    kw = dict(initialization_timeout=int(init_timeout_s), heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    if local_device_ids is None and env.get("MMJAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(x) for x in env["MMJAX_LOCAL_DEVICE_IDS"].split(",")]
    if local_device_ids is not None:
        kw["local_device_ids"] = local_device_ids
    if explicit:
        jax.distributed.initialize(coordinator, int(num_processes), int(process_id), **kw)
    else:
        jax.distributed.initialize(**kw)
    log.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


class StepWatchdog:
    """Exits the process if `beat()` is not called for `timeout_s` seconds.

    A daemon thread: it runs while the main thread blocks in a collective (which
    releases the GIL). Start it after the first step (compilation can be slow) and
    beat after each step whose result was waited for. `timeout_s <= 0` disables it.
    """

    def __init__(self, timeout_s: float, *, exit=os._exit):
        self.timeout_s = float(timeout_s)
        self._last = time.monotonic()
        self._exit = exit
        self._stop = threading.Event()
        self._thread = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="mmjax-watchdog", daemon=True)
            self._thread.start()

    def beat(self):
        self._last = time.monotonic()

    def close(self):
        self._stop.set()

    def _watch(self):
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(
                    f"mmjax: error: process {jax.process_index()} of {jax.process_count()}: no training step "
                    f"finished in {idle:.0f} s (parallel.step_timeout_s={self.timeout_s:g}); a peer process "
                    "is stuck or gone. Exiting so the job fails instead of hanging.",
                    file=sys.stderr,
                    flush=True,
                )
                self._exit(WATCHDOG_EXIT)
                return
