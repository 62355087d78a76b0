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
import json
import os
import shutil
import zipfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from mmjax.data import manifest as mf
from mmjax.data import records
from mmjax.data.convert_units import check_sample, make_units, unit_samples

WRITER_OPTIONS = "group_size:1,uncompressed"  # media are already compressed: zstd/snappy save ~0%
MEDIA = records.IMAGE_MEDIA + records.VIDEO_MEDIA  # media codes index this
CODE = {r: i + 1 for i, r in enumerate(mf.SKIP_REASONS)}  # verdict codes; 0 = ok


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

    def map(self, fn, jobs: list, on_result=None) -> list:
        """[fn(j) for j in jobs], in order; on_result(job, result) as each one comes back."""
        if self.workers <= 1 or len(jobs) <= 1:
            results = (fn(j) for j in jobs)
        else:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
            results = self.pool.map(fn, jobs)
        out = []
        for j, r in zip(jobs, results):
            out.append(r)
            if on_result is not None:
                on_result(j, r)
        return out

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


def prepare(
    src: str,
    out: str,
    *,
    split: str = "train",
    records_per_shard: int = 10000,
    min_side: int = 0,
    caption_chars: tuple[int, int] = (1, 10000),
    dedup: bool = False,
    data_dir: str | None = None,
) -> tuple[list[dict], dict]:
    """The conversion's units as jobs, with DIR's folders made and DIR/.tmp emptied ->
    (jobs, context); both drivers (`convert` here, `mmjax.data.convert_beam`) start here.
    A job holds the unit, its index, filters, config digest, scan cache and shard paths;
    the context is what `finish` needs: {"out", "split", "units", "info", "names", "missing"}."""
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
    context = {"out": out, "split": split, "units": len(jobs), "info": info, "names": names, "missing": missing}
    return jobs, context


def done_entry(job: dict) -> dict | None:
    """The shard entry of a unit an earlier run finished with the same config (shard size
    and sha256 checked), else None."""
    return mf.shard_is_done(job["out"], job["paths"]["json"], job["config"])


def write_job(job: dict, scan: dict, first_id: int) -> dict:
    """The input of `write_unit`: the job with its unit's scan verdicts and first record id."""
    return job | {k: scan[k] for k in ("codes", "media", "truncated")} | {"first_id": int(first_id)}


def finish(context: dict, entries: list[dict]) -> dict:
    """Writes the manifest from every unit's shard entry and removes the leftovers ->
    {"records", "skipped" ({reason: n}), "shards", "out"}."""
    out, split = context["out"], context["split"]
    entries = sorted(entries, key=lambda e: e["index"])
    if [e["index"] for e in entries] != list(range(context["units"])):
        raise RuntimeError(f"{out}: shard entries {[e['index'] for e in entries]} for {context['units']} units")
    split_info = mf.split_entry(entries, {"missing": context["missing"]}, context["info"])
    mf.write_manifest(out, split, split_info, context["info"], context["names"])
    mf.remove_leftovers(out, split, context["units"])
    return {"records": split_info["records"], "skipped": split_info["skipped"], "shards": len(entries), "out": out}


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
    progress=None,
) -> dict:
    """Converts SRC into DIR=`out` (module docstring) -> {"records", "skipped" ({reason: n}),
    "shards", "out"}; `data_dir` is the TFDS data_dir of a `tfds:` source; `progress(line)`,
    when given, gets one line per written shard (and one for the shards kept from a previous run)."""
    jobs, context = prepare(
        src,
        out,
        split=split,
        records_per_shard=records_per_shard,
        min_side=min_side,
        caption_chars=caption_chars,
        dedup=dedup,
        data_dir=data_dir,
    )
    done = {i: e for i, j in enumerate(jobs) if (e := done_entry(j))}
    workers = int(workers or len(os.sched_getaffinity(0)))
    with _Pool(workers) as pool:
        scans, first = _plan(pool, jobs, done, dedup)
        pending = [i for i in range(len(jobs)) if i not in done]
        writes = [write_job(jobs[i], scans[i], first[i]) for i in pending]
        if progress is not None and done:
            progress(f"{len(done)} of {len(jobs)} shards kept from a previous run")
        report = None
        if progress is not None:
            count = iter(range(1, len(writes) + 1))

            def report(job, entry):
                progress(f"shard {next(count)}/{len(writes)}: {entry['path']} ({entry['records']} records)")

        entries = dict(done) | dict(zip(pending, pool.map(write_unit, writes, report)))
    return finish(context, list(entries.values()))
