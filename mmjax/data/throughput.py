"""`mmjax data bench`: images/s of the training iterator alone."""

from __future__ import annotations

import tempfile
import time

from mmjax.data.schema import option


def pipeline_throughput(data_config, batch_size: int, num_batches: int, threads=None, tokenizer=None) -> dict:
    """Images/s of the training iterator alone (after one warm-up batch), with tf.data's
    private threadpool limited to `threads` when given. Without a tokenizer one is
    trained on the training captions (data.tokenizer.vocab_size)."""
    from mmjax.data import pipeline, sources
    from mmjax.data.tokenizer import Tokenizer, train_tokenizer

    if tokenizer is None:
        with tempfile.TemporaryDirectory() as d:
            caps = sources.captions(data_config, option(data_config, "train_split"))
            tokenizer = Tokenizer(train_tokenizer(caps, d, int(option(data_config, "tokenizer.vocab_size"))))
    it = pipeline.make_train_iterator(data_config, tokenizer, batch_size, seed=0, threads=threads)
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
