"""The built-in `shapes_av` set: the generator against an independent interpreter that
reads each scene back from its audio or its depth map alone, and the pipeline's
audio / depth batches over it (keys, shapes, the depth map aligned with the image
through crop and flip, the decoded clip equal to the generator's, exact resume, the
cache, text-free training batches, the errors)."""

import numpy as np
import pytest

from mmjax.data import shapes_av_gen, shapes_av_read, shapes_gen

N_READ = 500


def test_the_generator_extends_the_shapes_scene():
    for i in range(5):
        ex, base = shapes_av_gen.example(0, "train", i, 32), shapes_gen.example(0, "train", i, 32)
        assert np.array_equal(ex["image"], base["image"])
        for k in ("caption", "label", "hard_negatives", "objects", "relation"):
            assert ex[k] == base[k], k
        assert ex["audio"].shape == (8192, 2) and ex["audio"].dtype == np.int16
        assert ex["depth"].shape == (32, 32) and ex["depth"].dtype == np.uint16
        assert 0.4 < np.abs(ex["audio"]).max() / 32768 < 0.6  # peak about half of full scale
        again = shapes_av_gen.example(0, "train", i, 32)
        assert np.array_equal(ex["audio"], again["audio"]) and np.array_equal(ex["depth"], again["depth"])
        # the depth footprint is the image's object mask
        c0, c1 = ex["objects"][0][0], ex["objects"][1][0]
        raised = ex["depth"] < 2850
        coloured = ex["image"].max(-1) > 120
        assert (raised == coloured).mean() > 0.97
        heights = sorted({int(np.median(3000 - ex["depth"][raised & (abs(ex["depth"] - d) < 50)])) for d in
                          (2600 - 300 * c0, 2600 - 300 * c1)})  # fmt: skip
        assert all(abs(h - (400 + 300 * c)) <= 3 for h, c in zip(heights, sorted([c0, c1])))
    # every colour has its 2nd and 3rd harmonics below the 3800 Hz limit (shapes stay audible)
    assert all(len(shapes_av_gen.partials(1, shapes_av_gen.f0(c))) >= 2 for c in range(6))


def test_the_interpreter_reads_the_scene_back_from_audio_and_from_depth():
    audio_ok = depth_ok = 0
    for i in range(N_READ):
        ex = shapes_av_gen.example(0, "test", i, 32)
        audio_ok += shapes_av_read.read_audio(ex["audio"], 8000, 32) == ex["caption"]
        depth_ok += shapes_av_read.read_depth(ex["depth"]) == ex["caption"]
    print(f"read back: audio {audio_ok / N_READ:.3f}, depth {depth_ok / N_READ:.3f} of {N_READ}")
    assert audio_ok / N_READ >= 0.98 and depth_ok / N_READ >= 0.98


def test_another_scenes_signal_does_not_read_as_the_caption():
    exs = [shapes_av_gen.example(1, "train", i, 32) for i in range(60)]
    for a, b in zip(exs, exs[1:]):
        if a["caption"] == b["caption"]:
            continue
        assert shapes_av_read.read_audio(b["audio"], 8000, 32) != a["caption"]
        assert shapes_av_read.read_depth(b["depth"]) != a["caption"]
    ex = exs[0]  # a silent clip and a flat plane read as nothing
    assert shapes_av_read.read_audio(np.zeros_like(ex["audio"]), 8000, 32) == ""
    assert shapes_av_read.read_depth(np.full_like(ex["depth"], 3000)) == ""


# ------------------------------------------------------------------ the pipeline


class _Tok:
    def encode(self, texts, length):
        return np.array([[len(t) % 7 + 1] * length for t in texts], np.int32)


