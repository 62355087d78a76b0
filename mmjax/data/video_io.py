"""Video files: frame sampling and decoding with PyAV (no TensorFlow here).

Frame sampling splits a clip of n frames into T equal segments and takes one frame
from each (TSN): 'uniform' takes each segment's centre (deterministic, for eval),
'random' a random frame of each segment (training). A clip shorter than T repeats
frames. The same rule is written in TensorFlow ops in `pipeline` for the built-in
datasets; `sample_indices` is the reference both follow.
"""

from __future__ import annotations

import numpy as np

SAMPLINGS = ("uniform", "random")


class VideoDecodeError(ValueError):
    """A video file that cannot be opened or has no decodable video frame."""


def check_sampling(sampling: str) -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"data.frame_sampling={sampling!r}; valid choices: {', '.join(SAMPLINGS)}")
    return sampling


def sample_indices(n: int, num_frames: int, offsets=None) -> np.ndarray:
    """Frame indices [T] int64 of a clip of `n` frames: frame floor((i + u_i) n / T) of
    segment i, u_i = offsets[i] in [0, 1) (None: 0.5, the segment centres)."""
    if n < 1:
        raise VideoDecodeError("the clip has no frames")
    t = int(num_frames)
    u = np.full([t], 0.5) if offsets is None else np.asarray(offsets, np.float64)
    idx = np.floor((np.arange(t) + u) * n / t).astype(np.int64)
    return np.clip(idx, 0, n - 1)


def read_frames_bytes(data: bytes, num_frames: int, offsets=None) -> np.ndarray:
    """`read_frames` of a video container held in memory (a shard's record)."""
    import io

    return read_frames(io.BytesIO(bytes(data)), num_frames, offsets, name="a video record")


def read_frames(path, num_frames: int, offsets=None, name: str | None = None) -> np.ndarray:
    """The sampled frames of a video file (a path, or a file object with `name` for the
    messages): uint8 [T, H, W, 3] RGB (see `sample_indices`).

    Raises VideoDecodeError (with the path and the decoder's reason) for a file that is
    missing, not a video, or corrupt.
    """
    from mmjax.data import require

    av = require("av", "PyAV")  # FFmpeg's decoders, in the `data` extra
    name = str(path) if name is None else name
    try:
        with av.open(path if hasattr(path, "read") else str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name}: no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from e
    if not frames:
        raise VideoDecodeError(f"{name}: no decodable video frame")
    return np.stack([frames[i] for i in sample_indices(len(frames), num_frames, offsets)])


def write_video(path: str, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4") -> str:
    """uint8 [T, H, W, 3] RGB -> a video file (for tests and examples). H and W must be
    even for yuv420p codecs; 'mpeg4' at the highest quality keeps flat colours close."""
    import av

    frames = np.asarray(frames, np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
