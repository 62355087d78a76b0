"""A tf.data batch (numpy, after decode and augment) -> the batch contract of
docs/architecture.md: captions and hard negatives tokenized in python (deterministic;
a training batch holds text only with 'text' in data.modalities), eval batches padded
to a fixed shape with a `valid` mask."""

from __future__ import annotations

import numpy as np

from mmjax.data.augment import MAX_NEGATIVES


def _texts(strings) -> list[str]:
    return [c.decode("utf-8") for c in strings.reshape(-1)]


def train_batch(b, tokenizer, text_len: int, negatives: int, modalities=("image", "text")) -> dict:
    """The modalities' arrays (image, audio + audio_len, depth), id, text (only with
    'text' in `modalities`) (+ label; + hard_negatives [B, K, L] and their mask with K > 0)."""
    if b is None:
        raise StopIteration
    out = {k: b[k] for k in ("image", "depth") if k in modalities}
    if "audio" in modalities:
        out["audio"], out["audio_len"] = b["audio"], b["audio_len"].astype(np.int32)
    out["id"] = b["id"].astype(np.int64)
    if "text" in modalities:
        out["text"] = tokenizer.encode(_texts(b["caption"]), text_len)
    if "label" in b:
        out["label"] = b["label"].astype(np.int32)
    if negatives:
        ids = tokenizer.encode(_texts(b["hard_negatives"]), text_len)
        out["hard_negatives"] = ids.reshape(len(b["id"]), negatives, text_len)
        out["hard_negatives_valid"] = b["hard_negatives_valid"].astype(bool)
    return out


def train_finisher(data_config, tokenizer, text_len: int, negatives: int, process_count: int = 1):
    """The batch finisher of a train iterator: `train_batch` (captions), or with
    data.chat.template set a `chat_data.ChatCollator` (conversations; data.chat.buckets
    needs one process)."""
    import functools

    from mmjax.data import chat_data
    from mmjax.data.modalities import DEFAULT, parse

    media = parse(data_config)
    if chat_data.chat_options(data_config) is not None:
        if negatives:
            raise ValueError("data.chat conversations take no hard negatives (model.hard_negatives=0)")
        if set(media.modalities) != set(DEFAULT):
            raise ValueError(
                f"data.chat conversations read images and text; data.modalities={media.modalities} "
                "(set it to ('image', 'text'))"
            )
        return chat_data.ChatCollator(data_config, tokenizer, text_len=text_len, process_count=process_count)
    return functools.partial(
        train_batch, tokenizer=tokenizer, text_len=text_len, negatives=negatives, modalities=media.modalities
    )


def empty_eval_batch(
    batch_size: int, image_shape, text_len: int, has_label: bool, has_neg: bool, media: dict | None = None
) -> dict:
    """Zeros of an eval batch's keys and shapes; every row invalid (id -1). `media`
    ({key: (row shape, dtype)}, `modalities.eval_shapes`) replaces the image entry
    [B, *image_shape] float32 when given (audio, audio_len, depth, image as present)."""
    B, L = batch_size, text_len
    media = {"image": (list(image_shape), "float32")} if media is None else media
    out = {k: np.zeros([B, *shape], dtype) for k, (shape, dtype) in media.items()}
    out.update(
        text=np.zeros([B, L], np.int32),
        id=np.full([B], -1, np.int64),
        valid=np.zeros([B], bool),
        caption=np.array([""] * B, dtype=object),
    )
    if has_label:
        out["label"] = np.zeros([B], np.int32)
    if has_neg:
        out["hard_negatives"] = np.zeros([B, MAX_NEGATIVES, L], np.int32)
        out["hard_negatives_valid"] = np.zeros([B, MAX_NEGATIVES], bool)
    return out


def eval_batch(b, tokenizer, text_len: int, out: dict) -> dict:
    """Fills the first n rows of `out` (an empty_eval_batch) from the n records of `b`."""
    n = 0 if b is None else len(b["id"])
    out["valid"] = np.arange(len(out["valid"])) < n
    if not n:
        return out
    caps = _texts(b["caption"])
    for k in ("image", "audio", "audio_len", "depth"):
        if k in out:
            out[k][:n] = b[k]
    out["text"][:n] = tokenizer.encode(caps, text_len)
    out["id"][:n] = b["id"]
    out["caption"][:n] = caps
    if "label" in out:
        out["label"][:n] = b["label"]
    if "hard_negatives" in out:
        ids = tokenizer.encode(_texts(b["hard_negatives"]), text_len)
        out["hard_negatives"][:n] = ids.reshape(n, MAX_NEGATIVES, text_len)
        out["hard_negatives_valid"][:n] = b["hard_negatives_valid"]
    return out
