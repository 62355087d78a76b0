"""`mmjax data convert SRC --out DIR --runner beam`: the conversion of `mmjax.data.convert` as an
Apache Beam pipeline, for conversions that outgrow one machine.

The same units, unit functions and layout as the local driver (`convert.prepare`, `scan_unit`,
`mark_duplicates`' rule, `write_unit`, `finish`), so the shards, captions files, shard entries
and manifest are byte for byte those of `convert.convert` on the same SRC and options:

    jobs | Create | Reshuffle | Map(scan)                        (unit i -> its verdicts, or its kept entry)
         [--dedup: FlatMap(ok media hashes) | GroupByKey | FlatMap(later copies: (unit, sample)),
                   CoGroupByKey with the scans by unit | Map(mark them duplicate)]
         | Map(count) | ToList | Map(first ids)                  -> a side input: unit i's first record id
    scans | Reshuffle | Map(write, first ids)                    (kept when an earlier run wrote it the same)
          | ToList | Map(finish)                                 (manifest.json, written last)

Resume works as locally: a unit whose shard entry was made with the same config and whose shard
still has its size and sha256 is kept (without --dedup it is not even scanned again), so a
rerun after a failed pipeline only does the rest.

Every worker reads SRC and writes DIR with ordinary file I/O (ArrayRecordWriter writes local
files only): on a cluster both must be paths that every worker sees, the same on each
(a shared filesystem). apache-beam is the `beam` extra; its pins (protobuf<7, pyarrow<26,
pillow<13) conflict with the `data` extra's current versions, so it lives in its own venv.
"""

from __future__ import annotations

import logging
import os
import shlex

import numpy as np

from mmjax.data import MissingExtraError
from mmjax.data import convert as conv
from mmjax.data import manifest as mf

log = logging.getLogger(__name__)
BEAM_HINT = (
    "pip install -e '.[beam]' (or pip install 'mmjax[beam]'), best in a venv of its own: "
    "apache-beam pins protobuf<7, pyarrow<26 and pillow<13"
)


def require_beam():
    """-> the `apache_beam` module, or MissingExtraError (one line) naming the extra."""
    try:
        import apache_beam
    except ImportError as e:
        raise MissingExtraError(f"--runner beam needs Apache Beam ({e}): {BEAM_HINT}") from None
    return apache_beam


# ---------------------------------------------------------------- the steps (module-level: picklable)


def scan(job: dict, dedup: bool) -> tuple[int, dict]:
    """Unit i -> (i, {"job", "kept": entry} for a unit kept from an earlier run (without dedup),
    else (i, {"job", "scan"}) with `convert.scan_unit`'s verdicts."""
    if not dedup:
        entry = conv.done_entry(job)
        if entry is not None:
            return job["index"], {"job": job, "kept": entry}
    return job["index"], {"job": job, "scan": conv.scan_unit(job)}


def ok_hashes(item: tuple[int, dict]):
    """(hash, (unit, sample)) for each ok sample of a scanned unit."""
    i, x = item
    s = x["scan"]
    for j in np.flatnonzero(s["codes"] == 0):
        yield bytes(s["hash"][j]), (i, int(j))


def later_copies(item: tuple[bytes, list]):
    """(unit, sample) of every ok sample but the first (by unit, then sample) with this hash."""
    _, places = item
    yield from sorted(places)[1:]


def mark_duplicates(item: tuple[int, dict]) -> tuple[int, dict]:
    """(i, {"unit": [x], "dup": [samples]}) (CoGroupByKey's) -> (i, x) with those samples marked duplicate."""
    i, groups = item
    (x,) = groups["unit"]
    dups = sorted(groups["dup"])
    if dups:
        codes = x["scan"]["codes"].copy()
        codes[dups] = conv.CODE["duplicate"]
        x = dict(x, scan=dict(x["scan"], codes=codes))
    return i, x


def count(item: tuple[int, dict]) -> tuple[int, int]:
    """(i, the records unit i holds)."""
    i, x = item
    return i, x["kept"]["records"] if "kept" in x else int(np.sum(x["scan"]["codes"] == 0))


