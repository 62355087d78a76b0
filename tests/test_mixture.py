"""Mixtures of converted shard sets (`data.path=DIR:w,DIR:w,...`) and the order state a
checkpoint keeps.

References: `index.quotas` (rows per source in every batch), numpy's `index.stream_index`
(each source's rows, in row order, are its own stream: every record once per epoch), the
one-process batches (the union of the processes' rows), an uninterrupted iterator (a
resumed one continues it), and the records the test wrote (id ranges per source).
"""

import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import index, pipeline, sources
from mmjax.data.convert import convert
from mmjax.data.records import ArrayRecordShards
from mmjax.data.sources.shards import parse_path, source_names
from mmjax.data.tokenizer import Tokenizer, train_tokenizer

SIZES = {"web": 24, "curated": 9, "tiny": 5}
WEIGHTS = {"web": 0.6, "curated": 0.3, "tiny": 0.1}
G = 10  # global batch: quotas 6, 3, 1


def _image(i: int) -> bytes:
    px = np.random.default_rng(i).integers(0, 256, [20, 20 + i % 3, 3], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


def _convert(root, name: str, n: int, first: int) -> str:
    d = root / name
    os.makedirs(d / "img")
    for i in range(n):
        (d / "img" / f"{i}.png").write_bytes(_image(first + i))
    rows = "".join(f"img/{i}.png,{name} number {i}\n" for i in range(n))
    (d / "list.csv").write_text("image_path,caption\n" + rows)
    out = str(root / "sets" / name)
    convert(str(d / "list.csv"), out, workers=1, records_per_shard=8)
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    dirs = {name: _convert(root, name, n, 100 * k) for k, (name, n) in enumerate(SIZES.items())}
    caps = [f"{name} number {i}" for name, n in SIZES.items() for i in range(n)]
    tok = Tokenizer(train_tokenizer(caps, str(root / "tok"), 40))
    return dirs, tok


def _spec(dirs, weights=WEIGHTS) -> str:
    return ",".join(f"{dirs[name]}:{w}" for name, w in weights.items())


def _cfg(path):
    cfg = {"name": "shards", "path": path, "image_size": 16, "text_len": 8, "augment": {"flip": True}}
    return ml_collections.ConfigDict(cfg)


def _iter(path, tok, b=G, **kw):
    kw.setdefault("seed", 3)
    return pipeline.make_train_iterator(_cfg(path), tok, b, **kw)


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _offsets():
    return dict(zip(SIZES, np.cumsum([0, *SIZES.values()])[:-1].tolist()))


def _source_of(ids) -> np.ndarray:
    """The source index of each id (ids run over web's records, then curated's, then tiny's)."""
    return np.searchsorted(np.cumsum(list(SIZES.values())), np.asarray(ids), side="right")


def test_parse_path():
    assert parse_path("/d/web") == [("/d/web", None)]
    assert parse_path("/d/web:0.6, /d/cur:0.4") == [("/d/web", 0.6), ("/d/cur", 0.4)]
    assert parse_path("gs://b/x") == [("gs://b/x", None)]  # a ':' without a number is part of the path
    assert parse_path("gs://b/x:2,/d/a:b:1e-1") == [("gs://b/x", 2.0), ("/d/a:b", 0.1)]
    for bad, says in [
        ("/d/a:1,/d/b", "every entry"),
        ("/d/a:-1", "finite and >= 0"),
        ("/d/a:nan,/d/b:1", "finite"),
        ("/d/a:inf", "finite"),
        ("/d/a:1,,/d/b:1", "empty entry"),
    ]:
        with pytest.raises(ValueError, match=says) as e:
            parse_path(bad)
        assert "\n" not in str(e.value)
    assert source_names(["/a/web", "/b/web/", "/c/my set", "/d/web"]) == ["web", "web_2", "my_set", "web_3"]


def test_a_directory_with_colons_and_a_missing_manifest(sets, tmp_path):
    dirs, _ = sets
    odd = tmp_path / "set:v2"  # a directory whose name has a ':' and no weight
    os.symlink(dirs["tiny"], odd)
    src = sources.source_for(_cfg(str(odd)))
    assert src.num_examples("train") == SIZES["tiny"] and [e[1] for e in src.entries()] == [str(odd)]
    missing = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="nothing' holds no manifest.json") as e:
        sources.source_for(_cfg(f"{dirs['web']}:1,{missing}:1")).num_examples("train")
    assert "\n" not in str(e.value)


