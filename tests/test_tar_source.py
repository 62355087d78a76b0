"""webdataset tars read in place (`data.name=shards`, `data.path=` tars): the members'
bytes come back exactly, training covers every sample once an epoch (a broken image
replaced in its row and counted), processes' rows make the one-process batch, and the
index cache is used. References: the bytes the test wrote, the one-process batches,
numpy set equality."""

import os
import tarfile

import ml_collections
import numpy as np
import pytest
from test_convert import sample, write_tar

from mmjax.data import pipeline, sources, tar_reader
from mmjax.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture
def tar_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "tars"
    os.makedirs(d)
    written = {}
    for t in range(3):
        samples = []
        for i in range(6):
            key = f"{t}{i:03d}"
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
            s = sample(10 * t + i, f"thing {t} {i}", fmt, ext)
            samples.append((key, s))
            written[key] = (s[ext], f"thing {t} {i}")
        samples.append((f"{t}nocap", {"jpg": sample(99, None)["jpg"]}))  # no caption: left out
        write_tar(str(d / f"{t:05d}.tar"), samples)
    return str(d), written


def _cfg(path, **kw):
    cfg = {"name": "shards", "path": path, "image_size": 16, "text_len": 8, "augment": {"flip": True}}
    return ml_collections.ConfigDict({**cfg, **kw})


def test_the_reader_returns_the_members(tar_dir, monkeypatch):
    d, written = tar_dir
    r = tar_reader.TarShards(d)
    assert len(r) == 18 and r.left_out == 3
    got = r.read(range(18))
    keys = sorted(written)  # tar order, then member order
    assert [(s["image"], s["caption"]) for s in got] == [written[k] for k in keys]
    assert [s["id"] for s in got] == list(range(18)) and r.captions() == [written[k][1] for k in keys]
    assert r.bytes_read == sum(len(written[k][0]) for k in keys)
    # a second reader takes the index from the cache: no tar header is read again
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("re-indexed"))
    again = tar_reader.TarShards(f"{d}/{{00000..00002}}.tar")
    assert again.read([5, 17]) == [got[5], got[17]]


def test_training_from_tars_covers_each_sample_once_an_epoch(tar_dir, tmp_path):
    d, written = tar_dir
    # damage one image's bytes in place (same length): it no longer decodes
    r = tar_reader.TarShards(d)
    t, (_, off, n, _) = 1, r._index[1][2]
    with open(r.paths[t], "r+b") as f:
        f.seek(off)
        f.write(b"\0" * n)
    victim = r._starts[1] + 2
    tok = Tokenizer(train_tokenizer([c for _, c in written.values()], str(tmp_path / "tok"), 30))
    assert sources.source_for(_cfg(d)).num_examples("train") == 18
    it = pipeline.make_train_iterator(_cfg(d), tok, 6, seed=2)
    batches = [next(it) for _ in range(6)]  # 2 epochs of 18
    ids = np.concatenate([b["id"] for b in batches])
    for epoch in (ids[:18], ids[18:]):  # the damaged one's row holds the next sample of its epoch's order
        assert victim not in epoch and len(set(epoch)) == 17 and set(epoch) <= set(range(18))
    assert it.skipped == 2 and batches[-1]["data_state"]["skipped"] == 2
    it.close()
    # processes' rows make the one-process batch
    parts = []
    for rank in range(2):
        p = pipeline.make_train_iterator(_cfg(d), tok, 3, seed=2, process_index=rank, process_count=2)
        parts.append([next(p) for _ in range(3)])
        p.close()
    for g in range(3):
        for key in ("id", "image"):
            np.testing.assert_array_equal(np.concatenate([parts[0][g][key], parts[1][g][key]]), batches[g][key])


def test_tars_are_the_training_split_only(tar_dir):
    d, _ = tar_dir
    with pytest.raises(ValueError, match="training split only"):
        sources.source_for(_cfg(d)).num_examples("test")
    with pytest.raises(FileNotFoundError, match="no manifest.json and no .tar"):
        sources.source_for(_cfg(os.path.dirname(d))).num_examples("train")
