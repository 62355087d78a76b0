"""Modality tokenizers (mmjax/models/modality.py) against independent references: the
log-mel spectrogram against scipy's STFT and a mel filterbank written here from the
HTK formula, patch counts and padding masks, and a pure tone landing in its mel bin."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from mmjax.models import modality


def _htk_filters(n_fft, n_mels, sr):
    """Triangular filters on the HTK mel scale, by interpolation (a second formulation)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    inv = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    pts = inv(np.linspace(0.0, mel(sr / 2.0), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    out = np.zeros((len(freqs), n_mels))
    for j in range(n_mels):
        out[:, j] = np.interp(freqs, [pts[j], pts[j + 1], pts[j + 2]], [0.0, 1.0, 0.0], left=0.0, right=0.0)
    return out


@pytest.mark.parametrize("n_fft,hop,n_mels,sr", [(256, 64, 32, 8000), (400, 160, 64, 16000)])
def test_log_mel_matches_scipy(n_fft, hop, n_mels, sr):
    rng = np.random.default_rng(0)
    s = hop * 50
    wave = rng.normal(0, 0.1, size=(2, s, 2)).astype(np.float32)
    got = np.asarray(modality.log_mel(wave, sample_rate=sr, n_fft=n_fft, hop=hop, n_mels=n_mels))
    assert got.shape == (2, s // hop, n_mels, 2)
    filters = _htk_filters(n_fft, n_mels, sr)
    np.testing.assert_allclose(modality.mel_filterbank(n_fft, n_mels, sr), filters, atol=1e-5)
    window = scipy.signal.get_window("hann", n_fft)  # periodic, as torch.hann_window
    for b in range(2):
        for c in range(2):
            x = np.concatenate([wave[b, :, c], np.zeros(n_fft)]).astype(np.float64)
            _, _, z = scipy.signal.stft(
                x, nperseg=n_fft, noverlap=n_fft - hop, window=window, boundary=None, padded=False,
                detrend=False, scaling="spectrum",
            )  # fmt: skip
            power = (np.abs(z) * window.sum()) ** 2  # undo scipy's 1/sum(window) scaling: |rfft|^2
            ref = np.log(power[:, : s // hop].T @ filters + 1e-6)
            np.testing.assert_allclose(got[b, :, :, c], ref, rtol=1e-4, atol=2e-3)


def test_tone_lands_in_its_mel_bin():
    sr, n_fft, hop, n_mels = 8000, 256, 64, 32
    t = np.arange(8192) / sr
    for f0 in (250.0, 707.0, 1414.0):
        spec = np.asarray(
            modality.log_mel(
                np.sin(2 * np.pi * f0 * t)[None, :, None], sample_rate=sr, n_fft=n_fft, hop=hop, n_mels=n_mels
            )  # fmt: skip
        )
        centres = modality.mel_to_hz(np.linspace(0, modality.hz_to_mel(sr / 2), n_mels + 2))[1:-1]
        assert np.argmax(spec[0, 20:100, :, 0].mean(0)) == np.argmin(np.abs(centres - f0))


def test_audio_tokens_shapes_and_mask():
    tok = modality.AudioTokens(width=16, patch=8, sample_rate=8000, n_fft=256, hop=64, n_mels=32)
    wave = jnp.zeros((3, 8192, 2))
    length = jnp.array([8192, 4000, 1])
    (x, mask), _ = tok.init_with_output(jax.random.PRNGKey(0), wave, length)
    assert x.shape == (3, 1 + 16 * 4, 16) and mask.shape == (3, 65)
    # patch column k covers samples from k * 8 * 64 = 512 k: valid while 512 k < length
    cols = np.array([[512 * k < n for k in range(16)] for n in (8192, 4000, 1)])
    np.testing.assert_array_equal(np.asarray(mask[:, 1:]), np.repeat(cols, 4, axis=1))
    assert np.asarray(mask[:, 0]).all()  # the [CLS] token
    with pytest.raises(ValueError, match="not divisible by the patch"):
        modality.AudioTokens(width=16, patch=7, sample_rate=8000, n_fft=256, hop=64, n_mels=32).init(
            jax.random.PRNGKey(0), wave
        )


def test_map_and_signal_tokens():
    (x, mask), _ = modality.MapTokens(width=8, patch=4).init_with_output(
        jax.random.PRNGKey(0), jnp.ones((2, 16, 16, 1))
    )
    assert x.shape == (2, 17, 8) and np.asarray(mask).all()
    sig = modality.SignalTokens(width=8, patch=4)
    (x, mask), v = sig.init_with_output(jax.random.PRNGKey(0), jnp.ones((2, 32, 6)), jnp.array([32, 9]))
    v = nn.unbox(v)
    assert x.shape == (2, 9, 8)
    np.testing.assert_array_equal(np.asarray(mask[1]), [True] + [k * 4 < 9 for k in range(8)])
    # a window is the flattened [P, C] block: the projection of window 1 sees exactly steps 4..7
    xs = np.zeros((1, 32, 6), np.float32)
    xs[0, 4:8] = np.arange(24).reshape(4, 6)
    out, _ = sig.apply(v, jnp.asarray(xs))
    k = np.asarray(v["params"]["patch_embed"]["kernel"])
    b = np.asarray(v["params"]["patch_embed"]["bias"])
    pos = np.asarray(v["params"]["positions"]["pos_embedding"])[0]
    np.testing.assert_allclose(np.asarray(out[0, 2]), np.arange(24) @ k + b + pos[2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no tokenizer for modality"):
        modality.tokenizer("smell", 8, {"patch": 4})


def test_padding_is_masked_out_of_the_encoder():
    """A clip's padded tail cannot change its embedding: the masked tokens are keys nobody attends to."""
    enc = modality.ModalityEncoder(
        "audio", dict(width=32, depth=2, heads=2, mlp_dim=64), dict(patch=8, sample_rate=8000, n_fft=256, hop=64,
        n_mels=32), embed_dim=16,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    wave = rng.normal(0, 0.1, size=(1, 8192, 1)).astype(np.float32)
    v = enc.init(jax.random.PRNGKey(0), wave)
    length = jnp.array([4096])
    other = wave.copy()
    other[:, 4096 + 256 :] = rng.normal(0, 0.5, size=(1, 8192 - 4096 - 256, 1))  # beyond every valid frame's reach
    a, _ = enc.apply(v, wave, length)
    b, _ = enc.apply(v, other, length)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    c, _ = enc.apply(v, other)  # no length: the tail counts
    assert not np.allclose(np.asarray(a), np.asarray(c), atol=1e-4)
