"""What the loop watches besides the step: non-finite steps, SIGTERM, the data position.

* `StepChecks` reads each step's `bad_step` flag one step behind the dispatch (one
  step stays in flight), counts the skipped steps and raises `NonFiniteError` after
  `train.max_bad_steps` in a row. It also turns SIGTERM into a request to stop: the
  loop finishes the step, saves and leaves with `Preempted` (exit code 143). With
  several processes the request is OR-ed over all of them (a tiny all-reduce per
  step, read one step behind like the flag), so every process stops after the same
  step and saves the same checkpoint, whichever of them got the signal.
* `DataCursor` keeps the `data_state` of the batch each step consumed (the stream
  position after it, the records skipped so far, a mixture's per-source counts),
  writes it per process into the checkpoint meta and turns it (with the index-based
  order state, meta["data"]) back into the iterator's start on resume.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


class Preempted(SystemExit):
    """SIGTERM: the run saved a checkpoint at `step` and leaves with exit code 143."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT)
        self.step = int(step)


class NonFiniteError(ValueError):
    """train.max_bad_steps steps in a row had a non-finite loss or gradient."""


def _scalar(x) -> float:
    """A replicated (mesh) or per-device (pmap) metric -> a python float."""
    return float(np.asarray(x.addressable_shards[0].data).reshape(-1)[0])


class _AnyProcess:
    """`start(flag)` -> an all-reduce (max) of a per-process int over every device,
    dispatched without waiting; `read(pending)` -> its value."""

    def __init__(self):
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = Mesh(np.array(jax.devices()), ("p",))
        self._n_local = len(jax.local_devices())
        self._in = NamedSharding(mesh, P("p"))
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def start(self, flag: int):
        local = np.full((self._n_local,), int(flag), np.int32)
        return self._max(jax.make_array_from_process_local_data(self._in, local))

    def read(self, pending) -> int:
        return int(_scalar(pending))


class StepChecks:
    def __init__(self, max_bad_steps: int, bad_steps: int = 0):
        self.max_bad = max(1, int(max_bad_steps))
        self.total = int(bad_steps)  # skipped steps over the whole run (kept in the meta)
        self.in_a_row = 0
        self.stop = False  # every process agreed to stop (SIGTERM somewhere)
        self.failure = None  # NonFiniteError once max_bad_steps in a row were seen
        self._term = False  # this process got SIGTERM
        self._announced = False
        self._pending = None
        self._any = _AnyProcess() if jax.process_count() > 1 else None

    # -------------------------------------------------------------- SIGTERM
    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def _on_term(self, signum, frame):
        # Only a flag here: a handler that wrote to stderr could land inside another
        # write to it (tqdm, logging) and raise "reentrant call" into the step.
        self._term = True

    def _announce_term(self) -> None:
        if self._term and not self._announced:
            self._announced = True
            print(
                f"mmjax: SIGTERM: finishing the current step, then saving a checkpoint (process {jax.process_index()})",
                file=sys.stderr,
                flush=True,
            )

    # -------------------------------------------------------------- per step
    def push(self, done: int, bad_step) -> None:
        """After dispatching the step that ends at `done`: resolves the previous step's
        checks (waiting for it), queues this one's."""
        self._announce_term()
        stop = self._any.start(self._term) if self._any is not None else self._term
        self.flush()
        self._pending = (done, bad_step, stop)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def flush(self) -> None:
        """Resolves the queued checks (waits for that step); `raise_failure` raises
        what they found (after the loop has logged the step)."""
        if self._pending is None:
            return
        done, bad, stop = self._pending
        self._pending = None
        if _scalar(bad) > 0:
            self.total += 1
            self.in_a_row += 1
            log.warning(
                "step %d: non-finite loss or gradients; update skipped (%d in a row, %d in all)",
                done,
                self.in_a_row,
                self.total,
            )
            if self.in_a_row >= self.max_bad and self.failure is None:
                self.failure = NonFiniteError(
                    f"step {done}: the loss or gradients were not finite for {self.in_a_row} steps in a row "
                    f"(train.max_bad_steps={self.max_bad}); those steps changed nothing and the run stops; "
                    "lower train.lr or check the data"
                )
        else:
            self.in_a_row = 0
        self.stop = self.stop or bool(self._any.read(stop) if self._any is not None else stop)


