"""Training from converted shards (`data.name='shards'`): the index-based pipeline.

References: the one-process batches (the union of the processes' rows equals them row
for row), an uninterrupted iterator (a resumed one continues it exactly), a clean copy
of the shards (a corrupt record changes its own row only), numpy (each epoch reads
every record once), and the records the test wrote.
"""

import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import index, pipeline, sources
from mmjax.data.convert import convert
from mmjax.data.records import ArrayRecordShards
from mmjax.data.tokenizer import Tokenizer, train_tokenizer

N, B = 40, 4  # records; per-process batch


def _image(i: int) -> bytes:
    px = np.random.default_rng(i).integers(0, 256, [20 + i % 5, 24, 3], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG" if i % 2 else "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    os.makedirs(d / "img")
    for i in range(N):
        (d / "img" / f"{i}.img").write_bytes(_image(i))
    (d / "list.csv").write_text("image_path,caption\n" + "".join(f"img/{i}.img,a shape number {i}\n" for i in range(N)))
    out = str(d / "out")
    convert(str(d / "list.csv"), out, workers=1, records_per_shard=16)
    tok = Tokenizer(train_tokenizer([f"a shape number {i}" for i in range(N)], str(d / "tok"), 40))
    return out, tok


def _cfg(path, **kw):
    cfg = {"name": "shards", "path": path, "image_size": 16, "text_len": 8, "augment": {"flip": True}}
    return ml_collections.ConfigDict({**cfg, **kw})


def _batches(path, tok, n, *, procs=1, rank=0, start=0, seed=3):
    it = pipeline.make_train_iterator(
        _cfg(path), tok, B, seed=seed, start_batch=start, process_index=rank, process_count=procs
    )
    out = [next(it) for _ in range(n)]
    it.close()
    return out, it


def test_the_source_reads_what_was_converted(shards):
    path, _ = shards
    src = sources.source_for(_cfg(path))
    assert src.num_examples("train") == N and src.reader("train") is not None
    got = [(r["id"], r["caption"].decode()) for r in src.records("train").as_numpy_iterator()]
    assert got == [(i, f"a shape number {i}") for i in range(N)]
    assert src.captions("train") == [f"a shape number {i}" for i in range(N)]


def test_each_epoch_reads_every_record_once(shards):
    path, tok = shards
    batches, _ = _batches(path, tok, 2 * N // B)
    ids = np.concatenate([b["id"] for b in batches])
    assert sorted(ids[:N]) == list(range(N)) and sorted(ids[N:]) == list(range(N))
    assert list(ids[:N]) != list(ids[N:])  # a new permutation each epoch
    assert batches[0]["image"].shape == (B, 16, 16, 3) and batches[0]["text"].shape == (B, 8)


@pytest.mark.parametrize("procs", [2, 4])
def test_processes_rows_make_the_one_process_batch(shards, procs):
    """Each process reads only its rows; together they are the one-process global batch,
    row for row and pixel for pixel."""
    path, tok = shards
    # one process with the whole global batch (B * procs rows)
    whole = pipeline.make_train_iterator(_cfg(path), tok, B * procs, seed=3, process_index=0, process_count=1)
    ref = [next(whole) for _ in range(3)]
    whole.close()
    parts, order = [], index.GlobalOrder([N], None, 3, B * procs)
    for rank in range(procs):
        log, ours = [], set()
        real_init, real_read = ArrayRecordShards.__init__, ArrayRecordShards.read

        def init(self, *a, **kw):
            ours.add(id(self))  # readers this process opens (not the reference's prefetch thread)
            real_init(self, *a, **kw)

        def read(self, keys):
            if id(self) in ours:
                log.append(list(keys))
            return real_read(self, keys)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ArrayRecordShards, "__init__", init)
            mp.setattr(ArrayRecordShards, "read", read)
            got, _ = _batches(path, tok, 3, procs=procs, rank=rank)
        parts.append(got)
        mine = [list(index.local_rows(order.plan(g), rank, B)["record"]) for g in range(3)]
        assert log[1:4] == mine  # after the one-record probe: its own rows' records, batch by batch
    for g in range(3):
        for key in ("id", "text", "image"):
            np.testing.assert_array_equal(np.concatenate([p[g][key] for p in parts]), ref[g][key])


def test_resume_continues_the_uninterrupted_run(shards):
    path, tok = shards
    full, _ = _batches(path, tok, 6)
    rest, _ = _batches(path, tok, 3, start=3)
    for a, b in zip(full[3:], rest):
        np.testing.assert_array_equal(a["id"], b["id"])
        np.testing.assert_array_equal(a["image"], b["image"])
    assert full[2]["data_state"] == {"records": 3 * B, "skipped": 0}


def test_a_corrupt_record_changes_its_own_row_only(shards, tmp_path):
    """One record's bytes damaged: its row gets another record (counted), and every other
    row of every batch is what the clean shards give."""
    import shutil

    path, tok = shards
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    clean, _ = _batches(path, tok, N // B)
    victim = int(clean[1]["id"][2])  # a record of batch 1, row 2
    reader = ArrayRecordShards(bad)
    shard = max(i for i, s in enumerate(reader.shards) if int(s["first_id"]) <= victim)
    f = os.path.join(bad, reader.shards[shard]["path"])
    raw = ArrayRecordShards(path).read([victim])[0]["image"]
    data = bytearray(open(f, "rb").read())
    at = data.find(raw) + len(raw) // 2  # stored uncompressed: the whole image is there, once
    assert at > len(raw) // 2 and data.find(raw, at) < 0
    data[at : at + 32] = bytes(32)  # the record's chunk no longer matches its hash
    open(f, "wb").write(bytes(data))
    assert ArrayRecordShards(bad).read([victim]) == [None]
    got, it = _batches(bad, tok, N // B)
    for g, (a, b) in enumerate(zip(clean, got)):
        same = a["id"] == b["id"]
        assert same.all() if g != 1 else (~same).sum() == 1 and not same[2], g
        np.testing.assert_array_equal(a["image"][same], b["image"][same])
    assert victim not in got[1]["id"] and it.skipped == 1 and got[1]["data_state"]["skipped"] == 1


def test_video_shards_give_the_file_lists_clips(tmp_path):
    """mp4 records: training batches are clips [B, T, S, S, 3] covering every video once
    an epoch, and an eval pass over the shards equals one over the same videos as a
    file list (PyAV on the container's bytes = PyAV on the file)."""
    from mmjax.data import video_io

    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        frames = rng.integers(0, 256, [5 + i, 16, 16, 3], dtype=np.uint8)
        video_io.write_video(str(tmp_path / f"v{i}.mp4"), frames)
        rows.append(f"v{i}.mp4,clip number {i}\n")
    (tmp_path / "list.csv").write_text("video_path,caption\n" + "".join(rows))
    out = str(tmp_path / "shards")
    convert(str(tmp_path / "list.csv"), out, workers=1)
    tok = Tokenizer(train_tokenizer([f"clip number {i}" for i in range(6)], str(tmp_path / "tok"), 30))
    cfg = _cfg(out, num_frames=3, frame_sampling="random")
    it = pipeline.make_train_iterator(cfg, tok, 3, seed=1)
    batches = [next(it) for _ in range(4)]
    it.close()
    assert batches[0]["image"].shape == (3, 3, 16, 16, 3)
    ids = np.concatenate([b["id"] for b in batches])
    assert sorted(ids[:6]) == list(range(6)) and sorted(ids[6:]) == list(range(6))
    by = {}
    for eval_path in (out, str(tmp_path / "list.csv")):
        ev = _cfg(out, num_frames=3, eval_path=eval_path)
        got = list(pipeline.make_eval_iterator(ev, tok, "test", 4))
        by[eval_path] = {int(i): img for b in got for i, img, ok in zip(b["id"], b["image"], b["valid"]) if ok}
    assert sorted(by[out]) == list(range(6))
    for i in range(6):
        np.testing.assert_array_equal(by[out][i], by[str(tmp_path / "list.csv")][i])
