"""`mmjax data convert SRC --out DIR`: image-text (or video-text) sources -> ArrayRecord shards.

SRC is one of
- webdataset tars as img2dataset writes them (`mmjax.data.tars`): a brace pattern
  `dir/{00000..00127}.tar`, a directory of `*.tar`, or a comma-separated list; one tar = one unit;
- a CSV or JSONL list (`mmjax.data.files`): rows [i*R, (i+1)*R) = unit i (R = records_per_shard);
  labels become indices into the sorted label names;
- `tfds:NAME[/CONFIG]`: a prepared TFDS image dataset (never downloaded; mmjax's built-in sets are
  generated as for training), split `split`, slices of R examples = units.

Unit i becomes DIR/<split>/shard-{i:05d}.{array_record,captions.txt,json} (layout and manifest:
`mmjax.data.manifest`; record format: `mmjax.data.records`), written with WRITER_OPTIONS.

Two passes, both parallel over units (a spawn process pool; `workers=1` runs in this process):
1. scan: every sample is checked and gets a verdict (ok, or the first skip reason in the
   order missing, no_media, no_caption, caption_length, undecodable, too_small) and the
   sha256 of its media; images are decoded with PIL (the stored bytes stay as they were).
   With `dedup`, an ok sample whose media hash equals an earlier ok sample's (in (unit,
   sample) order) becomes a duplicate. Record ids are then known: unit i's first id = the
   ok samples of units < i.
2. write: each pending unit is read again and its ok samples are written, to DIR/.tmp first,
   then `os.replace`d into place, the shard's JSON after it.

Resume: a unit whose JSON was made with the same configuration, whose shard has the size and
sha256 it names and whose first id is still right, is kept; a rerun after a kill therefore only
does the rest. The writer's output is byte-deterministic (same records -> same file), so a
resumed conversion's shards and manifest equal an uninterrupted one's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from mmjax.data import manifest as mf
from mmjax.data import records, tars

WRITER_OPTIONS = "group_size:1,uncompressed"  # media are already compressed: zstd/snappy save ~0%
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tar member exts, in order of preference
VIDEO_EXTS = ("mp4",)
MEDIA = records.IMAGE_MEDIA + records.VIDEO_MEDIA  # media codes index this
PIL_MEDIA = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}  # what TF decodes
CODE = {r: i + 1 for i, r in enumerate(mf.SKIP_REASONS)}  # verdict codes; 0 = ok


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


def scan_unit(job: dict) -> dict:
    """Pass 1 for one unit -> {"codes": int8 [n], "media": int8 [n] (-1 when skipped),
    "hash": uint8 [n, 16] (sha256 prefix of the media), "truncated": 0/1}; cached in
    job["cache"] (an .npz, reused when made with the same config)."""
    try:
        with np.load(job["cache"]) as z:
            if str(z["config"]) == job["config"]:
                return {k: z[k] for k in ("codes", "media", "hash")} | {"truncated": int(z["truncated"])}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # none yet, or unreadable: scan
        pass
    codes, media, hashes, truncated = [], [], [], []
    for s in unit_samples(job["unit"], truncated):
        reason, m = check_sample(s, job["filters"])
        codes.append(CODE[reason] if reason else 0)
        media.append(MEDIA.index(m) if m else -1)
        hashes.append(hashlib.sha256(s["blob"] or b"").digest()[:16])
    out = {"codes": np.array(codes, np.int8), "media": np.array(media, np.int8)}
    out |= {"hash": np.frombuffer(b"".join(hashes), np.uint8).reshape(-1, 16), "truncated": int(bool(truncated))}
    tmp = f"{job['cache']}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, config=np.array(job["config"]), **out)
    os.replace(tmp, job["cache"])
    return out


def mark_duplicates(scans: dict) -> None:
    """Marks, in place, each ok sample whose media hash an earlier ok sample (by unit, then
    sample order) has as a duplicate."""
    order = sorted(scans)
    ok = [np.flatnonzero(scans[i]["codes"] == 0) for i in order]
    hashes = np.concatenate([scans[i]["hash"][o] for i, o in zip(order, ok)] + [np.zeros([0, 16], np.uint8)])
    _, first = np.unique(hashes.view("<u8").reshape(-1, 2), axis=0, return_index=True)
    keep = np.zeros(len(hashes), bool)
    keep[first] = True
    at = 0
    for i, o in zip(order, ok):
        scans[i]["codes"][o[~keep[at : at + len(o)]]] = CODE["duplicate"]
        at += len(o)


def _clean_caption(caption: str) -> str:
    return caption.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def write_unit(job: dict) -> dict:
    """Pass 2 for one unit: its shard, captions file and shard entry (-> the entry)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out, paths, codes, media = job["out"], job["paths"], job["codes"], job["media"]
    tmp = {k: os.path.join(out, ".tmp", paths[k].replace("/", "-") + f".{os.getpid()}") for k in ("path", "captions")}
    writer, kept, n, seen = ArrayRecordWriter(tmp["path"], WRITER_OPTIONS), {}, 0, 0
    with open(tmp["captions"], "w", encoding="utf-8", newline="") as cap:
        for j, s in enumerate(unit_samples(job["unit"], [])):
            seen += 1
            if j >= len(codes) or codes[j]:
                continue
            header = {"key": s["key"], "caption": s["caption"].strip(), "id": job["first_id"] + n}
            header |= {"media": MEDIA[media[j]]} | {k: s[k] for k in ("label", "meta") if s.get(k) is not None}
            writer.write(records.encode_record(header, [s["blob"]]))
            cap.write(_clean_caption(header["caption"]) + "\n")
            kept[header["media"]] = kept.get(header["media"], 0) + 1
            n += 1
    writer.close()
    if seen != len(codes):
        raise RuntimeError(f"{job['unit']['name']}: {seen} samples now, {len(codes)} when scanned (changed?)")
    for k in ("path", "captions"):
        os.replace(tmp[k], os.path.join(out, paths[k]))
    skipped = {reason: int(np.sum(codes == code)) for reason, code in CODE.items()}
    skipped["tar_truncated"] = job["truncated"]
    shard = os.path.join(out, paths["path"])
    entry = {k: paths[k] for k in ("path", "captions")} | {"unit": job["unit"]["name"], "index": job["index"]}
    entry |= {
        "first_id": job["first_id"],
        "records": n,
        "bytes": os.path.getsize(shard),
        "sha256": mf.sha256_file(shard),
    }
    entry |= {"media": kept, "skipped": skipped, "config": job["config"]}
    mf.write_json(os.path.join(out, paths["json"]), entry)
    return entry


