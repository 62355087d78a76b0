"""ArrayRecord shards written by `mmjax data convert` (`data.name='shards'`,
`data.path=DIR`): random access, so training reads through the index-based pipeline
(`mmjax.data.index_pipeline`): a seeded global order, each process reading only the
records of its own rows. The manifest (DIR/manifest.json) gives the splits, record
counts, label names and a fingerprint; `records(split)` (an ordered tf.data stream of
the encoded records) serves evaluation and the decodability probe."""

from __future__ import annotations

import os

import numpy as np

from mmjax.data import require_tf
from mmjax.data.sources import Source, register


@register
class ShardsSource(Source):
    names = ("shards",)
    keys = {"path": None}  # a directory written by `mmjax data convert` (manifest.json inside)
    summary = "'shards' for ArrayRecord shards from `mmjax data convert`"

    def __init__(self, data_config):
        super().__init__(data_config)
        self._readers = {}

    def _dir(self) -> str:
        path = self.option("path")
        if not path:
            raise ValueError("data.name='shards' needs data.path (a directory written by `mmjax data convert`)")
        path = os.path.expanduser(str(path))
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise FileNotFoundError(
                f"data.path={path!r} holds no manifest.json: convert the data first (`mmjax data convert SRC --out DIR`)"
            )
        return path

    def reader(self, split: str):
        """The split's random-access reader (`records.ArrayRecordShards`), opened once."""
        from mmjax.data.records import ArrayRecordShards

        if split not in self._readers:
            self._readers[split] = ArrayRecordShards(self._dir(), split)  # ValueError naming the splits there
        return self._readers[split]

    def records(self, split: str):
        """The split in key order, as the pipeline's records: 'image' (or 'video') bytes,
        'caption', 'id' and 'label' where the data has labels. An unreadable record is
        left out (counted by `dropped`)."""
        tf = require_tf()
        reader = self.reader(split)
        sample = next((s for s in reader.read(range(min(len(reader), 64))) if s is not None), None)
        if sample is None:
            raise ValueError(f"{self.describe(split)}: none of its first records reads")
        media = "video" if "video" in sample else "image"
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
        return self.reader(split).captions()

    def label_names(self) -> list[str] | None:
        return self.reader(self.option("train_split")).label_names

    def describe(self, split: str) -> str:
        return f"shards at {self.option('path')!r} (split {split!r})"
