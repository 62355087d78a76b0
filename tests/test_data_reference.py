"""The data layer's batches, bit for bit, against digests recorded from the code before
the source/pipeline restructuring of issue 15 (mmjax/data/sources.py, decode.py, augment.py and
the iterators as they were at commit 5116a9d).

Every built-in kind of source goes through the train and eval iterators: `shapes`
(augmented, with the in-memory cache, with hard negatives), `shapes_vqa`, a CSV file
list with a missing and an undecodable file (skip counts and `data_state` included),
`moving_shapes` clips, and a TFDS catalog dataset (a tiny builder registered here and
prepared in a temporary data_dir: no download). A digest covers each array's dtype,
shape and bytes, so any change of a pixel, a token, an id, a label, a negative, a
validity mask or a stream position fails the test.

The digests are TensorFlow's CPU numerics: if a TensorFlow upgrade changes them (and
the code did not), print the new table with `python tests/test_data_reference.py` and
review the diff before replacing REFERENCE.
"""

import functools
import hashlib
import os
import sys

import numpy as np
import pytest


class CharTokenizer:
    """Deterministic stand-in for sentencepiece: bos, one id per byte, eos, pad 0."""

    pad_id, bos_id, eos_id = 0, 2, 3

    def encode(self, texts, length):
        out = np.zeros((len(texts), length), np.int32)
        for i, t in enumerate(texts):
            ids = [self.bos_id] + [6 + b % 250 for b in t.encode("utf-8")][: length - 2] + [self.eos_id]
            out[i, : len(ids)] = ids
        return out


def _digest(batch) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        v = batch[k]
        if k == "data_state":
            h.update(f"{k}={sorted(v.items())}".encode())
            continue
        v = np.asarray(v)
        if v.dtype == object:
            h.update(f"{k}:object{v.shape}".encode() + b"\0".join(x if isinstance(x, bytes) else x.encode() for x in v))
        else:
            h.update(f"{k}:{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def _shapes(data_dir, **kw):
    cfg = {
        "name": "shapes",
        "data_dir": str(data_dir),
        "image_size": 16,
        "text_len": 16,
        "augment": {"crop_scale": (0.6, 1.0), "aspect": (0.75, 1.33), "flip": True},
        "shuffle_buffer": 100,
        "train_split": "train",
        "eval_split": "test",
        "shapes": {"image_size": 16, "num_train": 64, "num_validation": 8, "num_test": 25, "seed": 0},
    }
    cfg.update(kw)
    return cfg


def _moving(data_dir, **kw):
    cfg = {
        "name": "moving_shapes",
        "data_dir": str(data_dir),
        "image_size": 12,
        "text_len": 16,
        "num_frames": 4,
        "frame_sampling": "random",
        "augment": {"crop_scale": (0.6, 1.0), "aspect": (0.75, 1.33), "flip": True},
        "shuffle_buffer": 64,
        "moving_shapes": {
            "image_size": 16,
            "num_frames": 8,
            "num_train": 24,
            "num_validation": 4,
            "num_test": 12,
            "seed": 0,
        },
    }
    cfg.update(kw)
    return cfg


def _image_list(d):
    """A CSV of 10 random images of varied sizes (labels a/b/c), one undecodable PNG and
    one missing file."""
    from PIL import Image

    rng = np.random.default_rng(7)
    rows = []
    for i in range(10):
        h, w = 18 + i % 3, 24 - i % 4
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append(f"{i}.png,picture number {i},{'abc'[i % 3]}")
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rows.insert(3, "bad.png,a corrupt picture,a")
    rows.insert(6, "gone.png,a missing picture,b")
    (d / "list.csv").write_text("image_path,caption,label\n" + "\n".join(rows) + "\n")
    return str(d / "list.csv")


def _files(path, **kw):
    cfg = {
        "name": "files",
        "path": path,
        "image_size": 16,
        "text_len": 12,
        "shuffle_buffer": 50,
        "augment": {"crop_scale": (0.5, 1.0), "aspect": (0.75, 1.33), "flip": True},
    }
    cfg.update(kw)
    return cfg


CATALOG = "mmjax_reference_catalog"


@functools.cache
def _catalog_builder_class():
    """A catalog-style TFDS dataset (registered under CATALOG): images and class labels,
    no caption and no id feature, so captions come from the label names."""
    import tensorflow_datasets as tfds

    class MmjaxReferenceCatalog(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(10, 10, 3), encoding_format="png"),
                        "label": tfds.features.ClassLabel(names=["cat", "dog", "fox"]),
                    }
                ),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 12), "test": self._generate_examples(1, 5)}

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 255, (10, 10, 3), dtype=np.uint8), "label": i % 3}

    return MmjaxReferenceCatalog


def _take(it, n):
    return [next(it) for _ in range(n)]


def _source_facts(P, cfg, splits):
    facts = {s: P.num_examples(cfg, s) for s in splits}
    caps = P.captions(cfg, splits[0])
    facts["captions"] = hashlib.sha256("\n".join(caps).encode()).hexdigest()[:16]
    facts["label_names"] = P.label_names(cfg)
    facts["answer_types"] = P.answer_types(cfg)
    return facts


