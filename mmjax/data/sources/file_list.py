"""Lists of the user's own files (`data.name='files'`): a CSV or JSONL at data.path,
read by `mmjax.data.files` (rows of image or video paths, and/or audio and depth
paths, captions and optional labels; records 'image_path', 'video_path', 'audio_path',
'depth_path' as the list has them). A row with a missing file is dropped when the list
is read and counted as skipped before the stream; data.eval_fraction holds out a stable fraction as 'test', unless
data.eval_path names the eval set: then every row is for training."""

from __future__ import annotations

import os

import numpy as np

from mmjax.data import files as files_lib
from mmjax.data import require_tf
from mmjax.data.sources import Source, register


@register
class FileListSource(Source):
    names = ("files",)
    keys = {"path": None, "eval_fraction": 0.0}  # the list; the fraction held out as 'test'
    summary = "'files' for your own list"

    def __init__(self, data_config):
        super().__init__(data_config)
        self._list = None

    def _read(self):
        """-> (every kept row, the missing paths, the label names); read once."""
        if self._list is None:
            path = self.option("path")
            if not path:
                raise ValueError("data.name='files' needs data.path (a CSV or JSONL list)")
            files_lib.check_eval_fraction(self.option("eval_fraction"))
            rows, missing = files_lib.read_list(path, text_len=int(self.option("text_len")))
            self._list = rows, missing, files_lib.label_names(rows)
        return self._list

    def rows(self, split: str) -> list[dict]:
        held_out = 0.0 if self.option("eval_path") else self.option("eval_fraction")  # an eval set of its own
        return files_lib.split_rows(self._read()[0], split, held_out)

    def records(self, split: str):
        tf = require_tf()
        rows, names = self.rows(split), self._read()[2]
        keys = files_lib.path_keys(self._read()[0])
        cols = {key: [r[key] for r in rows] for key in keys}
        cols["caption"] = [r["caption"] for r in rows]
        cols["id"] = np.array([r["id"] for r in rows], np.int64)
        if names:
            idx = {n: i for i, n in enumerate(names)}
            cols["label"] = np.array([idx.get(r.get("label"), -1) for r in rows], np.int64)
        if not rows:
            cols.update({k: np.zeros([0], object).astype(str) for k in [*keys, "caption"]})
        return tf.data.Dataset.from_tensor_slices(cols)

    def num_examples(self, split: str) -> int:
        return len(self.rows(split))

    def captions(self, split: str) -> list[str]:
        return [r["caption"] for r in self.rows(split)]

    def label_names(self) -> list[str] | None:
        return self._read()[2]

    def dropped(self, split: str) -> int:
        return len(self._read()[1])

    def describe(self, split: str) -> str:
        return f"data.path={os.path.expanduser(str(self.option('path')))} (split {split!r})"

    @classmethod
    def eval_set(cls, data: dict, path: str, split: str):
        """data.eval_path = a list file: all of its rows are the eval set (split 'all')."""
        del split
        if os.path.isdir(path):
            return None
        return dict(data, name=cls.names[0], path=path, eval_fraction=0.0, train_split="all", eval_split="all"), "all"
