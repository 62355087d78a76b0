"""ArrayRecord shards written by `mmjax data convert` (`data.name='shards'`), or
img2dataset/webdataset tars read in place (`mmjax.data.tar_reader`): random
access, so training reads through the index-based pipeline (`mmjax.data.index_pipeline`):
a seeded global order, each process reading only the records of its own rows.

`data.path` is one directory, or a mixture `DIR:w,DIR:w,...` (`parse_path`): the train
split (`data.train_split`) is then read from every directory, each source getting a
fixed share w / sum(w) of every global batch; any other split (evaluation) is read
from the first directory. Each directory's manifest (DIR/manifest.json) gives its
splits, record counts, label names and a fingerprint; `records(split)` (an ordered
tf.data stream of the encoded records) serves evaluation and the decodability probe."""

from __future__ import annotations

import math
import os
import re
from bisect import bisect_right

import numpy as np

from mmjax.data import require_tf, tar_reader
from mmjax.data.sources import Source, register
from mmjax.errors import ConfigError


def parse_path(spec) -> list[tuple[str, float | None]]:
    """`data.path` -> [(directory, weight or None)]: split on ',', then a trailing
    ':NUMBER' of an entry is its weight (a path with ':' and no number, `gs://b/x`, is
    a path). Every entry has a weight or none has (None: shares proportional to record
    counts, as if the sets were concatenated); weights are finite and >= 0. ValueError
    (one line) otherwise."""
    entries = [e.strip() for e in str(spec).split(",")]
    if not all(entries):
        raise ValueError(f"data.path={spec!r} has an empty entry (a mixture is DIR:weight,DIR:weight,...)")
    out = []
    for entry in entries:
        head, sep, tail = entry.rpartition(":")
        try:
            weight = float(tail) if sep and head else None
        except ValueError:
            weight = None
        out.append((os.path.expanduser(head if weight is not None else entry), weight))
    given = [w for _, w in out if w is not None]
    if given and len(given) != len(out):
        raise ValueError(f"data.path={spec!r}: give every entry of a mixture a weight (DIR:weight), or none")
    if any(not math.isfinite(w) or w < 0 for w in given):
        raise ValueError(f"data.path={spec!r}: mixture weights must be finite and >= 0")
    return out


def source_names(directories: list[str]) -> list[str]:
    """Each directory's basename ([A-Za-z0-9_.-], the rest '_'), made unique by '_2', '_3', ..."""
    names: list[str] = []
    for d in directories:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(d))) or "shards"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


class Concatenated:
    """The readers of a mixture's sources as one split: keys and ids run over the first
    source's records, then the second's, ... (ids offset by the records before). Samples
    keep their 'label' only when every source has the same label names."""

    def __init__(self, readers: list):
        self.parts = list(readers)
        self.offsets = [0, *np.cumsum([len(r) for r in self.parts]).tolist()]
        self.directory = ",".join(r.directory for r in self.parts)
        self._labels = self.label_names is not None

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, keys) -> list[dict | None]:
        keys = [int(k) for k in keys]
        out: list[dict | None] = [None] * len(keys)
        groups: dict[int, list[int]] = {}
        for at, k in enumerate(keys):
            if not 0 <= k < len(self):
                raise IndexError(f"record {k} out of range [0, {len(self)}) of the mixture")
            groups.setdefault(bisect_right(self.offsets, k) - 1, []).append(at)
        for s, ats in groups.items():
            for at, sample in zip(ats, self.parts[s].read([keys[a] - self.offsets[s] for a in ats])):
                if sample is not None:
                    sample = dict(sample, id=sample["id"] + self.offsets[s])
                    if not self._labels:
                        sample.pop("label", None)
                out[at] = sample
        return out

    def captions(self) -> list[str]:
        return [c for r in self.parts for c in r.captions()]

    @property
    def label_names(self) -> list[str] | None:
        names = [r.label_names for r in self.parts]
        return names[0] if all(n == names[0] for n in names) else None


