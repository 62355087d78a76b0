"""The data source interface, its registry (a new source is one module: registered by
name, its keys join the schema, the pipeline reads it unchanged) and the data config
schema (every key declared once with its default; an unknown key is an error that
names it and the valid ones)."""

import ast
import glob
import io
import os

import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.config import ConfigError
from mmjax.data import schema, sources
from tiny import ROOT


class _Tok:
    def encode(self, texts, length):
        out = np.zeros((len(texts), length), np.int32)
        for i, t in enumerate(texts):
            ids = [2] + [6 + b % 250 for b in t.encode()][: length - 2] + [3]
            out[i, : len(ids)] = ids
        return out

    def decode(self, ids):
        return bytes(int(i) - 6 for i in ids if i > 5).decode()


@pytest.fixture
def counting_source():
    """A source defined the way a new module in mmjax/data/sources/ defines one:
    data.name='counting', its own section data.counting.n (records 0..n-1, image i
    a uniform grey of level 10 i, caption 'item i'); unregistered afterwards."""
    sources.registered()  # every module imported first: the saved registry is the whole one
    saved = (dict(sources._BY_NAME), list(sources._CLASSES))

    @sources.register
    class CountingSource(sources.Source):
        names = ("counting",)
        keys = {"counting": {"n": 6}}

        def records(self, split):
            import tensorflow as tf
            from PIL import Image

            n = int(self.option("counting.n"))
            pngs = []
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.full((6, 6, 3), 10 * i, np.uint8)).save(buf, format="PNG")
                pngs.append(buf.getvalue())
            cols = {"image": pngs, "caption": [f"item {i}" for i in range(n)], "id": np.arange(n, dtype=np.int64)}
            return tf.data.Dataset.from_tensor_slices(cols)

        def num_examples(self, split):
            return int(self.option("counting.n"))

    yield CountingSource
    sources._BY_NAME.clear()
    sources._BY_NAME.update(saved[0])
    sources._CLASSES[:] = saved[1]


def test_the_registry_serves_every_name():
    from mmjax.data.sources.builtin import BuiltinSource
    from mmjax.data.sources.catalog import CatalogSource
    from mmjax.data.sources.file_list import FileListSource
    from mmjax.data.sources.shards import ShardsSource

    assert sources.names() == [
        "shapes",
        "shapes_vqa",
        "shapes_av",
        "moving_shapes",
        "emoji",
        "files",
        "llava_json",
        "shards",
    ]
    for name in ("shapes", "shapes_vqa", "moving_shapes", "emoji"):
        assert sources.source_class(name) is BuiltinSource and sources.cache_allowed(name)
    assert sources.source_class("files") is FileListSource and not sources.cache_allowed("files")
    assert sources.source_class("shards") is ShardsSource and not sources.cache_allowed("shards")
    assert sources.source_class("coco_captions") is CatalogSource and not sources.cache_allowed("mnist")
    with pytest.raises(ValueError, match="registered twice"):

        @sources.register
        class Another(sources.Source):
            names = ("files",)


def test_a_new_source_is_one_registered_class(counting_source):
    from mmjax.data import pipeline as P

    cfg = {"name": "counting", "image_size": 4, "text_len": 10, "shuffle_buffer": 10, "counting": {"n": 5}}
    sources.check_data_config(cfg)
    with pytest.raises(ConfigError, match=r"'data\.counting\.m'; valid keys under 'data\.counting': n"):
        sources.check_data_config(dict(cfg, counting={"m": 1}))
    assert P.num_examples(cfg, "train") == 5 and P.captions(cfg, "train")[-1] == "item 4"
    assert P.label_names(cfg) is None and P.answer_types(cfg) is None
    batches = list(P.make_eval_iterator(cfg, _Tok(), "test", 4))
    assert [b["caption"].tolist() for b in batches] == [[f"item {i}" for i in range(4)], ["item 4", "", "", ""]]
    grey = np.stack([b["image"][:, 0, 0, 0] for b in batches]).reshape(-1)[:5]
    mean, std = P.MEAN[0], P.STD[0]
    np.testing.assert_allclose(grey, [(10 * i / 255.0 - mean) / std for i in range(5)], rtol=1e-5)
    train = P.make_train_iterator(
        dict(cfg, augment={"crop_scale": (1.0, 1.0), "aspect": (1.0, 1.0)}), _Tok(), 5, seed=0
    )
    first = next(train)
    assert sorted(first["id"].tolist()) == [0, 1, 2, 3, 4] and first["data_state"] == {"records": 5, "skipped": 0}
    assert [_Tok().decode(t) for t in first["text"]] == [f"item {i}" for i in first["id"]]
    with pytest.raises(ValueError, match="model.hard_negatives=1 but dataset 'counting'"):
        P.make_train_iterator(cfg, _Tok(), 2, seed=0, hard_negatives=1)
    with pytest.raises(ValueError, match=r"cache_decoded=True is for the built-in datasets \('shapes'"):
        P.make_train_iterator(dict(cfg, cache_decoded=True), _Tok(), 2, seed=0)


