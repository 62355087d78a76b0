"""Reader of user image-text, video-text, audio and depth lists (no TensorFlow).

CSV with a header `image_path,caption[,label]`, or JSONL lines
`{"image_path": ..., "caption": ..., "label": ...}`; a video list names `video_path`
instead of `image_path` (videos only). A row may name an audio clip (`audio_path`: WAV,
FLAC, MP3, OGG, anything PyAV reads) and a depth map (`depth_path`: a one-channel PNG,
8- or 16-bit), alone or with `image_path` in the same row (paired data: AudioCaps-like
audio + caption, ESC-50-like audio + label, image + depth, image + audio + depth). A
list without a `caption` column needs a `label` column: each row's caption is then
its label's name (`dog`, `rain`), as written. Relative paths are resolved against the
list file's directory. A row any of whose files is missing is skipped, counted and
logged (undecodable images, videos and clips are skipped later, by the pipeline).

A list that cannot be read as meant is a ValueError of one line naming the file (and
the line, `FILE:LINE: ...`, where there is one): not UTF-8, a CSV or JSON syntax
error, a JSONL line that is not an object, no path column, no caption (nor label)
column, no rows, every listed file missing, or a CSV caption that runs over following
lines that look like rows of the list (an unclosed quote). A CSV caption that spans
lines otherwise, and captions far longer than `data.text_len` allows, are warnings
that give their line numbers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import zlib

log = logging.getLogger(__name__)
PATH_KEYS = ("image_path", "video_path", "audio_path", "depth_path")
EXPECTED = (
    "image_path (or video_path), caption[, label]; audio_path and depth_path alone or with image_path; "
    "label alone stands for the caption"
)
_WARNED: set = set()  # (path, message) already logged: the list is read several times


def _warn_once(path: str, msg: str, *args) -> None:
    key = (path, msg % args)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def _lines(spans, limit: int = 8) -> str:
    """[(start, end)] -> 'lines 3-5, 9, ...' for a message."""
    out = [f"{a}-{b}" if b > a else f"{a}" for a, b in spans[:limit]]
    return "lines " + ", ".join(out) + (f", ... ({len(spans)} in all)" if len(spans) > limit else "")


def _text(path: str) -> str:
    """The file as UTF-8 text (a BOM is dropped), or ValueError FILE:LINE naming the byte."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {col}); save the list as UTF-8"
        ) from None


def _read_jsonl(path: str, text: str):
    """-> (columns, [(line, line, dict)])."""
    out, cols = [], set()
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"{path}:{n}: expected a JSON object like "
                f'{{"image_path": ..., "caption": ...}}, got {type(obj).__name__}'
            )
        cols.update(obj)
        out.append((n, n, obj))
    return cols, out


def _looks_like_path(field: str) -> bool:
    """A media path as lists hold them: one token with a file extension ('a/b.jpg')."""
    f = field.strip()
    ext = os.path.splitext(f)[1][1:]
    return bool(f) and not any(c.isspace() for c in f) and 1 <= len(ext) <= 5 and ext.isalnum()


def _looks_like_a_row(line: str, header: list[str]) -> bool:
    """A line inside a quoted caption that reads as a row of the list: enough fields,
    with a path in the path column (a caption line such as 'running, fast' is not)."""
    col = next((header.index(k) for k in PATH_KEYS if k in header), None)
    fields = next(csv.reader([line]), [])
    return col is not None and len(fields) >= max(len(header), 2) and _looks_like_path(fields[col])


