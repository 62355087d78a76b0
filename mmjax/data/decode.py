"""Decoding inside tf.data: an encoded image (bytes or a path) to uint8 pixels, a clip's
frames (`video_io.sample_indices` in TensorFlow) and the CLIP normalisation; a depth
map (PNG, 8- or 16-bit) to its stored values; an audio clip to float32 [n, C] (a
16-bit PCM WAV at data.audio.sample_rate here, anything else through PyAV:
`audio_io`); the check that a source has something to decode, and the in-memory cache
of decoded pixels, waveforms and depth maps (data.cache_decoded). The functions are
traced inside tf.data maps, so TensorFlow is imported in each.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import audio_io, require_tf, video_io
from mmjax.data.modalities import Media
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


def _head(data, n: int):
    """The first n bytes of a string tensor as uint8 [n] (zero-padded when shorter)."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    return tf.io.decode_raw(tf.strings.substr(tf.strings.join([data, "\0" * n]), 0, n), tf.uint8)


def decode_depth(rec):
    """float32 [H, W, 1]: a depth map's stored values, unscaled: a 16-bit PNG's uint16, an
    8-bit PNG's (or another image format's) uint8; an RGB file is converted to gray."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    if "depth_raw" in rec:  # already decoded (data.cache_decoded)
        return rec["depth_raw"]
    data = tf.io.read_file(rec["depth_path"]) if "depth_path" in rec else rec["depth"]
    head = _head(data, 25)
    png16 = tf.logical_and(tf.reduce_all(head[:8] == tf.constant(list(b"\x89PNG\r\n\x1a\n"), tf.uint8)), head[24] == 16)
    d = tf.cond(
        png16,
        lambda: tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.float32),
        lambda: tf.cast(tf.io.decode_image(data, channels=1, dtype=tf.uint8, expand_animations=False), tf.float32),
    )
    d.set_shape([None, None, 1])
    return d


def normalize_depth(raw, media: Media):
    """(stored value / data.depth.scale - mean) / std."""
    return (raw / media.depth_scale - media.depth_mean) / media.depth_std


def mix_channels(wave, channels: int):
    """TensorFlow twin of `audio_io.mix`: float32 [n, c] -> [n, channels]."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    if channels == 1:
        return tf.reduce_mean(wave, axis=1, keepdims=True)
    return tf.gather(wave, tf.minimum(tf.range(channels), tf.shape(wave)[1] - 1), axis=1)


def _le(head, at: int, n: int):
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    return sum(tf.cast(head[at + i], tf.int64) * (1 << (8 * i)) for i in range(n))


def decode_audio(rec, media: Media):
    """float32 [n, C] in [-1, 1] at media.sample_rate (C = media.channels): a 16-bit PCM WAV
    at that rate by tf.audio.decode_wav, anything else by PyAV (`audio_io`) in a
    tf.numpy_function; channels mixed by the same rule either way."""
    import tensorflow as tf  # traced inside tf.data: no importlib call here

    if "waveform" in rec:  # already decoded (data.cache_decoded)
        return rec["waveform"]
    data = tf.io.read_file(rec["audio_path"]) if "audio_path" in rec else rec["audio"]
    h = _head(data, 36)
    tags = tf.strings.substr(tf.strings.join([data, "\0" * 16]), 0, 16)
    wav = tf.strings.regex_full_match(tags, "RIFF....WAVEfmt ") & (_le(h, 20, 2) == 1) & (_le(h, 34, 2) == 16)
    fast = wav & (_le(h, 24, 4) == media.sample_rate)

    def by_tf():
        return mix_channels(tf.audio.decode_wav(data).audio, media.channels)

    def by_pyav():
        try:  # imported here, once: tf.data's threads importing it at once race
            import av  # noqa: F401
        except ImportError:  # only needed when a clip takes this path; audio_io then says what to install
            pass
        rate, c = media.sample_rate, media.channels
        return tf.numpy_function(lambda b: audio_io.read_audio_bytes(b, rate, c), [data], tf.float32, stateful=False)

    wave = tf.cond(fast, by_tf, by_pyav)
    wave.set_shape([None, media.channels])
    return wave


