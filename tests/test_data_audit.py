"""Data-layer fixes of issue 14: exact resume past dropped records (data_state), a clear
error for a list where nothing decodes, list parse errors and swallowed rows with
file:line, wrong columns / every file missing / eval_fraction / TFDS names in one line,
the NegCLIP validity mask of training hard negatives, and the `data` extra hint."""

import json
import logging
import sys

import numpy as np
import pytest

from mmjax.data import files
from mmjax.data.tokenizer import Tokenizer, train_tokenizer

BAD_PNG = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    caps = [f"picture number {i}" for i in range(40)] + ["a corrupt picture", "a missing picture"]
    return Tokenizer(train_tokenizer(caps, str(tmp_path_factory.mktemp("tok")), 60))


def _image_list(d, n_good=12, bad_at=(1, 6, 10), missing_at=(4,)):
    """A CSV of n_good random 20x24 images with undecodable PNGs and missing files
    inserted at the given row positions."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append(f"{i}.png,picture number {i}")
    for j, at in enumerate(bad_at):
        (d / f"bad{j}.png").write_bytes(BAD_PNG)
        rows.insert(at, f"bad{j}.png,a corrupt picture")
    for at in missing_at:
        rows.insert(at, "gone.png,a missing picture")
    (d / "list.csv").write_text("image_path,caption\n" + "\n".join(rows) + "\n")
    return str(d / "list.csv")


def _cfg(path, **kw):
    cfg = {
        "name": "files",
        "path": str(path),
        "image_size": 16,
        "text_len": 8,
        "shuffle_buffer": 100,
        "augment": {"crop_scale": (0.5, 1.0), "flip": True},
        "num_parallel_calls": 2,
    }
    cfg.update(kw)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a["data_state"] == b["data_state"]
    for k in ("image", "id", "text"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --------------------------------------------------------------------- A: exact resume


def test_resume_is_exact_past_undecodable_records(tmp_path, tok):
    from mmjax.data import pipeline as P

    cfg, B = _cfg(_image_list(tmp_path)), 3
    ref = _take(P.make_train_iterator(cfg, tok, B, seed=0), 12)  # 36 good records: 3 epochs of 12
    for i, b in enumerate(ref):
        ds = b["data_state"]
        # every stream position up to `records` was consumed or skipped as undecodable;
        # `skipped` also holds the one missing file (dropped when the list was read)
        assert ds["records"] == (i + 1) * B + ds["skipped"] - 1
    assert ref[-1]["data_state"]["skipped"] >= 1 + 2 * 3  # 1 missing + 3 bad per epoch passed
    k = next(i for i, b in enumerate(ref) if b["data_state"]["skipped"] > 1 and i >= 2) + 1
    state = ref[k - 1]["data_state"]
    it = P.make_train_iterator(
        cfg, tok, B, seed=0, start_batch=k, start_record=state["records"], skipped=state["skipped"]
    )
    assert it.batch_index == k
    for a, b in zip(ref[k:], _take(it, len(ref) - k)):
        _same(a, b)
    # The old position (k global batches of records) lands elsewhere once a record was dropped.
    legacy = _take(P.make_train_iterator(cfg, tok, B, seed=0, start_batch=k), 1)[0]
    assert not np.array_equal(legacy["id"], ref[k]["id"])


def test_resume_is_exact_per_process(tmp_path, tok):
    """Two processes (each its rows of every global batch) resume each from its own
    data_state and continue exactly as uninterrupted."""
    from mmjax.data import pipeline as P

    cfg = _cfg(_image_list(tmp_path), augment={"crop_scale": (1.0, 1.0), "aspect": (1.0, 1.0)})
    for p in range(2):
        kw = dict(seed=1, process_index=p, process_count=2)
        ref = _take(P.make_train_iterator(cfg, tok, 2, **kw), 8)
        assert ref[-1]["data_state"]["skipped"] > 1  # this process met undecodable rows
        state = ref[2]["data_state"]
        resumed = _take(
            P.make_train_iterator(
                cfg, tok, 2, start_batch=3, start_record=state["records"], skipped=state["skipped"], **kw
            ),
            5,
        )
        for a, b in zip(ref[3:], resumed):
            _same(a, b)


# ------------------------------------------------------------- B: nothing decodes


def test_a_list_where_nothing_decodes_fails_at_once(tmp_path, tok):
    from mmjax.data import pipeline as P

    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(BAD_PNG)
    (tmp_path / "all_bad.csv").write_text("image_path,caption\n" + "".join(f"{i}.png,x {i}\n" for i in range(5)))
    # Before: the iterator was built and then waited forever for a first batch.
    with pytest.raises(ValueError, match=r"all_bad\.csv.*none of its 5 records decodes") as e:
        P.make_train_iterator(_cfg(tmp_path / "all_bad.csv"), tok, 2, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "0.png" in msg and "function_node" not in msg


# ------------------------------------------------------- C: parse errors, swallowed rows


def test_unclosed_quote_swallowing_rows_is_an_error(tmp_path):
    rows = [f"{i}.png,picture {i}" for i in range(40)]
    rows[10] = '10.png,"picture 10 with an unclosed quote'
    rows[38] = '38.png,picture "38"'
    p = tmp_path / "list.csv"
    p.write_text("image_path,caption\n" + "\n".join(rows) + "\n")
    for i in range(40):
        (tmp_path / f"{i}.png").write_bytes(b"")
    # Before: 40 rows read as 12, one caption holding 28 of them, no word said.
    with pytest.raises(ValueError, match=r"list\.csv:12: .*lines 12-.*unclosed quote"):
        files.read_list(str(p))


def test_a_quoted_caption_with_commas_on_its_lines_is_legal(tmp_path):
    """A caption that spans lines and holds commas is valid CSV, not an unclosed quote:
    only lines with a path in the path column read as swallowed rows."""
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"")
    p = tmp_path / "list.csv"
    p.write_text('image_path,caption\n0.png,"A dog,\nrunning, fast"\n1.png,one\n2.png,two\n')
    rows, _ = files.read_list(str(p))
    assert [r["caption"] for r in rows] == ["A dog,\nrunning, fast", "one", "two"]


def test_multiline_and_overlong_captions_are_reported_with_lines(tmp_path, caplog):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"")
    long = " ".join(["word"] * 40)
    p = tmp_path / "list.csv"
    p.write_text(f'image_path,caption\n0.png,"two\nlines"\n1.png,short\n2.png,{long}\n')
    with caplog.at_level(logging.WARNING, logger="mmjax.data.files"):
        rows, _ = files.read_list(str(p), text_len=8)
    assert [r["caption"] for r in rows[:2]] == ["two\nlines", "short"]  # kept: a legal quoted caption
    text = caplog.text
    assert "1 caption(s) span several lines (lines 2-3)" in text
    assert "far longer than data.text_len=8" in text and "lines 5" in text


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("list.csv", b"image_path,caption\n0.png,fine\n1.png,caf\xe9\n", r"list\.csv:3: not UTF-8 \(byte 0xe9"),
        (
            "list.jsonl",
            b'{"image_path": "0.png", "caption": "a"}\n{"image_path": "1.png", "caption": }\n',
            r"list\.jsonl:2: not valid JSON",
        ),
        (
            "list.jsonl",
            b'{"image_path": "0.png", "caption": "a"}\n\n["1.png", "b"]\n',
            r"list\.jsonl:3: expected a JSON object .* got list",
        ),
    ],
)
def test_parse_errors_name_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        files.read_list(str(tmp_path / name))


# ---------------------------------------------- D: columns, missing files, eval_fraction, TFDS


def test_wrong_columns_and_all_missing_say_so(tmp_path):
    (tmp_path / "0.png").write_bytes(b"")
    (tmp_path / "cols.csv").write_text("path,text\n0.png,a thing\n")
    with pytest.raises(
        ValueError,
        match=r"cols\.csv: no 'image_path' \(or 'video_path'\) column; "
        r"found columns: path, text; expected: image_path",
    ):
        files.read_list(str(tmp_path / "cols.csv"))
    (tmp_path / "nocap.jsonl").write_text(json.dumps({"image_path": "0.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'caption' key; found keys: image_path, text"):
        files.read_list(str(tmp_path / "nocap.jsonl"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "gone.csv").write_text("image_path,caption\na.png,x\nb.png,y\n")
    with pytest.raises(
        ValueError, match=r"every file it lists is missing \(2 rows; e\.g\. .*a\.png\).*" + str(tmp_path / "sub")
    ):
        files.read_list(str(tmp_path / "sub" / "gone.csv"))


def test_eval_fraction_is_validated(tmp_path):
    from mmjax.data import pipeline as P

    (tmp_path / "0.png").write_bytes(b"")
    (tmp_path / "l.csv").write_text("image_path,caption\n0.png,a\n")
    for bad in (1.5, -0.1, 1.0):
        with pytest.raises(ValueError, match=rf"data\.eval_fraction={bad}: need 0 <= f < 1"):
            P.num_examples(_cfg(tmp_path / "l.csv", eval_fraction=bad), "train")
    assert P.num_examples(_cfg(tmp_path / "l.csv", eval_fraction=0.0), "train") == 1


def test_misspelt_tfds_name_is_one_line_with_a_suggestion(tmp_path):
    from mmjax.data import pipeline as P

    with pytest.raises(FileNotFoundError) as e:
        P.load_records({"name": "mnistt", "data_dir": str(tmp_path)}, "train")
    msg = str(e.value)
    assert "\n" not in msg and "'mnistt' not found in the TFDS catalog; did you mean 'mnist'" in msg


# -------------------------------------------------------------- E: hard-negative mask


def test_training_hard_negatives_carry_a_validity_mask(tmp_path, tok):
    """K above a record's number of negatives cycles them: the repeats (and the padding
    of a record with none) are marked invalid, the valid ones are distinct."""
    import tensorflow as tf

    from mmjax.data import augment, shapes_gen
    from mmjax.data import pipeline as P

    cfg = {
        "name": "shapes",
        "data_dir": str(tmp_path),
        "image_size": 16,
        "text_len": 16,
        "augment": {"crop_scale": (1.0, 1.0), "aspect": (1.0, 1.0)},
        "shuffle_buffer": 32,
        "shapes": {"image_size": 16, "num_train": 32, "num_validation": 4, "num_test": 4, "seed": 0},
    }
    K, texts = 5, []

    class Tok:  # one id per distinct text, so the test sees the captions themselves
        def encode(self, batch, length):
            ids = [texts.index(t) if t in texts else texts.append(t) or len(texts) - 1 for t in batch]
            return np.array(ids, np.int32)[:, None].repeat(length, 1)

    batch = next(P.make_train_iterator(cfg, Tok(), 16, seed=0, hard_negatives=K))
    valid = batch["hard_negatives_valid"]
    assert valid.shape == (16, K) and valid.dtype == bool
    for i, idx in enumerate(batch["id"]):
        own = shapes_gen.example(0, "train", int(idx), 16)["hard_negatives"]
        n = len(own)
        assert valid[i].tolist() == [j < n for j in range(K)]
        negs = [texts[t] for t in batch["hard_negatives"][i, :, 0]]
        assert len(set(negs[:n])) == min(n, K) and set(negs) == set(own)  # valid: distinct; rest: repeats
    picked, ok = augment.pick_negatives(tf.constant([], tf.string), 3, tf.constant([1, 2], tf.int64))
    assert picked.numpy().tolist() == [b""] * 3 and not ok.numpy().any()


# --------------------------------------------------------------- F: the data extra


def test_without_tensorflow_the_error_names_the_extra(tmp_path, monkeypatch):
    from mmjax.data import MissingExtraError, images
    from mmjax.data import pipeline as P

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails as if absent
    with pytest.raises(ImportError) as e:
        P.load_records({"name": "shapes", "data_dir": str(tmp_path)}, "train")
    assert isinstance(e.value, MissingExtraError)
    assert '".[data]"' in str(e.value) and "\n" not in str(e.value)
    pixels, ok = images.load_images({"image_size": 8}, [])  # a text-only embed needs no TensorFlow
    assert pixels.shape == (0, 8, 8, 3) and ok == []