def _read_csv(path: str, text: str):
    """-> (columns, [(first line, last line, dict)]); a row whose quoted caption swallows
    lines that look like rows (an unclosed quote) is a ValueError."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        out, prev = [], reader.line_num
        for fields in reader:
            end = reader.line_num
            if fields:
                out.append((prev + 1, end, dict(zip(header, fields))))
            prev = end
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: CSV syntax error ({e})") from None
    multiline = []
    for start, end, r in out:
        cap = r.get("caption") or ""
        if "\n" not in cap and "\r" not in cap:
            continue
        rowlike = [ln for ln in cap.splitlines()[1:] if _looks_like_a_row(ln, header)]
        if rowlike:
            raise ValueError(
                f"{path}:{start}: the caption of the row at lines {start}-{end} runs over "
                f"{len(rowlike)} line(s) that look like rows of the list (an unclosed quote?), e.g. "
                f"{rowlike[0][:60]!r}; fix the quoting or remove the line breaks from the caption"
            )
        multiline.append((start, end))
    if multiline:
        _warn_once(
            path,
            "%s: %d caption(s) span several lines (%s); check the quoting",
            path,
            len(multiline),
            _lines(multiline),
        )
    return set(header), out


def _row_paths(r: dict, keys: list[str], base: str) -> tuple[dict, str | None]:
    """-> ({key: absolute path} of a parsed row, the first missing or empty path or None)."""
    out = {}
    for key in keys:
        p = str(r.get(key) or "").strip()
        if not p:
            return out, "<empty>"
        p = os.path.normpath(os.path.join(base, os.path.expanduser(p)))
        if not os.path.isfile(p):
            return out, p
        out[key] = p
    return out, None


def _rows(raw, keys: list[str], base: str, text_len: int | None):
    """Parsed rows -> (rows whose every file exists, with ids; missing paths (a row's first);
    (first, last) lines of captions of more than 2 * text_len words). Without a caption
    column, a row's caption is its label."""
    rows, missing, long = [], [], []
    for start, end, r in raw:
        paths, gone = _row_paths(r, keys, base)
        if gone is not None:
            missing.append(gone)
            continue
        label = "" if r.get("label") in (None, "") else str(r["label"])
        row = dict(paths, caption=str(r.get("caption") or "") if "caption" in r else label)
        if label:
            row["label"] = label
        if text_len and len(row["caption"].split()) > 2 * int(text_len):
            long.append((start, end))
        rows.append(row)
    for i, row in enumerate(rows):
        row["id"] = i
    return rows, missing, long


def _path_keys(path: str, cols: set, what: str) -> list[str]:
    """The list's path columns (PATH_KEYS order); ValueError for none, or a video with another."""
    found = ", ".join(sorted(cols)) or "none"
    keys = [k for k in PATH_KEYS if k in cols]
    if "video_path" in keys and len(keys) > 1:
        raise ValueError(f"{path}: a video list holds videos only, not images, audio or depth ({what} {keys})")
    if not keys:
        raise ValueError(
            f"{path}: no 'image_path' (or 'video_path') {what[:-1]}; found {what}: {found}; expected: {EXPECTED}"
        )
    if "caption" not in cols and "label" not in cols:
        raise ValueError(f"{path}: no 'caption' {what[:-1]}; found {what}: {found}; expected: {EXPECTED}")
    return keys


def read_list(path: str, text_len: int | None = None) -> tuple[list[dict], list[str]]:
    """-> (rows, missing): rows are {'image_path' (or 'video_path'; and/or 'audio_path',
    'depth_path'): abs str, 'caption': str, 'id': int, ['label': str]} in file order (id =
    row index among kept rows); missing = skipped rows' (first missing) paths. With
    `text_len` (tokens), captions of more than 2 * text_len words (certainly cut by more
    than half) are reported with their line numbers."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path: list file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    text = _text(path)
    jsonl = path.endswith((".jsonl", ".json"))
    cols, raw = (_read_jsonl if jsonl else _read_csv)(path, text)
    what = "keys" if jsonl else "columns"
    if not raw:
        raise ValueError(f"{path}: the list has no rows (expected {what}: {EXPECTED})")
    keys = _path_keys(path, cols, what)
    rows, missing, long = _rows(raw, keys, base, text_len)
    if not rows:
        named = [m for m in missing if m != "<empty>"]
        if not named:
            raise ValueError(f"{path}: every one of its {len(missing)} rows has an empty {' or '.join(keys)}")
        raise ValueError(
            f"{path}: every file it lists is missing ({len(missing)} rows; e.g. {named[0]}); "
            f"relative paths are resolved against the list's directory {base}"
        )
    if missing:
        _warn_once(path, "%s: skipped %d rows whose file is missing (first: %s)", path, len(missing), missing[:5])
    if long:
        _warn_once(
            path,
            "%s: %d caption(s) far longer than data.text_len=%d tokens allows "
            "(more than %d words; %s) will be truncated",
            path,
            len(long),
            int(text_len),
            2 * int(text_len),
            _lines(long),
        )
    return rows, missing


def path_keys(rows: list[dict]) -> list[str]:
    """The path keys of the list's rows, in PATH_KEYS order (['image_path'] for no rows)."""
    return [k for k in PATH_KEYS if rows and k in rows[0]] or ["image_path"]


def path_key(rows: list[dict]) -> str:
    """The rows' first path key (PATH_KEYS order): 'image_path', 'video_path', 'audio_path'
    or 'depth_path'; the hold-out split hashes its path."""
    return path_keys(rows)[0]


def check_eval_fraction(eval_fraction) -> float:
    """data.eval_fraction as a float in [0, 1), else ValueError."""
    try:
        f = float(eval_fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0.0 <= f < 1.0:
        raise ValueError(
            f"data.eval_fraction={eval_fraction!r}: need 0 <= f < 1 "
            "(the fraction of a file list held out as the test split)"
        )
    return f


def split_rows(rows: list[dict], split: str, eval_fraction: float = 0.0) -> list[dict]:
    """'train'/'all' -> all rows, unless eval_fraction > 0: then a stable crc32 split of
    image paths into 'train' and 'test'/'validation'. Ids are re-numbered per split."""
    eval_fraction = check_eval_fraction(eval_fraction)
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
