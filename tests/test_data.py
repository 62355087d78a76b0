"""Tests of mmjax.data: shapes generator/builder, emoji pairs, tokenizer, pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import emoji_pairs, shapes_gen
from mmjax.data.tokenizer import Tokenizer, get_tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(data_dir, **kw):
    cfg = {
        "name": "shapes",
        "data_dir": str(data_dir),
        "image_size": 16,
        "text_len": 16,
        "augment": {"crop_scale": (0.6, 1.0), "flip": False},
        "shuffle_buffer": 100,
        "num_parallel_calls": -1,
        "train_split": "train",
        "eval_split": "test",
        "tokenizer": {"path": None, "vocab_size": 200},
        "shapes": {"image_size": 16, "num_train": 64, "num_validation": 8, "num_test": 25, "seed": 0},
    }
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    caps = [shapes_gen.example(0, "train", i, 16)["caption"] for i in range(300)]
    return Tokenizer(train_tokenizer(caps, str(tmp_path_factory.mktemp("tok")), 200))


def test_data_modules_import_without_tensorflow():
    code = (
        "import sys, mmjax.data.tokenizer, mmjax.data.shapes_gen, mmjax.data.files, "
        "mmjax.data.emoji_pairs, mmjax.data.pipeline, mmjax.data.images, mmjax.data.video_io, "
        "mmjax.data.audio_io, mmjax.data.modalities, mmjax.data.shapes_av_gen, mmjax.data.shapes_av_read; "
        "from mmjax.data import schema, sources; "
        "names = sorted(c.__name__ for c in sources.registered()); "
        "assert names == ['BuiltinSource', 'CatalogSource', 'FileListSource', 'LlavaJsonSource', 'ShardsSource'], names; "
        "sources.check_data_config({'name': 'shapes', 'shapes': {'seed': 1}}); "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets')]; assert not bad, bad"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO)
    )
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ shapes generator


def test_shapes_generator_deterministic():
    a = [shapes_gen.example(0, "train", i, 32) for i in range(20)]
    b = [shapes_gen.example(0, "train", i, 32) for i in reversed(range(20))][::-1]
    c = [shapes_gen.example(1, "train", i, 32) for i in range(20)]
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))
    assert all(x["caption"] == y["caption"] for x, y in zip(a, b))
    assert sum(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, c)) >= 19
    assert a[0]["image"].shape == (32, 32, 3) and a[0]["image"].dtype == np.uint8


def _parse(caption):
    """'a small red circle left of a large blue square' -> (obj_a, obj_b, relation)."""
    w = caption.split()
    assert w[0] == "a"
    a = (shapes_gen.COLOURS.index(w[2]), shapes_gen.SHAPES.index(w[3]), shapes_gen.SIZES.index(w[1]))
    rel = " ".join(w[4:-4])
    assert rel in shapes_gen.RELATIONS and w[-4] == "a"
    b = (shapes_gen.COLOURS.index(w[-2]), shapes_gen.SHAPES.index(w[-1]), shapes_gen.SIZES.index(w[-3]))
    return a, b, rel


def test_shapes_captions_canonical():
    for i in range(400):
        ex = shapes_gen.example(3, "validation", i, 32)
        (ca, sa, za, xa, ya), (cb, sb, zb, xb, yb) = ex["objects"]
        a, b, rel = _parse(ex["caption"])
        assert a == (ca, sa, za) and b == (cb, sb, zb) and a != b
        assert a < b  # canonical order
        assert rel == ex["relation"] == shapes_gen.relation_of((xa, ya), (xb, yb))
        # the dominant axis is clear and the objects' boxes do not overlap
        d = sorted([abs(xb - xa), abs(yb - ya)])
        assert d[1] >= 2 * d[0]
        ra, rb = (shapes_gen.SIZE_FRAC[z] * 16 for z in (za, zb))
        assert d[1] >= ra + rb
        # describing the scene from the other object gives the same caption
        assert shapes_gen.caption_of(b, a, shapes_gen.FLIP[rel]) == ex["caption"]
        negs = ex["hard_negatives"]
        assert 1 <= len(negs) <= 4 and len(set(negs)) == len(negs)
        for n in negs:
            assert n != ex["caption"]
            na, nb, nrel = _parse(n)
            assert na < nb  # canonical
            assert sorted(na + nb) != sorted(a + b) or nrel != rel or (na, nb) != (a, b)
            assert sorted(x for o in (na, nb) for x in o[:1]) == sorted([ca, cb])
            assert sorted(o[1] for o in (na, nb)) == sorted([sa, sb])
        assert ex["label"] == ca * 4 + sa
        assert shapes_gen.CLASS_NAMES[ex["label"]] == f"{shapes_gen.COLOURS[ca]} {shapes_gen.SHAPES[sa]}"


def test_shapes_builder_deterministic(shapes_dir, tmp_path):
    from mmjax.data import pipeline as P

    cfg = _cfg(shapes_dir)
    assert P.num_examples(cfg, "train") == 64 and P.num_examples(cfg, "test") == 25
    assert len(P.label_names(cfg)) == 24

    def first_images(c, n=10):
        ds = P.load_records(c, "train").take(n)
        return [r["image"] for r in ds.as_numpy_iterator()]

    a = first_images(cfg)
    b = first_images(_cfg(tmp_path / "other"))
    c = first_images(_cfg(shapes_dir, shapes=dict(cfg["shapes"], seed=1)))
    assert a == b and a != c
    caps = P.captions(cfg, "train")
    assert caps[:5] == [shapes_gen.example(0, "train", i, 16)["caption"] for i in range(5)]


# ------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_ids(tok, tmp_path):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.cls_id) == (0, 1, 2, 3, 4, 5)
    caps = [shapes_gen.example(0, "test", i, 16)["caption"] for i in range(20)]
    ids = tok.encode(caps, 24)
    assert ids.dtype == np.int32 and ids.shape == (20, 24)
    assert (ids[:, 0] == tok.bos_id).all()
    assert [tok.decode(r) for r in ids] == caps
    short = tok.encode(caps[:2], 5)
    assert (short[:, 0] == 2).all() and (short[:, -1] == 3).all()
    # get_tokenizer: trains into workdir, then reuses it; an explicit path wins.
    calls = []
    t1 = get_tokenizer({"path": None, "vocab_size": 100}, str(tmp_path), lambda: calls.append(1) or caps)
    t2 = get_tokenizer({"path": None, "vocab_size": 100}, str(tmp_path), lambda: calls.append(1) or caps)
    assert calls == [1] and os.path.exists(tmp_path / "tokenizer.model")
    assert (t1.encode(caps, 24) == t2.encode(caps, 24)).all()
    t3 = get_tokenizer({"path": tok.model_path}, None, lambda: [])
    assert (t3.encode(caps, 24) == ids).all()


# ------------------------------------------------------------------------- pipeline


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_iterator_deterministic_and_resume(shapes_dir, tok):
    from mmjax.data import pipeline as P

    cfg = _cfg(shapes_dir)
    a = _take(P.make_train_iterator(cfg, tok, 8, seed=0), 12)  # 1.5 epochs
    b = _take(P.make_train_iterator(cfg, tok, 8, seed=0), 12)
    r = P.make_train_iterator(cfg, tok, 8, seed=0, start_batch=7)
    assert r.batch_index == 7
    resumed = _take(r, 5)
    c = _take(P.make_train_iterator(cfg, tok, 8, seed=1), 2)
    x = a[0]
    assert x["image"].shape == (8, 16, 16, 3) and x["image"].dtype == np.float32
    assert x["text"].shape == (8, 16) and x["text"].dtype == np.int32
    assert x["id"].dtype == np.int64 and x["label"].dtype == np.int32
    for u, v in zip(a, b):
        assert all(np.array_equal(u[k], v[k]) for k in u)
    for u, v in zip(a[7:], resumed):
        assert all(np.array_equal(u[k], v[k]) for k in u)
    assert not np.array_equal(a[0]["id"], c[0]["id"])
    # each epoch visits every record once, in a different order
    e1 = np.concatenate([t["id"] for t in a[:8]])
    assert sorted(e1) == list(range(64))
    assert not np.array_equal(e1[:16], np.concatenate([t["id"] for t in a[8:10]]))


@pytest.mark.parametrize("crop", [(0.6, 1.0), (1.0, 1.0)])
def test_cached_decoding_gives_the_streaming_batches(shapes_dir, tok, crop):
    """data.cache_decoded keeps decoded pixels in memory: the batches (augmented or
    not, fresh or resumed) equal the streaming pipeline's; only built-in sets allow it."""
    from mmjax.data import pipeline as P

    aug = {"crop_scale": crop, "aspect": (1.0, 1.0) if crop == (1.0, 1.0) else (0.75, 1.33), "flip": False}
    stream = _take(P.make_train_iterator(_cfg(shapes_dir, augment=aug), tok, 8, seed=0), 10)
    cached = _take(P.make_train_iterator(_cfg(shapes_dir, augment=aug, cache_decoded=True), tok, 8, seed=0), 10)
    resumed = _take(
        P.make_train_iterator(_cfg(shapes_dir, augment=aug, cache_decoded=True), tok, 8, seed=0, start_batch=9), 1
    )
    for u, v in zip(stream, cached):
        assert u.pop("data_state") == v.pop("data_state")
        for k in u:
            np.testing.assert_allclose(u[k], v[k], atol=1e-5, err_msg=k)
    resumed[0].pop("data_state")
    for k in stream[9]:
        np.testing.assert_allclose(stream[9][k], resumed[0][k], atol=1e-5, err_msg=k)
    with pytest.raises(ValueError, match="cache_decoded"):
        P.make_train_iterator(dict(_cfg(shapes_dir), name="files", path="x.csv", cache_decoded=True), tok, 8, seed=0)


