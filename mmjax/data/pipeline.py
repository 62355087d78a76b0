"""tf.data input pipeline, one per process. TensorFlow is imported lazily, in functions.

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

from mmjax.data import files as files_lib
from mmjax.data import require_tf, require_tfds
from mmjax.data import shapes_gen
from mmjax.data import video_io

log = logging.getLogger(__name__)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_DATA_DIR = "~/.cache/mmjax/tensorflow_datasets"
MAX_NEGATIVES = shapes_gen.MAX_NEGATIVES
LOCAL_DATASETS = ("shapes", "shapes_vqa", "moving_shapes", "emoji")  # generated here, never downloaded


def _get(cfg, dotted: str, default=None):
    """cfg['a']['b'] for 'a.b' on a ConfigDict or a plain dict; default if absent/None."""
    for part in dotted.split("."):
        if cfg is None:
            return default
        try:
            cfg = cfg[part]
        except (KeyError, AttributeError, TypeError, IndexError):
            return default
    return default if cfg is None else cfg


def data_dir(cfg) -> str:
    d = _get(cfg, "data_dir") or os.environ.get("MMJAX_DATA_DIR", DEFAULT_DATA_DIR)
    return os.path.expanduser(str(d))


def _builder(cfg):
    """Prepared TFDS builder for the locally generated datasets (shapes, shapes_vqa,
    emoji). `shapes_vqa` takes its sizes and seed from `data.shapes` too."""
    name = _get(cfg, "name")
    require_tfds()  # the builder modules import it at the top
    if name in ("shapes", "shapes_vqa"):
        from mmjax.data.shapes import MmjaxShapes, MmjaxShapesVqa, make_config
        cls = MmjaxShapes if name == "shapes" else MmjaxShapesVqa
        c = make_config(**{k: _get(cfg, "shapes." + k, d) for k, d in (
            ("image_size", 32), ("num_train", 20000), ("num_validation", 1000),
            ("num_test", 1000), ("seed", 0))})
        known = c.name in cls.builder_configs  # the registered default
        b = cls(config=c.name if known else c, data_dir=data_dir(cfg))
    elif name == "moving_shapes":
        from mmjax.data.moving_shapes import MmjaxMovingShapes, make_config
        c = make_config(**{k: _get(cfg, "moving_shapes." + k, d) for k, d in (
            ("image_size", 32), ("num_frames", 8), ("num_train", None), ("num_validation", 1000),
            ("num_test", 1000), ("seed", 0)) if _get(cfg, "moving_shapes." + k, d) is not None})
        known = c.name in MmjaxMovingShapes.builder_configs
        b = MmjaxMovingShapes(config=c.name if known else c, data_dir=data_dir(cfg))
    elif name == "emoji":
        from mmjax.data.emoji_ds import MmjaxEmoji
        b = MmjaxEmoji(data_dir=data_dir(cfg))
    else:
        raise ValueError(f"not a local dataset: {name!r}; valid choices: {', '.join(LOCAL_DATASETS)}")
    if not b.is_prepared():
        log.info("generating %s into %s", name, data_dir(cfg))
        b.download_and_prepare()
    return b


def _catalog_builder(cfg):
    tfds = require_tfds()
    name, dd = _get(cfg, "name"), data_dir(cfg)
    try:
        b = tfds.builder(name, data_dir=dd)
        ok = b.is_prepared()
    except Exception as e:  # unknown name, bad config, ...
        if type(e).__name__ == "DatasetNotFoundError":  # its message lists the whole catalog
            raise FileNotFoundError(_not_in_catalog(str(name), tfds)) from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise FileNotFoundError(f"dataset {name!r} not available in data_dir={dd}: {reason}") from None
    if not ok:
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in data_dir={dd} (mmjax does not download "
            f"catalog datasets; prepare it with tfds first or set data.data_dir)")
    return b


def _not_in_catalog(name: str, tfds) -> str:
    """One line for a name that is neither built in nor in the TFDS catalog, with the
    closest names (difflib) instead of tfds's list of every dataset."""
    import difflib
    base = name.split(":")[0].split("/")[0]
    try:
        known = list(tfds.list_builders(with_community_datasets=False))
    except TypeError:  # older tfds
        known = list(tfds.list_builders())
    except Exception:
        known = []
    close = difflib.get_close_matches(base, known + list(LOCAL_DATASETS) + ["files"], n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        f"; built-in datasets: {', '.join(LOCAL_DATASETS)}, or 'files' for your own list"
    return f"dataset {base!r} not found in the TFDS catalog{hint}"


def _files_rows(cfg, split):
    path = _get(cfg, "path")
    if not path:
        raise ValueError("data.name='files' needs data.path (a CSV or JSONL list)")
    frac = files_lib.check_eval_fraction(_get(cfg, "eval_fraction", 0.0))
    rows, missing = files_lib.read_list(path, text_len=int(_get(cfg, "text_len", 32)))
    names = files_lib.label_names(rows)
    return files_lib.split_rows(rows, split, frac), missing, names


def load_records(data_config, split: str):
    """tf.data.Dataset of undecoded records of `split` (see module docstring)."""
    tf = require_tf()
    tfds = require_tfds()
    name = _get(data_config, "name")
    if name == "files":
        rows, _, names = _files_rows(data_config, split)
        key = files_lib.path_key(rows)
        cols = {key: [r[key] for r in rows],
                "caption": [r["caption"] for r in rows],
                "id": np.array([r["id"] for r in rows], np.int64)}
        if names:
            idx = {n: i for i, n in enumerate(names)}
            cols["label"] = np.array([idx.get(r.get("label"), -1) for r in rows], np.int64)
        if not rows:
            cols[key] = cols["caption"] = np.zeros([0], object).astype(str)
        return tf.data.Dataset.from_tensor_slices(cols)
    b = _builder(data_config) if name in LOCAL_DATASETS else _catalog_builder(data_config)
    feats = b.info.features
    media = "video" if "video" in feats else "image"
    ds = b.as_dataset(split=split, shuffle_files=False,
                      decoders={media: tfds.decode.SkipDecoding()})
    label_names_ = _label_names_of(feats)

    def select(r):
        out = {media: r[media]}
        if "caption" in feats:
            out["caption"] = r["caption"]
        elif "question" in feats:  # VQA: the question is the text, the answer the label
            out["caption"] = r["question"]
        elif "text" in feats:
            out["caption"] = r["text"]
        elif "captions" in feats:  # e.g. coco_captions: first caption
            out["caption"] = r["captions"]["text"][0]
        elif label_names_:
            out["caption"] = tf.strings.join(
                ["a photo of a ", tf.gather(tf.constant(label_names_), r["label"])])
        else:
            out["caption"] = tf.constant("")
        if "label" in feats:
            out["label"] = tf.cast(r["label"], tf.int64)
        if "hard_negatives" in feats:
            out["hard_negatives"] = r["hard_negatives"]
        return out

    if "id" in feats:
        return ds.map(lambda r: dict(select(r), id=tf.cast(r["id"], tf.int64)))
    return ds.map(select).enumerate().map(lambda i, r: dict(r, id=i))


def _label_names_of(feats):
    tfds = require_tfds()
    f = feats["label"] if "label" in feats else None
    return list(f.names) if isinstance(f, tfds.features.ClassLabel) else None


def label_names(data_config) -> list[str] | None:
    """Class names for zero-shot prompts (label index = position), or None."""
    name = _get(data_config, "name")
    if name == "shapes":
        return list(shapes_gen.CLASS_NAMES)
    if name == "shapes_vqa":
        return list(shapes_gen.ANSWERS)
    if name in ("emoji", "moving_shapes"):
        return None
    if name == "files":
        return _files_rows(data_config, "all")[2]
    return _label_names_of(_catalog_builder(data_config).info.features)


def answer_types(data_config) -> list[str] | None:
    """The type of each label (VQA answer types: colour, shape, size, yes/no), or None."""
    return list(shapes_gen.ANSWER_TYPES) if _get(data_config, "name") == "shapes_vqa" else None


def num_examples(data_config, split: str) -> int:
    name = _get(data_config, "name")
    if name == "files":
        return len(_files_rows(data_config, split)[0])
    b = _builder(data_config) if name in LOCAL_DATASETS else _catalog_builder(data_config)
    return int(b.info.splits[split].num_examples)


def captions(data_config, split: str) -> list[str]:
    """All captions of `split` (for tokenizer training)."""
    if _get(data_config, "name") == "files":
        return [r["caption"] for r in _files_rows(data_config, split)[0]]
    ds = load_records(data_config, split).map(lambda r: r["caption"])
    return [c.decode("utf-8") for c in ds.as_numpy_iterator()]


# ----------------------------------------------------------------------------- decode

def _decode(rec):
    import tensorflow as tf  # traced inside tf.data: no importlib call here
    if "pixels" in rec:  # already decoded (data.cache_decoded)
        return rec["pixels"]
    data = tf.io.read_file(rec["image_path"]) if "image_path" in rec else rec["image"]
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def num_frames(data_config) -> int:
    """data.num_frames: 0 for images, T > 0 for clips of T frames."""
    t = int(_get(data_config, "num_frames", 0) or 0)
    if t < 0:
        raise ValueError(f"data.num_frames={t}: need 0 (images) or the frames per clip")
    return t


def _is_clip(rec) -> bool:
    return "video" in rec or "video_path" in rec or ("pixels" in rec and rec["pixels"].shape.rank == 4)


def _frame_indices(n, t: int, offsets):
    """TensorFlow twin of `video_io.sample_indices`: [T] int32 indices into n frames."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here
    n_f = tf.cast(n, tf.float32)
    idx = tf.floor((tf.range(t, dtype=tf.float32) + offsets) * n_f / float(t))
    return tf.clip_by_value(tf.cast(idx, tf.int32), 0, tf.maximum(tf.cast(n, tf.int32) - 1, 0))


def _decode_frames(encoded):
    """Encoded frames [n] string -> uint8 [n, H, W, 3]."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here
    return tf.map_fn(lambda b: tf.io.decode_image(b, channels=3, expand_animations=False, dtype=tf.uint8),
                     encoded, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def _decode_clip(rec, t: int, offsets):
    """-> uint8 [T, H, W, 3]: frames floor((i + offsets[i]) n / T) of the record's clip
    (decoded here; a user's file through PyAV), or its image repeated T times."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here
    if "pixels" in rec and rec["pixels"].shape.rank == 4:  # a cached clip
        return tf.gather(rec["pixels"], _frame_indices(tf.shape(rec["pixels"])[0], t, offsets))
    if "video" in rec:
        return _decode_frames(tf.gather(rec["video"], _frame_indices(tf.shape(rec["video"])[0], t, offsets)))
    if "video_path" in rec:
        frames = tf.numpy_function(lambda path, u: video_io.read_frames(path.decode(), t, u),
                                   [rec["video_path"], offsets], tf.uint8, stateful=False)
        frames.set_shape([t, None, None, 3])
        return frames
    return tf.tile(_decode(rec)[None], [t, 1, 1, 1])


def _decode_media(rec, t: int, offsets):
    """uint8 [H, W, 3] (t = 0) or [T, H, W, 3] (t > 0)."""
    if t:
        return _decode_clip(rec, t, offsets)
    if _is_clip(rec):
        raise ValueError("this dataset holds videos: set data.num_frames (frames per clip)")
    return _decode(rec)


def _normalize(img):
    import tensorflow as tf  # traced inside tf.data: no importlib call here
    return (img / 255.0 - tf.constant(MEAN)) / tf.constant(STD)


def _pick_negatives(hn, k: int, seed):
    """k of a record's hard-negative captions, from a random start, cycling when it
    has fewer than k (so every image gets exactly k): [n] str -> ([k] str, [k] bool).
    The mask is True for the first min(n, k) picks, which are distinct; False marks a
    repeat of an earlier pick (n < k) or, for a record with none, an empty padding text."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here
    n = tf.shape(hn)[0]
    start = tf.random.stateless_uniform([], seed=seed, maxval=tf.maximum(n, 1), dtype=tf.int32)
    idx = tf.where(n > 0, (start + tf.range(k)) % tf.maximum(n, 1), n)  # n: the padding text
    return tf.gather(tf.concat([hn, [""]], 0), idx), tf.range(k) < n


def _train_map(data_config, seed, hard_negatives: int = 0):
    tf = require_tf()
    size = int(_get(data_config, "image_size", 224))
    scale = tuple(float(x) for x in _get(data_config, "augment.crop_scale", (0.5, 1.0)))
    ratio = tuple(float(x) for x in _get(data_config, "augment.aspect", (3 / 4, 4 / 3)))
    flip = bool(_get(data_config, "augment.flip", False))
    t = num_frames(data_config)
    sampling = video_io.check_sampling(_get(data_config, "frame_sampling", "random"))

    crop_is_identity = scale == (1.0, 1.0) and ratio == (1.0, 1.0)

    def fn(pos, rec):
        base = tf.stack([tf.constant(seed, tf.int64), pos])
        s = tf.random.experimental.stateless_split(base, 3)
        if t and sampling == "random":  # TSN: a random frame of each of T segments
            offsets = tf.random.stateless_uniform([t], seed=tf.random.experimental.stateless_fold_in(base, 1))
        else:
            offsets = tf.fill([t], 0.5)
        img = _decode_media(rec, t, offsets)  # [H, W, 3] or a clip [T, H, W, 3]: one crop and flip for all
        hw = img.shape[-3:-1]
        if crop_is_identity and hw == (size, size):
            img = tf.cast(img, tf.float32)  # nothing to crop or resize
        else:
            begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(img)[-3:], bounding_boxes=tf.zeros([1, 0, 4]), seed=s[0],
                min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
                max_attempts=10, use_image_if_no_bounding_boxes=True)
            if t:
                img = tf.slice(img, tf.concat([[0], begin], 0), tf.concat([[-1], crop], 0))
            else:
                img = tf.slice(img, begin, crop)
            img = tf.image.resize(img, [size, size], antialias=True)
        if flip and t:  # one coin for the whole clip
            coin = tf.random.stateless_uniform([], seed=s[1]) < 0.5
            img = tf.cond(coin, lambda: tf.reverse(img, [-2]), lambda: img)
        elif flip:
            img = tf.image.stateless_random_flip_left_right(img, s[1])
        out = {"image": _normalize(img), "caption": rec["caption"], "id": rec["id"],
               "pos": pos}
        if "label" in rec:
            out["label"] = tf.cast(rec["label"], tf.int32)
        if hard_negatives:
            out["hard_negatives"], out["hard_negatives_valid"] = _pick_negatives(
                rec["hard_negatives"], hard_negatives, s[2])
        return out
    return fn


def _eval_map(data_config):
    tf = require_tf()
    size = int(_get(data_config, "image_size", 224))
    t = num_frames(data_config)

    def fn(pos, rec):
        img = tf.image.resize(_decode_media(rec, t, tf.fill([t], 0.5)), [size, size], antialias=True)
        out = {"image": _normalize(img), "caption": rec["caption"], "id": rec["id"],
               "pos": pos}
        if "label" in rec:
            out["label"] = tf.cast(rec["label"], tf.int32)
        if "hard_negatives" in rec:
            hn = rec["hard_negatives"][:MAX_NEGATIVES]
            n = tf.shape(hn)[0]
            out["hard_negatives"] = tf.concat([hn, tf.fill([MAX_NEGATIVES - n], "")], 0)
            out["hard_negatives_valid"] = tf.range(MAX_NEGATIVES) < n
        return out
    return fn


def _options(data_config, threads=None):
    tf = require_tf()
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
        opts.threading.private_threadpool_size = int(threads)
    return opts


def _npc(data_config):
    tf = require_tf()
    n = int(_get(data_config, "num_parallel_calls", -1))
    return tf.data.AUTOTUNE if n < 0 else n


def _initial_skips(data_config, split) -> int:
    if _get(data_config, "name") == "files":
        return len(_files_rows(data_config, split)[1])
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

    def __init__(self, ds, finish, *, start_pos=0, skipped=0, total=None, batch_index=0, to_local=None,
                 state=False, missing=0):
        self._it = ds.as_numpy_iterator()
        _LIVE_ITERATORS.add(self)
        self._to_local = to_local  # stream position -> index among this process's records
        self._finish = finish
        self._expect = start_pos  # next (local) stream position expected from tf.data
        self._total = total       # stream length (eval) to count trailing drops
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


def _tf_reason(e) -> str:
    """A TensorFlow error's reason in one line, without op names ({{function_node ...}},
    [Op:...]) and without the stack of a py_func."""
    import re
    msg = str(getattr(e, "message", None) or e)
    msg = re.sub(r"\{\{[^}]*\}\}\s*", "", msg)
    msg = re.sub(r"\s*\[Op:[^\]]*\]( name:\s*\S*)?", "", msg)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for ln in reversed(lines):  # a python decoder's error (PyAV) is the last line of a py_func trace
        if "VideoDecodeError" in ln:
            return ln.split("VideoDecodeError:", 1)[-1].strip()[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def _source_name(data_config, split) -> str:
    name = _get(data_config, "name")
    if name == "files":
        return f"data.path={os.path.expanduser(str(_get(data_config, 'path')))} (split {split!r})"
    return f"dataset {name!r} (split {split!r})"


def _check_decodable(data_config, ds, split) -> None:
    """ValueError naming the source unless some record of `ds` decodes. Records are tried
    in order until one does: a healthy list costs one decode, a hopeless one a full pass,
    instead of an infinite stream that drops every record and never yields a batch."""
    tf = require_tf()
    t = num_frames(data_config)
    probe = ds.map(lambda r: tf.shape(_decode_media(r, t, tf.fill([t], 0.5)))[0]).ignore_errors().take(1)
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
            _decode_media(first, t, tf.fill([t], 0.5))
    except Exception as e:  # noqa: BLE001 (only for the message)
        reason = _tf_reason(e)
        reason = reason[len(path) + 2:] if path and reason.startswith(path + ": ") else reason
    where = f"{path}: " if path else ""
    raise ValueError(f"{src}: none of its {n} records decodes (first: {where}{reason or 'undecodable'}); "
                     "no batch can be made")


def _cache_decoded(data_config, ds):
    """Decodes every image once, resized to data.image_size, and keeps the uint8
    pixels in memory (built-in datasets only: they are small and hold no corrupt
    records, so no record is dropped before the stream positions are counted)."""
    tf = require_tf()
    size = int(_get(data_config, "image_size", 224))

    def decode(rec):
        if "video" in rec:  # every frame: the sampling happens after the cache
            img = _decode_frames(rec["video"])
        else:
            img = _decode(rec)
        img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, [size, size], antialias=True)), 0, 255),
                      tf.uint8)
        img.set_shape(([None] if "video" in rec else []) + [size, size, 3])
        out = {k: v for k, v in rec.items() if k not in ("image", "video")}
        out["pixels"] = img
        return out

    return ds.map(decode, num_parallel_calls=_npc(data_config), deterministic=True).cache()


