"""TFDS builder of the `emoji` dataset: Twemoji 72x72 PNGs + English names.

Imports TensorFlow Datasets; import lazily. Built locally from package data (no network).
RGBA is composited on white -> RGB uint8 [72, 72, 3].
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import emoji_pairs
from mmjax.data.shapes import png_bytes


def load_rgb(path: str) -> np.ndarray:
    """PNG file -> uint8 [H, W, 3], alpha composited on a white background."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, im).convert("RGB"))


class MmjaxEmoji(tfds.core.GeneratorBasedBuilder):
    """~3,950 (emoji image, English name) pairs; split by crc32 of the file name."""

    # No checksums file to look up (nothing is downloaded); this also avoids tfds's
    # code-path probing, which needs the optional `importlib_resources` package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(72, 72, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                    "id": np.int64,
                }
            ),
            supervised_keys=("image", "caption"),
            disable_shuffling=True,  # records stored in id order
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in ("train", "validation", "test")}

    def _generate_examples(self, split):
        d = emoji_pairs.png_dir()
        for i, (fn, cap) in enumerate(emoji_pairs.split_pairs(split)):
            yield i, {"image": png_bytes(load_rgb(os.path.join(d, fn))), "caption": cap, "file_name": fn, "id": i}