def _cfg(data_dir, **kw):
    cfg = {
        "name": "shapes_av",
        "data_dir": str(data_dir),
        "image_size": 32,
        "text_len": 8,
        "shuffle_buffer": 64,
        "augment": {"crop_scale": (0.5, 1.0), "aspect": (0.75, 1.33), "flip": True},
        "shapes": {"image_size": 32, "num_train": 48, "num_validation": 4, "num_test": 10, "seed": 0},
        "modalities": ("image", "audio", "depth"),
        "audio": {"sample_rate": 8000, "clip_seconds": 0.5, "channels": 2},
    }
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def av_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds_av")


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_batches_carry_the_modalities_and_no_text(av_dir):
    from mmjax.data import pipeline

    b = next(pipeline.make_train_iterator(_cfg(av_dir), _Tok(), 4, seed=0))
    state = b.pop("data_state")
    assert state["records"] == 4 and state["skipped"] == 0
    want = {"image": ((4, 32, 32, 3), np.float32), "audio": ((4, 4000, 2), np.float32),
            "audio_len": ((4,), np.int32), "depth": ((4, 32, 32, 1), np.float32),
            "id": ((4,), np.int64), "label": ((4,), np.int32)}  # fmt: skip
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want  # no 'text': the caption never reaches it
    assert np.all(b["audio_len"] == 4000) and np.abs(b["audio"]).max() <= 1.0
    mods = ("image", "text", "audio")
    t = next(pipeline.make_train_iterator(_cfg(av_dir, modalities=mods), _Tok(), 4, seed=0))
    assert set(t) == {"image", "text", "audio", "audio_len", "id", "label", "data_state"}


def test_eval_batches_add_text_and_the_clip_decodes_exactly(av_dir):
    from mmjax.data import pipeline

    cfg = _cfg(av_dir, audio={"sample_rate": 8000, "clip_seconds": 1.25, "channels": 2})
    ev = pipeline.make_eval_iterator(cfg, _Tok(), "test", 4)
    batches = list(ev)
    assert len(batches) == 3 and sum(int(b["valid"].sum()) for b in batches) == 10
    b = batches[0]
    assert set(b) == {"image", "audio", "audio_len", "depth", "text", "caption", "valid", "id", "label",
                      "hard_negatives", "hard_negatives_valid"}  # fmt: skip
    assert b["audio"].shape == (4, 10000, 2) and b["depth"].shape == (4, 32, 32, 1) and b["text"].shape == (4, 8)
    for row in range(4):  # a clip shorter than the window: the whole clip, then zeros
        ex = shapes_av_gen.example(0, "test", int(b["id"][row]), 32)
        assert b["caption"][row] == ex["caption"] and b["audio_len"][row] == 8192
        np.testing.assert_array_equal(b["audio"][row, :8192], ex["audio"] / 32768.0)
        assert not b["audio"][row, 8192:].any()
        np.testing.assert_allclose(b["depth"][row, ..., 0], ex["depth"] / 1000.0, atol=1e-5)
    last = batches[-1]
    assert list(last["valid"]) == [True, True, False, False] and list(last["audio_len"][2:]) == [0, 0]
    # a longer clip: eval takes the centre window; mono at 16 kHz goes through PyAV
    cfg = _cfg(av_dir, audio={"sample_rate": 16000, "clip_seconds": 0.5, "channels": 1}, modalities=("audio",))
    b = next(pipeline.make_eval_iterator(cfg, _Tok(), "test", 2))
    assert set(b) >= {"audio", "audio_len", "text"} and "image" not in b and "depth" not in b
    ex = shapes_av_gen.example(0, "test", int(b["id"][0]), 32)
    ref = (ex["audio"] / 32768.0).mean(1)  # 8 kHz mono; every other 16 kHz sample sits on it
    got = b["audio"][0, :, 0][::2]
    start = (16384 - 8000) // 2 // 2
    assert np.abs(got[20:-20] - ref[start + 20 : start + 4000 - 20]).max() < 0.02


def _object_masks(image, depth):
    from mmjax.data import pipeline

    pixels = image * np.array(pipeline.STD) + np.array(pipeline.MEAN)
    return pixels.max(-1) > 120 / 255, depth[..., 0] < 2.8


