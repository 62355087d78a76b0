"""`mmjax data capfilt`: BLIP's CapFilt (Li et al. 2022) over converted ArrayRecord shards.

    mmjax data capfilt --captioner W1 --filter W2 --in SRC_DIR --out DIR [--threshold 0.5]
        [--top-p 0.9] [--temperature 1.0] [--seed 0] [--split train] [--batch-size 64]
        [--records-per-shard N] [--weights student|ema]

For every image of split `split` of SRC_DIR (a directory `mmjax data convert` wrote), the
captioner (a workdir with the "caption" capability: BLIP, CoCa) writes a synthetic caption
by nucleus sampling, and the filter (capability "itm": ALBEF, BLIP) gives the match
probability sigmoid(ITM log-odds) of the image with its web caption and with the synthetic
one (`mmjax.data.capfilt_models`). Each caption whose probability is >= threshold becomes a
record of DIR (an empty synthetic caption never does). DIR has the layout and manifest of
`mmjax data convert` (`mmjax.data.manifest`), so `data.name=shards data.path=DIR` trains on
it. A record keeps its input record's image bytes, media, label and meta; its header adds
the provenance: "source_id" (the input record's id), "caption_kind" ("web" | "synthetic")
and "filter_prob"; its "key" is the input key + "/web" or "/synthetic".

Units: input ids [u*N, (u+1)*N) (N = records_per_shard) are unit u, and unit u's kept
pairs are DIR/<split>/shard-{u:05d}, in input id order, web before synthetic. Two passes:
1. score: the unit's results (per input record: web_prob, synthetic caption and
   synthetic_prob, or skip "undecodable" for a record that does not read or decode) go to
   DIR/.capfilt/<split>/unit-{u:05d}.json, atomically, with the digest of everything that
   made them (both workdirs and their checkpoint steps, weights, the input's fingerprint
   and the unit's range, top_p, temperature, seed, the models' text lengths, the rows per
   device per model call).
2. write: output ids run over the units in order, so unit u's first id is the kept count
   of the units before it; the unit's shard and captions file are written to a temporary
   name and os.replace'd, its shard JSON after them, then the manifest (process 0) last.
Process i of P does units i, i+P, ... in both passes (a barrier between them).

Resume: a unit's results are reused when their digest matches; a shard is kept when its
JSON has the same config (results digest, threshold, first id, writer options) and the
shard's size and sha256 match (`manifest.shard_is_done`). A rerun after a kill therefore
only does the rest, and a rerun at another threshold only the write pass. Determinism: a
record's sampling key is fold_in(PRNGKey(seed), its input id); the models see it at a slot
fixed by its id in fixed-shape calls (`capfilt_models.Scorer`), so its caption and
probabilities (stored, and compared with the threshold, rounded to 6 decimals) are the same
bits whatever the batch size, resume point or process count; the writer is
byte-deterministic, so the output files are too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

from mmjax.data import manifest as mf
from mmjax.data import records
from mmjax.data.convert import WRITER_OPTIONS
from mmjax.errors import ConfigError

VERSION = 1


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def kept(row: dict, threshold: float) -> list[str]:
    """The kinds of a results row whose caption is kept: prob >= threshold (non-empty)."""
    if "skip" in row:
        return []
    out = ["web"] if row["web_prob"] >= threshold else []
    return out + (["synthetic"] if row["synthetic"].strip() and row["synthetic_prob"] >= threshold else [])


class Plan:
    """The run's settings, input and units: `units` [(start, stop)], `mine` (this process's
    unit indices), the per-unit score and shard digests, and the paths of everything."""

    def __init__(self, captioner, filt, src, out, *, split, per, weights, sampling, threshold, process):
        from mmjax.data import capfilt_models

        cap_config, cap_step = capfilt_models.check_workdir(captioner, "caption", "--captioner")
        filt_config, filt_step = capfilt_models.check_workdir(filt, "itm", "--filter")
        self.src, self.out = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(out))
        if self.src == self.out:
            raise ConfigError(f"--in and --out are the same directory ({self.src})")
        self.reader = records.ArrayRecordShards(self.src, split)
        media = self.reader.manifest["splits"][split].get("media", [])
        if set(media) - set(records.IMAGE_MEDIA):
            raise ConfigError(f"--in {src}: split {split!r} holds {media}; capfilt reads images")
        self.split, self.per, self.threshold = split, int(per), float(threshold)
        n = len(self.reader)
        self.units = [(a, min(a + self.per, n)) for a in range(0, n, self.per)]
        self.mine = list(range(process[0], len(self.units), process[1]))
        self.workdirs, self.steps = (captioner, filt), (cap_step, filt_step)
        self.models = {
            "captioner": [os.path.abspath(captioner), cap_step, weights, int(cap_config.data.text_len)],
            "filter": [os.path.abspath(filt), filt_step, weights, int(filt_config.data.text_len)],
        }
        self.settings = dict(sampling, weights=weights)
        self.layout = [capfilt_models.MICRO, capfilt_models.PROB_DECIMALS]  # results depend on them
        self.tmp = os.path.join(self.out, ".tmp", f"p{process[0]}")

    def score_config(self, u: int) -> str:
        unit = {"input": self.reader.fingerprint, "split": self.split, "range": self.units[u]}
        return _digest([VERSION, self.models, self.settings, self.layout, unit])

    def results_path(self, u: int) -> str:
        return os.path.join(self.out, ".capfilt", self.split, f"unit-{u:05d}.json")

    def shard_config(self, u: int, results_digest: str, first_id: int) -> str:
        return _digest([VERSION, mf.VERSION, WRITER_OPTIONS, self.split, results_digest, self.threshold, first_id])

    def info(self) -> dict:
        """The manifest's source / options / filters of this run."""
        source = {"kind": "capfilt", "spec": self.src, "split": self.split, "fingerprint": self.reader.fingerprint}
        opts = {"records_per_shard": self.per, "writer_options": WRITER_OPTIONS, **self.settings}
        opts |= {k: {"workdir": v[0], "step": v[1]} for k, v in self.models.items()}
        return {"source": source, "options": opts, "filters": {"threshold": self.threshold}}


