"""TFDS sets read by random access (`data.random_access=True`, `mmjax.data.tfds_records`):
the built-in `shapes` set (tiny) through its array_record copy and the index pipeline.

References: the tf.data stream path's records of the same split (the reader returns the
same records), numpy (each epoch reads every record once), an uninterrupted iterator (a
resumed one continues it), the one-process batches (the union of two processes' rows
equals them), and the prepared directory before the copy (the stream path and a
read-only directory are untouched).
"""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from mmjax.data import pipeline, shapes_gen, sources, tfds_records
from mmjax.data.index_pipeline import IndexTrainIterator
from mmjax.data.tokenizer import Tokenizer, train_tokenizer
from mmjax.user_errors import user_error

N, B = 40, 4  # train records; per-process batch
SHAPES = {"image_size": 16, "num_train": N, "num_validation": 4, "num_test": 4, "seed": 0}


def _cfg(data_dir, random_access=True, **kw):
    cfg = {"name": "shapes", "data_dir": str(data_dir), "image_size": 16, "text_len": 12, "shapes": SHAPES}
    cfg.update(random_access=random_access, augment={"flip": False}, shuffle_buffer=8, **kw)
    return ml_collections.ConfigDict(cfg)


def _files(directory):
    return sorted(f for f in os.listdir(directory) if not f.startswith("."))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir with the array_record copy, a copy of it made before, the version dir's
    relative path, a tokenizer)."""
    root = tmp_path_factory.mktemp("tfds_ra")
    data_dir, pristine = root / "tfds", root / "pristine"
    version = os.path.relpath(sources.source_for(_cfg(data_dir)).builder().data_dir, data_dir)
    shutil.copytree(data_dir, pristine)
    sources.source_for(_cfg(data_dir)).reader("train")  # the copy, whichever test runs first (xdist)
    caps = [shapes_gen.example(0, "train", i, 16)["caption"] for i in range(N)]
    tok = Tokenizer(train_tokenizer(caps, str(root / "tok"), 40))
    return data_dir, pristine, version, tok


def _stream_records(data_dir, split="train"):
    return list(sources.source_for(_cfg(data_dir, False)).records(split).as_numpy_iterator())


def test_the_reader_returns_the_stream_paths_records(prepared, tmp_path):
    _, pristine, version, _ = prepared
    data_dir = tmp_path / "fresh"  # without the copy yet
    shutil.copytree(pristine, data_dir)
    vdir = os.path.join(data_dir, version)
    assert tfds_records.file_formats(vdir) == ["tfrecord"]
    reader = sources.source_for(_cfg(data_dir)).reader("train")  # makes the array_record copy
    assert isinstance(reader, tfds_records.TfdsRecords) and len(reader) == N
    assert tfds_records.file_formats(vdir) == ["tfrecord", "array_record"]
    assert sum(".tfrecord-" in f for f in _files(vdir)) == sum(".array_record-" in f for f in _files(vdir)) == 3
    stream = _stream_records(data_dir)  # still the tfrecord files, through tf.data
    keys = list(np.random.default_rng(0).permutation(N))  # any order, each record once
    got = dict(zip(keys, reader.read(keys)))
    assert len(stream) == N
    for r in stream:
        s = got[int(r["id"])]
        assert (s["id"], s["caption"], s["image"], s["label"]) == (
            r["id"],
            r["caption"].decode(),
            r["image"],
            r["label"],
        )
    assert (
        reader.keys_read == N and reader.unreadable == 0 and reader.bytes_read == sum(len(r["image"]) for r in stream)
    )
    assert reader.captions() == [r["caption"].decode() for r in stream]
    assert reader.label_names == list(shapes_gen.CLASS_NAMES)
    assert len(reader.fingerprint) == 64 and reader.fingerprint != type(reader)(vdir, "test").fingerprint
    # a second run reuses the copy (no file rewritten)
    stamps = {f: os.stat(os.path.join(vdir, f)).st_mtime_ns for f in _files(vdir)}
    assert sources.source_for(_cfg(data_dir)).reader("train").fingerprint == reader.fingerprint
    assert {f: os.stat(os.path.join(vdir, f)).st_mtime_ns for f in _files(vdir)} == stamps


def test_an_unreadable_record_is_none_and_counted(prepared):
    data_dir, _, version, _ = prepared
    reader = tfds_records.TfdsRecords(os.path.join(data_dir, version), "train")
    source = reader._data_source()
    real = type(source).__getitems__

    def flaky(self, keys):
        if 5 in list(keys):
            raise RuntimeError("corrupt chunk")
        return real(self, keys)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(source), "__getitems__", flaky)
        got = reader.read([3, 5, 7])
    assert got[1] is None and [got[0]["id"], got[2]["id"]] == [3, 7]
    assert reader.unreadable == 1 and reader.keys_read == 3


def _batches(data_dir, tok, n, *, procs=1, rank=0, start=0, batch=B, **kw):
    it = pipeline.make_train_iterator(
        _cfg(data_dir, **kw), tok, batch, seed=3, start_batch=start, process_index=rank, process_count=procs
    )
    out = [next(it) for _ in range(n)]
    it.close()
    return out, it


def test_each_epoch_reads_every_record_once(prepared):
    data_dir, _, _, tok = prepared
    batches, it = _batches(data_dir, tok, 2 * N // B)
    assert isinstance(it, IndexTrainIterator)
    ids = np.concatenate([b["id"] for b in batches])
    assert sorted(ids[:N]) == list(range(N)) and sorted(ids[N:]) == list(range(N))
    assert list(ids[:N]) != list(ids[N:])  # a new permutation each epoch
    assert batches[0]["image"].shape == (B, 16, 16, 3) and batches[0]["label"].shape == (B,)


def test_resume_continues_the_uninterrupted_run(prepared):
    data_dir, _, _, tok = prepared
    full, _ = _batches(data_dir, tok, 6)
    rest, _ = _batches(data_dir, tok, 3, start=3)
    for a, b in zip(full[3:], rest):
        for key in ("id", "text", "image"):
            np.testing.assert_array_equal(a[key], b[key])
    assert full[2]["data_state"] == {"records": 3 * B, "skipped": 0}


def test_two_processes_rows_make_the_one_process_batch(prepared):
    data_dir, _, _, tok = prepared
    ref, _ = _batches(data_dir, tok, 3, batch=2 * B)
    parts = [_batches(data_dir, tok, 3, procs=2, rank=r)[0] for r in range(2)]
    for g in range(3):
        for key in ("id", "text", "image"):
            np.testing.assert_array_equal(np.concatenate([p[g][key] for p in parts]), ref[g][key])


def test_random_access_off_keeps_the_stream_path(prepared):
    data_dir, pristine, _, tok = prepared
    assert sources.source_for(_cfg(data_dir, False)).reader("train") is None  # the copy exists, unused
    with_copy, it = _batches(data_dir, tok, 3, random_access=False)
    without, _ = _batches(pristine, tok, 3, random_access=False)
    assert not isinstance(it, IndexTrainIterator)
    for a, b in zip(with_copy, without):
        for key in ("id", "text", "image"):
            np.testing.assert_array_equal(a[key], b[key])


def test_a_read_only_set_without_the_copy_is_one_line(prepared, tmp_path):
    _, pristine, version, tok = prepared
    data_dir = tmp_path / "ro"
    shutil.copytree(pristine, data_dir)
    vdir = data_dir / version
    before = _files(vdir)
    os.chmod(vdir, 0o555)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if os.geteuid() == 0:  # root writes anyway: the check is what is tested
                mp.setattr(tfds_records, "_writable", lambda d: False)
            with pytest.raises(PermissionError) as e:
                pipeline.make_train_iterator(_cfg(data_dir), tok, B, seed=3)
    finally:
        os.chmod(vdir, 0o755)
    line = user_error(e.value, "train")
    assert line == str(e.value) and "\n" not in line
    assert "no array_record copy" in line and "tfds convert_format" in line and str(vdir) in line
    assert _files(vdir) == before


def test_a_set_stored_only_in_array_record_reads_by_random_access(prepared, tmp_path):
    """tf.data cannot read it: records (evaluation) and training both go through the reader."""
    data_dir, _, version, tok = prepared
    only = tmp_path / "only"
    shutil.copytree(data_dir, only)
    vdir = only / version
    for f in _files(vdir):
        if ".tfrecord-" in f:
            os.remove(vdir / f)
    info = json.loads((vdir / "dataset_info.json").read_text())
    info.update(fileFormat="array_record", alternativeFileFormats=[])
    (vdir / "dataset_info.json").write_text(json.dumps(info))
    assert sources.source_for(_cfg(only, False)).reader("train") is not None
    got = _stream_records(only, "test")
    ref = _stream_records(data_dir, "test")
    assert [(r["id"], r["caption"], r["image"]) for r in got] == [(r["id"], r["caption"], r["image"]) for r in ref]
    a, _ = _batches(only, tok, 2, random_access=False)
    b, _ = _batches(data_dir, tok, 2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
