"""data.modalities: what a batch carries, and the audio and depth options (no TensorFlow).

A training batch carries the modalities in data.modalities (image, text, audio, depth;
default image and text), plus id (and label); an eval batch carries them plus text
(and caption, valid, id, label). ImageBind-style training, `("image", "audio",
"depth")`, never tokenizes a caption into a training batch. `Media` holds the parsed
options; `check_records` tells a dataset that lacks a requested modality at once.
"""

from __future__ import annotations

import dataclasses

from mmjax.data.schema import option

MODALITIES = ("image", "text", "audio", "depth")
DEFAULT = ("image", "text")
# the record keys that carry each modality (encoded, a path, or decoded by data.cache_decoded)
RECORD_KEYS = {
    "image": ("image", "image_path", "video", "video_path", "video_file", "pixels"),
    "audio": ("audio", "audio_path", "waveform"),
    "depth": ("depth", "depth_path", "depth_raw"),
}
HINTS = {
    "image": "a file list: an image_path column",
    "audio": "built-in: shapes_av; a file list: an audio_path column",
    "depth": "built-in: shapes_av; a file list: a depth_path column",
}


@dataclasses.dataclass(frozen=True)
class Media:
    """The parsed data.modalities, data.audio.* and data.depth.* of a config."""

    modalities: tuple[str, ...] = DEFAULT
    sample_rate: int = 16000
    channels: int = 1
    clip_samples: int = 32000  # N = round(sample_rate * clip_seconds)
    depth_scale: float = 1000.0
    depth_mean: float = 0.0
    depth_std: float = 1.0

    def has(self, modality: str) -> bool:
        return modality in self.modalities

    @property
    def needs_stream(self) -> bool:
        """Audio and depth are read by the stream pipeline only (not the index-based one)."""
        return self.has("audio") or self.has("depth")


def _names(value) -> tuple[str, ...]:
    if isinstance(value, str):  # "image,audio" from a command line
        value = [v for v in value.replace("(", "").replace(")", "").split(",")]
    names = tuple(str(v).strip().strip("'\"") for v in value)
    return tuple(dict.fromkeys(n for n in names if n))


def parse(data_config) -> Media:
    """data.modalities, data.audio.*, data.depth.* -> Media; ValueError naming a bad value."""
    names = _names(option(data_config, "modalities"))
    bad = [n for n in names if n not in MODALITIES]
    if bad or not names:
        what = f"{bad[0]!r} is not a modality" if bad else "no modality given"
        raise ValueError(f"data.modalities: {what}; valid: {', '.join(MODALITIES)}")
    if names == ("text",):
        raise ValueError("data.modalities=('text',): a batch needs a modality besides text (image, audio, depth)")
    rate, seconds = option(data_config, "audio.sample_rate"), option(data_config, "audio.clip_seconds")
    channels = option(data_config, "audio.channels")
    if int(rate) <= 0 or float(seconds) <= 0 or int(channels) <= 0:
        raise ValueError(
            f"data.audio: sample_rate={rate}, clip_seconds={seconds}, channels={channels}; each must be > 0"
        )
    std, scale = float(option(data_config, "depth.std")), float(option(data_config, "depth.scale"))
    if std == 0 or scale == 0:
        raise ValueError(f"data.depth: scale={scale}, std={std}; neither may be 0")
    return Media(
        modalities=names,
        sample_rate=int(rate),
        channels=int(channels),
        clip_samples=int(round(int(rate) * float(seconds))),
        depth_scale=scale,
        depth_mean=float(option(data_config, "depth.mean")),
        depth_std=std,
    )


def check_records(keys, media: Media, num_frames: int, describe: str) -> None:
    """ValueError (one line, naming the dataset) when the records (their `keys`: a
    tf.data element_spec) lack a modality of `media`, or audio / depth meet clips."""
    keys = set(keys)
    if num_frames and media.needs_stream:
        raise ValueError("data.modalities with audio or depth reads images (data.num_frames=0), not clips")
    for m in ("image", "audio", "depth"):
        if media.has(m) and not keys.intersection(RECORD_KEYS[m]):
            raise ValueError(
                f"data.modalities includes {m!r} but {describe} has no {m} (its records carry: "
                f"{', '.join(sorted(keys))}); {HINTS[m]}; or leave {m!r} out of data.modalities"
            )


def eval_shapes(media: Media, image_shape, size: int) -> dict:
    """{key: (shape, dtype name)} of an eval batch's media arrays (per row)."""
    out = {"image": (list(image_shape), "float32")} if media.has("image") else {}
    if media.has("audio"):
        out["audio"] = ([media.clip_samples, media.channels], "float32")
        out["audio_len"] = ([], "int32")
    if media.has("depth"):
        out["depth"] = ([size, size, 1], "float32")
    return out


AUDIO_DERIVED_FROM = {
    "audio_sample_rate": "data.audio.sample_rate",
    "audio_samples": "data.audio.sample_rate * data.audio.clip_seconds",
    "audio_channels": "data.audio.channels",
}


def audio_model_keys(data_config) -> dict:
    """The model keys a family with an audio input derives from data.audio: the sample
    rate, the samples per clip (rate x clip_seconds, rounded) and the channels."""
    rate = int(option(data_config, "audio.sample_rate"))
    return {
        "audio_sample_rate": rate,
        "audio_samples": int(round(rate * float(option(data_config, "audio.clip_seconds")))),
        "audio_channels": int(option(data_config, "audio.channels")),
    }