def load_results(plan: Plan, u: int) -> dict | None:
    """Unit u's results when a run made them with the same settings, else None."""
    try:
        res = mf.read_json(plan.results_path(u))
        ok = res.get("config") == plan.score_config(u) and len(res["rows"]) == plan.units[u][1] - plan.units[u][0]
        return res if ok else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def score_unit(plan: Plan, scorer, u: int) -> dict:
    """Pass 1 for unit u: reads its records, scores them, writes its results file."""
    a, b = plan.units[u]
    ids = list(range(a, b))
    rows, skipped = [], set()
    for at in range(0, len(ids), 256):
        for i, rec in zip(ids[at : at + 256], plan.reader.read_records(ids[at : at + 256])):
            if rec is None:
                skipped.add(i)
            else:
                rows.append((i, rec[1][0], str(rec[0]["caption"])))
    scored = {r["id"]: r for r in scorer.score(a, rows)}
    res = {"config": plan.score_config(u), "range": [a, b], "steps": scorer.steps()}
    res["rows"] = [scored[i] if i not in skipped else {"id": i, "skip": "undecodable"} for i in ids]
    os.makedirs(os.path.dirname(plan.results_path(u)), exist_ok=True)
    mf.write_json(plan.results_path(u), res)
    return res


def _record(header: dict, blob: bytes, kind: str, row: dict, out_id: int) -> tuple[dict, bytes]:
    caption = header["caption"] if kind == "web" else row["synthetic"]
    out = {"key": f"{header.get('key', header['id'])}/{kind}", "caption": str(caption).strip(), "id": out_id}
    out |= {"media": header["media"], "source_id": int(header["id"]), "caption_kind": kind}
    out |= {"filter_prob": row[f"{kind}_prob"]} | {k: header[k] for k in ("label", "meta") if header.get(k) is not None}
    return out, records.encode_record(out, [blob])


