"""TFDS builder of the procedural `moving_shapes` video dataset (imports TensorFlow;
import lazily).

Generated locally (no download) from `mmjax.data.moving_shapes_gen`; clip i of split s
is drawn from `np.random.default_rng([seed, split_index, i])`. 'video' is a
`tfds.features.Video` stored as T PNG frames (no ffmpeg involved): it decodes to uint8
[T, S, S, 3], and with `decoders={"video": tfds.decode.SkipDecoding()}` to a string
[T] of PNG bytes, so a pipeline can decode only the frames it samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import moving_shapes_gen
from mmjax.data.shapes import png_bytes


@dataclasses.dataclass
class MovingShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_frames: int = 8
    num_train: int = 10000
    num_validation: int = 1000
    num_test: int = 1000
    seed: int = 0


def make_config(
    image_size=32, num_frames=8, num_train=10000, num_validation=1000, num_test=1000, seed=0
) -> MovingShapesConfig:
    """A config whose name encodes every field (one directory per setting)."""
    name = f"s{image_size}_t{num_frames}_n{num_train}-{num_validation}-{num_test}_seed{seed}"
    return MovingShapesConfig(
        name=name,
        image_size=int(image_size),
        num_frames=int(num_frames),
        num_train=int(num_train),
        num_validation=int(num_validation),
        num_test=int(num_test),
        seed=int(seed),
    )


class MmjaxMovingShapes(tfds.core.GeneratorBasedBuilder):
    """Clips of two objects and two events in sequence, captioned in order; the first
    hard negative is the caption of the clip played backwards (the time probe)."""

    # Nothing is downloaded: no checksums file, no code-path probing (see MmjaxShapes).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [make_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        s = c.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Video(shape=(c.num_frames, s, s, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "hard_negatives": tfds.features.Sequence(tfds.features.Text()),
                    "id": np.int64,
                }
            ),
            supervised_keys=("video", "caption"),
            disable_shuffling=True,  # records stored in id order
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {k: self._generate_examples(k, n) for k, n in sizes.items()}

    def _generate_examples(self, split, n):
        c = self.builder_config
        for i in range(n):
            ex = moving_shapes_gen.example(c.seed, split, i, c.image_size, c.num_frames)
            yield (
                i,
                {
                    "video": [png_bytes(f) for f in ex["video"]],
                    "caption": ex["caption"],
                    "hard_negatives": ex["hard_negatives"],
                    "id": i,
                },
            )
