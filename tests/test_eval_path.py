"""`data.eval_path`: an eval set given as its own shards directory or CSV/JSONL list.

References: the eval set read directly (as a source of its own, no eval_path), the
same images read from the other format (list vs shards), and the rows the test wrote.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import pipeline, sources
from mmjax.data.convert import convert
from mmjax.data.tokenizer import Tokenizer, train_tokenizer
from mmjax.errors import ConfigError
from tiny import DEMO

N_TRAIN, N_EVAL, B = 24, 10, 4
TRAIN_LABELS, EVAL_LABELS = ("ant", "bee", "cat"), ("bee", "cat")


def _png(path, i: int) -> None:
    px = np.random.default_rng(i).integers(0, 256, [18 + i % 5, 20, 3], dtype=np.uint8)
    Image.fromarray(px).save(path, "PNG")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A training list (CSV, labelled) and an eval set (JSONL, labelled with a subset of the
    training classes), each also converted to shards; a tokenizer of both sets' captions."""
    d = tmp_path_factory.mktemp("evalpath")
    os.makedirs(d / "img")
    train = ["image_path,caption,label"]
    for i in range(N_TRAIN):
        _png(d / "img" / f"t{i}.png", i)
        train.append(f"img/t{i}.png,a training picture {i},{TRAIN_LABELS[i % 3]}")
    (d / "train.csv").write_text("\n".join(train) + "\n")
    rows = [{"image_path": f"img/e{i}.png", "caption": f"an eval picture {i}", "label": EVAL_LABELS[i % 2]}
            for i in range(N_EVAL)]  # fmt: skip
    for i in range(N_EVAL):
        _png(d / "img" / f"e{i}.png", 1000 + i)
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert(str(d / "train.csv"), str(d / "train_shards"), workers=1, records_per_shard=16)
    convert(str(d / "eval.jsonl"), str(d / "eval_shards"), workers=1, records_per_shard=16)
    caps = [f"a training picture {i}" for i in range(N_TRAIN)] + [r["caption"] for r in rows]
    tok = Tokenizer(train_tokenizer(caps, str(d / "tok"), 40))
    return d, tok


def _cfg(name, path, **kw):
    return ml_collections.ConfigDict({"name": name, "path": str(path), "image_size": 16, "text_len": 8, **kw})


def _eval_rows(cfg, tok, split="test"):
    """(ids, captions, labels, images) of the valid rows of one eval pass."""
    out = {"id": [], "caption": [], "label": [], "image": []}
    for batch in pipeline.make_eval_iterator(cfg, tok, split, B):
        valid = np.asarray(batch["valid"], bool)
        for k in out:
            out[k].extend(list(np.asarray(batch[k])[valid]))
    return out


def _expect_eval_set(got, reference):
    assert [int(i) for i in got["id"]] == list(range(N_EVAL))
    assert [str(c) for c in got["caption"]] == [f"an eval picture {i}" for i in range(N_EVAL)]
    for k in ("id", "caption", "label"):
        assert [str(x) for x in got[k]] == [str(x) for x in reference[k]]
    np.testing.assert_array_equal(np.stack(got["image"]), np.stack(reference["image"]))


@pytest.mark.parametrize("train", ["shards", "files"])
def test_eval_reads_the_eval_shards(sets, train):
    """Training from shards or a list, eval_path = a shards dir: the eval pass is that
    set's records (its only split, 'train', stands for data.eval_split='test'), pixel for
    pixel what reading the set as a source of its own gives; counts come from it too."""
    d, tok = sets
    path = d / ("train_shards" if train == "shards" else "train.csv")
    cfg = _cfg(train, path, eval_path=str(d / "eval_shards"))
    got = _eval_rows(cfg, tok)
    _expect_eval_set(got, _eval_rows(_cfg("shards", d / "eval_shards"), tok, "train"))
    assert pipeline.num_examples(cfg, "test") == N_EVAL and pipeline.num_examples(cfg, "train") == N_TRAIN
    assert pipeline.captions(cfg, "test") == [f"an eval picture {i}" for i in range(N_EVAL)]
    assert pipeline.label_names(cfg) == list(EVAL_LABELS)


def test_eval_reads_the_whole_jsonl_list(sets):
    """eval_path = a JSONL list: every row of it (no hold-out), relative paths resolved
    against the list's directory; the same pixels as the same images from shards."""
    d, tok = sets
    cfg = _cfg("shards", d / "train_shards", eval_path=str(d / "eval.jsonl"))
    got = _eval_rows(cfg, tok)
    _expect_eval_set(got, _eval_rows(_cfg("files", d / "eval.jsonl"), tok, "train"))
    _expect_eval_set(got, _eval_rows(_cfg("shards", d / "eval_shards"), tok, "train"))
    assert sources.eval_source(cfg)[0].num_examples("all") == N_EVAL


