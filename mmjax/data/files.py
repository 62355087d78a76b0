"""Reader of user image-text and video-text lists (no TensorFlow).

CSV with a header `image_path,caption[,label]`, or JSONL lines
`{"image_path": ..., "caption": ..., "label": ...}`; a video list names `video_path`
instead of `image_path` (one kind per list). Relative paths are resolved against
the list file's directory. Rows whose file is missing are skipped, counted and
logged (undecodable images and videos are skipped later, by the pipeline).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import zlib

log = logging.getLogger(__name__)
PATH_KEYS = ("image_path", "video_path")


def read_list(path: str) -> tuple[list[dict], list[str]]:
    """-> (rows, missing): rows are {'image_path' (or 'video_path'): abs str, 'caption': str,
    'id': int, ['label': str]} in file order (id = row index among kept rows); missing =
    skipped paths."""
    path = os.path.expanduser(str(path))
    base = os.path.dirname(os.path.abspath(path))
    raw: list[dict] = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for line in f:
                if line.strip():
                    raw.append(json.loads(line))
        else:
            raw = list(csv.DictReader(f))
    keys = {k for r in raw for k in PATH_KEYS if k in r}
    if len(keys) > 1:
        raise ValueError(f"{path}: a list holds images or videos, not both (columns {sorted(keys)})")
    key = keys.pop() if keys else "image_path"
    rows, missing = [], []
    for r in raw:
        p = str(r.get(key) or "").strip()
        if not p:
            missing.append("<empty>")
            continue
        p = os.path.normpath(os.path.join(base, os.path.expanduser(p)))
        if not os.path.isfile(p):
            missing.append(p)
            continue
        row = {key: p, "caption": str(r.get("caption") or "")}
        if r.get("label") not in (None, ""):
            row["label"] = str(r["label"])
        rows.append(row)
    for i, row in enumerate(rows):
        row["id"] = i
    if missing:
        log.warning("%s: skipped %d rows whose file is missing (first: %s)",
                    path, len(missing), missing[:5])
    return rows, missing


def path_key(rows: list[dict]) -> str:
    """'video_path' for a video list, else 'image_path'."""
    return "video_path" if rows and "video_path" in rows[0] else "image_path"


def split_rows(rows: list[dict], split: str, eval_fraction: float = 0.0) -> list[dict]:
    """'train'/'all' -> all rows, unless eval_fraction > 0: then a stable crc32 split of
    image paths into 'train' and 'test'/'validation'. Ids are re-numbered per split."""
    if split in ("all",) or (split == "train" and eval_fraction <= 0):
        out = rows
    else:
        if eval_fraction <= 0:
            raise ValueError(f"files: split {split!r} needs data.eval_fraction > 0")
        def is_eval(r):
            return (zlib.crc32(r[path_key([r])].encode()) % 10000) < eval_fraction * 10000
        out = [r for r in rows if is_eval(r) == (split != "train")]
    return [dict(r, id=i) for i, r in enumerate(out)]


def label_names(rows: list[dict]) -> list[str] | None:
    """Sorted distinct labels (label index = position here), or None without labels."""
    names = sorted({r["label"] for r in rows if "label" in r})
    return names or None
