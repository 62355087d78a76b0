"""webdataset tar shards as img2dataset and video2dataset write them (no TensorFlow).

A shard is an uncompressed tar whose members are `{key}.{ext}`: `jpg`/`png`/`webp` (or
`mp4`) media, `txt` caption, `json` metadata. Members are grouped into samples by the
webdataset rule: key = the member path up to the first dot of its basename, ext = the
rest, lower-cased (`a/0001.seg.JPG` -> key `a/0001`, ext `seg.jpg`); consecutive
members with the same key form one sample.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Callable, Iterator

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
END_SLACK = 1024  # a complete tar ends with two zero blocks of 512 bytes after its last member


def _split_top_commas(spec: str) -> list[str]:
    """'a/{0..3}.tar,b' -> ['a/{0..3}.tar', 'b'] (commas inside braces do not split)."""
    parts, depth, cur = [], 0, ""
    for c in spec:
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    return [p.strip() for p in parts + [cur] if p.strip()]


def _expand_braces(pattern: str) -> list[str]:
    """'d/{00000..00002}.tar' -> ['d/00000.tar', 'd/00001.tar', 'd/00002.tar'] (zero padding
    kept: the width of the first bound when it starts with 0); several ranges multiply."""
    m = _RANGE.search(pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") and len(a) > 1 else 0
    step = 1 if int(b) >= int(a) else -1
    out = []
    for n in range(int(a), int(b) + step, step):
        out.extend(_expand_braces(pattern[: m.start()] + str(n).zfill(width) + pattern[m.end() :]))
    return out


def expand_shards(spec: str) -> list[str]:
    """Tar paths of `spec`: a comma-separated list of brace patterns (`dir/{00000..00127}.tar`),
    glob patterns, files, or directories (a directory -> its `*.tar`, sorted). Order is kept,
    repeats dropped. FileNotFoundError (one line) when nothing matches or a named file is missing."""
    out: list[str] = []
    missing: list[str] = []
    for part in _split_top_commas(str(spec)):
        for p in _expand_braces(os.path.expanduser(part)):
            if os.path.isdir(p):
                out.extend(sorted(glob.glob(os.path.join(p, "*.tar"))))
            elif any(c in p for c in "*?["):
                out.extend(sorted(glob.glob(p)))
            elif os.path.isfile(p):
                out.append(p)
            else:
                missing.append(p)
    out = list(dict.fromkeys(out))
    if missing:
        raise FileNotFoundError(f"{spec}: {len(missing)} shard(s) not found (first: {missing[0]})")
    if not out:
        raise FileNotFoundError(f"{spec}: no tar shards found")
    return out


def split_key(name: str) -> tuple[str, str] | None:
    """Member path -> (key, lower-cased ext) by the webdataset rule, None without a dot."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _tail_is_clean(f, end: int, size: int) -> bool:
    """Whether the bytes after the last member (from `end`) are a tar's end: at least two
    zero blocks and nothing else but zeros."""
    if size - end < END_SLACK:
        return False
    f.seek(end)
    while block := f.read(1 << 16):
        if block.count(0) != len(block):
            return False
    return True


def iter_tar_samples(
    path: str, on_truncated: Callable[[str], None] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of the tar at `path`, in member order (module
    docstring); members that are not regular files or have no ext are ignored.

    A truncated or damaged tar (a read error inside a member or header, or an end that is
    not two zero blocks followed by zeros, e.g. a cut at a header boundary, which tarfile
    passes silently) yields what was readable: the samples before the damage, the
    sample being read when a member was cut without that member, and then calls
    `on_truncated(reason)` once, after the last sample.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        key, sample, reason = None, {}, None
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    parts = split_key(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    data = tar.extractfile(member).read()
                    if parts[0] != key:
                        if key is not None:
                            yield key, sample
                        key, sample = parts[0], {}
                    sample[parts[1]] = data
                end = tar.offset
            if not _tail_is_clean(f, end, size):
                reason = f"{path}: ends at byte {size} without the end of archive after byte {end}"
        except (tarfile.TarError, EOFError) as e:
            reason = f"{path}: {type(e).__name__}: {e}"
        if key is not None and sample:
            yield key, sample
    if reason and on_truncated is not None:
        on_truncated(reason)
