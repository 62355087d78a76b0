"""Layout and manifest of a converted directory (`mmjax data convert SRC --out DIR`).

    DIR/manifest.json                         written last, atomically: its presence = conversion complete
    DIR/<split>/shard-{i:05d}.array_record    the records of input unit i (`mmjax.data.records`)
    DIR/<split>/shard-{i:05d}.json            its shard entry (below), written after the shard = unit done
    DIR/<split>/shard-{i:05d}.captions.txt    one caption per line, in id order ("\\n" in a caption -> " ")
    DIR/.tmp/  DIR/.scan/                     partial files and per-unit scan results (removed when done)

A shard entry (also the item of the manifest's shard lists):
    {"path": "train/shard-00000.array_record", "captions": "train/shard-00000.captions.txt",
     "unit": "00000.tar", "index": 0, "first_id": 0, "records": n, "bytes": file size,
     "sha256": hex of the file, "media": {"jpg": n, ...}, "skipped": {reason: count for each of SKIP_REASONS},
     "config": hex digest of what made it (source unit, split, filters, writer options, format version)}

The manifest:
    {"version": 1,
     "source": {"kind": "tars" | "list" | "tfds", "spec": SRC}, "options": {...}, "filters": {...},
                (those of the latest conversion; each split keeps its own as well)
     "splits": {split: {"records", "bytes", "media": [kinds], "skipped": {reason: n} (its shards' plus a
                        list's rows whose file was missing when it was read), "source", "options", "filters",
                        "shards": [shard entries, by index]}},
     "skipped": {reason: total over the splits},
     "label_names": [str] | null,
     "fingerprint": sha256 hex over every shard's (split, path, records, sha256), splits sorted}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

VERSION = 1
MANIFEST = "manifest.json"
SKIP_REASONS = (
    "undecodable",  # the media does not decode (or is not an image/video format the pipeline reads)
    "no_media",  # no .jpg/.jpeg/.png/.webp/.mp4 member (or an empty one)
    "no_caption",  # no .txt member (or an empty caption)
    "tar_truncated",  # per truncated tar: it ends inside a member or header (what was readable is kept)
    "too_small",  # min(width, height) < min_side
    "caption_length",  # caption length in characters outside caption_chars
    "duplicate",  # the same media bytes (sha256) as an earlier sample (dedup)
    "missing",  # a listed file that does not exist
)


def shard_paths(split: str, index: int) -> dict:
    """Paths (relative to DIR) of unit `index`'s files: {"path", "captions", "json"}."""
    stem = f"{split}/shard-{index:05d}"
    return {"path": stem + ".array_record", "captions": stem + ".captions.txt", "json": stem + ".json"}


def no_skips() -> dict:
    return dict.fromkeys(SKIP_REASONS, 0)


def add_skips(total: dict, more: dict) -> dict:
    for k, v in more.items():
        total[k] = total.get(k, 0) + int(v)
    return total


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str, obj) -> None:
    """`obj` as JSON at `path`, atomically (a temp file in the same folder, then os.replace)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_manifest(directory: str) -> dict:
    """DIR/manifest.json; FileNotFoundError (one line) without it, ValueError for another version."""
    path = os.path.join(os.path.expanduser(str(directory)), MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory}: no {MANIFEST} (not a converted directory, or its conversion did not finish)"
        )
    m = read_json(path)
    if not isinstance(m, dict) or m.get("version") != VERSION:
        raise ValueError(
            f"{path}: manifest version {m.get('version') if isinstance(m, dict) else m!r}, expected {VERSION}"
        )
    return m


def fingerprint(splits: dict) -> str:
    """sha256 hex over every shard's (split, path, records, sha256), splits sorted, shards by index."""
    h = hashlib.sha256()
    for split in sorted(splits):
        for s in splits[split]["shards"]:
            h.update(json.dumps([split, s["path"], int(s["records"]), s["sha256"]]).encode() + b"\n")
    return h.hexdigest()


def shard_is_done(directory: str, entry_path: str, config: str) -> dict | None:
    """The shard entry at DIR/`entry_path` if it was made with `config` and its shard file's
    size and sha256 match, else None (the unit is converted again)."""
    path = os.path.join(directory, entry_path)
    try:
        entry = read_json(path)
        shard = os.path.join(directory, entry["path"])
        if entry.get("config") != config or os.path.getsize(shard) != entry["bytes"]:
            return None
        if not os.path.isfile(os.path.join(directory, entry["captions"])):
            return None
        return entry if sha256_file(shard) == entry["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def split_entry(entries: list[dict], extra_skips: dict, info: dict) -> dict:
    """One split of the manifest from its shard entries (sorted by index) and `info`
    ({"source", "options", "filters"}); `extra_skips` are skips outside any shard."""
    entries = sorted(entries, key=lambda e: e["index"])
    skipped = add_skips(no_skips(), extra_skips)
    media: set = set()
    for e in entries:
        add_skips(skipped, e["skipped"])
        media.update(k for k, v in e["media"].items() if v)
    out = {"records": sum(e["records"] for e in entries), "bytes": sum(e["bytes"] for e in entries)}
    return dict(out, media=sorted(media), skipped=skipped, shards=entries, **info)


def write_manifest(directory: str, split: str, entry: dict, info: dict, label_names) -> dict:
    """Adds (or replaces) `split` in DIR/manifest.json, keeping the other splits; written
    atomically. `label_names` must extend (start with) the kept splits' names, else ValueError."""
    path = os.path.join(directory, MANIFEST)
    old = read_manifest(directory) if os.path.isfile(path) else {}
    splits = dict(old.get("splits", {}), **{split: entry})
    names = old.get("label_names")
    if label_names is not None and names and list(label_names[: len(names)]) != list(names) and set(splits) - {split}:
        raise ValueError(f"{directory}: split {split!r} has label names {label_names} that do not extend {names}")
    totals = no_skips()
    for s in splits.values():
        add_skips(totals, s["skipped"])
    m = {"version": VERSION, **info, "splits": splits, "skipped": totals}
    m["label_names"] = list(label_names) if label_names is not None else names
    m["fingerprint"] = fingerprint(splits)
    write_json(path, m)
    return m


def remove_leftovers(directory: str, split: str, n: int) -> None:
    """Removes DIR/.tmp, DIR/.scan/<split> (and DIR/.scan once empty) and the files of
    shards >= `n` of `split` that an earlier conversion with more units left."""
    shutil.rmtree(os.path.join(directory, ".tmp"), ignore_errors=True)
    shutil.rmtree(os.path.join(directory, ".scan", split), ignore_errors=True)
    if os.path.isdir(os.path.join(directory, ".scan")) and not os.listdir(os.path.join(directory, ".scan")):
        os.rmdir(os.path.join(directory, ".scan"))
    for name in os.listdir(os.path.join(directory, split)):
        m = re.fullmatch(r"shard-(\d{5,})\.(array_record|json|captions\.txt)", name)
        if m and int(m.group(1)) >= n:
            os.remove(os.path.join(directory, split, name))