def test_train_hard_negatives(shapes_dir, tok):
    """K hard negatives per image: real swapped captions of that image, never its own
    caption, deterministic and resumable like the rest of the batch."""
    from mmjax.data import pipeline as P
    from mmjax.data import shapes_gen

    cfg = _cfg(shapes_dir)
    a = _take(P.make_train_iterator(cfg, tok, 8, seed=0, hard_negatives=2), 3)
    r = _take(P.make_train_iterator(cfg, tok, 8, seed=0, hard_negatives=2, start_batch=2), 1)
    assert np.array_equal(a[2]["hard_negatives"], r[0]["hard_negatives"])
    for batch in a:
        assert batch["hard_negatives"].shape == (8, 2, 16)
        for i, idx in enumerate(batch["id"]):
            ex = shapes_gen.example(0, "train", int(idx), 16)
            own = tok.encode([ex["caption"]], 16)[0]
            allowed = {tuple(t) for t in tok.encode(ex["hard_negatives"], 16)}
            for neg in batch["hard_negatives"][i]:
                assert tuple(neg) in allowed and not np.array_equal(neg, own)


def test_hard_negatives_need_a_dataset_that_has_them(tmp_path, tok):
    from PIL import Image

    from mmjax.data import pipeline as P

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "one.png")
    csv = tmp_path / "list.csv"
    csv.write_text("image_path,caption\none.png,a thing\n")
    with pytest.raises(ValueError, match="hard_negatives"):
        P.make_train_iterator(
            {"name": "files", "path": str(csv), "image_size": 16, "text_len": 16}, tok, 1, seed=0, hard_negatives=1
        )


