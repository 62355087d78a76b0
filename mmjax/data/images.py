"""Images, videos and texts from a user's files, prepared exactly as the eval pipeline
prepares them (decode; for a video the data.num_frames segment-centre frames; resize
with antialiasing to data.image_size, normalise with the dataset mean/std): for
`mmjax embed`, `mmjax caption` and other inference entry points."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def load_images(data_config, paths) -> tuple[np.ndarray, list[str]]:
    """-> (images [N, S, S, 3] float32, the paths that decoded). An unreadable or
    undecodable file is skipped with a warning (the file and the decoder's reason), never
    a crash. No paths: no TensorFlow needed (a text-only `mmjax embed`)."""
    from mmjax.data import decode, require_tf, schema

    size = int(schema.option(data_config, "image_size"))
    if not paths:
        return np.zeros((0, size, size, 3), np.float32), []
    tf = require_tf()
    out, ok = [], []
    for path in paths:
        try:
            img = decode.decode_image({"image_path": tf.constant(str(path))})
            img = tf.image.resize(img, [size, size], antialias=True)
            out.append(decode.normalize(img).numpy().astype(np.float32))
            ok.append(str(path))
        except (tf.errors.OpError, ValueError) as e:
            log.warning("skipping %s: %s", path, decode.tf_reason(e)[:200])
    empty = np.zeros((0, size, size, 3), np.float32)
    return (np.stack(out) if out else empty), ok


def read_texts(path: str) -> list[str]:
    """One text per non-empty line of a UTF-8 file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_videos(data_config, paths) -> tuple[np.ndarray, list[str]]:
    """-> (clips [N, T, S, S, 3] float32 with T = data.num_frames, the paths that
    decoded). An unreadable video is skipped with a warning, never a crash."""
    from mmjax.data import decode, require_tf, schema, video_io

    tf = require_tf()
    size, t = int(schema.option(data_config, "image_size")), decode.num_frames(data_config)
    if not t:
        raise ValueError("this model reads images, not videos (its data.num_frames is 0)")
    out, ok = [], []
    for path in paths:
        try:
            frames = video_io.read_frames(str(path), t)
        except video_io.VideoDecodeError as e:
            log.warning("skipping %s: %s", path, str(e).splitlines()[0][:200])
            continue
        clip = tf.image.resize(tf.constant(frames), [size, size], antialias=True)
        out.append(decode.normalize(clip).numpy().astype(np.float32))
        ok.append(str(path))
    empty = np.zeros((0, t, size, size, 3), np.float32)
    return (np.stack(out) if out else empty), ok