def write_unit(plan: Plan, u: int, res: dict, first_id: int) -> dict:
    """Pass 2 for unit u: its shard, captions file and shard entry (-> the entry)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    paths = mf.shard_paths(plan.split, u)
    rows = [r for r in res["rows"] if kept(r, plan.threshold)]
    tmp = {k: os.path.join(plan.tmp, paths[k].replace("/", "-")) for k in ("path", "captions")}
    os.makedirs(plan.tmp, exist_ok=True)
    writer, n, media = ArrayRecordWriter(tmp["path"], WRITER_OPTIONS), 0, {}
    with open(tmp["captions"], "w", encoding="utf-8", newline="") as cap:
        for at in range(0, len(rows), 256):
            chunk = rows[at : at + 256]
            for row, rec in zip(chunk, plan.reader.read_records([r["id"] for r in chunk])):
                if rec is None:
                    raise RuntimeError(f"{plan.src}: record {row['id']} no longer reads (input changed?)")
                for kind in kept(row, plan.threshold):
                    header, data = _record(rec[0], rec[1][0], kind, row, first_id + n)
                    writer.write(data)
                    cap.write(header["caption"].replace("\r", " ").replace("\n", " ") + "\n")
                    media[header["media"]] = media.get(header["media"], 0) + 1
                    n += 1
    writer.close()
    for k in ("path", "captions"):
        os.replace(tmp[k], os.path.join(plan.out, paths[k]))
    shard = os.path.join(plan.out, paths["path"])
    a, b = plan.units[u]
    entry = {k: paths[k] for k in ("path", "captions")} | {"unit": f"ids {a}-{b - 1}", "index": u}
    entry |= {"first_id": first_id, "records": n, "bytes": os.path.getsize(shard), "sha256": mf.sha256_file(shard)}
    skips = sum("skip" in r for r in res["rows"])
    entry |= {"media": media, "skipped": mf.add_skips(mf.no_skips(), {"undecodable": skips})}
    entry |= {"config": plan.shard_config(u, _digest(res), first_id), "capfilt": unit_counts(res, plan.threshold)}
    mf.write_json(os.path.join(plan.out, paths["json"]), entry)
    return entry


def unit_counts(res: dict, threshold: float) -> dict:
    """{"inputs", "web_kept", "synthetic_kept", "dropped", "skipped_corrupt"} of a unit's results."""
    rows = res["rows"]
    skipped = sum("skip" in r for r in rows)
    kinds = [k for r in rows for k in kept(r, threshold)]
    web, syn = kinds.count("web"), kinds.count("synthetic")
    return {
        "inputs": len(rows),
        "web_kept": web,
        "synthetic_kept": syn,
        "dropped": 2 * (len(rows) - skipped) - web - syn,
        "skipped_corrupt": skipped,
    }


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mmjax data capfilt: {name}")


def capfilt(
    captioner: str,
    filt: str,
    src: str,
    out: str,
    *,
    threshold: float = 0.5,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    split: str = "train",
    batch_size: int = 64,
    records_per_shard: int = 10000,
    weights: str = "student",
    progress=None,
    process: tuple[int, int] | None = None,
    devices=None,
) -> dict:
    """Runs CapFilt (module docstring) -> the summary: {"inputs", "web_kept",
    "synthetic_kept", "dropped", "skipped_corrupt", "records", "shards", "out"} (also
    written to DIR/<split>/capfilt_summary.json). `progress(line)` gets a line per unit
    and pass; `process` = (index, count) (default: jax's process index and count);
    `devices`: the devices the models run on (default: this process's)."""
    import jax

    if not (0 <= int(seed) < 2**31 and 0 < top_p <= 1 and temperature > 0 and 0 <= threshold <= 1):
        raise ConfigError(
            f"seed={seed}, top_p={top_p}, temperature={temperature}, threshold={threshold}: expected "
            "0 <= seed < 2**31, 0 < top_p <= 1, temperature > 0, 0 <= threshold <= 1"
        )
    process = process or (jax.process_index(), jax.process_count())
    sampling = {"top_p": float(top_p), "temperature": float(temperature), "seed": int(seed)}
    kw = dict(split=split, per=records_per_shard, weights=weights, sampling=sampling, threshold=threshold)
    plan = Plan(captioner, filt, src, out, process=process, **kw)
    say = progress or (lambda line: None)
    shutil.rmtree(plan.tmp, ignore_errors=True)
    os.makedirs(os.path.join(plan.out, split), exist_ok=True)
    score_pass(plan, say, batch_size, devices)
    _barrier("scored")
    counts, first = write_pass(plan, say)
    _barrier("written")
    summary = {k: sum(c[k] for c in counts) for k in ("inputs", "web_kept", "synthetic_kept", "dropped")}
    summary |= {"skipped_corrupt": sum(c["skipped_corrupt"] for c in counts), "records": first[-1]}
    summary |= {"shards": len(plan.units), "out": plan.out}
    if process[0] == 0:
        finish(plan, summary)
    _barrier("finished")
    return summary


def score_pass(plan: Plan, say, batch_size: int, devices=None) -> None:
    """Pass 1 over this process's units without results; the models are opened only
    when one needs scoring."""
    from mmjax.data.capfilt_models import Scorer

    scorer = None
    for k, u in enumerate(plan.mine):
        if load_results(plan, u) is None:
            if scorer is None:
                kw = dict(steps=plan.steps, batch_size=batch_size, devices=devices, **plan.settings)
                scorer = Scorer(*plan.workdirs, **kw)
            c = unit_counts(score_unit(plan, scorer, u), plan.threshold)
            say(f"scored unit {k + 1}/{len(plan.mine)} (ids {plan.units[u][0]}-{plan.units[u][1] - 1}): {c}")


