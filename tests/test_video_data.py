"""Video data: frame sampling (TensorFlow against the numpy reference), a user's video
list through PyAV with a corrupt and a missing file skipped and counted,
`moving_shapes` clips through the pipeline, and a tiny video CoCa that trains,
evaluates (video->text retrieval, the time probe, captions) and captions video files."""

import json

import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.data import decode as decode_lib
from mmjax.data import moving_shapes_gen, pipeline, video_io
from tiny import ROOT, tiny_overrides

MEAN, STD = np.array(pipeline.MEAN, np.float32), np.array(pipeline.STD, np.float32)


def _normalized(frames):
    return (frames.astype(np.float32) / 255.0 - MEAN) / STD


def test_tf_frame_indices_follow_the_reference():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for n, t in [(8, 4), (2, 4), (7, 3), (30, 8), (1, 4), (8, 8)]:
        for offsets in (np.full([t], 0.5), rng.uniform(size=t), np.zeros([t]), np.full([t], 0.999)):
            want = video_io.sample_indices(n, t, offsets)
            got = decode_lib.frame_indices(tf.constant(n), t, tf.constant(offsets, tf.float32)).numpy()
            np.testing.assert_array_equal(got, want)
            assert np.all(np.diff(want) >= 0) and want.min() >= 0 and want.max() < n
    np.testing.assert_array_equal(video_io.sample_indices(8, 4), [1, 3, 5, 7])  # segment centres