def test_every_recipe_passes_the_schema():
    recipes = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    assert len(recipes) >= 10
    for path in recipes:
        sources.check_data_config(config_lib.recipe(path).data)


@pytest.mark.parametrize(
    "key, value, named, valid",
    [
        ("shape", 1, "data.shape", "shapes"),  # a typo of a section
        ("imagesize", 32, "data.imagesize", "image_size"),
        ("shapes.num_trian", 5, "data.shapes.num_trian", "num_train"),
        ("moving_shapes.frames", 4, "data.moving_shapes.frames", "num_frames"),
        ("augment.flop", True, "data.augment.flop", "crop_scale"),
        ("tokenizer.size", 64, "data.tokenizer.size", "vocab_size"),
    ],
)
def test_an_unknown_data_key_is_an_error(key, value, named, valid):
    cfg = config_lib.recipe(os.path.join(ROOT, "configs", "demo.py"))
    with cfg.unlocked():
        section, _, leaf = key.rpartition(".")
        (cfg.data[section] if section else cfg.data)[leaf] = value
    with pytest.raises(ConfigError) as e:
        sources.check_data_config(cfg.data)
    msg = str(e.value)
    assert f"unknown config key {named!r}" in msg and valid in msg.split("valid keys")[1] and "\n" not in msg


def test_a_section_must_be_a_dict():
    with pytest.raises(ConfigError, match=r"'data\.shapes' is a section with keys image_size, num_test"):
        sources.check_data_config({"name": "shapes", "shapes": 3})
    sources.check_data_config({"name": "files", "path": "x.csv", "shapes": None, "augment": {"flip": True}})
    sources.check_data_config(None)


def test_options_read_the_declared_defaults():
    assert schema.option({}, "image_size") == 224 and schema.option({"image_size": None}, "image_size") == 224
    assert schema.option({"augment": {"flip": True}}, "augment.flip") is True
    assert schema.option({"augment": {"flip": True}}, "augment.aspect") == (3 / 4, 4 / 3)
    assert sources.option({}, "shapes.num_train") == 20000 and sources.option({}, "moving_shapes.num_train") == 10000
    assert sources.option({"path": "a.csv"}, "path") == "a.csv" and sources.option({}, "eval_fraction") == 0.0
    with pytest.raises(KeyError, match="data.nope is not declared"):
        schema.option({"nope": 1}, "nope")


def test_an_unknown_name_lists_the_own_sources(tmp_path):
    from mmjax.data import pipeline as P

    with pytest.raises(FileNotFoundError) as e:
        P.load_records({"name": "zzqqxxv", "data_dir": str(tmp_path)}, "train")
    assert str(e.value) == (
        "dataset 'zzqqxxv' not found in the TFDS catalog; built-in datasets: shapes, shapes_vqa, "
        "shapes_av, moving_shapes, emoji, or 'files' for your own list, or 'llava_json' for LLaVA-format conversations, "
        "or 'shards' for ArrayRecord shards from "
        "`mmjax data convert` (or webdataset tars in place)"
    )


def test_only_the_file_list_source_knows_the_name_files():
    """No `name == "files"` branch outside mmjax/data/sources/file_list.py."""
    data = os.path.join(ROOT, "mmjax", "data")
    found = []
    for path in glob.glob(os.path.join(data, "**", "*.py"), recursive=True):
        if path.endswith(os.path.join("sources", "file_list.py")):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Constant) and node.value == "files":
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not found
