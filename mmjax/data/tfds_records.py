"""TFDS datasets read by random access: `TfdsRecords`, the reader of one split of a
prepared TFDS set stored in a random-access file format (array_record), with the
reader contract of `mmjax.data.records.ArrayRecordShards` (`len`, `read(keys)`,
`captions()`, `label_names`, `fingerprint`, the `bytes_read` / `keys_read` /
`unreadable` counters), so that training takes the index-based pipeline
(`mmjax.data.index_pipeline`).

Records are read through TFDS's data source (`builder.as_data_source(split, decoders=
{media: SkipDecoding()})`, what `tfds.data_source(name, split=..., data_dir=...,
download=False)` returns, from the prepared version directory: the built-in sets'
builders are not in the TFDS registry) and mapped as the stream path maps a TFDS
example (`mmjax.data.sources.catalog`): the media still encoded, the first text feature
as 'caption' (else "a photo of a <label name>", else ""), 'id' the feature when it is an
integer (the built-in sets), else the record's index in the split, and 'label'.

A set prepared as tfrecord (TFDS's default, and the built-in sets') has no random
access: `add_array_record_copy` writes an array_record copy of every split next to the
tfrecord files and lists it in `dataset_info.json` (what `tfds convert_format
--out_file_format=array_record` does, without its apache-beam import). Both formats
stay: `as_dataset` (the stream path, evaluation) reads the tfrecord files,
`as_data_source` the array_record ones. Each file is written under a temporary name and
renamed, so concurrent processes (or a run killed midway) never leave a partial file
under a final name, and a second run reuses the copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading

import numpy as np

from mmjax.data import require_tf, require_tfds

log = logging.getLogger(__name__)

ARRAY_RECORD = "array_record"
TEXT_FEATURES = ("caption", "question", "text", "captions")  # the caption's source, first found


def _info_proto(directory: str):
    from tensorflow_datasets.core import dataset_info as info_lib

    require_tfds()
    return info_lib.read_proto_from_builder_dir(directory)


def file_formats(directory: str) -> list[str]:
    """The file formats the prepared set in `directory` (a version directory) is stored in."""
    info = _info_proto(directory)
    return [f for f in [info.file_format or "tfrecord", *info.alternative_file_formats] if f]


def has_random_access(directory: str) -> bool:
    """Whether `as_data_source` can read the set (one of its formats has random access)."""
    from tensorflow_datasets.core import file_adapters

    ok = {f.value for f in file_adapters.FileFormat.with_random_access()}
    return any(f in ok for f in file_formats(directory))


def stream_readable(directory: str) -> bool:
    """Whether `as_dataset` (tf.data) can read the set (array_record alone cannot)."""
    from tensorflow_datasets.core import file_adapters

    ok = {f.value for f in file_adapters.FileFormat.with_tf_data()}
    return any(f in ok for f in file_formats(directory))


def _writable(directory: str) -> bool:
    return os.access(directory, os.W_OK)


def add_array_record_copy(directory: str) -> None:
    """Writes an array_record copy of every split of the set in `directory` (a version
    directory) next to its files and adds the format to its `dataset_info.json`
    (module docstring). Shards already there are kept (a concurrent or earlier run)."""
    from tensorflow_datasets.core import dataset_info as info_lib
    from tensorflow_datasets.core import file_adapters
    from tensorflow_datasets.core.utils import py_utils

    info = _info_proto(directory)
    if ARRAY_RECORD in file_formats(directory):
        return
    fmt = file_adapters.FileFormat(info.file_format or "tfrecord")
    source = file_adapters.ADAPTER_FOR_FORMAT[fmt]
    ins = info_lib.get_split_dict_from_proto(info, directory, fmt)
    outs = info_lib.get_split_dict_from_proto(info, directory, ARRAY_RECORD)
    for name, split in ins.items():
        n = split.num_shards
        for k in range(n):
            out = outs[name].filename_template.sharded_filepath(shard_index=k, num_shards=n)
            if out.exists():
                continue
            path = split.filename_template.sharded_filepath(shard_index=k, num_shards=n)
            rows = ((i, r.numpy()) for i, r in enumerate(source.make_tf_data(filename=path)))
            with py_utils.incomplete_file(out) as tmp:
                file_adapters.ArrayRecordFileAdapter.write_examples(path=tmp, iterator=rows)
    info = _info_proto(directory)  # as it is now (a concurrent run may have written it)
    if ARRAY_RECORD not in info.alternative_file_formats and info.file_format != ARRAY_RECORD:
        info.alternative_file_formats.append(ARRAY_RECORD)
        text = info_lib.get_dataset_info_json(info)
        fd, tmp = tempfile.mkstemp(prefix=".dataset_info.", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(directory, "dataset_info.json"))
    log.info("%s: added an array_record copy (random access)", directory)


def ensure_array_record(directory: str, name: str) -> None:
    """An array_record copy of the set in `directory`, made once if missing; a one-line
    PermissionError when it is missing and `directory` is not writable."""
    if has_random_access(directory):
        return
    hint = (
        f"dataset {name!r} in {directory} has no array_record copy (data.random_access=True reads one) "
        f"and the directory is not writable: run `tfds convert_format --dataset_version_dir={directory} "
        f"--out_file_format=array_record` (needs apache-beam) as a user who may write there, "
        "or set data.random_access=False"
    )
    if not _writable(directory):
        raise PermissionError(hint)
    try:
        add_array_record_copy(directory)
    except PermissionError:
        raise PermissionError(hint) from None


def _shard_entries(directory: str, split: str) -> list[dict]:
    """The random-access files of `split` as a converted manifest lists its shards:
    {"path": relative to the data_dir (name/config/version/file), "records", "bytes",
    "sha256": None (not computed)}."""
    from tensorflow_datasets.core import dataset_info as info_lib
    from tensorflow_datasets.core import file_adapters

    ok = {f.value for f in file_adapters.FileFormat.with_random_access()}
    fmt = next(f for f in file_formats(directory) if f in ok)
    info = _info_proto(directory)
    si = info_lib.get_split_dict_from_proto(info, directory, fmt)[split]
    parts = [info.name, info.config_name, info.version] if info.config_name else [info.name, info.version]
    out, n = [], len(si.shard_lengths)
    for k, records in enumerate(si.shard_lengths):
        path = si.filename_template.sharded_filepath(shard_index=k, num_shards=n)
        rel = "/".join([*parts, path.name])
        out.append({"path": rel, "records": int(records), "bytes": os.path.getsize(path), "sha256": None})
    return out


def _is_int(feature) -> bool:
    dtype = getattr(feature, "np_dtype", None)
    return dtype is not None and np.issubdtype(dtype, np.integer)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsRecords:
    """Random access to the records of one split of a prepared TFDS set (module docstring).

    `directory` is the set's version directory (`builder.data_dir`). `read(keys)` takes
    indices in [0, len) and returns, in order, {"image" (encoded bytes) or "video" (the
    encoded frames), "caption": str, "id": int[, "label": int]} or None for a record that
    cannot be read; a batch read that fails is retried key by key, so one bad record
    costs only itself. The data source is opened on first read (and reopened after
    pickling). `shards` lists the split's files as a converted manifest does (what the
    index pipeline's order fingerprint covers)."""

    def __init__(self, directory: str, split: str = "train"):
        tfds = require_tfds()
        self.directory = os.path.expanduser(str(directory))
        info = tfds.builder_from_directory(self.directory).info
        if split not in info.splits:
            raise ValueError(f"{self.directory}: no split {split!r} (splits: {', '.join(sorted(info.splits))})")
        if not has_random_access(self.directory):
            raise ValueError(
                f"{self.directory}: no random-access (array_record) copy; `add_array_record_copy` makes one"
            )
        feats = info.features
        self.split = split
        self.name = info.full_name
        self.media = "video" if "video" in feats else "image"
        self._text = next((t for t in TEXT_FEATURES if t in feats), None)
        self._has_label = "label" in feats
        label = feats["label"] if self._has_label else None
        self._labels = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
        self._own_id = "id" in feats and _is_int(feats["id"])
        self._total = int(info.splits[split].num_examples)
        self.shards = _shard_entries(self.directory, split)
        self._source = None
        self._fingerprint = None
        self._lock = threading.Lock()
        self.bytes_read = self.keys_read = self.unreadable = 0

    def __len__(self) -> int:
        return self._total

    @property
    def label_names(self) -> list[str] | None:
        return list(self._labels) if self._labels else None

    @property
    def fingerprint(self) -> str:
        """sha256 hex over `shards` (the set's name, config and version in each path, the
        record counts and file sizes; no file is read)."""
        if self._fingerprint is None:
            raw = json.dumps([self.split, self.shards], sort_keys=True).encode("utf-8")
            self._fingerprint = hashlib.sha256(raw).hexdigest()
        return self._fingerprint

    def _data_source(self):
        with self._lock:
            if self._source is None:
                tfds = require_tfds()
                builder = tfds.builder_from_directory(self.directory)
                decoders = {self.media: tfds.decode.SkipDecoding()}
                self._source = builder.as_data_source(self.split, decoders=decoders)
            return self._source

    def _caption(self, r) -> str:
        if self._text == "captions":  # e.g. coco_captions: the first caption
            return _text(r["captions"]["text"][0])
        if self._text:
            return _text(r[self._text])
        if self._labels:
            return "a photo of a " + self._labels[int(r["label"])]
        return ""

    def _sample(self, r, key: int) -> dict | None:
        if r is None:
            return None
        try:
            out = {self.media: r[self.media], "caption": self._caption(r)}
            out["id"] = int(r["id"]) if self._own_id else key
            if self._has_label:
                out["label"] = int(r["label"])
        except (KeyError, TypeError, ValueError, IndexError, UnicodeDecodeError) as e:
            log.warning("%s split %r record %d: bad record (%s)", self.directory, self.split, key, e)
            return None
        return out

    def _read_one(self, source, key: int):
        try:
            return source.__getitems__([key])[0]
        except Exception as e:  # a corrupt chunk or example: this record only
            log.warning("%s split %r record %d unreadable: %s", self.directory, self.split, key, str(e)[:200])
            return None

    def read(self, keys) -> list[dict | None]:
        """Samples (or None) at indices `keys`, in order (class docstring)."""
        keys = [int(k) for k in keys]
        for k in keys:
            if not 0 <= k < self._total:
                raise IndexError(f"record {k} out of range [0, {self._total}) of split {self.split!r}")
        source = self._data_source()
        try:
            raws = list(source.__getitems__(keys)) if keys else []
        except Exception:  # one bad record fails the batch: read key by key to isolate it
            raws = [self._read_one(source, k) for k in keys]
        out = [self._sample(r, k) for r, k in zip(raws, keys)]
        payload = sum(_payload(o[self.media]) for o in out if o is not None)
        with self._lock:  # read() may be called from several threads
            self.bytes_read += payload
            self.keys_read += len(keys)
            self.unreadable += sum(o is None for o in out)
        return out

    def captions(self) -> list[str]:
        """Every caption of the split in index order ("" for an unreadable record)."""
        out = []
        for start in range(0, self._total, 256):
            out.extend(s["caption"] if s else "" for s in self.read(range(start, min(start + 256, self._total))))
        return out

    def close(self) -> None:
        with self._lock:
            self._source = None

    def __getstate__(self):  # picklable (worker processes): the data source is reopened
        state = dict(self.__dict__, _source=None)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _payload(media) -> int:
    if isinstance(media, (bytes, str)):
        return len(media)
    return sum(len(m) for m in media)  # a clip: its encoded frames


def records_dataset(reader: TfdsRecords):
    """The split in index order as a tf.data stream of the pipeline's records (for a set
    stored only in array_record, which `as_dataset` cannot read); unreadable records are
    left out."""
    tf = require_tf()
    n = len(reader)
    first = next((s for s in reader.read(range(min(n, 64))) if s is not None), None)
    if first is None:
        raise ValueError(f"{reader.directory}: none of the first records of split {reader.split!r} reads")
    media = reader.media
    spec = {media: tf.TensorSpec([] if media == "image" else [None], tf.string)}
    spec.update(caption=tf.TensorSpec([], tf.string), id=tf.TensorSpec([], tf.int64))
    if "label" in first:
        spec["label"] = tf.TensorSpec([], tf.int64)

    def gen(chunk=256):
        for start in range(0, n, chunk):
            for s in reader.read(range(start, min(start + chunk, n))):
                if s is not None:
                    yield {k: (np.int64(s[k]) if k in ("id", "label") else s[k]) for k in spec}

    return tf.data.Dataset.from_generator(gen, output_signature=spec)