@register
class ShardsSource(Source):
    names = ("shards",)
    keys = {"path": None}  # a directory written by `mmjax data convert`, or DIR:w,DIR:w,... (a mixture)
    summary = "'shards' for ArrayRecord shards from `mmjax data convert` (or webdataset tars in place)"

    def __init__(self, data_config):
        super().__init__(data_config)
        self._readers = {}
        self._entries = None

    def entries(self) -> list[tuple[str, str, float | None]]:
        """[(name, directory, weight or None)] of `data.path` (`parse_path`, `source_names`);
        FileNotFoundError naming a directory without a manifest.json."""
        if self._entries is None:
            path = self.option("path")
            if not path:
                raise ValueError("data.name='shards' needs data.path (a directory written by `mmjax data convert`)")
            parsed = parse_path(path)
            for d, _ in parsed:
                if not os.path.isfile(os.path.join(d, "manifest.json")) and not tar_reader.is_tar_spec(d):
                    raise FileNotFoundError(
                        f"data.path entry {d!r} holds no manifest.json and no .tar files: convert the data "
                        "(`mmjax data convert SRC --out DIR`) or name webdataset tars (DIR or dir/{00000..00127}.tar)"
                    )
            names = source_names([d for d, _ in parsed])
            self._entries = [(n, d, w) for n, (d, w) in zip(names, parsed)]
        return self._entries

    def _open(self, directory: str, split: str):
        from mmjax.data.records import ArrayRecordShards

        if (directory, split) not in self._readers:  # ValueError naming the splits there
            if os.path.isfile(os.path.join(directory, "manifest.json")):
                self._readers[directory, split] = ArrayRecordShards(directory, split)
            elif split != self.option("train_split"):
                raise ValueError(
                    f"{directory}: webdataset tars are read as the training split only; evaluate on a set of "
                    "its own (data.eval_path) or convert them with `mmjax data convert --split`"
                )
            else:
                self._readers[directory, split] = tar_reader.TarShards(directory)
        return self._readers[directory, split]

    def mixture(self, split: str) -> list[tuple[str, float | None, object]]:
        """[(name, weight or None, reader)] of every source of the train split; another
        split is the first source's alone."""
        entries = self.entries()
        if split != self.option("train_split"):
            entries = entries[:1]
        return [(name, w, self._open(d, split)) for name, d, w in entries]

    def reader(self, split: str):
        """The split's random-access reader, opened once: `records.ArrayRecordShards`, or
        for a mixture's train split a `Concatenated` view of its sources."""
        readers = [r for _, _, r in self.mixture(split)]
        return readers[0] if len(readers) == 1 else Concatenated(readers)

    def records(self, split: str):
        """The split in key order, as the pipeline's records: 'image' (or 'video_file') bytes,
        'caption', 'id' and 'label' where the data has labels. An unreadable record is
        left out (counted by `dropped`)."""
        tf = require_tf()
        reader = self.reader(split)
        sample = next((s for s in reader.read(range(min(len(reader), 64))) if s is not None), None)
        if sample is None:
            raise ValueError(f"{self.describe(split)}: none of its first records reads")
        media = "video_file" if "video_file" in sample else "image"
        spec = {media: tf.TensorSpec([], tf.string), "caption": tf.TensorSpec([], tf.string)}
        spec["id"] = tf.TensorSpec([], tf.int64)
        if "label" in sample:
            spec["label"] = tf.TensorSpec([], tf.int64)

        def gen(chunk=256):
            for start in range(0, len(reader), chunk):
                for s in reader.read(range(start, min(start + chunk, len(reader)))):
                    if s is not None:
                        yield {k: (np.int64(s[k]) if k in ("id", "label") else s[k]) for k in spec}

        return tf.data.Dataset.from_generator(gen, output_signature=spec)

    def num_examples(self, split: str) -> int:
        return len(self.reader(split))

    def captions(self, split: str) -> list[str]:
        """The split's captions (a mixture's train split: every source's, in order)."""
        return self.reader(split).captions()

    def label_names(self) -> list[str] | None:
        """The train split's label names; for a mixture, the sources' common label names,
        or None when they differ (then training batches carry no 'label')."""
        return self.reader(self.option("train_split")).label_names

    def describe(self, split: str) -> str:
        return f"shards at {self.option('path')!r} (split {split!r})"

    @classmethod
    def eval_set(cls, data: dict, path: str, split: str):
        """data.eval_path = a converted directory: its split `split`, or for data.eval_split
        its only split (a list converted with the default split 'train')."""
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            return None
        from mmjax.data import manifest
        from mmjax.data.schema import option

        splits = list(manifest.read_manifest(path).get("splits", {}))
        if split not in splits and not (split == option(data, "eval_split") and len(splits) == 1):
            raise ConfigError(
                f"data.eval_path={path!r} has no split {split!r} (its splits: {', '.join(splits) or 'none'}); "
                "set data.eval_split to one of them"
            )
        split = split if split in splits else splits[0]
        return dict(data, name=cls.names[0], path=path, train_split=split, eval_split=split), split