def _video_list(tmp_path, n=5):
    """n short clips (frame j of clip i has red level 20j + 7i), a corrupt file and a
    missing one, listed in a JSONL file."""
    rows = []
    for i in range(n):
        frames = np.zeros((6 + i, 32, 32, 3), np.uint8)
        frames[..., 0] = (20 * np.arange(6 + i) + 7 * i)[:, None, None]
        frames[..., 2] = 90
        video_io.write_video(str(tmp_path / f"v{i}.mp4"), frames)
        rows.append({"video_path": f"v{i}.mp4", "caption": f"clip number {i}"})
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 20)
    rows.insert(2, {"video_path": "broken.mp4", "caption": "broken"})
    rows.append({"video_path": "gone.mp4", "caption": "gone"})
    with open(tmp_path / "videos.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(tmp_path / "videos.jsonl")


class _Tok:
    def encode(self, texts, length):
        return np.zeros((len(texts), length), np.int32)


def test_a_video_list_with_a_corrupt_and_a_missing_file(tmp_path):
    path = _video_list(tmp_path)
    cfg = dict(
        name="files",
        path=path,
        image_size=32,
        text_len=8,
        num_frames=4,
        frame_sampling="uniform",
        augment=dict(crop_scale=(1.0, 1.0), aspect=(1.0, 1.0)),
        shuffle_buffer=1,
    )
    ev = pipeline.make_eval_iterator(cfg, _Tok(), "train", 8)
    batch = next(ev)
    valid = batch["valid"]
    assert batch["image"].shape == (8, 4, 32, 32, 3) and valid.sum() == 5
    good = [f"v{i}.mp4" for i in range(5)]
    for row, name in enumerate(good):  # ids are row numbers among the listed (existing) files
        assert batch["caption"][row] == f"clip number {name[1]}"
        want = _normalized(video_io.read_frames(str(tmp_path / name), 4))
        np.testing.assert_allclose(batch["image"][row], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(StopIteration):
        next(ev)
    assert ev.skipped == 2  # the missing file (listing) and the undecodable one (decoder)
    # Training: random frames per segment, the same two skipped, every clip from its
    # own file: each sampled frame is one of the file's decoded frames, from its segment.
    it = pipeline.make_train_iterator(dict(cfg, frame_sampling="random"), _Tok(), 5, seed=0)
    batch = next(it)
    assert batch["image"].shape == (5, 4, 32, 32, 3) and it.skipped == 2
    picked = set()
    for clip, cid in zip(batch["image"], batch["id"]):
        i = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4}[int(cid)]  # row id -> file (the broken file is row 2)
        n = 6 + i
        every = _normalized(video_io.read_frames(str(tmp_path / f"v{i}.mp4"), n))  # all n frames in order
        for k, frame in enumerate(clip):
            match = [j for j in range(n) if np.allclose(frame, every[j], atol=1e-5)]
            assert match and np.floor(k * n / 4) <= match[0] < (k + 1) * n / 4, (i, k, match)
            picked.add((i, k, match[0]))
    assert len({(i, k) for i, k, _ in picked}) == 20


def _moving_cfg(tmp_path, **extra):
    over = {
        "data.data_dir": str(tmp_path),
        "data.image_size": 16,
        "data.num_frames": 4,
        "data.text_len": 16,
        "data.moving_shapes": "{'image_size': 16, 'num_frames': 8, 'num_train': 48, 'num_validation': 8, "
        "'num_test': 24, 'seed': 0}",
        "data.tokenizer.vocab_size": 60,
        "data.shuffle_buffer": 64,
        **extra,
    }
    return config_lib.load(f"{ROOT}/configs/video_clip.py", [f"{k}={v}" for k, v in over.items()])


def test_moving_shapes_clips_through_the_pipeline(tmp_path):
    cfg = _moving_cfg(tmp_path)
    ev = pipeline.make_eval_iterator(cfg.data, _Tok(), "test", 8)
    batch = next(ev)
    assert batch["image"].shape == (8, 4, 16, 16, 3)
    for row in range(8):  # eval: the segment centres, frames 1, 3, 5, 7 of 8
        ex = moving_shapes_gen.example(0, "test", int(batch["id"][row]), 16, 8)
        np.testing.assert_allclose(batch["image"][row], _normalized(ex["video"][[1, 3, 5, 7]]), rtol=1e-5, atol=1e-5)
        assert batch["caption"][row] == ex["caption"]
        assert batch["hard_negatives_valid"][row, 0]  # the time-reversed caption
    # The in-memory cache of decoded clips gives the very batches of streaming.
    streamed = pipeline.make_train_iterator(dict(cfg.data.to_dict(), cache_decoded=False), _Tok(), 8, seed=3)
    cached = pipeline.make_train_iterator(dict(cfg.data.to_dict(), cache_decoded=True), _Tok(), 8, seed=3)
    for _ in range(3):
        a, b = next(streamed), next(cached)
        np.testing.assert_array_equal(a["id"], b["id"])
        np.testing.assert_allclose(a["image"], b["image"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="set data.num_frames"):
        next(
            pipeline.make_train_iterator(dict(cfg.data.to_dict(), num_frames=0, cache_decoded=False), _Tok(), 8, seed=0)
        )


def test_video_coca_trains_evaluates_and_captions_videos(tmp_path, capsys):
    """A tiny video CoCa ('divided' space-time attention) on moving_shapes through the
    real loop: the LM loss falls, the eval reports video->text retrieval, the time
    probe and caption metrics; `mmjax caption --videos` captions video files (the
    corrupt one skipped) exactly as the family's own decoding does."""
    from mmjax import cli
    from mmjax.train import loop
    from mmjax.train import setup as setup_lib

    over = {k: v for k, v in tiny_overrides(tmp_path).items() if not k.startswith("model.")}
    over.update(
        {
            "data.name": "moving_shapes",
            "data.num_frames": 4,
            "data.text_len": 16,
            "data.moving_shapes": "{'image_size': 16, 'num_frames': 8, 'num_train': 64, 'num_validation': 8, "
            "'num_test': 24, 'seed': 0}",
            "data.tokenizer.vocab_size": 60,
            "train.steps": 10,
            "train.log_every": 5,
            "train.ckpt_every": 0,
            "model.temporal": "divided",
            "model.cap_queries": 4,
            "model.image_overrides": "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
            "model.text_overrides": "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
            "model.unimodal_layers": 1,
        }
    )
    cfg = config_lib.load(f"{ROOT}/configs/coca.py", [f"{k}={v}" for k, v in over.items()])
    work = str(tmp_path / "vcoca")
    result = loop.train(cfg, work, progress=False)
    assert result["num_images"] == 24 and 0 <= result["i2t_r@1"] <= 1
    assert result["time_probe_chance"] == 0.5 and 0 <= result["time_probe_acc"] <= 1
    assert result["num_captions_scored"] == 24
    rows = [json.loads(x) for x in open(tmp_path / "vcoca" / "metrics.jsonl") if '"train"' in x]
    assert rows[-1]["loss_lm"] < rows[0]["loss_lm"]
    paths = []
    for i in range(2):
        clip = moving_shapes_gen.example(0, "test", i, 16, 8)["video"]
        paths.append(video_io.write_video(str(tmp_path / f"c{i}.mp4"), clip))
    (tmp_path / "bad.mp4").write_bytes(b"no video here" * 10)
    capsys.readouterr()
    assert cli.main(["caption", "--workdir", work, "--videos", paths[0], str(tmp_path / "bad.mp4"), paths[1]]) == 0
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if "\t" in ln]
    assert [ln.split("\t")[0] for ln in lines] == paths
    import jax

    from mmjax.data import images as images_lib

    params, setup, _ = setup_lib.restore_params(work, "student")
    clips, ok = images_lib.load_videos(setup.config.data, paths)
    ids = np.asarray(jax.jit(lambda x: setup.family.caption(params, x))(clips))
    assert [ln.split("\t")[1].rstrip() for ln in lines] == [setup.tokenizer.decode(r).rstrip() for r in ids]
    assert cli.main(["embed", "--workdir", work, "--videos", *paths, "--out", str(tmp_path / "e.npz")]) == 0
    emb = np.load(tmp_path / "e.npz")
    np.testing.assert_allclose(emb["image_emb"], np.asarray(setup.family.encode_image(params, clips)), atol=1e-5)
