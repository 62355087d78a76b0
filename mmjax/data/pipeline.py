"""The train and eval iterators, one tf.data pipeline per process:

    source (mmjax.data.sources: encoded records)
    -> decode + augment (decode.py, augment.py: tf.data maps)
    -> tokenize + batch contract (collate.py, in python: deterministic)
    -> batches with stream positions and skip counts (iterator.py)

With data.num_frames = T > 0 every record becomes a clip of T frames
(`video_io.sample_indices`; an image is repeated T times) and batches hold 'image'
[B, T, S, S, 3]. data.modalities (`modalities.py`) picks what a batch carries: image,
text, audio ('audio' [B, N, C], 'audio_len' [B]), depth ('depth' [B, S, S, 1]). See
docs/architecture.md for the batch contract and docs/data.md for positions and resume.
TensorFlow is imported lazily, in functions. `mmjax data bench` measures these
iterators (throughput.py).

Many processes (`make_train_iterator`): every process walks the same shuffled record
order, cut into global batches of `batch_size * process_count`, and decodes only its
rows `[process_index * batch_size, (process_index + 1) * batch_size)` of each. The
global batch is therefore the same whatever the process count (as long as no record is
dropped: a process fills a dropped row with its next own row), and `start_batch` counts
global batches; `start_record` and `data_state` are per process (global stream
positions).

A random-access source (`data.name=shards`, one directory or a mixture) takes the
index-based pipeline instead (`index_pipeline.IndexTrainIterator`), positioned by
`start_batch` alone; `replaced` (a mixture's replacements per source, restored) and
`order_state` (the checkpoint's `order_state(g)`, checked: ValueError when the data,
weights, seed or global batch changed) are its own. The stream path ignores them. It
reads images (or clips) and text: data.modalities with audio or depth is refused there.
"""

from __future__ import annotations

import math

from mmjax.data import collate, modalities, require_tf, sources
from mmjax.data.augment import eval_map, train_map
from mmjax.data.decode import MEAN, STD, cache_decoded, check_decodable, num_frames  # noqa: F401
from mmjax.data.iterator import BatchIterator, local_positions
from mmjax.data.schema import option
from mmjax.data.sources import answer_types, captions, label_names, load_records, num_examples  # noqa: F401


def _options(threads=None):
    tf = require_tf()
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
        opts.threading.private_threadpool_size = int(threads)
    return opts


def _parallel_calls(data_config):
    n = int(option(data_config, "num_parallel_calls"))
    return require_tf().data.AUTOTUNE if n < 0 else n


def _train_records(source, split: str, hard_negatives: int, media):
    """The split's records, checked (cache allowed, hard negatives present, every modality
    of `media` present, something decodes) and, with data.cache_decoded, decoded once
    into memory."""
    cache = bool(option(source.config, "cache_decoded"))
    if cache and not source.cache_allowed:
        allowed = tuple(n for c in sources.registered() if c.cache_allowed for n in c.names)
        raise ValueError(
            f"data.cache_decoded=True is for the built-in datasets {allowed}, not "
            f"{source.name!r}: a large or partly corrupt dataset must stream"
        )
    ds = source.records(split)
    if hard_negatives and not source.has_hard_negatives():
        raise ValueError(
            f"model.hard_negatives={hard_negatives} but dataset {source.name!r} has no "
            "hard_negatives feature (built-in: shapes); set model.hard_negatives=0"
        )
    t = num_frames(source.config)
    modalities.check_records(ds.element_spec, media, t, source.describe(split))
    if cache:
        return cache_decoded(ds, int(option(source.config, "image_size")), _parallel_calls(source.config), media)
    check_decodable(ds, t, source.describe(split), media)
    return ds


def _train_stream(ds, data_config, *, seed, start, batch_size, process_index, process_count, negatives, threads):
    """Shuffled per epoch, repeated, positioned at stream position `start`, this
    process's rows of each global batch, augmented, batched."""
    tf = require_tf()
    shuffle = int(option(data_config, "shuffle_buffer"))
    ds = ds.shuffle(shuffle, seed=int(seed), reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start)
    b, rank, global_b = int(batch_size), int(process_index), int(batch_size) * int(process_count)
    if process_count > 1:  # this process's rows of every global batch, before any decoding
        ds = ds.filter(lambda pos, rec: (pos % global_b) // b == rank)
    fn = train_map(data_config, int(seed), negatives)
    ds = ds.map(fn, num_parallel_calls=_parallel_calls(data_config), deterministic=True).ignore_errors()
    ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(threads))


