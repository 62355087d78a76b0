"""Audio and depth from a user's lists (`data.name=files`): WAV and FLAC clips (PyAV),
a 22050 Hz file resampled to 16 kHz (against scipy's polyphase resampler), missing
and undecodable files skipped and counted, label-only lists (ESC-50-like), rows that
pair an image with a clip and a depth map, the channel-mixing rule in both decoders,
and `mmjax data bench`'s clips/s."""

import json

import numpy as np
import pytest

from mmjax.data import audio_io, files, pipeline, shapes_av_gen


class _Tok:
    def encode(self, texts, length):
        return np.zeros((len(texts), length), np.int32)


def _sine(freq, seconds, rate, channels=1, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.round(np.stack([x * (1 - 0.3 * c) for c in range(channels)], 1) * 32767).astype(np.int16)


def _cfg(path, **kw):
    cfg = {"name": "files", "path": str(path), "image_size": 16, "text_len": 8, "shuffle_buffer": 8,
           "modalities": ("audio", "text"), "audio": {"sample_rate": 16000, "clip_seconds": 1.0, "channels": 1},
           "augment": {"crop_scale": (1.0, 1.0), "aspect": (1.0, 1.0)}}  # fmt: skip
    cfg.update(kw)
    return cfg


@pytest.fixture
def audio_list(tmp_path):
    """A 22050 Hz stereo WAV, a 16 kHz mono FLAC, a long 16 kHz WAV, an undecodable
    file and a missing one, listed in a CSV."""
    (tmp_path / "a.wav").write_bytes(shapes_av_gen.wav_bytes(_sine(440, 0.5, 22050, 2), 22050))
    audio_io.write_audio(str(tmp_path / "b.flac"), _sine(1000, 0.25, 16000), 16000)
    (tmp_path / "c.wav").write_bytes(shapes_av_gen.wav_bytes(_sine(300, 3.0, 16000), 16000))
    (tmp_path / "bad.ogg").write_bytes(b"OggS not really" * 30)
    rows = [("a.wav", "a sine at 440"), ("b.flac", "a sine at 1000"), ("bad.ogg", "broken"),
            ("gone.mp3", "gone"), ("c.wav", "a long sine")]  # fmt: skip
    (tmp_path / "clips.csv").write_text("audio_path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return tmp_path / "clips.csv"


def test_an_audio_list_wav_flac_resampled_and_skips_counted(audio_list):
    from scipy import signal

    ev = pipeline.make_eval_iterator(_cfg(audio_list), _Tok(), "train", 8)
    b = next(ev)
    assert ev.skipped == 2  # the missing file (counted when the list is read) and the undecodable one
    assert set(b) == {"audio", "audio_len", "text", "caption", "valid", "id"} and "image" not in b
    assert b["audio"].shape == (8, 16000, 1) and b["audio"].dtype == np.float32
    assert list(b["caption"][:3]) == ["a sine at 440", "a sine at 1000", "a long sine"]  # bad.ogg dropped
    assert list(b["valid"]) == [True] * 3 + [False] * 5
    assert list(b["audio_len"][:3]) == [8000, 4000, 16000]
    with pytest.raises(StopIteration):
        next(ev)
    src = _sine(440, 0.5, 22050, 2).astype(np.float64) / 32768
    ref = signal.resample_poly(src, 320, 441, axis=0).mean(1)  # 22050 -> 16000 Hz, then the mono mix
    got = b["audio"][0, :8000, 0]
    assert np.abs(got[100:-100] - ref[100:-100]).max() < 2e-3
    spectrum = np.abs(np.fft.rfft(got))
    assert abs(np.argmax(spectrum) * 16000 / len(got) - 440) <= 2
    flac = _sine(1000, 0.25, 16000)[:, 0] / 32768
    np.testing.assert_allclose(b["audio"][1, :4000, 0], flac, atol=1e-6)  # lossless, already 16 kHz
    long = _sine(300, 3.0, 16000)[:, 0] / 32768  # 48000 samples: eval's window is the centre one
    np.testing.assert_array_equal(b["audio"][2, :, 0], long[16000:32000].astype(np.float32))
    assert not b["audio"][1, 4000:].any()


def test_audio_training_batches_crop_pad_and_resume(audio_list):
    cfg = _cfg(audio_list, audio={"sample_rate": 16000, "clip_seconds": 0.4, "channels": 2})
    it = pipeline.make_train_iterator(cfg, _Tok(), 2, seed=0)
    batches = [next(it) for _ in range(6)]
    assert all(set(b) == {"audio", "audio_len", "text", "id", "data_state"} for b in batches)
    assert batches[-1]["data_state"]["skipped"] >= 2  # missing + undecodable
    lens = {int(n) for b in batches for n in b["audio_len"]}
    assert lens <= {6400, 4000} and 4000 in lens  # the 0.25 s FLAC is padded, the others cut to 0.4 s
    for b in batches:
        for row, n in zip(b["audio"], b["audio_len"]):
            assert not row[n:].any() and row.shape == (6400, 2)
            if n == 4000:  # the mono FLAC: its channel on both
                np.testing.assert_array_equal(row[:, 1], row[:, 0])
    state = batches[2]["data_state"]
    resumed = pipeline.make_train_iterator(
        cfg, _Tok(), 2, seed=0, start_record=state["records"], skipped=state["skipped"]
    )
    for want in batches[3:]:
        got = next(resumed)
        assert got["data_state"] == want["data_state"]
        for k in ("audio", "audio_len", "id"):
            np.testing.assert_array_equal(got[k], want[k])


def test_label_lists_and_paired_rows(tmp_path):
    from PIL import Image

    for i, label in enumerate(["dog", "rain", "dog"]):
        (tmp_path / f"{i}.wav").write_bytes(shapes_av_gen.wav_bytes(_sine(200 + 100 * i, 0.2, 16000), 16000))
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 12), 1000 + 500 * i, np.uint16)).save(tmp_path / f"{i}_d16.png")
        Image.fromarray(np.full((10, 12), 7 * i, np.uint8)).save(tmp_path / f"{i}_d8.png")
    esc = tmp_path / "esc.jsonl"
    esc.write_text("".join(json.dumps({"audio_path": f"{i}.wav", "label": n}) + "\n"
                           for i, n in enumerate(["dog", "rain", "dog"])))  # fmt: skip
    rows, _ = files.read_list(str(esc))
    assert [r["caption"] for r in rows] == ["dog", "rain", "dog"]  # no caption column: the label's name
    b = next(pipeline.make_eval_iterator(_cfg(esc), _Tok(), "train", 4))
    assert list(b["label"][:3]) == [0, 1, 0] and list(b["caption"][:3]) == ["dog", "rain", "dog"]
    paired = tmp_path / "paired.csv"
    lines = [f"{i}.png,{i}.wav,{i}_d{16 if i != 1 else 8}.png,scene {i}" for i in range(3)]
    lines.insert(1, "0.png,missing.wav,0_d16.png,gone")
    paired.write_text("image_path,audio_path,depth_path,caption\n" + "\n".join(lines) + "\n")
    cfg = _cfg(paired, modalities=("image", "audio", "depth"))
    b = next(pipeline.make_eval_iterator(cfg, _Tok(), "train", 4))
    assert b["image"].shape == (4, 16, 16, 3) and b["depth"].shape == (4, 16, 16, 1)
    assert list(b["caption"][:3]) == ["scene 0", "scene 1", "scene 2"] and not b["valid"][3]
    np.testing.assert_allclose(b["depth"][:3, 0, 0, 0], [1.0, 0.007, 2.0], atol=1e-5)  # stored value / 1000
    t = next(pipeline.make_train_iterator(cfg, _Tok(), 2, seed=0))
    assert set(t) == {"image", "audio", "audio_len", "depth", "id", "data_state"}
    assert t["data_state"]["skipped"] == 1  # the row with a missing clip
    with pytest.raises(ValueError, match=r"includes 'image' but data\.path=.*esc\.jsonl.*has no image"):
        pipeline.make_train_iterator(_cfg(esc, modalities=("image", "audio")), _Tok(), 2, seed=0)
    (tmp_path / "v.csv").write_text("video_path,audio_path,caption\na.mp4,0.wav,x\n")
    with pytest.raises(ValueError, match="a video list holds videos only"):
        files.read_list(str(tmp_path / "v.csv"))


def test_channel_mixing_is_one_rule_in_both_decoders():
    import tensorflow as tf

    from mmjax.data import decode

    rng = np.random.default_rng(0)
    for c_in in (1, 2, 3):
        w = rng.uniform(-1, 1, (50, c_in)).astype(np.float32)
        for c_out in (1, 2, 4):
            want = audio_io.mix(w, c_out)
            assert want.shape == (50, c_out)
            np.testing.assert_allclose(decode.mix_channels(tf.constant(w), c_out).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(audio_io.mix(np.array([[1.0, 0.0]]), 1), [[0.5]])


def test_bench_reports_clips_per_second(audio_list):
    from mmjax.data import throughput

    out = throughput.pipeline_throughput(_cfg(audio_list), 2, 2, tokenizer=_Tok())
    assert out["clips_per_s"] == out["images_per_s"] and out["cores"] >= 1
    assert out["clips_per_s_per_core"] == pytest.approx(out["clips_per_s"] / out["cores"])