def test_train_sharding_disjoint_and_topology_free(shapes_dir, tok):
    """Two processes decode disjoint rows, and together they give exactly the
    one-process global batches (fresh and resumed): a run can move between topologies."""
    from mmjax.data import pipeline as P

    cfg = _cfg(shapes_dir)
    one = _take(P.make_train_iterator(cfg, tok, 16, seed=0), 6)
    parts = [_take(P.make_train_iterator(cfg, tok, 8, seed=0, process_index=p, process_count=2), 6) for p in range(2)]
    resumed = [
        _take(P.make_train_iterator(cfg, tok, 8, seed=0, process_index=p, process_count=2, start_batch=4), 2)
        for p in range(2)
    ]
    ids = [set(np.concatenate([t["id"] for t in part[:4]]).tolist()) for part in parts]
    assert len(ids[0]) == len(ids[1]) == 32
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(64))
    for i, whole in enumerate(one):
        for k in whole:
            if k == "data_state":  # per process: each one's position in the global stream
                assert [p[i][k]["records"] for p in parts] == [16 * i + 8, 16 * i + 16]
                continue
            np.testing.assert_array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), whole[k])
            if i >= 4:
                np.testing.assert_array_equal(np.concatenate([resumed[0][i - 4][k], resumed[1][i - 4][k]]), whole[k])


