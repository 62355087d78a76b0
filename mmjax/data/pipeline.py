"""tf.data input pipeline, one per process: the train and eval iterators over a
source's records (`mmjax.data.sources`), decoded (`decode`) and augmented (`augment`)
in tf.data. TensorFlow is imported lazily, in functions.

Records (`load_records`) are dicts of still-encoded images ('image' bytes, or
'image_path' for user lists) or clips ('video': the PNG bytes of each frame [n], or
'video_path' for user lists), 'caption' (string), 'id' (int64) and, where the dataset
has them, 'label' (int64) and 'hard_negatives' (string [n]). With data.num_frames = T
> 0 every record becomes a clip of T frames (`video_io.sample_indices`; an image is
repeated T times) and batches hold 'image' [B, T, S, S, 3]. The iterators decode,
augment and batch in tf.data and tokenize in python (deterministic), yielding dicts of
numpy arrays; see docs/architecture.md for the batch contract.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import tempfile
import time
import weakref

import numpy as np

from mmjax.data import require_tf, video_io
from mmjax.data.augment import MAX_NEGATIVES, eval_map, train_map
from mmjax.data.decode import (
    decode_frames,
    decode_image,
    decode_media,
    num_frames,  # noqa: F401
    tf_reason,
)
from mmjax.data.sources import (
    LOCAL_DATASETS,
    captions,  # noqa: F401
    cfg_get,
    files_rows,
    load_records,
    num_examples,
)

log = logging.getLogger(__name__)


def _options(data_config, threads=None):
    tf = require_tf()
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
        opts.threading.private_threadpool_size = int(threads)
    return opts


def _npc(data_config):
    tf = require_tf()
    n = int(cfg_get(data_config, "num_parallel_calls", -1))
    return tf.data.AUTOTUNE if n < 0 else n


def _initial_skips(data_config, split) -> int:
    if cfg_get(data_config, "name") == "files":
        return len(files_rows(data_config, split)[1])
    return 0


# --------------------------------------------------------------------------- iterators

_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_iterators():
    """Drops every live tf.data iterator before the interpreter finalizes: one whose
    threads are inside a Python decoder (PyAV, through tf.numpy_function) when the
    interpreter shuts down otherwise hangs the exit."""
    for it in list(_LIVE_ITERATORS):
        it.close()


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


def _source_name(data_config, split) -> str:
    name = cfg_get(data_config, "name")
    if name == "files":
        return f"data.path={os.path.expanduser(str(cfg_get(data_config, 'path')))} (split {split!r})"
    return f"dataset {name!r} (split {split!r})"


def _check_decodable(data_config, ds, split) -> None:
    """ValueError naming the source unless some record of `ds` decodes. Records are tried
    in order until one does: a healthy list costs one decode, a hopeless one a full pass,
    instead of an infinite stream that drops every record and never yields a batch."""
    tf = require_tf()
    t = num_frames(data_config)
    probe = ds.map(lambda r: tf.shape(decode_media(r, t, tf.fill([t], 0.5)))[0]).ignore_errors().take(1)
    for _ in probe.as_numpy_iterator():
        return
    n = int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())
    src = _source_name(data_config, split)
    if not n:
        raise ValueError(f"{src}: no records to train on")
    reason, first = "", next(iter(ds.take(1)))
    what = next((k for k in ("image_path", "video_path") if k in first), None)
    path = first[what].numpy().decode() if what else ""
    try:  # the first record's decoder error, for the message
        if what == "video_path":
            video_io.read_frames(path, t or 1)
        else:
            decode_media(first, t, tf.fill([t], 0.5))
    except Exception as e:  # noqa: BLE001 (only for the message)
        reason = tf_reason(e)
        reason = reason[len(path) + 2 :] if path and reason.startswith(path + ": ") else reason
    where = f"{path}: " if path else ""
    raise ValueError(
        f"{src}: none of its {n} records decodes (first: {where}{reason or 'undecodable'}); no batch can be made"
    )


def _cache_decoded(data_config, ds):
    """Decodes every image once, resized to data.image_size, and keeps the uint8
    pixels in memory (built-in datasets only: they are small and hold no corrupt
    records, so no record is dropped before the stream positions are counted)."""
    tf = require_tf()
    size = int(cfg_get(data_config, "image_size", 224))

    def decode(rec):
        if "video" in rec:  # every frame: the sampling happens after the cache
            img = decode_frames(rec["video"])
        else:
            img = decode_image(rec)
        img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, [size, size], antialias=True)), 0, 255), tf.uint8)
        img.set_shape(([None] if "video" in rec else []) + [size, size, 3])
        out = {k: v for k, v in rec.items() if k not in ("image", "video")}
        out["pixels"] = img
        return out

    return ds.map(decode, num_parallel_calls=_npc(data_config), deterministic=True).cache()


def make_train_iterator(
    data_config,
    tokenizer,
    batch_size: int,
    *,
    seed: int,
    start_batch: int = 0,
    start_record: int | None = None,
    skipped: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    threads=None,
    hard_negatives: int = 0,
) -> BatchIterator:
    """Infinite iterator of per-process training batches:
    image float32 [B, S, S, 3] (clips, with data.num_frames = T: [B, T, S, S, 3], frames
    sampled by data.frame_sampling), text int32 [B, L], id int64 [B] (+ label int32 [B]),
    and with `hard_negatives=K` > 0 also hard_negatives int32 [B, K, L] (captions with
    attributes swapped, for NegCLIP-style training; the dataset must provide them) and
    hard_negatives_valid bool [B, K] (False where a record with fewer than K negatives
    repeats one, or pads with an empty text when it has none). Every batch also carries
    `data_state = {"records": int, "skipped": int}` (host-only, not an array: drop it
    before the device): the stream position just after the batch's last record and the
    records this process skipped so far (missing files + undecodable), this batch included.

    Shuffled per epoch from `seed`, augmentation seeded by (seed, stream position). The
    stream position indexes the seeded, shuffled, repeated record stream, counted before
    any record is dropped, so resuming is exact with or without undecodable records:
    `start_record=data_state["records"]`, `skipped=data_state["skipped"]` of the last
    batch consumed yields exactly the batches the uninterrupted iterator yields next.
    `start_record` wins over `start_batch` for the position; `start_batch` still sets
    `.batch_index`, and alone (start_record None: a checkpoint written before data_state)
    it positions at start_batch global batches, exact only when no record was dropped
    before that point. `skipped` is the count restored with the position (a fresh
    iterator adds the list's missing files to it; a resumed one has them in it already).

    Multi-process: every process walks the same shuffled record order, cut into
    global batches of `batch_size * process_count`, and decodes only its rows
    `[process_index * batch_size, (process_index + 1) * batch_size)` of each. The
    global batch is therefore the same whatever the process count (as long as no
    record is dropped: a process fills a dropped row with its next own row), and
    `start_batch` counts global batches; `start_record` and `data_state` are per
    process (global stream positions).

    ValueError when no record of the split decodes (a full pass in order finds none).
    """
    tf = require_tf()
    split = cfg_get(data_config, "train_split", "train")
    L = int(cfg_get(data_config, "text_len", 32))
    cache = bool(cfg_get(data_config, "cache_decoded", False))
    if cache and cfg_get(data_config, "name") not in LOCAL_DATASETS:
        raise ValueError(
            f"data.cache_decoded=True is for the built-in datasets {LOCAL_DATASETS}, not "
            f"{cfg_get(data_config, 'name')!r}: a large or partly corrupt dataset must stream"
        )
    ds = load_records(data_config, split)
    K = int(hard_negatives or 0)
    if K and "hard_negatives" not in ds.element_spec:
        raise ValueError(
            f"model.hard_negatives={K} but dataset {cfg_get(data_config, 'name')!r} has no "
            "hard_negatives feature (built-in: shapes); set model.hard_negatives=0"
        )
    if cache:
        ds = _cache_decoded(data_config, ds)
    else:
        _check_decodable(data_config, ds, split)
    ds = ds.shuffle(
        int(cfg_get(data_config, "shuffle_buffer", 10000)), seed=int(seed), reshuffle_each_iteration=True
    ).repeat()
    b, n_proc, rank = int(batch_size), int(process_count), int(process_index)
    global_b = b * n_proc
    start = int(start_batch) * global_b if start_record is None else int(start_record)
    if start < 0:
        raise ValueError(f"start_record={start}: a stream position is >= 0")
    ds = ds.enumerate().skip(start)
    if n_proc > 1:  # this process's rows of every global batch, before any decoding
        ds = ds.filter(lambda pos, rec: (pos % global_b) // b == rank)
    ds = ds.map(
        train_map(data_config, int(seed), K), num_parallel_calls=_npc(data_config), deterministic=True
    ).ignore_errors()
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(_options(data_config, threads))

    def finish(b):
        if b is None:
            raise StopIteration
        out = {
            "image": b["image"],
            "id": b["id"].astype(np.int64),
            "text": tokenizer.encode([c.decode("utf-8") for c in b["caption"]], L),
        }
        if "label" in b:
            out["label"] = b["label"].astype(np.int32)
        if K:
            negs = [c.decode("utf-8") for c in b["hard_negatives"].reshape(-1)]
            out["hard_negatives"] = tokenizer.encode(negs, L).reshape(len(b["id"]), K, L)
            out["hard_negatives_valid"] = b["hard_negatives_valid"].astype(bool)
        return out

    # Stream positions -> this process's own count, so skipped records are gaps in it.
    to_local = (lambda pos: (pos // global_b) * b + pos % global_b - rank * b) if n_proc > 1 else None
    local_start = (start // global_b) * b + min(max(start % global_b - rank * b, 0), b)
    missing = _initial_skips(data_config, split) if start_record is None else 0
    return BatchIterator(
        ds,
        finish,
        start_pos=local_start,
        batch_index=int(start_batch),
        skipped=int(skipped) + missing,
        missing=missing,
        to_local=to_local,
        state=True,
    )


def make_eval_iterator(
    data_config, tokenizer, split: str, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> BatchIterator:
    """One ordered pass over this process's shard of `split`, no augmentation.

    Every process yields the same number of batches, ceil(ceil(N / P) / B), each of
    fixed shape B; padding rows have `valid` False. Keys: image [B,S,S,3] f32 (clips:
    [B,T,S,S,3], frames sampled 'uniform'),
    text [B,L] i32, id [B] i64 (-1 on padding), valid [B] bool, caption [B] object str,
    and where present label [B] i32, hard_negatives [B,K,L] i32, hard_negatives_valid
    [B,K] bool (K = 4).
    """
    tf = require_tf()
    L = int(cfg_get(data_config, "text_len", 32))
    S = int(cfg_get(data_config, "image_size", 224))
    clip = [num_frames(data_config)] if num_frames(data_config) else []
    n_total = num_examples(data_config, split)
    n_shard = len(range(process_index, n_total, process_count))
    num_batches = math.ceil(math.ceil(n_total / process_count) / batch_size)
    ds = load_records(data_config, split).shard(process_count, process_index).enumerate()
    ds = ds.map(eval_map(data_config), num_parallel_calls=_npc(data_config), deterministic=True).ignore_errors()
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options(data_config))
    has_label = "label" in ds.element_spec
    has_neg = "hard_negatives" in ds.element_spec
    state = {"done": 0}
    B = batch_size

    def finish(b):
        if state["done"] >= num_batches:
            raise StopIteration
        state["done"] += 1
        n = 0 if b is None else len(b["id"])
        out = {
            "image": np.zeros([B] + clip + [S, S, 3], np.float32),
            "text": np.zeros([B, L], np.int32),
            "id": np.full([B], -1, np.int64),
            "valid": np.arange(B) < n,
            "caption": np.array([""] * B, dtype=object),
        }
        if has_label:
            out["label"] = np.zeros([B], np.int32)
        if has_neg:
            out["hard_negatives"] = np.zeros([B, MAX_NEGATIVES, L], np.int32)
            out["hard_negatives_valid"] = np.zeros([B, MAX_NEGATIVES], bool)
        if n:
            caps = [c.decode("utf-8") for c in b["caption"]]
            out["image"][:n] = b["image"]
            out["text"][:n] = tokenizer.encode(caps, L)
            out["id"][:n] = b["id"]
            out["caption"][:n] = caps
            if has_label:
                out["label"][:n] = b["label"]
            if has_neg:
                negs = [c.decode("utf-8") for c in b["hard_negatives"].reshape(-1)]
                out["hard_negatives"][:n] = tokenizer.encode(negs, L).reshape(n, MAX_NEGATIVES, L)
                out["hard_negatives_valid"][:n] = b["hard_negatives_valid"]
        return out

    missing = _initial_skips(data_config, split)
    return BatchIterator(ds, finish, total=n_shard, skipped=missing, missing=missing)


def pipeline_throughput(data_config, batch_size: int, num_batches: int, threads=None, tokenizer=None) -> dict:
    """Images/s of the training iterator alone (after one warm-up batch), with tf.data's
    private threadpool limited to `threads` when given."""
    from mmjax.data.tokenizer import Tokenizer, train_tokenizer

    if tokenizer is None:
        with tempfile.TemporaryDirectory() as d:
            split = cfg_get(data_config, "train_split", "train")
            tokenizer = Tokenizer(
                train_tokenizer(
                    captions(data_config, split), d, int(cfg_get(data_config, "tokenizer.vocab_size", 8000))
                )
            )
    it = make_train_iterator(data_config, tokenizer, batch_size, seed=0, threads=threads)
    next(it)
    t = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    dt = time.perf_counter() - t
    return {
        "images_per_s": num_batches * batch_size / dt,
        "threads": threads,
        "batch_size": batch_size,
        "num_batches": num_batches,
        "seconds": dt,
    }