def compute(root) -> dict:
    """{case: digests (one per batch) or facts} for the data under directory `root`."""
    from mmjax.data import pipeline as P

    tok, out = CharTokenizer(), {}
    tfds_dir = os.path.join(root, "tfds")
    shapes = _shapes(tfds_dir)
    out["shapes/train"] = [_digest(b) for b in _take(P.make_train_iterator(shapes, tok, 8, seed=3), 10)]
    cached = dict(shapes, cache_decoded=True, augment={"crop_scale": (1.0, 1.0), "aspect": (1.0, 1.0)})
    out["shapes/train_cached"] = [_digest(b) for b in _take(P.make_train_iterator(cached, tok, 8, seed=0), 3)]
    it = P.make_train_iterator(shapes, tok, 8, seed=1, hard_negatives=2)
    out["shapes/train_hard_negatives"] = [_digest(b) for b in _take(it, 3)]
    out["shapes/eval"] = [_digest(b) for b in P.make_eval_iterator(shapes, tok, "test", 8)]
    out["shapes/eval_shard1of2"] = [
        _digest(b) for b in P.make_eval_iterator(shapes, tok, "test", 8, process_index=1, process_count=2)
    ]
    out["shapes/facts"] = _source_facts(P, shapes, ["train", "validation", "test"])
    vqa = _shapes(tfds_dir, name="shapes_vqa", text_len=24)
    out["shapes_vqa/eval"] = [_digest(b) for b in P.make_eval_iterator(vqa, tok, "test", 8)]
    out["shapes_vqa/facts"] = _source_facts(P, vqa, ["train", "test"])

    lst = os.path.join(root, "list")
    os.makedirs(lst, exist_ok=True)
    files = _files(_image_list(__import__("pathlib").Path(lst)))
    it = P.make_train_iterator(files, tok, 3, seed=0)
    out["files/train"] = [_digest(b) for b in _take(it, 8)] + [f"skipped={it.skipped}"]
    ev = P.make_eval_iterator(files, tok, "train", 4)
    out["files/eval"] = [_digest(b) for b in ev] + [f"skipped={ev.skipped}"]
    # (data.eval_fraction splits by a checksum of the absolute path: not comparable here)
    out["files/facts"] = _source_facts(P, files, ["train"])

    moving = _moving(tfds_dir)
    out["moving_shapes/train"] = [_digest(b) for b in _take(P.make_train_iterator(moving, tok, 4, seed=0), 4)]
    uniform = dict(moving, frame_sampling="uniform", cache_decoded=True)
    out["moving_shapes/train_cached"] = [_digest(b) for b in _take(P.make_train_iterator(uniform, tok, 4, seed=2), 2)]
    out["moving_shapes/eval"] = [_digest(b) for b in P.make_eval_iterator(moving, tok, "test", 8)]
    out["moving_shapes/facts"] = _source_facts(P, moving, ["train", "test"])

    builder = _catalog_builder_class()(data_dir=tfds_dir)
    builder.download_and_prepare()
    catalog = {"name": CATALOG, "data_dir": tfds_dir, "image_size": 8, "text_len": 12, "shuffle_buffer": 20}
    out["catalog/train"] = [_digest(b) for b in _take(P.make_train_iterator(catalog, tok, 4, seed=0), 4)]
    out["catalog/eval"] = [_digest(b) for b in P.make_eval_iterator(catalog, tok, "test", 4)]
    out["catalog/facts"] = _source_facts(P, catalog, ["train", "test"])
    out["builders"] = _builder_facts(tfds_dir)
    return out


def _builder_facts(tfds_dir) -> dict:
    """Per built-in TFDS builder: its directory under data_dir, a digest of its features
    and of its first generated test examples (emoji: without building all ~3,950)."""
    from mmjax.data import sources

    out = {}
    for name in ("shapes", "shapes_vqa", "moving_shapes", "emoji"):
        cfg = _moving(tfds_dir, name=name) if name == "moving_shapes" else _shapes(tfds_dir, name=name)
        b = sources.source_for(cfg).unprepared_builder()
        gen = b._split_generators(None)["test"]
        examples = [next(gen) for _ in range(3)]
        blob = repr(b.info.features).encode() + repr([(k, sorted(e.items())) for k, e in examples]).encode()
        rel = os.path.relpath(b.data_dir, tfds_dir)
        out[name] = f"{rel} {b.name} {b.version} {hashlib.sha256(blob).hexdigest()[:16]}"
    return out


