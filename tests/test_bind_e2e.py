"""ImageBind and Meta-Transformer through the CLI on the built-in `shapes_av` data at tiny
shapes (16 px scenes, 0.256 s clips: 32 log-mel frames x 16 bins in 8x8 patches), from a
tiny demo CLIP written by `mmjax train --stop-at 0` (its tokenizer trained on the captions).

Checked: the CLIP's towers stay bit-identical to the CLIP workdir's and every tower leaf
moves; a run stopped and resumed ends bit-identical to an uninterrupted one; the eval
reports the bind metrics (X -> image / text, zero-shot, arithmetic) for both
modalities; Meta-Transformer's frozen encoder is the CLIP's image blocks bit for bit
while its tokenizers and heads train, and its eval reports each modality's accuracy.
The text anchor, the separate encoders and the objectives are checked at model level
(tests/test_imagebind.py); the synthetic bench batch by tests/test_flops.py."""

import os

import pytest
from test_llava import _assert_changed, _assert_same, _flat, _metrics, _params, _train

from tiny import DEMO, ROOT

IMAGEBIND = os.path.join(ROOT, "configs", "imagebind.py")
META = os.path.join(ROOT, "configs", "meta_transformer.py")
TOWER = "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}"
STEPS = 4
SHAPES = dict(image_size=16, num_train=96, num_validation=16, num_test=32)


def _data(data_dir) -> dict:
    shapes = {f"data.shapes.{k}": v for k, v in SHAPES.items()}
    return {"data.data_dir": str(data_dir), "data.image_size": 16, "data.shuffle_buffer": 64, **shapes}


def _run(data_dir, clip, steps=STEPS, **extra) -> dict:
    train = {
        f"train.{k}": v
        for k, v in dict(batch_size=8, steps=steps, warmup_steps=1, log_every=1, keep_checkpoints=5).items()
    }
    return {
        **_data(data_dir),
        **train,
        "data.audio.clip_seconds": 0.256,
        "eval.every": 0,
        "eval.at_end": False,
        "eval.batch_size": 16,
        **extra,
    }


def _bind_run(data_dir, clip, **extra) -> dict:
    parts = {p: f"{clip}:{p}" for p in ("image_tower", "text_tower", "image_proj", "text_proj")}
    model = {
        "model.image": "mu/4",
        "model.image_overrides": TOWER,
        "model.text_overrides": TOWER,
        "model.embed_dim": 16,
        "model.audio": f"{{'variant': 'mu/8', 'overrides': {TOWER}, 'n_fft': 128, 'hop': 64, 'n_mels': 16}}",
        "model.depth": f"{{'variant': 'mu/4', 'overrides': {TOWER}}}",
        "finetune.init_parts": repr(parts),
        "finetune.tokenizer_from": clip,
    }
    return _run(data_dir, clip, **model, **extra)


def _meta_run(data_dir, clip, arg, **extra) -> dict:
    model = {
        "model.image": "mu/4",
        "model.image_overrides": TOWER,
        "model.audio": "{'patch': 8, 'n_fft': 128, 'hop': 64, 'n_mels': 16}",
        "model.depth": "{'patch': 4}",
    }
    if arg != "scratch":
        model["finetune.init_parts"] = repr({"encoder": f"{clip}:image_tower/encoder"})
    return _run(data_dir, clip, **model, **extra)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def clip(tmp_path_factory, data_dir):
    """The demo CLIP at 16 px, 2-block towers of width 32, embed 16: its fresh init as step 0."""
    w = str(tmp_path_factory.mktemp("parts") / "clip")
    over = {
        **_data(data_dir),
        "model.image": "mu/4",
        "model.image_overrides": TOWER,
        "model.text_overrides": TOWER,
        "model.embed_dim": 16,
        "data.tokenizer.vocab_size": 128,
        "data.text_len": 16,
        "train.batch_size": 8,
    }
    _train(DEMO, w, over, "--stop-at", 0)
    return w


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, clip):
    """ib: stopped at 0 (its fresh init kept as step 0) and at 2, then to the end with the
    eval; ib_full: the same uninterrupted; meta: the frozen recipe, stopped at 0, then on."""
    root = tmp_path_factory.mktemp("bind")
    w = {k: str(root / k) for k in ("ib", "ib_full", "meta")}
    ib = _bind_run(data_dir, clip, **{"data.text_len": 16})
    for flags in (("--stop-at", 0), ("--stop-at", 2)):
        _train(IMAGEBIND, w["ib"], ib, *flags)
    _train(IMAGEBIND, w["ib"], {**ib, "eval.at_end": True})
    _train(IMAGEBIND, w["ib_full"], ib)
    meta = _meta_run(data_dir, clip, "frozen", **{"eval.at_end": True})
    _train(META, w["meta"], meta, "--stop-at", 0)
    _train(META, w["meta"], meta)
    return w


def test_imagebind_keeps_the_clip_frozen_and_trains_every_tower_leaf(runs, clip):
    got, before, src = _flat(_params(runs["ib"])), _flat(_params(runs["ib"], step=0)), _flat(_params(clip))
    towers = {k: v for k, v in got.items() if k.startswith(("['audio_tower']", "['depth_tower']"))}
    clip_part = {k: v for k, v in got.items() if k not in towers and k != "['t']"}
    _assert_same(clip_part, {k: src[k] for k in clip_part})
    moving = {k: v for k, v in towers.items() if "['cls']" not in k}
    _assert_changed(moving, {k: before[k] for k in moving})


def test_imagebind_resumes_exactly(runs):
    _assert_same(_flat(_params(runs["ib"])), _flat(_params(runs["ib_full"])))
    stopped, full = _metrics(runs["ib"]), _metrics(runs["ib_full"])
    assert [r["loss"] for r in stopped] == [r["loss"] for r in full]


def test_imagebind_eval_reports_the_bind_metrics(runs):
    (ev,) = _metrics(runs["ib"], "eval")
    for m in ("audio", "depth"):
        for k in ("2i_r@1", "2t_r@1", "_zero_shot_top1", "_arith_hit@5", "_arith_image_only@5", "2t_chance@1"):
            assert 0.0 <= ev[m + k] <= 1.0, (m + k, ev)
    assert ev["audio2i_chance@1"] == pytest.approx(1 / SHAPES["num_test"])
    assert "i2t_r@1" in ev  # the frozen CLIP's own retrieval, for reference


def test_meta_transformer_frozen_encoder_is_the_clips_blocks(runs, clip):
    got, before = _flat(_params(runs["meta"])), _flat(_params(runs["meta"], step=0))
    src = _flat(_params(clip))
    enc = {k: v for k, v in got.items() if k.startswith("['encoder']")}
    assert enc
    _assert_same(enc, {k: src[k.replace("['encoder']", "['image_tower']['encoder']", 1)] for k in enc})
    rest = {k: v for k, v in got.items() if not k.startswith("['encoder']") and "['cls']" not in k}
    _assert_changed(rest, {k: before[k] for k in rest})
    (ev,) = _metrics(runs["meta"], "eval")
    assert {"audio_top1", "depth_top1", "audio_top5"} <= set(ev)