def test_eval_iterator_covers_once(shapes_dir, tok):
    from mmjax.data import pipeline as P

    cfg = _cfg(shapes_dir)
    seen, counts = [], []
    for p in range(2):
        batches = list(P.make_eval_iterator(cfg, tok, "test", 5, process_index=p, process_count=2))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (5, 16, 16, 3) and b["valid"].shape == (5,)
            assert b["hard_negatives"].shape == (5, 4, 16)
            assert b["hard_negatives_valid"].shape == (5, 4)
            assert (b["id"][~b["valid"]] == -1).all()
            seen += b["id"][b["valid"]].tolist()
            v = b["valid"]
            assert all(tok.decode(t) == c for t, c in zip(b["text"][v], b["caption"][v]))
            assert (b["hard_negatives_valid"][v].sum(1) >= 1).all()
            assert not b["hard_negatives_valid"][~v].any()
    assert counts == [3, 3]  # ceil(ceil(25 / 2) / 5) on both processes
    assert sorted(seen) == list(range(25))


def _write_files(tmp_path, n_good=4):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append((f"imgs/{i}.png", f"picture number {i}", "odd" if i % 2 else "even"))
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rows.insert(2, ("imgs/bad.png", "a corrupt picture", "even"))
    rows.insert(1, ("imgs/missing.png", "a missing picture", "odd"))
    return rows


def test_files_corrupt_and_missing_skipped(tmp_path, tok):
    from mmjax.data import pipeline as P

    rows = _write_files(tmp_path)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image_path,caption,label\n" + "".join(f"{p},{c},{l}\n" for p, c, l in rows))
    jsonl_path = tmp_path / "list.jsonl"
    jsonl_path.write_text("".join(json.dumps({"image_path": p, "caption": c}) + "\n" for p, c, _ in rows))
    for path in (csv_path, jsonl_path):
        cfg = _cfg(tmp_path, name="files", path=str(path), image_size=16)
        assert P.num_examples(cfg, "train") == 5  # the missing file is dropped up front
        it = P.make_eval_iterator(cfg, tok, "train", 4)
        batches = list(it)
        assert len(batches) == 2 and it.skipped == 2
        valid = np.concatenate([b["valid"] for b in batches])
        assert valid.sum() == 4
        caps = [c for b in batches for c, v in zip(b["caption"], b["valid"]) if v]
        assert caps == [f"picture number {i}" for i in range(4)]
        tr = P.make_train_iterator(cfg, tok, 2, seed=0)
        got = _take(tr, 4)  # two passes over the 4 good images
        assert all(g["image"].shape == (2, 16, 16, 3) for g in got)
        assert tr.skipped >= 2
    assert P.label_names(_cfg(tmp_path, name="files", path=str(csv_path))) == ["even", "odd"]


def test_missing_catalog_dataset_fails_clearly(tmp_path):
    from mmjax.data import pipeline as P

    with pytest.raises(FileNotFoundError, match="mnist"):
        P.load_records(_cfg(tmp_path, name="mnist"), "train")


# ---------------------------------------------------------------------------- emoji


def test_emoji_pairs_and_splits():
    pairs = emoji_pairs.pairs()
    assert 3900 <= len(pairs) <= 4000
    files = [f for f, _ in pairs]
    assert len(set(files)) == len(files)
    assert all(c and ":" not in c[:1] and "_" not in c for _, c in pairs)
    frac = {s: np.mean([emoji_pairs.split_of(f) == s for f in files]) for s in ("train", "validation", "test")}
    assert 0.75 < frac["train"] < 0.85
    assert 0.07 < frac["validation"] < 0.13 and 0.07 < frac["test"] < 0.13
    assert emoji_pairs.pairs() == pairs  # stable
    img = emoji_pairs.load_rgb(os.path.join(emoji_pairs.png_dir(), files[0]))
    assert img.shape == (72, 72, 3) and img.dtype == np.uint8
