"""TFDS catalog datasets (any data.name no other source claims): read from a data_dir
the user prepared with tfds (`tfds.load(..., download=False)` semantics: mmjax never
downloads). The first text feature found is the caption ('caption', a VQA 'question',
'text', the first of 'captions'), else "a photo of a <label name>".

`data.random_access=True` trains through the index-based pipeline (a seeded global
order, each process reading only its rows: `mmjax.data.index_pipeline`) from the set's
array_record copy (`mmjax.data.tfds_records`), made once next to the prepared files when
missing. Off by default: the tf.data stream (a shuffle buffer) gives other batches, and
the built-in recipes' numbers were measured on it. A set stored only in array_record
(which tf.data cannot read) is always read by random access."""

from __future__ import annotations

import logging
import os

from mmjax.data import require_tf, require_tfds
from mmjax.data.sources import Source, names, register

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "~/.cache/mmjax/tensorflow_datasets"


@register
class CatalogSource(Source):
    fallback = True
    # data_dir default: $MMJAX_DATA_DIR, else DEFAULT_DATA_DIR; random_access: module docstring
    keys = {"data_dir": None, "random_access": False}

    def __init__(self, data_config):
        super().__init__(data_config)
        self._builder = None
        self._readers = {}

    def data_dir(self) -> str:
        d = self.option("data_dir") or os.environ.get("MMJAX_DATA_DIR", DEFAULT_DATA_DIR)
        return os.path.expanduser(str(d))

    def builder(self):
        """The prepared TFDS builder (made once per source)."""
        if self._builder is None:
            self._builder = self._make_builder()
        return self._builder

    def _make_builder(self):
        tfds = require_tfds()
        name, dd = self.name, self.data_dir()
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

    def reader(self, split: str):
        """The split's `tfds_records.TfdsRecords` (opened once) with data.random_access=True
        (making the array_record copy if missing) or for a set tf.data cannot read; else None."""
        if split not in self._readers:
            self._readers[split] = self._open_reader(split)
        return self._readers[split]

    def _open_reader(self, split: str):
        from mmjax.data import tfds_records

        directory = str(self.builder().data_dir)
        if not self.option("random_access"):
            return None if tfds_records.stream_readable(directory) else tfds_records.TfdsRecords(directory, split)
        if "video" in self.builder().info.features:
            raise ValueError(
                f"data.random_access=True: {self.name!r} is a video set, not read by the index pipeline yet; "
                "set data.random_access=False"
            )
        tfds_records.ensure_array_record(directory, str(self.name))
        return tfds_records.TfdsRecords(directory, split)

    def records(self, split: str):
        tf, tfds = require_tf(), require_tfds()
        from mmjax.data import tfds_records

        directory = str(self.builder().data_dir)
        if not tfds_records.stream_readable(directory):  # stored in array_record only
            return tfds_records.records_dataset(tfds_records.TfdsRecords(directory, split))
        feats = self.builder().info.features
        media = "video" if "video" in feats else "image"
        skip = {k: tfds.decode.SkipDecoding() for k in (media, "depth") if k in feats}  # encoded, for the pipeline
        ds = self.builder().as_dataset(split=split, shuffle_files=False, decoders=skip)
        select = _selector(feats, media, _class_names(feats))
        if "id" in feats:
            return ds.map(lambda r: dict(select(r), id=tf.cast(r["id"], tf.int64)))
        return ds.map(select).enumerate().map(lambda i, r: dict(r, id=i))

    def num_examples(self, split: str) -> int:
        return int(self.builder().info.splits[split].num_examples)

    def label_names(self) -> list[str] | None:
        return _class_names(self.builder().info.features)

    def has_hard_negatives(self) -> bool:
        return "hard_negatives" in self.builder().info.features


def _class_names(feats) -> list[str] | None:
    tfds = require_tfds()
    f = feats["label"] if "label" in feats else None
    return list(f.names) if isinstance(f, tfds.features.ClassLabel) else None


def _selector(feats, media: str, label_names):
    """A TFDS example -> a record (module docstring of mmjax.data.sources)."""
    tf = require_tf()

    def select(r):
        out = {k: r[k] for k in (media, "audio", "depth") if k in feats}  # audio: a file's bytes; depth: a PNG's
        if "caption" in feats:
            out["caption"] = r["caption"]
        elif "question" in feats:  # VQA: the question is the text, the answer the label
            out["caption"] = r["question"]
        elif "text" in feats:
            out["caption"] = r["text"]
        elif "captions" in feats:  # e.g. coco_captions: first caption
            out["caption"] = r["captions"]["text"][0]
        elif label_names:
            out["caption"] = tf.strings.join(["a photo of a ", tf.gather(tf.constant(label_names), r["label"])])
        else:
            out["caption"] = tf.constant("")
        if "label" in feats:
            out["label"] = tf.cast(r["label"], tf.int64)
        if "hard_negatives" in feats:
            out["hard_negatives"] = r["hard_negatives"]
        return out

    return select


def _not_in_catalog(name: str, tfds) -> str:
    """One line for a name that is neither a registered source nor in the TFDS catalog,
    with the closest names (difflib) instead of tfds's list of every dataset."""
    import difflib

    from mmjax.data import sources

    base = name.split(":")[0].split("/")[0]
    try:
        known = list(tfds.list_builders(with_community_datasets=False))
    except TypeError:  # older tfds
        known = list(tfds.list_builders())
    except Exception:
        known = []
    close = difflib.get_close_matches(base, known + names(), n=3)
    own = ", or ".join(c.summary for c in sources.registered() if c.summary)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; {own}"
    return f"dataset {base!r} not found in the TFDS catalog{hint}"