def make_train_iterator(data_config, tokenizer, batch_size: int, *, seed: int,
                        start_batch: int = 0, start_record: int | None = None, skipped: int = 0,
                        process_index: int = 0, process_count: int = 1, threads=None,
                        hard_negatives: int = 0) -> BatchIterator:
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
    split = _get(data_config, "train_split", "train")
    L = int(_get(data_config, "text_len", 32))
    cache = bool(_get(data_config, "cache_decoded", False))
    if cache and _get(data_config, "name") not in LOCAL_DATASETS:
        raise ValueError(f"data.cache_decoded=True is for the built-in datasets {LOCAL_DATASETS}, not "
                         f"{_get(data_config, 'name')!r}: a large or partly corrupt dataset must stream")
    ds = load_records(data_config, split)
    K = int(hard_negatives or 0)
    if K and "hard_negatives" not in ds.element_spec:
        raise ValueError(f"model.hard_negatives={K} but dataset {_get(data_config, 'name')!r} has no "
                         "hard_negatives feature (built-in: shapes); set model.hard_negatives=0")
    if cache:
        ds = _cache_decoded(data_config, ds)
    else:
        _check_decodable(data_config, ds, split)
    ds = ds.shuffle(int(_get(data_config, "shuffle_buffer", 10000)), seed=int(seed),
                    reshuffle_each_iteration=True).repeat()
    b, n_proc, rank = int(batch_size), int(process_count), int(process_index)
    global_b = b * n_proc
    start = int(start_batch) * global_b if start_record is None else int(start_record)
    if start < 0:
        raise ValueError(f"start_record={start}: a stream position is >= 0")
    ds = ds.enumerate().skip(start)
    if n_proc > 1:  # this process's rows of every global batch, before any decoding
        ds = ds.filter(lambda pos, rec: (pos % global_b) // b == rank)
    ds = ds.map(_train_map(data_config, int(seed), K), num_parallel_calls=_npc(data_config),
                deterministic=True).ignore_errors()
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(_options(data_config, threads))

    def finish(b):
        if b is None:
            raise StopIteration
        out = {"image": b["image"], "id": b["id"].astype(np.int64),
               "text": tokenizer.encode([c.decode("utf-8") for c in b["caption"]], L)}
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
    return BatchIterator(ds, finish, start_pos=local_start, batch_index=int(start_batch),
                         skipped=int(skipped) + missing, missing=missing, to_local=to_local, state=True)


def make_eval_iterator(data_config, tokenizer, split: str, batch_size: int, *,
                       process_index: int = 0, process_count: int = 1) -> BatchIterator:
    """One ordered pass over this process's shard of `split`, no augmentation.

    Every process yields the same number of batches, ceil(ceil(N / P) / B), each of
    fixed shape B; padding rows have `valid` False. Keys: image [B,S,S,3] f32 (clips:
    [B,T,S,S,3], frames sampled 'uniform'),
    text [B,L] i32, id [B] i64 (-1 on padding), valid [B] bool, caption [B] object str,
    and where present label [B] i32, hard_negatives [B,K,L] i32, hard_negatives_valid
    [B,K] bool (K = 4).
    """
    tf = require_tf()
    L = int(_get(data_config, "text_len", 32))
    S = int(_get(data_config, "image_size", 224))
    clip = [num_frames(data_config)] if num_frames(data_config) else []
    n_total = num_examples(data_config, split)
    n_shard = len(range(process_index, n_total, process_count))
    num_batches = math.ceil(math.ceil(n_total / process_count) / batch_size)
    ds = load_records(data_config, split).shard(process_count, process_index).enumerate()
    ds = ds.map(_eval_map(data_config), num_parallel_calls=_npc(data_config),
                deterministic=True).ignore_errors()
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(
        _options(data_config))
    has_label = "label" in ds.element_spec
    has_neg = "hard_negatives" in ds.element_spec
    state = {"done": 0}
    B = batch_size

    def finish(b):
        if state["done"] >= num_batches:
            raise StopIteration
        state["done"] += 1
        n = 0 if b is None else len(b["id"])
        out = {"image": np.zeros([B] + clip + [S, S, 3], np.float32),
               "text": np.zeros([B, L], np.int32),
               "id": np.full([B], -1, np.int64),
               "valid": np.arange(B) < n,
               "caption": np.array([""] * B, dtype=object)}
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
                out["hard_negatives"][:n] = tokenizer.encode(negs, L).reshape(
                    n, MAX_NEGATIVES, L)
                out["hard_negatives_valid"][:n] = b["hard_negatives_valid"]
        return out

    missing = _initial_skips(data_config, split)
    return BatchIterator(ds, finish, total=n_shard, skipped=missing, missing=missing)


def pipeline_throughput(data_config, batch_size: int, num_batches: int, threads=None,
                        tokenizer=None) -> dict:
    """Images/s of the training iterator alone (after one warm-up batch), with tf.data's
    private threadpool limited to `threads` when given."""
    from mmjax.data.tokenizer import Tokenizer, train_tokenizer
    if tokenizer is None:
        with tempfile.TemporaryDirectory() as d:
            split = _get(data_config, "train_split", "train")
            tokenizer = Tokenizer(train_tokenizer(
                captions(data_config, split), d,
                int(_get(data_config, "tokenizer.vocab_size", 8000))))
    it = make_train_iterator(data_config, tokenizer, batch_size, seed=0, threads=threads)
    next(it)
    t = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    dt = time.perf_counter() - t
    return {"images_per_s": num_batches * batch_size / dt, "threads": threads,
            "batch_size": batch_size, "num_batches": num_batches, "seconds": dt}
