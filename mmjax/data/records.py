"""The record format of converted shards and the shard reader (no TensorFlow).

A record (one sample, one ArrayRecord entry) is

    b"MMJ1" | uint32 little-endian n | n bytes of UTF-8 JSON header | blob 0 | blob 1 | ...

The header is `json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`:
    "key"     str, the sample's name in its source (a tar's webdataset key, a list's path)
    "caption" str
    "id"      int, the record's index in its split (global over the split's shards)
    "label"   int, optional (index into the manifest's `label_names`)
    "media"   "jpg" | "png" | "webp" | "gif" | "bmp": an image, by its decoded format (not its name);
              "mp4": a video file (an `.mp4` member, or a video list's file: PyAV reads the container)
    "meta"    dict, optional (the sample's `.json` in an img2dataset tar)
    "sizes"   [int], the byte length of each blob (one blob, the encoded file, stored as it was)

`ArrayRecordShards(DIR, split)` reads a directory made by `mmjax.data.convert` (its
layout and `manifest.json`: `mmjax.data.manifest`) by global record index.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor

from mmjax.data import manifest as manifest_lib

log = logging.getLogger(__name__)

MAGIC = b"MMJ1"
IMAGE_MEDIA = ("jpg", "png", "webp", "gif", "bmp")
VIDEO_MEDIA = ("mp4",)
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access: no read-ahead


def encode_record(header: dict, blobs: list[bytes]) -> bytes:
    """header (without "sizes") + blobs -> one record (module docstring)."""
    head = dict(header, sizes=[len(b) for b in blobs])
    raw = json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(raw)), raw, *blobs])


def decode_record(data: bytes) -> tuple[dict, list[bytes]]:
    """One record -> (header, blobs); ValueError for a bad magic, header or length."""
    data = bytes(data)
    if len(data) < 8 or data[:4] != MAGIC:
        raise ValueError(f"not an mmjax record (magic {data[:4]!r}, expected {MAGIC!r})")
    (n,) = struct.unpack("<I", data[4:8])
    if 8 + n > len(data):
        raise ValueError(f"record header of {n} bytes runs past the record ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"record header is not UTF-8 JSON ({e})") from None
    sizes = header.get("sizes") if isinstance(header, dict) else None
    if not isinstance(sizes, list) or sum(sizes) != len(data) - 8 - n or min(sizes, default=0) < 0:
        raise ValueError(f"record blob sizes {sizes!r} do not add up to {len(data) - 8 - n} bytes")
    blobs, at = [], 8 + n
    for s in sizes:
        blobs.append(data[at : at + s])
        at += s
    return header, blobs


def to_sample(header: dict, blobs: list[bytes]) -> dict:
    """A decoded record -> {"image" or "video_file": bytes, "caption": str, "id": int[, "label": int]}
    ("video_file": a whole video container, e.g. an mp4, decoded by PyAV)."""
    media = header.get("media")
    if media not in IMAGE_MEDIA + VIDEO_MEDIA or len(blobs) != 1:
        raise ValueError(f"record of media {media!r} with {len(blobs)} blobs")
    out = {"video_file" if media in VIDEO_MEDIA else "image": blobs[0], "caption": str(header["caption"])}
    out["id"] = int(header["id"])
    if header.get("label") is not None:
        out["label"] = int(header["label"])
    return out


class ArrayRecordShards:
    """Random access to the records of one split of a converted directory.

    `read(keys)` takes global record indices in [0, len) and returns, in the same order,
    `to_sample` dicts, or None for a record that cannot be read (a corrupt chunk, a bad
    record); a batch read that fails is retried key by key, so one bad record costs only
    itself. Shards are opened on first use (nothing is opened or counted at init: the
    counts come from the manifest); reads are grouped per shard and issued from a pool of
    `threads` threads (array_record releases the GIL while reading). Counters:
    `keys_read` (keys asked for), `bytes_read` (payload bytes of the records returned),
    `unreadable` (None results). `read` may be called from several threads at once.
    """

    def __init__(self, directory: str, split: str = "train", threads: int = 8):
        self.directory = os.path.expanduser(str(directory))
        self.manifest = manifest_lib.read_manifest(self.directory)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise ValueError(f"{self.directory}: no split {split!r} (splits: {', '.join(sorted(splits)) or 'none'})")
        self.split = split
        self.shards = list(splits[split]["shards"])
        self._starts = [int(s["first_id"]) for s in self.shards]
        self._total = sum(int(s["records"]) for s in self.shards)
        self._threads = max(1, int(threads))
        self._readers: dict[int, object] = {}
        self._lock = threading.Lock()
        self._pool = None
        self.bytes_read = self.keys_read = self.unreadable = 0

    def __len__(self) -> int:
        return self._total

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    def captions(self) -> list[str]:
        """Every caption of the split in id order, from the shards' captions files (no media
        reads). Lines are split on "\\n" only (a caption's own line breaks were made spaces)."""
        out = []
        for s in self.shards:
            with open(os.path.join(self.directory, s["captions"]), encoding="utf-8", newline="") as f:
                text = f.read()
            lines = text.split("\n")[:-1] if text else []
            if len(lines) != int(s["records"]):
                raise ValueError(f"{s['captions']}: {len(lines)} captions for {s['records']} records")
            out.extend(lines)
        return out

    def _reader(self, shard: int):
        with self._lock:
            if shard not in self._readers:
                from array_record.python.array_record_module import ArrayRecordReader

                path = os.path.join(self.directory, self.shards[shard]["path"])
                self._readers[shard] = ArrayRecordReader(path, READER_OPTIONS)
            return self._readers[shard]

    def _read_shard(self, shard: int, local: list[int]) -> list[bytes | None]:
        """Raw records at `local` indices of one shard; None where a read fails."""
        reader = self._reader(shard)
        try:
            return list(reader.read(local))
        except RuntimeError:
            out = []
            for i in local:
                try:
                    out.append(reader.read([i])[0])
                except RuntimeError as e:
                    log.warning("%s record %d unreadable: %s", self.shards[shard]["path"], i, str(e)[:200])
                    out.append(None)
            return out

    def _sample(self, raw, key: int, as_record: bool = False):
        if raw is None:
            return None
        try:
            record = decode_record(raw)
            sample = to_sample(*record)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s split %r record %d: bad record (%s)", self.directory, self.split, key, e)
            return None
        if sample["id"] != key:
            return None
        return record if as_record else sample

    def read_records(self, keys) -> list[tuple[dict, list[bytes]] | None]:
        """As `read`, but each record as `decode_record` gives it: (its header with every
        field, "key", "meta" and any other, blobs); None where `read` gives None."""
        return self.read(keys, as_record=True)

    def read(self, keys, *, as_record: bool = False) -> list[dict | None]:
        """Samples (or None) at global indices `keys`, in order (class docstring)."""
        keys = [int(k) for k in keys]
        groups: dict[int, list[int]] = {}
        for pos, k in enumerate(keys):
            if not 0 <= k < self._total:
                raise IndexError(f"record {k} out of range [0, {self._total}) of split {self.split!r}")
            groups.setdefault(bisect_right(self._starts, k) - 1, []).append(pos)
        jobs = {s: [keys[p] - self._starts[s] for p in ps] for s, ps in groups.items()}
        if len(jobs) > 1 and self._threads > 1:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="mmjax-records")
            futures = {s: self._pool.submit(self._read_shard, s, local) for s, local in jobs.items()}
            raws = {s: f.result() for s, f in futures.items()}
        else:
            raws = {s: self._read_shard(s, local) for s, local in jobs.items()}
        out: list[dict | None] = [None] * len(keys)
        payload = 0
        for s, ps in groups.items():
            for p, raw in zip(ps, raws[s]):
                out[p] = self._sample(raw, keys[p], as_record)
                payload += len(raw) if out[p] is not None else 0
        with self._lock:  # read() may be called from several threads
            self.bytes_read += payload
            self.keys_read += len(keys)
            self.unreadable += sum(o is None for o in out)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()

    def __getstate__(self):  # picklable (worker processes): open readers and the pool stay behind
        state = dict(self.__dict__, _readers={}, _pool=None)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
