"""A user's LLaVA-format conversations (`data.name='llava_json'`): a JSON list or JSONL
at data.path of `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}`
records, image paths relative to data.image_root (default: the file's directory).
Read by `mmjax.data.conversations.read_llava_json`: a malformed record or a missing
image is skipped and counted (before the stream, as `dropped`), never an exception
unless nothing is left. Each record is one image with its whole conversation; the
conversation travels as JSON in the record's 'caption' and the run's data.chat
template renders it (data.chat.task='llava', set by this source). data.eval_fraction
holds out a stable fraction of the images as 'test'."""

from __future__ import annotations

import json
import os

import numpy as np

from mmjax.data import files as files_lib
from mmjax.data import require_tf
from mmjax.data.sources import Source, register


def conversation_json(conv) -> str:
    """A Conversation -> the JSON a record carries (turns and system prompt)."""
    return json.dumps({"turns": [list(t) for t in conv.turns], "system": conv.system, "id": conv.id})


@register
class LlavaJsonSource(Source):
    names = ("llava_json",)
    keys = {"path": None, "image_root": None, "eval_fraction": 0.0}
    summary = "'llava_json' for LLaVA-format conversations"

    def __init__(self, data_config):
        super().__init__(data_config)
        self._rows = None

    def _read(self):
        """-> (rows {image_path, caption (the conversation's JSON), id}, skipped count); read once."""
        if self._rows is None:
            from mmjax.data.conversations import read_llava_json

            path = self.option("path")
            if not path:
                raise ValueError("data.name='llava_json' needs data.path (a LLaVA-format JSON or JSONL file)")
            path = os.path.expanduser(str(path))
            root = self.option("image_root") or os.path.dirname(os.path.abspath(path))
            files_lib.check_eval_fraction(self.option("eval_fraction"))
            convs = read_llava_json(path, os.path.expanduser(str(root)))
            rows = [
                {"image_path": str(c.image), "caption": conversation_json(c), "id": i}
                for i, c in enumerate(convs)
                if c.image is not None
            ]
            skipped = sum(convs.skipped.values()) + (len(convs) - len(rows))
            self._rows = rows, skipped
        return self._rows

    def rows(self, split: str) -> list[dict]:
        held_out = 0.0 if self.option("eval_path") else self.option("eval_fraction")
        return files_lib.split_rows(self._read()[0], split, held_out)

    def records(self, split: str):
        tf = require_tf()
        rows = self.rows(split)
        cols = {
            "image_path": [r["image_path"] for r in rows],
            "caption": [r["caption"] for r in rows],
            "id": np.array([r["id"] for r in rows], np.int64),
        }
        if not rows:
            cols["image_path"] = cols["caption"] = np.zeros([0], object).astype(str)
        return tf.data.Dataset.from_tensor_slices(cols)

    def num_examples(self, split: str) -> int:
        return len(self.rows(split))

    def captions(self, split: str) -> list[str]:
        """The conversations' texts, image markers removed (what a tokenizer is trained on)."""
        from mmjax.data.chat_templates import IMAGE

        out = []
        for r in self.rows(split):
            for user, answer in json.loads(r["caption"])["turns"]:
                out += [t.replace(IMAGE, "").strip() for t in (user, answer) if t]
        return out

    def dropped(self, split: str) -> int:
        return self._read()[1]

    def describe(self, split: str) -> str:
        return f"data.path={os.path.expanduser(str(self.option('path')))} (split {split!r})"
