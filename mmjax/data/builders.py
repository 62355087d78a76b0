"""TFDS builders of the built-in datasets, generated locally (no download), over one
scaffolding (`LocalBuilder`). Imports TensorFlow Datasets: import lazily (as
`mmjax.data.sources.builtin` does).

- `shapes` / `shapes_vqa`: example i of split s drawn from
  `np.random.default_rng([seed, split_index, i])` (`shapes_gen`); a `shapes_vqa`
  record has the image of the `shapes` record of that split and index and one question.
- `shapes_av`: the `shapes` record of that split and index heard and seen
  (`shapes_av_gen`): 'audio' the bytes of a stereo 16-bit 8 kHz WAV, 'depth' a 16-bit
  PNG in millimetres.
- `moving_shapes`: clips (`moving_shapes_gen`), 'video' a `tfds.features.Video` stored
  as T PNG frames (no ffmpeg): it decodes to uint8 [T, S, S, 3], and with
  `decoders={"video": tfds.decode.SkipDecoding()}` to a string [T] of PNG bytes, so a
  pipeline decodes only the frames it samples.
- `emoji`: Twemoji 72x72 PNGs + English names (`emoji_pairs`), split by a crc32 of
  the file name.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import emoji_pairs, moving_shapes_gen, shapes_av_gen, shapes_gen

SPLITS = ("train", "validation", "test")


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] (or uint16 [H, W]: a 16-bit gray PNG) -> PNG bytes (PIL is much
    faster than tfds's per-image TF encode)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_train: int = 20000
    num_validation: int = 1000
    num_test: int = 1000
    seed: int = 0
    NAME = "s{image_size}_n{num_train}-{num_validation}-{num_test}_seed{seed}"


@dataclasses.dataclass
class MovingShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_frames: int = 8
    num_train: int = 10000
    num_validation: int = 1000
    num_test: int = 1000
    seed: int = 0
    NAME = "s{image_size}_t{num_frames}_n{num_train}-{num_validation}-{num_test}_seed{seed}"


def make_config(config_class, **values):
    """A config of `config_class` whose name encodes every field (one directory per setting)."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    fields = {f.name: f.default for f in dataclasses.fields(config_class) if f.name not in base}
    fields.update(values)
    return config_class(name=config_class.NAME.format(**fields), **{k: int(v) for k, v in fields.items()})


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset generated here: nothing to download (no checksums file, and no
    code-path probing, which needs the optional `importlib_resources`), splits train /
    validation / test, records stored in id order ('id' = index in the split). A
    subclass gives `FEATURES` (name -> feature, given the config), `SUPERVISED` and
    `examples(split)`; one with settings also `CONFIG` (a config class)."""

    VERSION = tfds.core.Version("1.0.0")
    CONFIG = None
    SUPERVISED = ("image", "caption")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    @classmethod
    def for_options(cls, data_dir: str, **options):
        """The builder for these config values (by the registered config's name when equal)."""
        if cls.CONFIG is None:
            return cls(data_dir=data_dir)
        c = make_config(cls.CONFIG, **options)
        return cls(config=c.name if c.name in cls.builder_configs else c, data_dir=data_dir)

    def features(self) -> dict:
        raise NotImplementedError

    def examples(self, split: str):
        """Yields the feature dicts (without 'id') of `split` in order."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(dict(self.features(), id=np.int64)),
            supervised_keys=self.SUPERVISED,
            disable_shuffling=True,  # records stored in id order
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
        for i, ex in enumerate(self.examples(split)):
            yield i, dict(ex, id=i)

    def split_size(self, split: str) -> int:
        c = self.builder_config
        return {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}[split]


class MmjaxShapes(LocalBuilder):
    """Two coloured objects and a canonical compositional caption per image."""

    CONFIG = ShapesConfig
    BUILDER_CONFIGS = [make_config(ShapesConfig)]

    def features(self):
        s = self.builder_config.image_size
        return {
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "hard_negatives": tfds.features.Sequence(tfds.features.Text()),
            "label": tfds.features.ClassLabel(names=list(shapes_gen.CLASS_NAMES)),
        }

    def examples(self, split):
        c = self.builder_config
        for i in range(self.split_size(split)):
            ex = shapes_gen.example(c.seed, split, i, c.image_size)
            yield {
                "image": png_bytes(ex["image"]),
                "caption": ex["caption"],
                "hard_negatives": ex["hard_negatives"],
                "label": ex["label"],
            }


class MmjaxShapesVqa(MmjaxShapes):
    """`shapes` images with one question each (`shapes_gen.question_of`): the same
    image as the `shapes` record of that split and index (so a VQA test image was
    never a pretraining image), 'question' text and 'label' = the answer's class
    (ClassLabel over shapes_gen.ANSWERS)."""

    SUPERVISED = ("image", "question")
    BUILDER_CONFIGS = [make_config(ShapesConfig)]

    def features(self):
        s = self.builder_config.image_size
        return {
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "question": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(shapes_gen.ANSWERS)),
            "question_type": tfds.features.ClassLabel(names=list(shapes_gen.QUESTION_TYPES)),
        }

    def examples(self, split):
        c = self.builder_config
        for i in range(self.split_size(split)):
            ex = shapes_gen.vqa_example(c.seed, split, i, c.image_size)
            yield {
                "image": png_bytes(ex["image"]),
                "question": ex["question"],
                "label": ex["answer"],
                "question_type": ex["question_type"],
            }


class MmjaxShapesAv(MmjaxShapes):
    """`shapes` scenes with their audio and depth (`shapes_av_gen`): the image, caption,
    hard negatives and label of the `shapes` record of that split and index; 'audio'
    the bytes of a WAV file (stereo int16, 8000 Hz, 8192 samples); 'depth' uint16
    [S, S, 1] millimetres, stored as a 16-bit PNG."""

    BUILDER_CONFIGS = [make_config(ShapesConfig)]

    def features(self):
        s = self.builder_config.image_size
        return dict(
            super().features(),
            audio=tfds.features.Tensor(shape=(), dtype=np.object_),
            depth=tfds.features.Image(shape=(s, s, 1), dtype=np.uint16, encoding_format="png"),
        )

    def examples(self, split):
        c = self.builder_config
        for i in range(self.split_size(split)):
            ex = shapes_av_gen.example(c.seed, split, i, c.image_size)
            yield {
                "image": png_bytes(ex["image"]),
                "audio": shapes_av_gen.wav_bytes(ex["audio"]),
                "depth": png_bytes(ex["depth"]),
                "caption": ex["caption"],
                "hard_negatives": ex["hard_negatives"],
                "label": ex["label"],
            }


class MmjaxMovingShapes(LocalBuilder):
    """Clips of two objects and two events in sequence, captioned in order; the first
    hard negative is the caption of the clip played backwards (the time probe)."""

    CONFIG = MovingShapesConfig
    BUILDER_CONFIGS = [make_config(MovingShapesConfig)]
    SUPERVISED = ("video", "caption")

    def features(self):
        c = self.builder_config
        s = c.image_size
        return {
            "video": tfds.features.Video(shape=(c.num_frames, s, s, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "hard_negatives": tfds.features.Sequence(tfds.features.Text()),
        }

    def examples(self, split):
        c = self.builder_config
        for i in range(self.split_size(split)):
            ex = moving_shapes_gen.example(c.seed, split, i, c.image_size, c.num_frames)
            yield {
                "video": [png_bytes(f) for f in ex["video"]],
                "caption": ex["caption"],
                "hard_negatives": ex["hard_negatives"],
            }


class MmjaxEmoji(LocalBuilder):
    """~3,950 (emoji image, English name) pairs; RGBA composited on white -> RGB uint8
    [72, 72, 3]; split by crc32 of the file name."""

    def features(self):
        return {
            "image": tfds.features.Image(shape=(72, 72, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        }

    def examples(self, split):
        d = emoji_pairs.png_dir()
        for fn, cap in emoji_pairs.split_pairs(split):
            yield {"image": png_bytes(emoji_pairs.load_rgb(os.path.join(d, fn))), "caption": cap, "file_name": fn}


BUILDERS = {
    "shapes": MmjaxShapes,
    "shapes_vqa": MmjaxShapesVqa,
    "shapes_av": MmjaxShapesAv,
    "moving_shapes": MmjaxMovingShapes,
    "emoji": MmjaxEmoji,
}
