"""The units of a conversion (`mmjax.data.convert`) and their samples: one tar, or a
slice of a CSV/JSONL list or of a TFDS split, read as {key, caption, media bytes, ...}
dicts, and the check every sample passes (its verdict: ok, or the first skip reason)."""

from __future__ import annotations

import io
import json
import os
import warnings

from mmjax.data import tars

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tar member exts, in order of preference
VIDEO_EXTS = ("mp4",)
PIL_MEDIA = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}  # what TF decodes


def _units_tars(src: str) -> list[dict]:
    paths = tars.expand_shards(src)
    return [{"kind": "tar", "name": os.path.basename(p), "path": os.path.abspath(p)} for p in paths]


def _units_list(src: str, per: int, known: list | None) -> tuple[list[dict], list, int]:
    """Rows [a, a + per) per unit; labels index `known` (the label names already in DIR)
    extended by this list's other names, sorted."""
    from mmjax.data import files

    rows, missing = files.read_list(src)
    names = files.label_names(rows)
    if names is not None and known:
        names = list(known) + [n for n in names if n not in known]
    index = {n: i for i, n in enumerate(names or [])}
    base, stem = os.path.dirname(os.path.abspath(src)), os.path.basename(src)
    key = files.path_key(rows)
    if key not in ("image_path", "video_path"):
        raise ValueError(f"{src}: mmjax data convert reads image or video lists; this one has {key} (train from it)")
    rows = [
        {"path": r[key], "key": os.path.relpath(r[key], base), "caption": r["caption"]}
        | {"label": index.get(r.get("label"))}
        for r in rows
    ]
    video, n = key == "video_path", len(rows)
    units = [
        {"kind": "list", "name": f"{stem}[{a}:{min(a + per, n)}]", "rows": rows[a : a + per]} for a in range(0, n, per)
    ]
    return [dict(u, video=video) for u in units], names, len(missing)


def _units_tfds(src: str, split: str, per: int, data_dir) -> tuple[list[dict], list]:
    from mmjax.data import sources

    name = src[len("tfds:") :]
    source = sources.source_for({"name": name, **({"data_dir": data_dir} if data_dir else {})})
    b = source.builder()
    if "image" not in b.info.features:
        raise ValueError(f"{src}: only TFDS image datasets convert (features: {', '.join(b.info.features)})")
    n = int(b.info.splits[split].num_examples)
    names = source.label_names()
    units = [
        {"kind": "tfds", "name": f"{name}/{split}[{a}:{min(a + per, n)}]", "dir": b.data_dir, "split": split}
        | {"start": a, "stop": min(a + per, n), "labels": names}
        for a in range(0, n, per)
    ]
    return units, names


def make_units(src: str, split: str, records_per_shard: int, data_dir=None, known_labels=None) -> tuple:
    """-> (kind, units, label names or None, rows missing before any unit)."""
    src, per = str(src), int(records_per_shard)
    if per < 1:
        raise ValueError(f"records_per_shard={per}: need >= 1")
    if src.startswith("tfds:"):
        return ("tfds", *_units_tfds(src, split, per, data_dir), 0)
    if src.endswith((".csv", ".jsonl", ".json")) and os.path.isfile(os.path.expanduser(src)):
        return ("list", *_units_list(os.path.expanduser(src), per, known_labels))
    return "tars", _units_tars(src), None, 0


def _from_tar(key: str, sample: dict) -> dict:
    ext = next((e for e in IMAGE_EXTS + VIDEO_EXTS if sample.get(e)), None)
    txt = sample.get("txt")
    meta = None
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
    caption = txt.decode("utf-8", errors="replace") if txt is not None else None
    out = {"key": key, "blob": sample.get(ext) if ext else None, "video": ext in VIDEO_EXTS, "caption": caption}
    return dict(out, meta=meta if isinstance(meta, dict) else None)


def _tfds_samples(unit: dict):
    from mmjax.data import require_tfds
    from mmjax.data.sources import catalog

    tfds = require_tfds()
    b = tfds.builder_from_directory(unit["dir"])
    split = f"{unit['split']}[{unit['start']}:{unit['stop']}]"
    ds = b.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    select = catalog._selector(b.info.features, "image", unit["labels"])
    for j, ex in enumerate(tfds.as_numpy(ds.map(select))):
        label = int(ex["label"]) if "label" in ex else None
        caption = ex["caption"].decode("utf-8", errors="replace")
        yield {"key": f"{unit['split']}[{unit['start'] + j}]", "blob": ex["image"], "caption": caption, "label": label}


def unit_samples(unit: dict, truncated: list):
    """The samples of a unit, in order: {"key", "blob" (bytes or None), "caption" (str or
    None), optional "video", "label", "meta", "missing"}; a truncated tar appends its reason
    to `truncated`."""
    if unit["kind"] == "tar":
        for key, sample in tars.iter_tar_samples(unit["path"], on_truncated=truncated.append):
            yield _from_tar(key, sample)
    elif unit["kind"] == "list":
        for r in unit["rows"]:
            try:
                with open(r["path"], "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                blob = None
            yield dict(r, blob=blob, video=unit["video"], missing=blob is None)
    else:
        yield from _tfds_samples(unit)


def _image_media(blob: bytes) -> tuple[str, int]:
    """-> (media, min side) of an image PIL decodes in a format the pipeline reads; ValueError else."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(blob)) as im:
            media = PIL_MEDIA.get(im.format)
            if media is None:
                raise ValueError(f"image format {im.format} is not read by the pipeline")
            im.load()
            return media, min(im.size)


def _video_media(blob: bytes) -> tuple[str, int]:
    """-> ("mp4", min side of the first frame), decoded with PyAV where it is installed."""
    try:
        import av
    except ImportError:
        return "mp4", 1 << 30
    try:
        with av.open(io.BytesIO(blob)) as c:
            frame = next(c.decode(video=0))
            return "mp4", min(frame.width, frame.height)
    except (av.error.FFmpegError, StopIteration, IndexError) as e:
        raise ValueError(f"undecodable video ({e})") from None


def check_sample(s: dict, filters: dict) -> tuple[str | None, str | None]:
    """-> (skip reason or None, media) for one sample under `filters` (module docstring)."""
    if s.get("missing"):
        return "missing", None
    if not s["blob"]:
        return "no_media", None
    caption = (s["caption"] or "").strip()
    if not caption:
        return "no_caption", None
    lo, hi = filters["caption_chars"]
    if not lo <= len(caption) <= hi:
        return "caption_length", None
    try:
        media, side = (_video_media if s.get("video") else _image_media)(s["blob"])
    except Exception:  # noqa: BLE001 (any decoder error: PIL raises OSError, ValueError, SyntaxError, ...)
        return "undecodable", None
    if side < filters["min_side"]:
        return "too_small", None
    return None, media