def decode_all(rec, media: Media, t: int, offsets) -> dict:
    """The modalities of `media` a record gives, decoded: image (uint8, as `decode_media`),
    depth (float32 [H, W, 1], stored values), audio (float32 [n, C])."""
    out = {"image": decode_media(rec, t, offsets)} if media.has("image") else {}
    if media.has("depth"):
        out["depth"] = decode_depth(rec)
    if media.has("audio"):
        out["audio"] = decode_audio(rec, media)
    return out


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
        for error in ("VideoDecodeError:", "AudioDecodeError:"):
            if error in ln:
                return ln.split(error, 1)[-1].strip()[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def _first_error(first, media: Media, t: int) -> tuple[str, str]:
    """(the first record's path, its decoder's error) for the message of check_decodable."""
    tf = require_tf()
    what = next((k for k in ("image_path", "video_path", "audio_path", "depth_path") if k in first), None)
    path = first[what].numpy().decode() if what else ""
    reason = ""
    try:  # the first record's decoder error, for the message
        if what == "video_path":
            video_io.read_frames(path, t or 1)
        elif what == "audio_path" and not media.has("image"):
            audio_io.read_audio(path, media.sample_rate, media.channels)
        else:
            decode_all(first, media, t, tf.fill([t], 0.5))
    except Exception as e:  # noqa: BLE001 (only for the message)
        reason = tf_reason(e)
        reason = reason[len(path) + 2 :] if path and reason.startswith(path + ": ") else reason
    return path, reason


def check_decodable(ds, t: int, source: str, media: Media | None = None) -> None:
    """ValueError naming `source` (a Source.describe) unless some record of `ds` decodes
    (every modality of `media`; default: the image). Records are tried in order until
    one does: a healthy list costs one decode, a hopeless one a full pass, instead of an
    infinite stream that drops every record and never yields a batch."""
    tf = require_tf()
    media = media or Media()

    def probe(r):
        return tf.add_n([tf.size(v) for v in decode_all(r, media, t, tf.fill([t], 0.5)).values()])

    for _ in ds.map(probe).ignore_errors().take(1).as_numpy_iterator():
        return
    n = int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())
    if not n:
        raise ValueError(f"{source}: no records to train on")
    path, reason = _first_error(next(iter(ds.take(1))), media, t)
    where = f"{path}: " if path else ""
    raise ValueError(
        f"{source}: none of its {n} records decodes (first: {where}{reason or 'undecodable'}); no batch can be made"
    )


def cache_decoded(ds, size: int, num_parallel_calls, media: Media | None = None):
    """Decodes every record's media once and keeps them in memory (sources with
    `cache_allowed` only: they are small and hold no corrupt records, so no record is
    dropped before the stream positions are counted): the image (or every frame of a
    clip) resized to `size` as uint8 'pixels', with data.modalities the depth map
    resized to `size` ('depth_raw', float32 stored values) and the waveform at
    data.audio.sample_rate ('waveform', float32 [n, C]: 4 * n * C bytes a record)."""
    tf = require_tf()
    media = media or Media()

    def decode(rec):
        out = {k: v for k, v in rec.items() if k not in ("image", "video", "audio", "depth")}
        if media.has("image"):
            img = decode_frames(rec["video"]) if "video" in rec else decode_image(rec)  # clips: every frame
            img = tf.image.resize(img, [size, size], antialias=True)
            out["pixels"] = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
            out["pixels"].set_shape(([None] if "video" in rec else []) + [size, size, 3])
        if media.has("depth"):
            out["depth_raw"] = tf.image.resize(decode_depth(rec), [size, size], antialias=True)
        if media.has("audio"):
            out["waveform"] = decode_audio(rec, media)
        return out

    return ds.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True).cache()