def first_ids(counts: list) -> dict:
    """[(i, records)] of every unit -> {i: its first record id} (ids follow the unit order)."""
    counts = dict(counts)
    if sorted(counts) != list(range(len(counts))):
        raise RuntimeError(f"unit counts for {sorted(counts)}, expected 0..{len(counts) - 1}")
    first = np.concatenate([[0], np.cumsum([counts[i] for i in range(len(counts))])]).astype(int)
    return {i: int(first[i]) for i in range(len(counts))}


def write(item: tuple[int, dict], first: dict) -> dict:
    """Unit i's shard entry: the kept one when it has the right first id and count, else
    `convert.write_unit` (scanning again first if the unit was kept but its ids moved)."""
    i, x = item
    job = x["job"]
    kept = x["kept"] if "kept" in x else conv.done_entry(job)
    records = count(item)[1]
    if kept is not None and kept["first_id"] == first[i] and kept["records"] == records:
        return kept
    entry = conv.write_unit(conv.write_job(job, x["scan"] if "scan" in x else conv.scan_unit(job), first[i]))
    log.info("shard %s: %d records", entry["path"], entry["records"])
    return entry


def finish(entries: list, context: dict) -> dict:
    return conv.finish(context, entries)


# ---------------------------------------------------------------- the pipeline


def build(p, jobs: list[dict], context: dict, dedup: bool):
    """Adds the conversion to pipeline `p` -> the PCollection of its one result dict."""
    beam = require_beam()
    scans = p | "Units" >> beam.Create(jobs) | "Spread" >> beam.Reshuffle() | "Scan" >> beam.Map(scan, dedup)
    if dedup:
        dups = (
            scans
            | "OkHashes" >> beam.FlatMap(ok_hashes)
            | "ByHash" >> beam.GroupByKey()
            | "LaterCopies" >> beam.FlatMap(later_copies)
        )
        scans = (
            {"unit": scans, "dup": dups} | "Join" >> beam.CoGroupByKey() | "MarkDuplicates" >> beam.Map(mark_duplicates)
        )
    first = scans | "Count" >> beam.Map(count) | "Counts" >> beam.combiners.ToList() | "FirstIds" >> beam.Map(first_ids)
    return (
        scans
        | "SpreadWrites" >> beam.Reshuffle()
        | "Write" >> beam.Map(write, beam.pvalue.AsSingleton(first))
        | "Entries" >> beam.combiners.ToList()
        | "Manifest" >> beam.Map(finish, context)
    )


def pipeline_args(workers: int, beam_options: str = "") -> list[str]:
    """The PipelineOptions flags: a local DirectRunner over `workers` processes, then
    `beam_options` (shell-split; a flag given there wins, e.g. --runner=DataflowRunner)."""
    direct = ["--runner=DirectRunner", f"--direct_num_workers={workers}"]
    direct.append(f"--direct_running_mode={'multi_processing' if workers > 1 else 'in_memory'}")
    return direct + shlex.split(beam_options or "")


def convert_beam(
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
    beam_options: str = "",
) -> dict:
    """`convert.convert` run as a Beam pipeline (module docstring) -> {"records", "skipped"
    ({reason: n}), "shards", "out"}, read back from the manifest the pipeline wrote."""
    beam = require_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    jobs, context = conv.prepare(
        src,
        out,
        split=split,
        records_per_shard=records_per_shard,
        min_side=min_side,
        caption_chars=caption_chars,
        dedup=dedup,
        data_dir=data_dir,
    )
    workers = int(workers or len(os.sched_getaffinity(0)))
    options = PipelineOptions(pipeline_args(workers, beam_options))
    with beam.Pipeline(options=options) as p:
        build(p, jobs, context, bool(dedup))
    entry = mf.read_manifest(context["out"])["splits"][split]
    return {
        "records": entry["records"],
        "skipped": entry["skipped"],
        "shards": len(entry["shards"]),
        "out": context["out"],
    }