def test_depth_gets_the_images_crop_and_flip(av_dir):
    from mmjax.data import pipeline

    batches = _take(pipeline.make_train_iterator(_cfg(av_dir), _Tok(), 8, seed=3), 3)
    aligned, shuffled = [], []
    for b in batches:
        for row in range(8):
            img, dep = _object_masks(b["image"][row], b["depth"][row])
            aligned.append((img & dep).sum() / max((img | dep).sum(), 1))
            other = _object_masks(b["image"][row], b["depth"][(row + 1) % 8])[1]
            shuffled.append((img & other).sum() / max((img | other).sum(), 1))
    assert min(aligned) > 0.7 and np.mean(aligned) > 0.85, aligned
    assert np.mean(shuffled) < 0.3
    # some rows were cropped (not the whole scene) and some flipped: the check is not trivial
    ids = np.concatenate([b["id"] for b in batches])
    whole = [shapes_av_gen.example(0, "train", int(i), 32)["image"].max(-1) > 120 for i in ids]
    img_masks = [_object_masks(b["image"][r], b["depth"][r])[0] for b in batches for r in range(8)]
    assert sum(not np.array_equal(m, w) for m, w in zip(img_masks, whole)) > 8


def test_resume_is_exact_with_audio_and_the_cache_gives_the_stream(av_dir):
    from mmjax.data import pipeline

    cfg = _cfg(av_dir)
    a = _take(pipeline.make_train_iterator(cfg, _Tok(), 4, seed=0), 6)
    state = a[2]["data_state"]
    r = _take(pipeline.make_train_iterator(cfg, _Tok(), 4, seed=0, start_record=state["records"],
                                           skipped=state["skipped"]), 3)  # fmt: skip
    for u, v in zip(a[3:], r):
        assert u["data_state"] == v["data_state"]
        for k in u:
            if k != "data_state":
                np.testing.assert_array_equal(u[k], v[k], err_msg=k)
    starts = set()
    for b in a:  # each row is a 4000-sample window of its record's clip, from a random start
        for i, row in zip(b["id"], b["audio"]):
            clip = shapes_av_gen.example(0, "train", int(i), 32)["audio"] / 32768.0
            windows = np.lib.stride_tricks.sliding_window_view(clip[:, 0], 4000)
            (at,) = np.nonzero((windows == row[:, 0]).all(1))
            assert len(at) == 1 and np.array_equal(clip[at[0] : at[0] + 4000], row)
            starts.add(int(at[0]))
    assert len(starts) > 12
    cached = _take(pipeline.make_train_iterator(_cfg(av_dir, cache_decoded=True), _Tok(), 4, seed=0), 6)
    for u, v in zip(a, cached):
        assert u.pop("data_state") == v.pop("data_state")
        for k in u:
            np.testing.assert_allclose(u[k], v[k], atol=1e-5, err_msg=k)


def test_modality_errors(av_dir, tmp_path):
    from mmjax.data import pipeline

    with pytest.raises(ValueError, match=r"data\.modalities: 'sound' is not a modality; valid: image, text, audio"):
        pipeline.make_train_iterator(_cfg(av_dir, modalities=("image", "sound")), _Tok(), 4, seed=0)
    no_audio = dict(_cfg(tmp_path, name="shapes", modalities=("image", "audio")), shapes=_cfg(av_dir)["shapes"])
    with pytest.raises(ValueError, match=r"includes 'audio' but dataset 'shapes' \(split 'train'\) has no audio"):
        pipeline.make_train_iterator(no_audio, _Tok(), 4, seed=0)
    with pytest.raises(ValueError, match=r"includes 'depth' but dataset 'shapes' \(split 'test'\) has no depth"):
        pipeline.make_eval_iterator(dict(no_audio, modalities=("image", "depth")), _Tok(), "test", 4)
    with pytest.raises(ValueError, match=r"needs 'text' in data\.modalities"):
        pipeline.make_train_iterator(_cfg(av_dir), _Tok(), 4, seed=0, hard_negatives=2)
    with pytest.raises(ValueError, match=r"stream pipeline.*set data\.random_access=False"):
        pipeline.make_train_iterator(_cfg(av_dir, random_access=True), _Tok(), 4, seed=0)