def test_the_source_concatenates_the_train_split(sets):
    dirs, _ = sets
    src = sources.source_for(_cfg(_spec(dirs)))
    assert src.num_examples("train") == sum(SIZES.values())
    assert src.captions("train") == [f"{name} number {i}" for name, n in SIZES.items() for i in range(n)]
    got = [(int(r["id"]), r["caption"].decode()) for r in src.records("train").as_numpy_iterator()]
    assert got == list(enumerate(src.captions("train")))  # ids offset: unique over the mixture
    assert [name for name, _, _ in src.mixture("train")] == list(SIZES)
    assert src.label_names() is None


def test_quotas_shares_and_epochs(sets):
    """Every batch holds index.quotas rows of each source; each source's rows, in row
    order, are numpy's stream of that source (a fresh permutation per epoch)."""
    dirs, tok = sets
    n_batches = 15
    batches = _take(_iter(_spec(dirs), tok), n_batches)
    quota = index.quotas(list(WEIGHTS.values()), G)
    assert quota == [6, 3, 1]
    for b in batches:
        np.testing.assert_array_equal(np.bincount(_source_of(b["id"]), minlength=3), quota)
    ids = np.concatenate([b["id"] for b in batches])
    offsets = _offsets()
    for s, (name, n) in enumerate(SIZES.items()):
        share = quota[s] / G
        assert abs(share - WEIGHTS[name]) <= 1 / G  # the long-run share
        mine = ids[_source_of(ids) == s] - offsets[name]
        assert len(mine) == n_batches * quota[s]
        np.testing.assert_array_equal(mine, index.stream_index(np.arange(len(mine)), n, 3, s))
        for e in range(len(mine) // n):  # every record once per epoch, epochs differ
            assert sorted(mine[e * n : (e + 1) * n]) == list(range(n))
        assert len(mine) < 2 * n or list(mine[:n]) != list(mine[n : 2 * n])
    assert batches[0]["image"].shape == (G, 16, 16, 3) and batches[0]["text"].shape == (G, 8)


def test_resume_continues_the_uninterrupted_run_and_counts_per_source(sets):
    dirs, tok = sets
    it = _iter(_spec(dirs), tok)
    full = _take(it, 6)
    state = json.loads(json.dumps(it.order_state(3)))  # as a checkpoint's meta keeps it
    rest = _take(_iter(_spec(dirs), tok, start_batch=3, order_state=state), 3)
    for a, b in zip(full[3:], rest):
        np.testing.assert_array_equal(a["id"], b["id"])
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["data_state"] == b["data_state"]
    assert full[2]["data_state"] == {
        "records": 3 * G,
        "skipped": 0,
        "sources": {
            "web": {"rows": 18, "replaced": 0},
            "curated": {"rows": 9, "replaced": 0},
            "tiny": {"rows": 3, "replaced": 0},
        },
    }


def test_two_processes_rows_make_the_one_process_batch(sets):
    dirs, tok = sets
    ref = _take(_iter(_spec(dirs), tok), 3)
    parts = [_take(_iter(_spec(dirs), tok, G // 2, process_index=r, process_count=2), 3) for r in range(2)]
    for g in range(3):
        for key in ("id", "text", "image"):
            np.testing.assert_array_equal(np.concatenate([p[g][key] for p in parts]), ref[g][key])


def test_zero_weight_reads_nothing_and_a_zero_quota_fails_in_one_line(sets):
    dirs, tok = sets
    batches = _take(_iter(_spec(dirs, {"web": 1, "curated": 1, "tiny": 0}), tok), 4)
    ids = np.concatenate([b["id"] for b in batches])
    assert np.bincount(_source_of(ids), minlength=3).tolist() == [20, 20, 0]
    with pytest.raises(ValueError, match=r"gets 0 of the 10 rows.*sources in order: web, curated, tiny") as e:
        _iter(_spec(dirs, {"web": 1, "curated": 1, "tiny": 0.01}), tok)
    assert "\n" not in str(e.value)


def test_the_state_check_refuses_changed_weights_seed_data_and_batch(sets):
    dirs, tok = sets
    it = _iter(_spec(dirs), tok)
    state = it.order_state(2)
    it.close()
    changes = [
        (dict(path=_spec(dirs, {"web": 0.5, "curated": 0.4, "tiny": 0.1})), "the mixture weights changed"),
        (dict(seed=4), "the data seed changed"),
        (dict(path=_spec(dirs, {"web": 0.6, "curated": 0.4})), r"the data \(record counts per source\) changed"),
        (dict(b=2 * G), "the global batch changed"),
        (dict(state=dict(state, fingerprint="0" * 64)), "the training shards changed"),
        (dict(start_batch=3), "data state is at batch 2"),
    ]
    for change, says in changes:
        kw = {**dict(path=_spec(dirs), b=G, seed=3, start_batch=2, state=state), **change}
        with pytest.raises(ValueError, match=says) as e:
            _iter(kw["path"], tok, kw["b"], seed=kw["seed"], start_batch=kw["start_batch"], order_state=kw["state"])
        assert "\n" not in str(e.value) and str(e.value).startswith("cannot resume")
    _take(_iter(_spec(dirs), tok, start_batch=2, order_state=state), 1)  # unchanged: resumes


def test_a_replaced_record_counts_for_its_own_source(sets, monkeypatch):
    dirs, tok = sets
    clean = _take(_iter(_spec(dirs), tok), 2)
    ids = clean[1]["id"]
    row = int(np.nonzero(_source_of(ids) == 1)[0][0])  # a curated row of batch 1
    victim = int(ids[row]) - _offsets()["curated"]
    real = ArrayRecordShards.read

    def read(self, keys):
        out = real(self, keys)
        bad = self.directory == dirs["curated"]
        return [None if bad and int(k) == victim else s for k, s in zip(keys, out)]

    monkeypatch.setattr(ArrayRecordShards, "read", read)
    got = _take(_iter(_spec(dirs), tok), 2)
    assert _source_of(got[1]["id"][row]) == 1 and got[1]["id"][row] != ids[row]  # replaced within curated
    same = got[1]["id"] == ids
    assert (~same).sum() == 1 and not same[row]
    sources_state = got[1]["data_state"]["sources"]
    assert {k: v["replaced"] for k, v in sources_state.items()} == {"web": 0, "curated": 1, "tiny": 0}
    assert got[1]["data_state"]["skipped"] == 1


def test_a_run_saves_the_order_and_refuses_a_changed_mixture(sets, tmp_path):
    """A tiny training run on a mixture logs rows per source and keeps the order state in
    its checkpoint: resuming with other weights stops with one line."""
    from mmjax.train import loop
    from tiny import tiny_config

    dirs, _ = sets
    kv = {"data.name": "shards", "data.cache_decoded": False, "eval.at_end": False, "train.steps": 2}
    kv.update({"train.log_every": 1, "train.batch_size": 16})
    wd = str(tmp_path / "wd")
    loop.train(tiny_config(tmp_path, **kv, **{"data.path": _spec(dirs)}), wd, progress=False)
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    quota = index.quotas(list(WEIGHTS.values()), 16)
    assert [[r[f"data/rows_{name}"] for name in SIZES] for r in rows if r["kind"] == "train"] == [
        quota,
        [2 * q for q in quota],
    ]
    with pytest.raises(ValueError, match="cannot resume: the mixture weights changed") as e:
        loop.train(tiny_config(tmp_path, **kv, **{"data.path": _spec(dirs, {"web": 1, "curated": 1, "tiny": 1})}), wd)
    assert "\n" not in str(e.value)


def test_the_cursor_restores_counts_on_another_process_count(caplog):
    """Index-based checkpoints (meta["data"]) resume exactly on any process count: process 0
    carries the counts on, no warning; the stream path still warns after dropped records."""
    from mmjax.train.guard import DataCursor

    order = {"version": 1, "batch": 3}
    meta = {"data_position": 3, "data": order, "records": [30, 30], "skipped": [1, 2], "replaced": [[0, 1], [2, 0]]}
    with caplog.at_level("WARNING"):
        first, other = DataCursor(meta, 1, 0), DataCursor(meta, 4, 2)
        assert first.start == {"order_state": order, "skipped": 3, "replaced": [2, 1]}
        assert other.start == {"order_state": order, "skipped": 0, "replaced": [0, 0]}
        same = DataCursor(meta, 2, 1)
        assert same.start == {"order_state": order, "start_record": 30, "skipped": 2, "replaced": [2, 0]}
    assert not caplog.records
    stream = {k: v for k, v in meta.items() if k not in ("data", "replaced")}
    with caplog.at_level("WARNING"):
        assert DataCursor(stream, 1, 0).start == {}
    assert "not exact when records were dropped" in caplog.text
    cursor = DataCursor({"data_position": 0}, 1, 0)
    cursor.consumed(
        {
            "records": 20,
            "skipped": 1,
            "sources": {"web": {"rows": 12, "replaced": 1}, "cur": {"rows": 8, "replaced": 0}},
        }
    )
    totals = cursor.totals()
    assert cursor.meta(totals) == {"records": [20], "skipped": [1], "replaced": [[1, 0]]}
    assert cursor.source_metrics(totals) == {"data/rows_web": 12, "data/replaced_web": 1, "data/rows_cur": 8}