def write_pass(plan: Plan, say) -> tuple[list[dict], list[int]]:
    """Pass 2 over this process's units whose shard is not done -> (every unit's
    `unit_counts`, first ids [units + 1]: unit u's first output id, then the total)."""
    results = {u: load_results(plan, u) for u in range(len(plan.units))}
    if any(r is None for r in results.values()):
        raise RuntimeError(f"{plan.out}: units {[u for u, r in results.items() if r is None]} have no results")
    counts = [unit_counts(results[u], plan.threshold) for u in range(len(plan.units))]
    first = [0]
    for c in counts:
        first.append(first[-1] + c["web_kept"] + c["synthetic_kept"])
    for k, u in enumerate(plan.mine):
        config = plan.shard_config(u, _digest(results[u]), first[u])
        if not mf.shard_is_done(plan.out, mf.shard_paths(plan.split, u)["json"], config):
            entry = write_unit(plan, u, results[u], first[u])
            say(f"wrote shard {k + 1}/{len(plan.mine)}: {entry['path']} ({entry['records']} records)")
    return counts, first


def finish(plan: Plan, summary: dict) -> None:
    """The manifest from every unit's shard entry, the summary file, leftovers removed."""
    entries = [
        mf.read_json(os.path.join(plan.out, mf.shard_paths(plan.split, u)["json"])) for u in range(len(plan.units))
    ]
    info = plan.info()
    split_info = mf.split_entry(entries, {}, info)
    mf.write_manifest(plan.out, plan.split, split_info, info, plan.reader.label_names)
    mf.remove_leftovers(plan.out, plan.split, len(plan.units))
    stale = os.path.join(plan.out, ".capfilt", plan.split)
    for name in os.listdir(stale) if os.path.isdir(stale) else []:
        if name.startswith("unit-") and name.endswith(".json") and int(name[5:-5]) >= len(plan.units):
            os.remove(os.path.join(stale, name))
    report = {k: v for k, v in summary.items() if k != "out"} | {"threshold": plan.threshold, **plan.info()}
    mf.write_json(os.path.join(plan.out, plan.split, "capfilt_summary.json"), report)


def command(args, overrides) -> int:
    """`mmjax data capfilt` (the handler mmjax/commands.py calls): one JSON line on
    stdout at the end, progress on stderr; a mistake in the flags is a ConfigError."""
    from mmjax.parallel import distributed

    if overrides or args.config:
        raise ConfigError("mmjax data capfilt takes no --config (nor --config overrides)")
    if args.src is not None:
        raise ConfigError(f"mmjax data capfilt takes no SRC (got {args.src!r}); give the input as --in DIR")
    need = {"--captioner": args.captioner, "--filter": args.filter, "--in": args.capfilt_in, "--out": args.out}
    missing = [f for f, v in need.items() if not v]
    if missing:
        raise ConfigError(
            f"mmjax data capfilt needs {', '.join(missing)} (--captioner W1 --filter W2 --in DIR --out DIR)"
        )
    checks = {
        "--threshold": (args.threshold, 0.0 <= args.threshold <= 1.0, "a probability in [0, 1]"),
        "--top-p": (args.top_p, 0.0 < args.top_p <= 1.0, "a number in (0, 1]"),
        "--temperature": (args.temperature, args.temperature > 0.0, "a number > 0"),
        "--seed": (args.seed, 0 <= args.seed < 2**31, "an integer in [0, 2**31)"),
        "--batch-size": (args.batch_size, args.batch_size >= 1, "an integer >= 1"),
        "--records-per-shard": (args.records_per_shard, args.records_per_shard >= 1, "an integer >= 1"),
    }
    for flag, (value, ok, what) in checks.items():
        if not ok:
            raise ConfigError(f"{flag} {value}: expected {what}")
    distributed.initialize()  # MMJAX_* env / cluster detection; one process otherwise

    def progress(line):
        print(f"mmjax data capfilt: {line}", file=sys.stderr, flush=True)

    kw = dict(threshold=args.threshold, top_p=args.top_p, temperature=args.temperature, seed=args.seed)
    kw |= dict(split=args.split, batch_size=args.batch_size, records_per_shard=args.records_per_shard)
    summary = capfilt(
        args.captioner, args.filter, args.capfilt_in, args.out, weights=args.weights, progress=progress, **kw
    )
    print(json.dumps(summary), flush=True)
    return 0