def test_a_training_list_keeps_every_row(sets):
    """With an eval set of its own, data.eval_fraction holds nothing out of the training list."""
    d, _ = sets
    held = _cfg("files", d / "train.csv", eval_fraction=0.5)
    assert pipeline.num_examples(held, "train") < N_TRAIN
    cfg = _cfg("files", d / "train.csv", eval_fraction=0.5, eval_path=str(d / "eval.jsonl"))
    assert pipeline.num_examples(cfg, "train") == N_TRAIN
    assert len(pipeline.captions(cfg, "train")) == N_TRAIN
    assert pipeline.num_examples(cfg, "test") == N_EVAL


def test_bad_eval_paths_are_one_line(sets, tmp_path):
    d, _ = sets
    for bad, words in ((tmp_path / "nope.csv", "no such file"), (tmp_path, "without manifest.json")):
        cfg = _cfg("files", d / "train.csv", eval_path=str(bad))
        for call in (sources.check_data_config, lambda c: pipeline.num_examples(c, "test")):
            with pytest.raises(ConfigError, match="data.eval_path") as e:
                call(cfg)
            assert words in str(e.value) and "\n" not in str(e.value)
    # two splits, neither the eval split: the message names them
    two = tmp_path / "two"
    convert(str(d / "eval.jsonl"), str(two), workers=1, records_per_shard=16)
    convert(str(d / "eval.jsonl"), str(two), split="val", workers=1, records_per_shard=16)
    cfg = _cfg("files", d / "train.csv", eval_path=str(two))
    with pytest.raises(ConfigError, match=r"no split 'test' \(its splits: (train, val|val, train)\)"):
        pipeline.num_examples(cfg, "test")
    cfg.eval_split = "val"
    assert pipeline.num_examples(cfg, "val") == N_EVAL


def test_a_classifier_reads_eval_labels_as_training_ones(sets, tmp_path):
    """Eval labels index the eval set's class names (zero-shot prompts); a classifier's
    outputs index the training set's, so its eval maps them by name."""
    d, _ = sets
    cfg = _cfg("files", d / "train.csv", eval_path=str(d / "eval_shards"))
    assert sources.eval_label_map(cfg).tolist() == [1, 2, -1]  # bee, cat; -1 stays -1
    assert sources.eval_label_map(_cfg("files", d / "train.csv")) is None
    odd = tmp_path / "odd.csv"
    odd.write_text(f"image_path,caption,label\n{d / 'img' / 'e0.png'},a dog,dog\n")
    with pytest.raises(ValueError, match="classes the training set lacks: dog"):
        sources.eval_label_map(_cfg("files", d / "train.csv", eval_path=str(odd)))


def test_a_run_evaluates_the_eval_set(sets, capsys):
    """A tiny training run from the training list with data.eval_path (on the CLI): the
    eval at the end counts the eval set's images. The model and batch shapes are
    tests/test_files_e2e.py's, so the two share compiled programs (the test cache)."""
    from mmjax import cli

    d, _ = sets
    wd = d / "wd"
    code = cli.main(
        ["train", "--config", DEMO, "--workdir", str(wd), "--no-progress",
         "--config.data.name=files", f"--config.data.path={d / 'train.csv'}", "--config.data.eval_fraction=0.3",
         f"--config.data.eval_path={d / 'eval.jsonl'}", "--config.data.image_size=16", "--config.data.text_len=8",
         "--config.data.tokenizer.vocab_size=30", "--config.model.image=mu/8", "--config.model.image_overrides={}",
         "--config.model.text_overrides={}", "--config.model.embed_dim=16", "--config.train.batch_size=8",
         "--config.train.steps=4", "--config.train.log_every=2", "--config.train.ckpt_every=0",
         "--config.eval.every=0", "--config.eval.batch_size=8"]
    )  # fmt: skip
    assert code == 0
    evals = [r for r in map(json.loads, open(wd / "metrics.jsonl")) if r["kind"] == "eval"]
    assert evals and evals[-1]["num_images"] == N_EVAL
    # `mmjax eval` on the workdir, pointed at another eval set (the same images as shards)
    code = cli.main(["eval", "--workdir", str(wd), f"--config.data.eval_path={d / 'eval_shards'}"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.split("result:")[-1].splitlines()[0])["num_images"] == N_EVAL
