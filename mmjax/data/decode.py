"""Decoding inside tf.data: an encoded image (bytes or a path) to uint8 pixels, a clip's
frames (`video_io.sample_indices` in TensorFlow) and the CLIP normalisation; the check
that a source has something to decode, and the in-memory cache of decoded pixels
(data.cache_decoded). The functions are traced inside tf.data maps, so TensorFlow is
imported in each.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import require_tf, video_io
from mmjax.data.schema import option

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(rec):
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    if "pixels" in rec:  # already decoded (data.cache_decoded)
        return rec["pixels"]
    data = tf.io.read_file(rec["image_path"]) if "image_path" in rec else rec["image"]
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def num_frames(data_config) -> int:
    """data.num_frames: 0 for images, T > 0 for clips of T frames."""
    t = int(option(data_config, "num_frames") or 0)
    if t < 0:
        raise ValueError(f"data.num_frames={t}: need 0 (images) or the frames per clip")
    return t


def is_clip(rec) -> bool:
    return any(k in rec for k in ("video", "video_path", "video_file")) or (
        "pixels" in rec and rec["pixels"].shape.rank == 4
    )


def frame_indices(n, t: int, offsets):
    """TensorFlow twin of `video_io.sample_indices`: [T] int32 indices into n frames."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    n_f = tf.cast(n, tf.float32)
    idx = tf.floor((tf.range(t, dtype=tf.float32) + offsets) * n_f / float(t))
    return tf.clip_by_value(tf.cast(idx, tf.int32), 0, tf.maximum(tf.cast(n, tf.int32) - 1, 0))


def decode_frames(encoded):
    """Encoded frames [n] string -> uint8 [n, H, W, 3]."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    return tf.map_fn(
        lambda b: tf.io.decode_image(b, channels=3, expand_animations=False, dtype=tf.uint8),
        encoded,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )


def decode_clip(rec, t: int, offsets):
    """-> uint8 [T, H, W, 3]: frames floor((i + offsets[i]) n / T) of the record's clip
    (decoded here; a user's file through PyAV), or its image repeated T times."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    if "pixels" in rec and rec["pixels"].shape.rank == 4:  # a cached clip
        return tf.gather(rec["pixels"], frame_indices(tf.shape(rec["pixels"])[0], t, offsets))
    if "video" in rec:
        return decode_frames(tf.gather(rec["video"], frame_indices(tf.shape(rec["video"])[0], t, offsets)))
    if "video_path" in rec or "video_file" in rec:  # a file on disk, or a container's bytes (shards)
        read = video_io.read_frames if "video_path" in rec else video_io.read_frames_bytes
        frames = tf.numpy_function(
            lambda v, u: read(v.decode() if "video_path" in rec else v, t, u),
            [rec["video_path"] if "video_path" in rec else rec["video_file"], offsets],
            tf.uint8,
            stateful=False,
        )
        frames.set_shape([t, None, None, 3])
        return frames
    return tf.tile(decode_image(rec)[None], [t, 1, 1, 1])


def decode_media(rec, t: int, offsets):
    """uint8 [H, W, 3] (t = 0) or [T, H, W, 3] (t > 0)."""
    if t:
        return decode_clip(rec, t, offsets)
    if is_clip(rec):
        raise ValueError("this dataset holds videos: set data.num_frames (frames per clip)")
    return decode_image(rec)


def normalize(img):
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    return (img / 255.0 - tf.constant(MEAN)) / tf.constant(STD)


def tf_reason(e) -> str:
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


def check_decodable(ds, t: int, source: str) -> None:
    """ValueError naming `source` (a Source.describe) unless some record of `ds` decodes.
    Records are tried in order until one does: a healthy list costs one decode, a
    hopeless one a full pass, instead of an infinite stream that drops every record and
    never yields a batch."""
    tf = require_tf()
    probe = ds.map(lambda r: tf.shape(decode_media(r, t, tf.fill([t], 0.5)))[0]).ignore_errors().take(1)
    for _ in probe.as_numpy_iterator():
        return
    n = int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())
    if not n:
        raise ValueError(f"{source}: no records to train on")
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
        f"{source}: none of its {n} records decodes (first: {where}{reason or 'undecodable'}); no batch can be made"
    )


def cache_decoded(ds, size: int, num_parallel_calls):
    """Decodes every image (or every frame of a clip) once, resized to `size`, and keeps
    the uint8 pixels in memory as 'pixels' (sources with `cache_allowed` only: they are
    small and hold no corrupt records, so no record is dropped before the stream
    positions are counted)."""
    tf = require_tf()

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

    return ds.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True).cache()