def _gather_ints(values: list[int]) -> np.ndarray:
    """[process_count, len(values)] int64 of every process's `values` (>= 0)."""
    row = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return row[None]
    from jax.experimental import multihost_utils

    split = np.stack([row // 2**30, row % 2**30], -1).astype(np.int32)  # no int64 without x64
    out = np.asarray(multihost_utils.process_allgather(split)).astype(np.int64)
    return out[..., 0] * 2**30 + out[..., 1]


class DataCursor:
    """The per-process data position of the last batch a step consumed.

    `start` (the iterator's resume keywords) holds the checkpoint's `start_record` and
    `skipped` of this process, a mixture's `replaced` per source, and `order_state` (the
    index-based pipeline's order, meta["data"]). On another process count the index-based
    position (the global batch index) is still exact: process 0 carries the counts on;
    the stream path's position then is not exact if records were dropped (a warning)."""

    def __init__(self, meta: dict, process_count: int, process_index: int):
        self.records, self.skipped, self.sources, self.record_bytes = None, 0, None, None
        self.start = {}
        if meta.get("data") is not None:
            self.start["order_state"] = meta["data"]
        records, skipped, replaced = meta.get("records"), meta.get("skipped"), meta.get("replaced")
        if records is None:  # a fresh run, or a checkpoint from before data_state
            return
        if len(records) == process_count:
            self.start.update(start_record=int(records[process_index]), skipped=int(skipped[process_index]))
            if replaced:
                self.start["replaced"] = [int(n) for n in replaced[process_index]]
        elif meta.get("data") is not None:  # index-based: exact on any topology
            first = process_index == 0
            self.start["skipped"] = int(sum(skipped)) if first else 0
            if replaced:
                self.start["replaced"] = [int(n) if first else 0 for n in np.sum(replaced, axis=0)]
        elif sum(skipped):
            log.warning(
                "resuming on %d processes a run saved by %d after %d dropped records: the data "
                "position is the global batch count, which is not exact when records were dropped",
                process_count,
                len(records),
                sum(skipped),
            )

    def consumed(self, data_state) -> None:
        if data_state is not None:
            self.records, self.skipped = int(data_state["records"]), int(data_state["skipped"])
            self.sources = data_state.get("sources")  # a mixture's {name: {"rows", "replaced"}}

    def totals(self, record_bytes: int | None = None) -> np.ndarray | None:
        """[process_count, 2 + S (+ 1)] (records, skipped, a mixture's replaced per source,
        and `record_bytes`: on the index-based path, the record bytes this process's
        iterator read so far) of every process; a collective when there are several
        (every process calls it at the same step, all with or all without bytes)."""
        if self.records is None:
            return None
        self.record_bytes = record_bytes
        replaced = [int(c["replaced"]) for c in self.sources.values()] if self.sources else []
        read = [] if self.record_bytes is None else [int(self.record_bytes)]
        return _gather_ints([self.records, self.skipped, *replaced, *read])

    def meta(self, totals) -> dict:
        if totals is None:
            return {}
        out = {"records": [int(r) for r in totals[:, 0]], "skipped": [int(s) for s in totals[:, 1]]}
        S = len(self.sources) if self.sources else 0
        if S:
            out["replaced"] = [[int(n) for n in row] for row in totals[:, 2 : 2 + S]]
        if self.record_bytes is not None:  # each process's share of the reads (about 1/P)
            out["record_bytes"] = [int(b) for b in totals[:, 2 + S]]
        return out

    def source_metrics(self, totals) -> dict:
        """A mixture's metrics: `data/rows_<name>` (the source's rows in the global batches
        so far) and, when some were, `data/replaced_<name>` (over all processes)."""
        if totals is None or not self.sources:
            return {}
        out = {}
        for s, (name, counts) in enumerate(self.sources.items()):
            out[f"data/rows_{name}"] = int(counts["rows"])
            if totals[:, 2 + s].sum():
                out[f"data/replaced_{name}"] = int(totals[:, 2 + s].sum())
        return out
