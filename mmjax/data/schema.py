"""The data config schema: every key under `data`, declared once with its default.

The keys every pipeline reads are declared here (`COMMON`); each source declares its
own (`Source.keys` in `mmjax.data.sources`: `data.path` for file lists, `data.shapes.*`
for the built-in sets, ...). A recipe may carry the sections of other sources (the
demo recipe holds `data.shapes` and `data.moving_shapes` whatever `data.name` is), so
the valid keys are the union over every registered source (`sources.declared()`).
`option` reads a value or its declared default; `sources.check_data_config` rejects a
key that nothing declares (with `check_section` here).
"""

from __future__ import annotations

COMMON = {
    "name": None,  # the source: a registered name (mmjax.data.sources), else a TFDS catalog dataset
    "train_split": "train",
    "eval_split": "test",
    "eval_path": None,  # the eval set's own shards directory or CSV/JSONL list (sources.eval_source)
    "image_size": 224,  # pixels per side after resizing
    "text_len": 32,  # tokens per text, bos and eos included
    "num_frames": 0,  # 0: images; T > 0: every record becomes a clip of T frames
    "frame_sampling": "random",  # training clips: a random frame per segment, or "uniform" (the centres)
    "shuffle_buffer": 10000,
    "num_parallel_calls": -1,  # tf.data map parallelism; -1: AUTOTUNE
    "prefetch_to_device": 2,  # batches copied to the devices ahead of the step (the train loop)
    "cache_decoded": False,  # keep decoded pixels (and waveforms, depth maps) in memory (sources that allow it)
    # what a TRAINING batch carries, of image, text, audio, depth (mmjax.data.modalities); eval
    # batches carry these plus text. ImageBind: ("image", "audio", "depth"), no text in training
    "modalities": ("image", "text"),
    # audio [B, N, C] float32 in [-1, 1], N = round(sample_rate * clip_seconds), C = channels
    # (resampled and mixed when the file differs); audio_len [B]: the valid samples
    "audio": {"sample_rate": 16000, "clip_seconds": 2.0, "channels": 1},
    # depth [B, S, S, 1] float32 = (stored value / scale - mean) / std (PNG: 8- or 16-bit, one channel)
    "depth": {"scale": 1000.0, "mean": 0.0, "std": 1.0},
    "augment": {"crop_scale": (0.5, 1.0), "aspect": (3 / 4, 4 / 3), "flip": False},
    # path: a sentencepiece .model or an HF tokenizer.json (else one is trained on the captions);
    # lowercase: mmjax's own models lower-case text, an imported LLM's tokenizer keeps case
    "tokenizer": {"path": None, "vocab_size": 8000, "lowercase": True},
    # conversations for LM-connector families (mmjax/data/chat_data.py); template None: caption batches
    "chat": {
        "template": None,
        "task": "vqa",
        "turns": 2,
        "held_out": False,
        "system": None,
        "image_tokens": 0,
        "on_mismatch": "raise",
        "buckets": None,  # train batch lengths (<= text_len): each batch cut to the smallest that fits
    },
}


def cfg_get(cfg, dotted: str, default=None):
    """cfg['a']['b'] for 'a.b' on a ConfigDict or a plain dict; default if absent/None."""
    for part in dotted.split("."):
        if cfg is None:
            return default
        try:
            cfg = cfg[part]
        except (KeyError, AttributeError, TypeError, IndexError):
            return default
    return default if cfg is None else cfg


def default(dotted: str, declared: dict = COMMON):
    """The declared default of data key `dotted` ('augment.flip') in `declared` (COMMON,
    or `sources.declared()` for the union with every source's keys); KeyError if undeclared."""
    value = declared
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"data.{dotted} is not declared in the data schema (mmjax.data.schema, Source.keys)")
        value = value[part]
    return value


def option(data_config, dotted: str, declared: dict = COMMON):
    """data_config's value of `dotted`, or its declared default when absent or None."""
    return cfg_get(data_config, dotted, default(dotted, declared))


def _keys(section) -> list[str]:
    return list(section.keys())


def is_section(value) -> bool:
    import ml_collections

    return isinstance(value, (dict, ml_collections.ConfigDict))


def check_section(section, schema: dict, where: str, error) -> None:
    for key in _keys(section):
        here = f"{where}.{key}"
        if key not in schema:
            raise error(f"unknown config key {here!r}; valid keys under {where!r}: {', '.join(sorted(schema))}")
        value, sub = section[key], schema[key]
        if not isinstance(sub, dict) or value is None:
            continue
        if not is_section(value):
            raise error(f"config key {here!r} is a section with keys {', '.join(sorted(sub))}; got {value!r}")
        check_section(value, sub, here, error)
