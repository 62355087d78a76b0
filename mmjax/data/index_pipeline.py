"""The index-based training stream over random-access sources (`Source.mixture`: one
source, or a weighted mixture of several).

Order: `index.GlobalOrder`, a seeded permutation of each source per epoch; each source
has a fixed quota of the G rows of every global batch (G = per-process batch x
processes), its slots shuffled among the rows by (seed, batch). Process r reads the
records of its rows [r*B, (r+1)*B) only, so the bytes each process reads are about 1/P
of the total, and the global batch is the same whatever the number of processes. Each
row is augmented by `augment.train_map` seeded by (seed, its global position g*G + j),
as on the stream path, so a row's pixels do not depend on the topology either. Ids are
offset by the record counts of the sources before a row's source (unique over the
mixture).

A record that cannot be read (a corrupt chunk) or decoded is replaced by the next
readable record of its source's epoch order (`index.replacement_positions`), augmented
with the row's own position, and counted (`skipped`, `data_state["skipped"]`, per source
in a mixture): the rows after it never move. Resuming needs only the global batch index
(the checkpoint's `data_position`), on any number of processes; `order_state` (saved in
the checkpoint with it) lets a resumed iterator refuse changed data, weights, seed or
global batch.

Reads run in tf.data's generator thread ahead of the consumer, one batch of records
per hand-over; decoding and augmentation in tf.data's parallel map (deterministic
order), batched there; a batch whose positions a dropped record shifted is repaired
here by position.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from mmjax.data import collate, index, require_tf
from mmjax.data.augment import train_map
from mmjax.data.schema import option

log = logging.getLogger(__name__)


def fingerprint(readers) -> str:
    """sha256 hex over each reader's `shards` (path, records, bytes, sha256), sources in
    order: the files the order reads (another split added to a directory does not change it)."""
    shards = [[[s["path"], int(s["records"]), s.get("bytes"), s.get("sha256")] for s in r.shards] for r in readers]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def _order(sizes, weights, seed: int, G: int, names: list[str]) -> index.GlobalOrder:
    try:
        return index.GlobalOrder(sizes, weights, seed, G)
    except ValueError as e:
        raise ValueError(f"{e} (data.path sources in order: {', '.join(names)})") from None


class IndexTrainIterator:
    """Per-process training batches (the keys of `pipeline.make_train_iterator`), each
    with host-only `data_state = {"records": (g + 1) * G, "skipped": replaced so far}`
    and, for a mixture, `"sources": {name: {"rows": rows of the source in the global
    batches so far, "replaced": this process's replacements}}`; `.batch_index` is the
    next global batch, `.skipped` the records replaced so far, `.replaced` per source.
    `order_state` (a checkpoint's `order_state(g)`) is checked against this iterator's
    order: ValueError (one line) when the data, weights, seed or global batch changed."""

    def __init__(self, source, data_config, tokenizer, batch_size: int, *, seed: int, start_batch: int = 0,
                 process_index: int = 0, process_count: int = 1, skipped: int = 0, replaced=None,
                 order_state=None, num_parallel_calls=None, options=None):  # fmt: skip
        tf = require_tf()
        parts = source.mixture(option(data_config, "train_split"))
        self.names, self.readers = [str(p[0]) for p in parts], [p[2] for p in parts]
        weights = None if all(p[1] is None for p in parts) else [1.0 if p[1] is None else p[1] for p in parts]
        self.B, self.rank = int(batch_size), int(process_index)
        self.G = self.B * int(process_count)
        self.order = _order([len(r) for r in self.readers], weights, int(seed), self.G, self.names)
        self.offsets = [0, *np.cumsum(self.order.sizes).tolist()][:-1]
        self.fingerprint = fingerprint(self.readers)
        self.batch_index, self.skipped = int(start_batch), int(skipped)
        self.replaced = [int(n) for n in replaced] if replaced else [0] * len(self.readers)
        if order_state is not None:
            self._check_resume(order_state)
        self._fn = train_map(data_config, int(seed), 0)
        self._finish = collate.train_finisher(
            data_config, tokenizer, int(option(data_config, "text_len")), 0, int(process_count)
        )
        self._spec = self._signature(tf)
        self._replaced_reads: dict[int, list[int]] = {}  # batch -> records replaced per source by the reader thread
        batched = {k: tf.TensorSpec([None], v.dtype) for k, v in self._spec.items()}
        ds = tf.data.Dataset.from_generator(self._batches, output_signature=(tf.TensorSpec([None], tf.int64), batched))
        ds = ds.unbatch().map(self._fn, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)
        # batched in tf.data (no per-record hand-over); a dropped record shifts a chunk's
        # positions, which _gather notices and repairs by position
        ds = ds.ignore_errors().batch(self.B).prefetch(tf.data.AUTOTUNE)
        self._it = (ds.with_options(options) if options is not None else ds).as_numpy_iterator()
        self._buf = None  # augmented rows pulled but not used yet: dict of [n] arrays, positions ascending

    def order_state(self, batch_index: int) -> dict:
        """The JSON-able order state before global batch `batch_index` (`GlobalOrder.state`)
        with the sources' `fingerprint`: what a checkpoint keeps to check a resume."""
        return {**self.order.state(batch_index), "fingerprint": self.fingerprint}

    def payload_bytes(self) -> int:
        """Bytes of the records this process's readers returned so far (its rows, the
        replacements and the first-record probe; read ahead included)."""
        return int(sum(r.bytes_read for r in self.readers))

    def _check_resume(self, state: dict) -> None:
        g = self.order.check_state(state)  # ValueError: sizes, weights, seed or global batch changed
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "cannot resume: the training shards changed since the checkpoint (their fingerprint differs) "
                "and the data order depends on them; train on the same data.path, or start a new workdir"
            )
        if g != self.batch_index:
            raise ValueError(
                f"cannot resume: the checkpoint's data state is at batch {g}, its position at {self.batch_index}"
            )

    def _signature(self, tf) -> dict:
        """The element spec: image (or video_file: encoded video containers, clips cut as
        the file-list path cuts them), caption, id, and label when every source's first
        readable record has one (and a mixture's sources share their label names)."""
        firsts = []
        for reader in self.readers:
            first = next((s for k in range(min(len(reader), 64)) for s in reader.read([k]) if s), None)
            if first is None:
                raise ValueError(f"{reader.directory}: none of the first records of the split reads")
            firsts.append(first)
        media = {"video_file" if "video_file" in f else "image" for f in firsts}
        if len(media) > 1:
            raise ValueError("a mixture of image and video shards: mix sources of one kind (images or videos)")
        spec = {media.pop(): tf.TensorSpec([], tf.string), "caption": tf.TensorSpec([], tf.string)}
        spec["id"] = tf.TensorSpec([], tf.int64)
        same_labels = all(r.label_names == self.readers[0].label_names for r in self.readers)
        if all("label" in f for f in firsts) and same_labels:
            spec["label"] = tf.TensorSpec([], tf.int64)
        return spec

    def _record(self, sample, s: int) -> dict:
        """A reader's sample of source `s` -> the element's record (id offset)."""
        rec = {k: (np.int64(sample[k]) if k in ("id", "label") else sample[k]) for k in self._spec}
        rec["id"] = np.int64(sample["id"] + self.offsets[s])
        return rec

    def _rows(self, g: int) -> dict:
        return index.local_rows(self.order.plan(g), self.rank, self.B)

    def _readable(self, stream_pos: int, s: int):
        """(stream position, sample) of the first readable record of source `s` after
        `stream_pos` in its epoch's order; ValueError when none of the next 16 reads."""
        reader, n = self.readers[s], self.order.sizes[s]
        for k in index.replacement_positions(stream_pos, n):
            sample = reader.read([int(index.stream_index(k, n, self.order.seed, s))])[0]
            if sample is not None:
                return k, sample
        raise ValueError(f"{reader.directory}: 16 records in a row after stream position {stream_pos} do not read")

    def _read_rows(self, rows: dict) -> list:
        """The samples (or None) of `rows`, in row order: one read per source."""
        samples = [None] * len(rows["record"])
        for s, reader in enumerate(self.readers):
            at = np.nonzero(rows["source"] == s)[0]
            if at.size:
                for j, sample in zip(at, reader.read(rows["record"][at])):
                    samples[j] = sample
        return samples

    def _batches(self):
        """(global positions [B], records as [B] arrays) of this process's rows, batch
        after batch (one hand-over to tf.data per batch, not per record: that costs
        ~40% of the throughput at 224 px); an unreadable record is replaced here
        (counted for its batch and source)."""
        g = self.batch_index
        while True:
            rows, recs = self._rows(g), []
            for j, sample in enumerate(self._read_rows(rows)):
                s = int(rows["source"][j])
                if sample is None:
                    _, sample = self._readable(int(rows["stream"][j]), s)
                    self._replaced_reads.setdefault(g, [0] * len(self.readers))[s] += 1
                recs.append(self._record(sample, s))
            cols = {k: np.array([r[k] for r in recs], dtype=object if k in ("image", "video_file", "caption") else np.int64)
                    for k in self._spec}  # fmt: skip
            yield rows["pos"].astype(np.int64), cols
            g += 1

    def _gather(self, want: np.ndarray):
        """The augmented rows at global positions `want` ([B], ascending) -> (dict of [B]
        arrays with None where a position's record was dropped (it did not decode), the
        missing rows' indices). The rows after `want` stay buffered for the next batch."""
        while self._buf is None or not len(self._buf["pos"]) or self._buf["pos"][-1] < want[-1]:  # endless
            chunk = next(self._it)
            empty = self._buf is None or not len(self._buf["pos"])
            self._buf = chunk if empty else {k: np.concatenate([self._buf[k], chunk[k]]) for k in chunk}
        buf, n = self._buf, len(want)
        if len(buf["pos"]) >= n and np.array_equal(buf["pos"][:n], want):  # nothing dropped: the common case
            out, self._buf = {k: v[:n] for k, v in buf.items()}, {k: v[n:] for k, v in buf.items()}
            return out, []
        at = np.minimum(np.searchsorted(buf["pos"], want), len(buf["pos"]) - 1)
        present = buf["pos"][at] == want
        out = {k: [v[i] if ok else None for i, ok in zip(at, present)] for k, v in buf.items()}
        rest = buf["pos"] > want[-1]
        self._buf = {k: v[rest] for k, v in buf.items()}
        return out, [j for j in range(n) if not present[j]]

    def _decoded_replacement(self, pos: int, stream_pos: int, s: int) -> dict:
        """The row at `pos` made from the next record of source `s` that reads and decodes (eagerly)."""
        tf = require_tf()
        for _ in range(16):
            stream_pos, sample = self._readable(stream_pos, s)
            try:
                rec = {k: tf.constant(v) for k, v in self._record(sample, s).items()}
                return {k: v.numpy() for k, v in self._fn(tf.constant(pos, tf.int64), rec).items()}
            except (tf.errors.OpError, ValueError) as e:
                log.warning("data: record at stream position %d does not decode (%s)", stream_pos, e)
        raise ValueError(f"{self.readers[s].directory}: 16 replacements for position {pos} do not decode")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = self.batch_index
        rows = self._rows(g)
        replaced = np.zeros(len(self.readers), np.int64)
        batch, missing = self._gather(rows["pos"])
        if missing:  # rows whose record did not decode: the next one of their source that does
            for j in missing:
                s = int(rows["source"][j])
                el = self._decoded_replacement(int(rows["pos"][j]), int(rows["stream"][j]), s)
                for k in batch:
                    batch[k][j] = el[k]
                replaced[s] += 1
            batch = {k: np.array(v, dtype=object) if k == "caption" else np.stack(v) for k, v in batch.items()}
        replaced += self._replaced_reads.pop(g, 0)
        if replaced.sum():
            self.skipped += int(replaced.sum())
            self.replaced = [int(a + b) for a, b in zip(self.replaced, replaced)]
            log.warning("data: replaced %d unreadable records in batch %d (%d so far)", replaced.sum(), g, self.skipped)
        out = self._finish(batch)
        out["data_state"] = {"records": (g + 1) * self.G, "skipped": self.skipped}
        if len(self.readers) > 1:
            rows_so_far = self.order.drawn(g + 1)
            out["data_state"]["sources"] = {
                name: {"rows": rows_so_far[s], "replaced": self.replaced[s]} for s, name in enumerate(self.names)
            }
        self.batch_index += 1
        return out

    def close(self):
        self._it = iter(())
