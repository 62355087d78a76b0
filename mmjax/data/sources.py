"""Where records come from: the built-in TFDS sets (generated locally), the TFDS
catalog (prepared by the user; never downloaded) and CSV/JSONL lists of local files
(`data.name='files'`). `load_records` returns a tf.data.Dataset of still-encoded
records (see `mmjax.data.pipeline`); the other functions answer questions about a
source (class names, sizes, captions) without building a pipeline. TensorFlow is
imported lazily, in functions.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from mmjax.data import files as files_lib
from mmjax.data import require_tf, require_tfds, shapes_gen

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "~/.cache/mmjax/tensorflow_datasets"
LOCAL_DATASETS = ("shapes", "shapes_vqa", "moving_shapes", "emoji")  # generated here, never downloaded


def cfg_get(cfg, dotted: str, default=None):
    """cfg['a']['b'] for 'a.b' on a ConfigDict or a plain dict; default if absent/None."""
    for part in dotted.split("."):
        if cfg is None:
            return default
        try:
            cfg = cfg[part]
        except (KeyError, AttributeError, TypeError, IndexError):
            return default
    return default if cfg is None else cfg


def data_dir(cfg) -> str:
    d = cfg_get(cfg, "data_dir") or os.environ.get("MMJAX_DATA_DIR", DEFAULT_DATA_DIR)
    return os.path.expanduser(str(d))


def _builder(cfg):
    """Prepared TFDS builder for the locally generated datasets (shapes, shapes_vqa,
    emoji). `shapes_vqa` takes its sizes and seed from `data.shapes` too."""
    name = cfg_get(cfg, "name")
    require_tfds()  # the builder modules import it at the top
    if name in ("shapes", "shapes_vqa"):
        from mmjax.data.shapes import MmjaxShapes, MmjaxShapesVqa, make_config

        cls = MmjaxShapes if name == "shapes" else MmjaxShapesVqa
        c = make_config(
            **{
                k: cfg_get(cfg, "shapes." + k, d)
                for k, d in (
                    ("image_size", 32),
                    ("num_train", 20000),
                    ("num_validation", 1000),
                    ("num_test", 1000),
                    ("seed", 0),
                )
            }
        )
        known = c.name in cls.builder_configs  # the registered default
        b = cls(config=c.name if known else c, data_dir=data_dir(cfg))
    elif name == "moving_shapes":
        from mmjax.data.moving_shapes import MmjaxMovingShapes, make_config

        c = make_config(
            **{
                k: cfg_get(cfg, "moving_shapes." + k, d)
                for k, d in (
                    ("image_size", 32),
                    ("num_frames", 8),
                    ("num_train", None),
                    ("num_validation", 1000),
                    ("num_test", 1000),
                    ("seed", 0),
                )
                if cfg_get(cfg, "moving_shapes." + k, d) is not None
            }
        )
        known = c.name in MmjaxMovingShapes.builder_configs
        b = MmjaxMovingShapes(config=c.name if known else c, data_dir=data_dir(cfg))
    elif name == "emoji":
        from mmjax.data.emoji_ds import MmjaxEmoji

        b = MmjaxEmoji(data_dir=data_dir(cfg))
    else:
        raise ValueError(f"not a local dataset: {name!r}; valid choices: {', '.join(LOCAL_DATASETS)}")
    if not b.is_prepared():
        log.info("generating %s into %s", name, data_dir(cfg))
        b.download_and_prepare()
    return b


def _catalog_builder(cfg):
    tfds = require_tfds()
    name, dd = cfg_get(cfg, "name"), data_dir(cfg)
    try:
        b = tfds.builder(name, data_dir=dd)
        ok = b.is_prepared()
    except Exception as e:  # unknown name, bad config, ...
        if type(e).__name__ == "DatasetNotFoundError":  # its message lists the whole catalog
            raise FileNotFoundError(_not_in_catalog(str(name), tfds)) from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise FileNotFoundError(f"dataset {name!r} not available in data_dir={dd}: {reason}") from None
    if not ok:
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in data_dir={dd} (mmjax does not download "
            f"catalog datasets; prepare it with tfds first or set data.data_dir)"
        )
    return b


def _not_in_catalog(name: str, tfds) -> str:
    """One line for a name that is neither built in nor in the TFDS catalog, with the
    closest names (difflib) instead of tfds's list of every dataset."""
    import difflib

    base = name.split(":")[0].split("/")[0]
    try:
        known = list(tfds.list_builders(with_community_datasets=False))
    except TypeError:  # older tfds
        known = list(tfds.list_builders())
    except Exception:
        known = []
    close = difflib.get_close_matches(base, known + list(LOCAL_DATASETS) + ["files"], n=3)
    hint = (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"; built-in datasets: {', '.join(LOCAL_DATASETS)}, or 'files' for your own list"
    )
    return f"dataset {base!r} not found in the TFDS catalog{hint}"


