"""img2dataset / webdataset tars read in place, by random access (`data.name=shards`,
`data.path=` a directory of `*.tar` or a brace pattern `dir/{00000..00127}.tar`).

The reader contract of `records.ArrayRecordShards` (`__len__`, `read(keys)`, `shards`,
`captions()`, counters), so training goes through the index-based pipeline: a seeded
global order, each process reading only its rows' members (`os.pread` at the offsets of
a member index).

The index: one pass over each tar's headers (`tarfile` in seekable mode: no member
data is read, except the `.txt` captions), keeping for each key (the webdataset rule,
`tars.split_key`) its media member (jpg/jpeg/png/webp, or mp4) and its caption. A
sample without media or caption is left out (counted in `left_out`); a tar cut short
keeps the samples whose members lie whole before the cut. Records are numbered in tar
order, then member order. The index of a tar is cached (JSON, keyed by the tar's path,
size and mtime) under `$MMJAX_CACHE_DIR/tar_index` (default `~/.cache/mmjax`), so each
host indexes a tar once; a cache that cannot be written is skipped.

Media are not checked here: an undecodable image is a decode failure in the pipeline,
replaced in its own row and counted like a corrupt shard record. `mmjax data convert`
checks every sample once, drops the bad ones and writes ArrayRecord shards, which read
faster (no per-sample member lookups) and carry a manifest; read tars in place to
start at once, convert for long runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import threading
from bisect import bisect_right

from mmjax.data import tars

log = logging.getLogger(__name__)

MEDIA_EXTS = ("jpg", "jpeg", "png", "webp", "mp4")  # in order of preference
INDEX_VERSION = 1


def _cache_path(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{INDEX_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    root = os.environ.get("MMJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmjax")
    return os.path.join(root, "tar_index", key.hexdigest() + ".json")


def _scan(path: str) -> tuple[list[list], int]:
    """-> ([[media ext, data offset, size, caption], ...] in member order, samples left out)."""
    size = os.path.getsize(path)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                parts = tars.split_key(m.name) if m.isfile() else None
                if parts is not None and m.offset_data + m.size <= size:
                    members.setdefault(parts[0], {})[parts[1]] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        log.warning("%s: indexed up to a damaged part (%s)", path, e)
    out, left_out = [], 0
    with open(path, "rb") as f:
        for exts in members.values():
            media = next((e for e in MEDIA_EXTS if e in exts), None)
            if media is None or "txt" not in exts:
                left_out += 1
                continue
            off, n = exts["txt"]
            caption = os.pread(f.fileno(), n, off).decode("utf-8", "replace").replace("\n", " ").strip()
            out.append([media, *exts[media], caption])
    return out, left_out


def index_tar(path: str) -> tuple[list[list], int]:
    """The tar's samples and the count left out (`_scan`), from the cache when it has them."""
    cache = _cache_path(path)
    try:
        with open(cache) as f:
            data = json.load(f)
        return data["samples"], int(data["left_out"])
    except (OSError, ValueError, KeyError):
        pass
    samples, left_out = _scan(path)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"samples": samples, "left_out": left_out}, f)
        os.replace(tmp, cache)
    except OSError as e:
        log.info("tar index cache not written (%s)", e)
    return samples, left_out


def is_tar_spec(spec: str) -> bool:
    """Whether `spec` names tars: a pattern ending in .tar, or a directory holding *.tar."""
    spec = os.path.expanduser(str(spec))
    if spec.endswith(".tar"):
        return True
    return os.path.isdir(spec) and any(f.endswith(".tar") for f in os.listdir(spec))


class TarShards:
    """Random access over the samples of webdataset tars (module docstring).

    `read(keys)` -> per key {"image" (or "video_file" for mp4): bytes, "caption": str,
    "id": key}, or None when the member cannot be read; `keys_read`, `bytes_read`,
    `unreadable` count as in `ArrayRecordShards`."""

    def __init__(self, spec: str):
        self.directory = str(spec)
        self.paths = tars.expand_shards(os.path.expanduser(str(spec)))
        self._index, self.shards, self.left_out = [], [], 0
        for path in self.paths:
            samples, left_out = index_tar(path)
            self._index.append(samples)
            self.left_out += left_out
            self.shards.append({"path": path, "records": len(samples), "bytes": os.path.getsize(path), "sha256": None})
        self._starts = [0]
        for samples in self._index:
            self._starts.append(self._starts[-1] + len(samples))
        if not self._starts[-1]:
            raise ValueError(f"{spec}: no sample with an image (or mp4) and a .txt caption in {len(self.paths)} tar(s)")
        self.label_names = None
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = self.keys_read = self.unreadable = 0

    def __len__(self) -> int:
        return self._starts[-1]

    def captions(self) -> list[str]:
        return [s[3] for samples in self._index for s in samples]

    def _fd(self, t: int) -> int:
        with self._lock:
            if t not in self._fds:
                self._fds[t] = os.open(self.paths[t], os.O_RDONLY)
            return self._fds[t]

    def _one(self, key: int) -> dict | None:
        if not 0 <= key < len(self):
            raise IndexError(f"record {key} out of range [0, {len(self)}) of {self.directory}")
        t = bisect_right(self._starts, key) - 1
        media, off, n, caption = self._index[t][key - self._starts[t]]
        try:
            data = os.pread(self._fd(t), n, off)
        except OSError as e:
            log.warning("%s: sample %d unreadable (%s)", self.paths[t], key, e)
            return None
        if len(data) != n:
            return None
        return {"video_file" if media == "mp4" else "image": data, "caption": caption, "id": key}

    def read(self, keys) -> list[dict | None]:
        out = [self._one(int(k)) for k in keys]
        with self._lock:
            self.keys_read += len(out)
            self.bytes_read += sum(len(s.get("image", s.get("video_file", b""))) for s in out if s is not None)
            self.unreadable += sum(s is None for s in out)
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