class _Pool:
    """map() over a spawn process pool, or in this process for workers=1."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def map(self, fn, jobs: list) -> list:
        if self.workers <= 1 or len(jobs) <= 1:
            return [fn(j) for j in jobs]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        return list(self.pool.map(fn, jobs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _unit_config(unit: dict, split: str, filters: dict, per: int) -> str:
    """What makes a unit's shard: the unit (a tar's path and size, a list's rows, a TFDS
    slice), split, filters, records per shard, writer options, format version."""
    ident = dict(unit, size=os.path.getsize(unit["path"])) if unit["kind"] == "tar" else unit
    what = [mf.VERSION, WRITER_OPTIONS, split, filters, per, ident]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _plan(pool: _Pool, jobs: list[dict], done: dict, dedup: bool) -> tuple[dict, list[int]]:
    """Scans what it must and drops stale kept units -> (scans, first ids)."""
    n = len(jobs)
    todo = [i for i in range(n) if dedup or i not in done]
    scans = dict(zip(todo, pool.map(scan_unit, [jobs[i] for i in todo])))
    if dedup:
        mark_duplicates(scans)
    while True:
        counts = [int(np.sum(scans[i]["codes"] == 0)) if i in scans else done[i]["records"] for i in range(n)]
        first = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        stale = [i for i, e in done.items() if e["first_id"] != first[i] or e["records"] != counts[i]]
        if not stale:
            return scans, first
        for i in stale:
            del done[i]
        todo = [i for i in stale if i not in scans]
        scans.update(zip(todo, pool.map(scan_unit, [jobs[i] for i in todo])))


def convert(
    src: str,
    out: str,
    *,
    split: str = "train",
    workers: int | None = None,
    records_per_shard: int = 10000,
    min_side: int = 0,
    caption_chars: tuple[int, int] = (1, 10000),
    dedup: bool = False,
    data_dir: str | None = None,
) -> dict:
    """Converts SRC into DIR=`out` (module docstring) -> {"records", "skipped" ({reason: n}),
    "shards", "out"}; `data_dir` is the TFDS data_dir of a `tfds:` source."""
    out = os.path.abspath(os.path.expanduser(str(out)))
    lo, hi = (int(c) for c in caption_chars)
    filters = {"min_side": int(min_side), "caption_chars": [lo, hi], "dedup": bool(dedup)}
    known = mf.read_manifest(out).get("label_names") if os.path.isfile(os.path.join(out, mf.MANIFEST)) else None
    kind, units, names, missing = make_units(src, split, records_per_shard, data_dir, known)
    info = {"source": {"kind": kind, "spec": str(src)}, "filters": filters}
    info["options"] = {"records_per_shard": int(records_per_shard), "writer_options": WRITER_OPTIONS}
    shutil.rmtree(os.path.join(out, ".tmp"), ignore_errors=True)
    for d in (".tmp", split, os.path.join(".scan", split)):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    jobs = []
    for i, u in enumerate(units):
        cache = os.path.join(out, ".scan", split, f"unit-{i:05d}.npz")
        config = _unit_config(u, split, filters, int(records_per_shard))
        jobs.append({"unit": u, "index": i, "filters": filters, "config": config, "cache": cache, "out": out})
        jobs[-1]["paths"] = mf.shard_paths(split, i)
    done = {i: e for i, j in enumerate(jobs) if (e := mf.shard_is_done(out, j["paths"]["json"], j["config"]))}
    workers = int(workers or len(os.sched_getaffinity(0)))
    with _Pool(workers) as pool:
        scans, first = _plan(pool, jobs, done, dedup)
        pending = [i for i in range(len(jobs)) if i not in done]
        writes = [
            jobs[i] | {k: scans[i][k] for k in ("codes", "media", "truncated")} | {"first_id": first[i]}
            for i in pending
        ]
        entries = dict(done) | dict(zip(pending, pool.map(write_unit, writes)))
    split_info = mf.split_entry([entries[i] for i in range(len(jobs))], {"missing": missing}, info)
    mf.write_manifest(out, split, split_info, info, names)
    mf.remove_leftovers(out, split, len(jobs))
    return {"records": split_info["records"], "skipped": split_info["skipped"], "shards": len(jobs), "out": out}
