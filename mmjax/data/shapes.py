"""TFDS builder of the procedural `shapes` dataset (imports TensorFlow; import lazily).

Generated locally (no download) from `mmjax.data.shapes_gen`; example i of split s is
drawn from `np.random.default_rng([seed, split_index, i])`.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import shapes_gen


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (PIL is much faster than tfds's per-image TF encode)."""
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


def make_config(image_size=32, num_train=20000, num_validation=1000, num_test=1000, seed=0) -> ShapesConfig:
    """A config whose name encodes every field (one directory per setting)."""
    name = f"s{image_size}_n{num_train}-{num_validation}-{num_test}_seed{seed}"
    return ShapesConfig(
        name=name,
        image_size=int(image_size),
        num_train=int(num_train),
        num_validation=int(num_validation),
        num_test=int(num_test),
        seed=int(seed),
    )


class MmjaxShapes(tfds.core.GeneratorBasedBuilder):
    """Two coloured objects and a canonical compositional caption per image."""

    # No checksums file to look up (nothing is downloaded); this also avoids tfds's
    # code-path probing, which needs the optional `importlib_resources` package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [make_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "hard_negatives": tfds.features.Sequence(tfds.features.Text()),
                    "label": tfds.features.ClassLabel(names=list(shapes_gen.CLASS_NAMES)),
                    "id": np.int64,
                }
            ),
            supervised_keys=("image", "caption"),
            disable_shuffling=True,  # records stored in id order
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {k: self._generate_examples(k, n) for k, n in sizes.items()}

    def _generate_examples(self, split, n):
        c = self.builder_config
        for i in range(n):
            ex = shapes_gen.example(c.seed, split, i, c.image_size)
            yield (
                i,
                {
                    "image": png_bytes(ex["image"]),
                    "caption": ex["caption"],
                    "hard_negatives": ex["hard_negatives"],
                    "label": ex["label"],
                    "id": i,
                },
            )


class MmjaxShapesVqa(MmjaxShapes):
    """`shapes` images with one question each (`shapes_gen.question_of`): the same
    image as the `shapes` record of that split and index (so a VQA test image was
    never a pretraining image), 'question' text and 'label' = the answer's class
    (ClassLabel over shapes_gen.ANSWERS)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [make_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "question": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(shapes_gen.ANSWERS)),
                    "question_type": tfds.features.ClassLabel(names=list(shapes_gen.QUESTION_TYPES)),
                    "id": np.int64,
                }
            ),
            supervised_keys=("image", "question"),
            disable_shuffling=True,
        )

    def _generate_examples(self, split, n):
        c = self.builder_config
        for i in range(n):
            ex = shapes_gen.vqa_example(c.seed, split, i, c.image_size)
            yield (
                i,
                {
                    "image": png_bytes(ex["image"]),
                    "question": ex["question"],
                    "label": ex["answer"],
                    "question_type": ex["question_type"],
                    "id": i,
                },
            )