REFERENCE = {
    'builders': {
        'emoji': 'mmjax_emoji/1.0.0 mmjax_emoji 1.0.0 c111cc144b096f4d',
        'moving_shapes': 'mmjax_moving_shapes/s16_t8_n24-4-12_seed0/1.0.0 mmjax_moving_shapes 1.0.0 e89ef1eefac27548',
        'shapes': 'mmjax_shapes/s16_n64-8-25_seed0/1.0.0 mmjax_shapes 1.0.0 2a4f4df5cddbbb61',
        'shapes_vqa': 'mmjax_shapes_vqa/s16_n64-8-25_seed0/1.0.0 mmjax_shapes_vqa 1.0.0 2a4c223993bbd620',
    },
    'catalog/eval': ['0e637f29f7010934', 'db410255d161dddb'],
    'catalog/facts': {
        'answer_types': None,
        'captions': '42a9303eaf9426ca',
        'label_names': ['cat', 'dog', 'fox'],
        'test': 5,
        'train': 12,
    },
    'catalog/train': ['b9452bf392f7bdca', '2b72c6d6dab97b09', '187b2f12522c0ca5', 'e8f6a83b31e07952'],
    'files/eval': ['ce1f03b7489d12a5', '51ef37f2d06e106e', '5bb52cc16ef8c862', 'skipped=2'],
    'files/facts': {'answer_types': None, 'captions': '1fa497ec8f87b986', 'label_names': ['a', 'b', 'c'], 'train': 11},
    'files/train': [
        '64e1e1dfb870117f',
        '85e0da176272451f',
        '3664419489f6d47d',
        '55796ebea000370f',
        '84d51741600ba781',
        'b2a7b6698016a332',
        'f08a635c1a012865',
        '3410a9af37d3cbb4',
        'skipped=4',
    ],
    'moving_shapes/eval': ['cba3e02844559159', '0da9c76026375361'],
    'moving_shapes/facts': {
        'answer_types': None,
        'captions': '2267772a0f9fb7cb',
        'label_names': None,
        'test': 12,
        'train': 24,
    },
    'moving_shapes/train': ['6c73f49087d05cef', '6a791f93c156d7f1', '7f705f504e4a641f', 'f1c23962b8762344'],
    'moving_shapes/train_cached': ['c0a172284abeefb3', '92cf0ec05c2b8477'],
    'shapes/eval': ['650c447b6eb2ce87', 'c069969819d5bf88', '5901bc2a6b73f02a', '718b5758ad6635b9'],
    'shapes/eval_shard1of2': ['e3cd11d5f8c11cac', 'e5fdeb169abd5ab8'],
    'shapes/facts': {
        'answer_types': None,
        'captions': '0464cb17a8319163',
        'label_names': [
            'red circle',
            'red square',
            'red triangle',
            'red cross',
            'green circle',
            'green square',
            'green triangle',
            'green cross',
            'blue circle',
            'blue square',
            'blue triangle',
            'blue cross',
            'yellow circle',
            'yellow square',
            'yellow triangle',
            'yellow cross',
            'purple circle',
            'purple square',
            'purple triangle',
            'purple cross',
            'white circle',
            'white square',
            'white triangle',
            'white cross',
        ],
        'test': 25,
        'train': 64,
        'validation': 8,
    },
    'shapes/train': [
        '882bf5307d395c2f',
        'edddeab499ac903a',
        '53dc78791447e5ef',
        'acb0c17d6a7e524e',
        '0f5996570b5376e6',
        '3c2eba69fca429da',
        '12cb74609755a751',
        'e6187ab1480bdc3b',
        '2698cfe6efc3384b',
        'fb41bedd9f2f346a',
    ],
    'shapes/train_cached': ['7813cc0cd4af1ecf', '0fd908b0d3620091', 'fd17d7476d32f8b5'],
    'shapes/train_hard_negatives': ['ba25755d90caabe5', '8bc2579e928792f6', '4d53364f36f1a2e9'],
    'shapes_vqa/eval': ['f40c5c58108b611b', '1dd077a2fde2d135', '4b4e172907d2cbef', '8dceb34526869b5d'],
    'shapes_vqa/facts': {
        'answer_types': [
            'colour',
            'colour',
            'colour',
            'colour',
            'colour',
            'colour',
            'shape',
            'shape',
            'shape',
            'shape',
            'size',
            'size',
            'yes/no',
            'yes/no',
        ],
        'captions': '40866d0fc3039d0c',
        'label_names': [
            'red',
            'green',
            'blue',
            'yellow',
            'purple',
            'white',
            'circle',
            'square',
            'triangle',
            'cross',
            'small',
            'large',
            'yes',
            'no',
        ],
        'test': 25,
        'train': 64,
    },
}


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    return compute(str(tmp_path_factory.mktemp("reference")))


@pytest.mark.parametrize("case", sorted(REFERENCE or {}))
def test_batches_match_the_reference(computed, case):
    assert computed[case] == REFERENCE[case], case


def test_reference_covers_every_case(computed):
    assert sorted(computed) == sorted(REFERENCE)


def test_digest_sees_a_one_ulp_change():
    a = {"image": np.ones([2, 2], np.float32), "id": np.arange(2)}
    b = {"image": np.nextafter(a["image"], 2), "id": a["id"]}
    assert _digest(a) != _digest(b) and _digest(a) == _digest(dict(a))


if __name__ == "__main__":  # print the table (for review when TensorFlow's numerics change)
    import pprint
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pprint.pprint(compute(d), width=120, stream=sys.stdout)