def make_train_iterator(data_config, tokenizer, batch_size: int, *, seed: int, start_batch: int = 0,
                        start_record: int | None = None, skipped: int = 0, process_index: int = 0,
                        process_count: int = 1, threads=None, hard_negatives: int = 0,
                        replaced: list[int] | None = None, order_state: dict | None = None) -> BatchIterator:  # fmt: skip
    """Infinite iterator of per-process training batches:
    image float32 [B, S, S, 3] (clips, with data.num_frames = T: [B, T, S, S, 3], frames
    sampled by data.frame_sampling), text int32 [B, L], id int64 [B] (+ label int32 [B]),
    or, with data.modalities, the ones it names: image, text (absent from the batch when
    'text' is not named), audio float32 [B, N, C] in [-1, 1] (N = round(data.audio.
    sample_rate * clip_seconds), C = data.audio.channels; a random window of a longer
    clip, zero-padded after a shorter one) with audio_len int32 [B] (the valid samples),
    depth float32 [B, S, S, 1] ((stored value / data.depth.scale - mean) / std, given
    the image's own crop and flip),
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
    Many processes, and random-access sources (`replaced`, `order_state`): module docstring.

    ValueError when no record of the split decodes (a full pass in order finds none).
    """
    source = sources.source_for(data_config)
    split = option(data_config, "train_split")
    K = int(hard_negatives or 0)
    media = _train_media(source, split, K)
    if source.reader(split) is not None:  # random access: the index-based pipeline
        resume = {"skipped": int(skipped), "replaced": replaced, "order_state": order_state}
        return _index_iterator(source, data_config, tokenizer, batch_size, seed, start_batch, resume, K,
                               process_index, process_count, threads)  # fmt: skip
    ds = _train_records(source, split, K, media)
    n_proc, rank = int(process_count), int(process_index)
    start = int(start_batch) * int(batch_size) * n_proc if start_record is None else int(start_record)
    if start < 0:
        raise ValueError(f"start_record={start}: a stream position is >= 0")
    ds = _train_stream(ds, data_config, seed=seed, start=start, batch_size=batch_size, process_index=rank,
                       process_count=n_proc, negatives=K, threads=threads)  # fmt: skip
    finish = collate.train_finisher(data_config, tokenizer, int(option(data_config, "text_len")), K, n_proc)
    to_local, local_start = local_positions(start, batch_size, rank, n_proc)
    missing = source.dropped(split) if start_record is None else 0
    return BatchIterator(ds, finish, start_pos=local_start, batch_index=int(start_batch),
                         skipped=int(skipped) + missing, missing=missing, to_local=to_local, state=True)  # fmt: skip


def _train_media(source, split: str, K: int):
    """data.modalities parsed and checked against the run: hard negatives need text, audio
    and depth the stream pipeline (not random access)."""
    media = modalities.parse(source.config)
    if K and not media.has("text"):
        raise ValueError(f"model.hard_negatives={K} needs 'text' in data.modalities={media.modalities}")
    if media.needs_stream and (source.option("random_access") or source.reader(split) is not None):
        raise ValueError(
            f"data.modalities={media.modalities}: audio and depth need the stream pipeline, and "
            f"{source.describe(split)} is read by random access; set data.random_access=False (shards: not yet)"
        )
    return media


def _index_iterator(source, data_config, tokenizer, batch_size, seed, start_batch, resume, K, rank, n_proc, threads):
    """`index_pipeline.IndexTrainIterator`: positioned by the global batch index alone (the
    stream position of the stream path is not needed); `resume`: skipped, replaced,
    order_state."""
    from mmjax.data.index_pipeline import IndexTrainIterator

    if K:
        raise ValueError(
            f"model.hard_negatives={K} but the index-based pipeline ({source.describe('train')}) reads no hard "
            "negatives; set model.hard_negatives=0 (a TFDS set: or data.random_access=False)"
        )
    return IndexTrainIterator(
        source,
        data_config,
        tokenizer,
        batch_size,
        seed=int(seed),
        start_batch=int(start_batch),
        process_index=int(rank),
        process_count=int(n_proc),
        **resume,
        num_parallel_calls=_parallel_calls(data_config),
        options=_options(threads),
    )


def make_eval_iterator(
    data_config, tokenizer, split: str, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> BatchIterator:
    """One ordered pass over this process's shard of `split`, no augmentation; with
    data.eval_path, of that eval set (`sources.eval_source`).

    Every process yields the same number of batches, ceil(ceil(N / P) / B), each of
    fixed shape B; padding rows have `valid` False. Keys: image [B,S,S,3] f32 (clips:
    [B,T,S,S,3], frames sampled 'uniform'),
    text [B,L] i32, id [B] i64 (-1 on padding), valid [B] bool, caption [B] object str,
    and where present label [B] i32, hard_negatives [B,K,L] i32, hard_negatives_valid
    [B,K] bool (K = 4). With data.modalities: those it names (image only if named) and
    always text; audio [B,N,C] f32 (the centre window) with audio_len [B] i32 (0 on
    padding), depth [B,S,S,1] f32 (resized).
    """
    tf = require_tf()
    source, split = sources.eval_source(data_config, split)  # data.eval_path's set, when given
    L, S = int(option(data_config, "text_len")), int(option(data_config, "image_size"))
    clip = [num_frames(data_config)] if num_frames(data_config) else []
    media = modalities.parse(data_config)
    n_total = source.num_examples(split)
    n_shard = len(range(process_index, n_total, process_count))
    num_batches = math.ceil(math.ceil(n_total / process_count) / batch_size)
    ds = source.records(split)
    modalities.check_records(ds.element_spec, media, num_frames(data_config), source.describe(split))
    ds = ds.shard(process_count, process_index).enumerate()
    ds = ds.map(eval_map(data_config), num_parallel_calls=_parallel_calls(data_config), deterministic=True)
    ds = ds.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options())
    has_label, has_neg = "label" in ds.element_spec, "hard_negatives" in ds.element_spec
    done = [0]

    def finish(b):
        if done[0] >= num_batches:
            raise StopIteration
        done[0] += 1
        shapes = modalities.eval_shapes(media, clip + [S, S, 3], S)
        out = collate.empty_eval_batch(batch_size, None, L, has_label, has_neg, shapes)
        return collate.eval_batch(b, tokenizer, L, out)

    missing = source.dropped(split)
    return BatchIterator(ds, finish, total=n_shard, skipped=missing, missing=missing)