def files_rows(cfg, split):
    path = cfg_get(cfg, "path")
    if not path:
        raise ValueError("data.name='files' needs data.path (a CSV or JSONL list)")
    frac = files_lib.check_eval_fraction(cfg_get(cfg, "eval_fraction", 0.0))
    rows, missing = files_lib.read_list(path, text_len=int(cfg_get(cfg, "text_len", 32)))
    names = files_lib.label_names(rows)
    return files_lib.split_rows(rows, split, frac), missing, names


def load_records(data_config, split: str):
    """tf.data.Dataset of undecoded records of `split` (see module docstring)."""
    tf = require_tf()
    tfds = require_tfds()
    name = cfg_get(data_config, "name")
    if name == "files":
        rows, _, names = files_rows(data_config, split)
        key = files_lib.path_key(rows)
        cols = {
            key: [r[key] for r in rows],
            "caption": [r["caption"] for r in rows],
            "id": np.array([r["id"] for r in rows], np.int64),
        }
        if names:
            idx = {n: i for i, n in enumerate(names)}
            cols["label"] = np.array([idx.get(r.get("label"), -1) for r in rows], np.int64)
        if not rows:
            cols[key] = cols["caption"] = np.zeros([0], object).astype(str)
        return tf.data.Dataset.from_tensor_slices(cols)
    b = _builder(data_config) if name in LOCAL_DATASETS else _catalog_builder(data_config)
    feats = b.info.features
    media = "video" if "video" in feats else "image"
    ds = b.as_dataset(split=split, shuffle_files=False, decoders={media: tfds.decode.SkipDecoding()})
    label_names_ = _label_names_of(feats)

    def select(r):
        out = {media: r[media]}
        if "caption" in feats:
            out["caption"] = r["caption"]
        elif "question" in feats:  # VQA: the question is the text, the answer the label
            out["caption"] = r["question"]
        elif "text" in feats:
            out["caption"] = r["text"]
        elif "captions" in feats:  # e.g. coco_captions: first caption
            out["caption"] = r["captions"]["text"][0]
        elif label_names_:
            out["caption"] = tf.strings.join(["a photo of a ", tf.gather(tf.constant(label_names_), r["label"])])
        else:
            out["caption"] = tf.constant("")
        if "label" in feats:
            out["label"] = tf.cast(r["label"], tf.int64)
        if "hard_negatives" in feats:
            out["hard_negatives"] = r["hard_negatives"]
        return out

    if "id" in feats:
        return ds.map(lambda r: dict(select(r), id=tf.cast(r["id"], tf.int64)))
    return ds.map(select).enumerate().map(lambda i, r: dict(r, id=i))


def _label_names_of(feats):
    tfds = require_tfds()
    f = feats["label"] if "label" in feats else None
    return list(f.names) if isinstance(f, tfds.features.ClassLabel) else None


def label_names(data_config) -> list[str] | None:
    """Class names for zero-shot prompts (label index = position), or None."""
    name = cfg_get(data_config, "name")
    if name == "shapes":
        return list(shapes_gen.CLASS_NAMES)
    if name == "shapes_vqa":
        return list(shapes_gen.ANSWERS)
    if name in ("emoji", "moving_shapes"):
        return None
    if name == "files":
        return files_rows(data_config, "all")[2]
    return _label_names_of(_catalog_builder(data_config).info.features)


def answer_types(data_config) -> list[str] | None:
    """The type of each label (VQA answer types: colour, shape, size, yes/no), or None."""
    return list(shapes_gen.ANSWER_TYPES) if cfg_get(data_config, "name") == "shapes_vqa" else None


def num_examples(data_config, split: str) -> int:
    name = cfg_get(data_config, "name")
    if name == "files":
        return len(files_rows(data_config, split)[0])
    b = _builder(data_config) if name in LOCAL_DATASETS else _catalog_builder(data_config)
    return int(b.info.splits[split].num_examples)


def captions(data_config, split: str) -> list[str]:
    """All captions of `split` (for tokenizer training)."""
    if cfg_get(data_config, "name") == "files":
        return [r["caption"] for r in files_rows(data_config, split)[0]]
    ds = load_records(data_config, split).map(lambda r: r["caption"])
    return [c.decode("utf-8") for c in ds.as_numpy_iterator()]
