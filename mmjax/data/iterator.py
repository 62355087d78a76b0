"""The batch iterator over a tf.data stream: numpy batches (made by a `finish`
function, `mmjax.data.collate`), the stream position of each training batch (exact
resume) and the count of records skipped (missing files + undecodable records)."""

from __future__ import annotations

import atexit
import logging
import weakref

import numpy as np

log = logging.getLogger(__name__)

_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_iterators():
    """Drops every live tf.data iterator before the interpreter finalizes: one whose
    threads are inside a Python decoder (PyAV, through tf.numpy_function) when the
    interpreter shuts down otherwise hangs the exit."""
    for it in list(_LIVE_ITERATORS):
        it.close()


def local_positions(start: int, batch_size: int, process_index: int, process_count: int):
    """-> (to_local, local_start) for a process that keeps rows [rank * B, (rank + 1) * B)
    of every global batch of B * P records: to_local maps global stream positions to
    this process's own count (None with one process), so a skipped record is a gap in
    it; local_start is that count at global position `start`."""
    b, n_proc, rank = int(batch_size), int(process_count), int(process_index)
    global_b = b * n_proc
    to_local = (lambda pos: (pos // global_b) * b + pos % global_b - rank * b) if n_proc > 1 else None
    local_start = (start // global_b) * b + min(max(start % global_b - rank * b, 0), b)
    return to_local, local_start


class BatchIterator:
    """Python iterator over numpy batches; `.skipped` counts records dropped so far
    (missing files + undecodable images), `.batch_index` the next batch's index.

    With `state=True` (training) every batch carries a host-only
    `data_state = {"records": int, "skipped": int}`: the stream position just after
    the last record of the batch (where a resumed iterator starts) and the records
    skipped up to and including this batch. `.skipped` itself runs ahead of the
    consumer by whatever a prefetching reader has taken; `data_state` belongs to its
    batch."""

    def __init__(
        self, ds, finish, *, start_pos=0, skipped=0, total=None, batch_index=0, to_local=None, state=False, missing=0
    ):
        self._it = ds.as_numpy_iterator()
        _LIVE_ITERATORS.add(self)
        self._to_local = to_local  # stream position -> index among this process's records
        self._finish = finish
        self._expect = start_pos  # next (local) stream position expected from tf.data
        self._total = total  # stream length (eval) to count trailing drops
        self._state = state
        self.skipped = skipped
        self.batch_index = batch_index
        if missing:
            log.warning("data: %d records skipped (missing files)", missing)

    def __iter__(self):
        return self

    def order_state(self, batch_index: int) -> None:
        """None: a stream's position is `data_state` alone (the index-based iterator returns
        the order state a checkpoint keeps to check a resume)."""
        del batch_index
        return None

    def payload_bytes(self) -> None:
        """None: a stream reads through tf.data, which counts no bytes (the index-based
        iterator returns the record bytes its readers returned)."""
        return None

    def close(self):
        """Releases the tf.data iterator and its threads; the iterator ends."""
        self._it = iter(())

    def _count(self, pos):
        if self._to_local is not None:
            pos = self._to_local(np.asarray(pos))
        gaps = int(pos[0] - self._expect) + int(pos[-1] - pos[0] + 1 - len(pos))
        self._expect = int(pos[-1]) + 1
        self._add(gaps)

    def _add(self, n):
        if n > 0:
            self.skipped += n
            log.warning("data: skipped %d undecodable records (%d so far)", n, self.skipped)

    def __next__(self):
        try:
            b = next(self._it)
        except StopIteration:
            if self._total is not None:
                self._add(self._total - self._expect)
                self._expect = self._total
            b = None
        out = self._finish(b)  # may raise StopIteration
        if b is not None:
            self._count(b["pos"])
            if self._state:
                out["data_state"] = {"records": int(b["pos"][-1]) + 1, "skipped": int(self.skipped)}
        self.batch_index += 1
        return out
