"""The index-based training stream over a random-access source (`Source.reader`).

Order: `index.GlobalOrder`, a seeded permutation of the split per epoch; global batch g
holds stream positions g*G .. g*G + G - 1 (G = per-process batch x processes). Process r
reads the records of its rows [r*B, (r+1)*B) only, so the bytes each process reads are
about 1/P of the total, and the global batch is the same whatever the number of
processes. Each row is augmented by `augment.train_map` seeded by (seed, its global
position g*G + j), as on the stream path, so a row's pixels do not depend on the
topology either.

A record that cannot be read (a corrupt chunk) or decoded is replaced by the next
readable record of its epoch's order (`index.replacement_positions`), augmented with
the row's own position, and counted (`skipped`, `data_state["skipped"]`): the rows
after it never move. Resuming needs only the global batch index (the checkpoint's
`data_position`), on any number of processes.

Reads run in tf.data's generator thread ahead of the consumer; decoding and
augmentation in tf.data's parallel map (deterministic order); batches are assembled
here by position.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from mmjax.data import collate, index, require_tf
from mmjax.data.augment import train_map
from mmjax.data.schema import option

log = logging.getLogger(__name__)


class IndexTrainIterator:
    """Per-process training batches (the keys of `pipeline.make_train_iterator`), each
    with host-only `data_state = {"records": (g + 1) * G, "skipped": replaced so far}`;
    `.batch_index` is the next global batch, `.skipped` the records replaced so far."""

    def __init__(self, source, data_config, tokenizer, batch_size: int, *, seed: int, start_batch: int = 0,
                 process_index: int = 0, process_count: int = 1, skipped: int = 0, num_parallel_calls=None,
                 options=None):  # fmt: skip
        tf = require_tf()
        self.reader = source.reader(option(data_config, "train_split"))
        self.B, self.rank = int(batch_size), int(process_index)
        self.G = self.B * int(process_count)
        self.order = index.GlobalOrder([len(self.reader)], None, int(seed), self.G)
        self.batch_index, self.skipped = int(start_batch), int(skipped)
        self._fn = train_map(data_config, int(seed), 0)
        self._finish = functools.partial(
            collate.train_batch, tokenizer=tokenizer, text_len=int(option(data_config, "text_len")), negatives=0
        )
        self._spec = self._signature(tf)
        self._replaced_reads: dict[int, int] = {}  # batch -> records replaced by the reader thread
        ds = tf.data.Dataset.from_generator(self._elements, output_signature=(tf.TensorSpec([], tf.int64), self._spec))
        ds = ds.map(self._fn, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors().prefetch(tf.data.AUTOTUNE)
        self._it = (ds.with_options(options) if options is not None else ds).as_numpy_iterator()
        self._ahead = None  # an element pulled past a missing position

    def _signature(self, tf) -> dict:
        first = next((s for k in range(min(len(self.reader), 64)) for s in self.reader.read([k]) if s), None)
        if first is None:
            raise ValueError(f"{self.reader.directory}: none of the first records of the split reads")
        if "video" in first:
            raise ValueError(
                "video shards are not read by the index pipeline yet: convert images, or use data.name=files"
            )
        spec = {"image": tf.TensorSpec([], tf.string), "caption": tf.TensorSpec([], tf.string)}
        spec["id"] = tf.TensorSpec([], tf.int64)
        if "label" in first:
            spec["label"] = tf.TensorSpec([], tf.int64)
        return spec

    def _record(self, sample) -> dict:
        return {k: (np.int64(sample[k]) if k in ("id", "label") else sample[k]) for k in self._spec}

    def _rows(self, g: int) -> dict:
        return index.local_rows(self.order.plan(g), self.rank, self.B)

    def _readable(self, stream_pos: int, g: int):
        """(stream position, sample) of the first readable record after `stream_pos` in its
        epoch's order; ValueError when none of the next 16 reads."""
        n = len(self.reader)
        for k in index.replacement_positions(stream_pos, n):
            sample = self.reader.read([int(index.stream_index(k, n, self.order.seed, 0))])[0]
            if sample is not None:
                return k, sample
        raise ValueError(f"{self.reader.directory}: 16 records in a row after stream position {stream_pos} do not read")

    def _elements(self):
        """(global position, record) of this process's rows, batch after batch; an
        unreadable record is replaced here (counted for its batch)."""
        g = self.batch_index
        while True:
            rows = self._rows(g)
            for j, sample in enumerate(self.reader.read(rows["record"])):
                if sample is None:
                    _, sample = self._readable(int(rows["stream"][j]), g)
                    self._replaced_reads[g] = self._replaced_reads.get(g, 0) + 1
                yield np.int64(rows["pos"][j]), self._record(sample)
            g += 1

    def _take(self, pos: int):
        """The augmented element at global position `pos`, or None if it was dropped (its
        record did not decode)."""
        while True:
            el = self._ahead if self._ahead is not None else next(self._it)
            self._ahead = None
            if int(el["pos"]) == pos:
                return el
            if int(el["pos"]) > pos:
                self._ahead = el
                return None

    def _decoded_replacement(self, pos: int, stream_pos: int, g: int) -> dict:
        """The row at `pos` made from the next record that reads and decodes (eagerly)."""
        tf = require_tf()
        for _ in range(16):
            stream_pos, sample = self._readable(stream_pos, g)
            try:
                rec = {k: tf.constant(v) for k, v in self._record(sample).items()}
                return {k: v.numpy() for k, v in self._fn(tf.constant(pos, tf.int64), rec).items()}
            except (tf.errors.OpError, ValueError) as e:
                log.warning("data: record at stream position %d does not decode (%s)", stream_pos, e)
        raise ValueError(f"{self.reader.directory}: 16 replacements for position {pos} do not decode")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = self.batch_index
        rows, elements, replaced = self._rows(g), [], 0
        for j in range(self.B):
            el = self._take(int(rows["pos"][j]))
            if el is None:
                el, replaced = self._decoded_replacement(int(rows["pos"][j]), int(rows["stream"][j]), g), replaced + 1
            elements.append(el)
        replaced += self._replaced_reads.pop(g, 0)
        if replaced:
            self.skipped += replaced
            log.warning("data: replaced %d unreadable records in batch %d (%d so far)", replaced, g, self.skipped)
        batch = {k: np.stack([e[k] for e in elements]) for k in elements[0] if k != "caption"}
        batch["caption"] = np.array([e["caption"] for e in elements], dtype=object)
        out = self._finish(batch)
        out["data_state"] = {"records": (g + 1) * self.G, "skipped": self.skipped}
        self.batch_index += 1
        return out

    def close(self):
        self._it = iter(())
