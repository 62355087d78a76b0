"""`mmjax data bench`: images/s of the training iterator alone (and clips/s, per core too,
when its batches carry audio), and the bytes it read."""

from __future__ import annotations

import os
import tempfile
import time

from mmjax.data.schema import option


def read_bytes() -> int | None:
    """Bytes this process has read through read/pread system calls so far (Linux's
    `rchar` in /proc/self/io: files and sockets, page cache hits included); None where
    the counter does not exist."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def pipeline_throughput(
    data_config, batch_size: int, num_batches: int, threads=None, tokenizer=None, process_index=0, process_count=1
) -> dict:
    """Images/s of the training iterator alone (after one warm-up batch), with tf.data's
    private threadpool limited to `threads` when given. Without a tokenizer one is
    trained on the training captions (data.tokenizer.vocab_size).

    With process_count P > 1 this process reads as process `process_index` of P (its rows
    of each global batch of batch_size * P; no other process needs to run). `bytes_read`:
    what the process read through system calls from the warm-up batch to the last one
    (read ahead included); `record_bytes`: the record bytes the index-based readers
    returned over the same span (None on the stream path). Set them against a 1-process
    run over the same batches.

    With audio in the batches (data.modalities), also `clips_per_s` (the same rows, as
    audio clips) and `clips_per_s_per_core`: divided by the cores this process may use
    (`cores`, os.sched_getaffinity)."""
    from mmjax.data import pipeline, sources
    from mmjax.data.tokenizer import Tokenizer, train_tokenizer

    if tokenizer is None:
        with tempfile.TemporaryDirectory() as d:
            caps = sources.captions(data_config, option(data_config, "train_split"))
            tokenizer = Tokenizer(train_tokenizer(caps, d, int(option(data_config, "tokenizer.vocab_size"))))
    from mmjax.data import require_tf

    require_tf()  # imported before counting: its modules' reads are not the data's
    it = pipeline.make_train_iterator(
        data_config,
        tokenizer,
        batch_size,
        seed=0,
        threads=threads,
        process_index=int(process_index),
        process_count=int(process_count),
    )
    before, payload = read_bytes(), it.payload_bytes()
    audio = "audio" in next(it)
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(it)
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    after, payload_after = read_bytes(), it.payload_bytes()
    it.close()
    out = {
        "images_per_s": num_batches * batch_size / dt,
        # per CPU-second of this process (all its threads): images per core, also on a busy machine
        "images_per_cpu_s": num_batches * batch_size / cpu if cpu > 0 else None,
        "threads": threads,
        "batch_size": batch_size,
        "num_batches": num_batches,
        "seconds": dt,
        "process_index": int(process_index),
        "process_count": int(process_count),
        "bytes_read": None if before is None else after - before,
        "record_bytes": None if payload is None else payload_after - payload,
    }
    return dict(out, **_clips(out["images_per_s"])) if audio else out


def _clips(per_s: float) -> dict:
    """The audio figures: clips/s, and per core (the cores this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"clips_per_s": per_s, "clips_per_s_per_core": per_s / cores, "cores": cores}
