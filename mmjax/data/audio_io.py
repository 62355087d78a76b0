"""Audio files: decoding with PyAV (FFmpeg: WAV, FLAC, MP3, OGG, ... anything it reads),
resampling and channel mixing, in numpy (no TensorFlow here).

A clip becomes float32 [n, C] in [-1, 1] at data.audio.sample_rate with C =
data.audio.channels: decoded, resampled by FFmpeg's resampler (libswresample) channel
by channel, then mixed by `mix` (to mono: the mean of the channels; from mono: the
channel repeated; otherwise the first C channels, the last one repeated where the
file has fewer). The pipeline decodes a 16-bit PCM WAV already at the right rate in
TensorFlow (`decode.decode_audio`, the same mixing) and everything else here, inside
a `tf.numpy_function`.
"""

from __future__ import annotations

import io

import numpy as np


class AudioDecodeError(ValueError):
    """An audio file that cannot be opened, has no audio stream or no samples."""


def mix(wave: np.ndarray, channels: int) -> np.ndarray:
    """float [n, c] -> float32 [n, channels] (module docstring)."""
    wave = np.asarray(wave, np.float32)
    c = wave.shape[1]
    if c == channels:
        return wave
    if channels == 1:
        return wave.mean(1, keepdims=True, dtype=np.float32)
    return wave[:, np.minimum(np.arange(channels), c - 1)]


def _decode(container, sample_rate: int, name: str) -> np.ndarray:
    """The first audio stream of an open container -> float32 [n, c] at sample_rate."""
    import av

    if not container.streams.audio:
        raise AudioDecodeError(f"{name}: no audio stream")
    resampler = av.AudioResampler(format="fltp", rate=int(sample_rate))  # layout kept: mixed by `mix`
    chunks = []
    for frame in container.decode(audio=0):
        chunks += [f.to_ndarray() for f in resampler.resample(frame)]
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
    chunks = [c for c in chunks if c.size]
    if not chunks:
        raise AudioDecodeError(f"{name}: no decodable audio samples")
    return np.concatenate(chunks, axis=1).T


def read_audio(path, sample_rate: int, channels: int, name: str | None = None) -> np.ndarray:
    """An audio file (a path, or a file object with `name` for the messages) -> float32
    [n, channels] in [-1, 1] at `sample_rate` (module docstring). AudioDecodeError, with
    the file and the decoder's reason, for a file that is missing, not audio, or corrupt."""
    from mmjax.data import require

    av = require("av", "PyAV")  # FFmpeg's decoders, in the `data` extra
    name = str(path) if name is None else name
    try:
        with av.open(path if hasattr(path, "read") else str(path)) as container:
            wave = _decode(container, sample_rate, name)
    except AudioDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise AudioDecodeError(f"{name}: cannot decode audio ({type(e).__name__}: {e})") from e
    return np.clip(mix(wave, int(channels)), -1.0, 1.0)


def read_audio_bytes(data: bytes, sample_rate: int, channels: int) -> np.ndarray:
    """`read_audio` of a file held in memory (a record's 'audio', or a listed file's bytes)."""
    return read_audio(io.BytesIO(bytes(data)), sample_rate, channels, name="an audio record")


def write_audio(path: str, wave, sample_rate: int, codec: str = "flac") -> str:
    """int16 [n, c] -> an audio file through PyAV (for tests and examples): 'flac',
    'pcm_s16le' (a WAV), or another encoder FFmpeg has."""
    import av

    w = np.ascontiguousarray(np.asarray(wave, np.int16).reshape(len(wave), -1))
    layout = {1: "mono", 2: "stereo"}[w.shape[1]]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(sample_rate), layout=layout)
        frame = av.AudioFrame.from_ndarray(w.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = int(sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)
