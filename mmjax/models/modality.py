"""Modality tokenizers and encoders beyond image and text (ImageBind, Meta-Transformer).

A tokenizer turns one modality's input into tokens for the same transformer blocks
every tower uses (`transformer.Encoder`): `__call__(x, length=None) -> (tokens [B, 1+N, D],
mask [B, 1+N] bool)`, a [CLS] token first, learned positions added, mask True where a
token is real (False for tokens made only of padding). Each holds `patch_embed` and
`positions/{cls, pos_embedding}`; the blocks are a `transformer.Encoder` in the same
layout as every tower's (`encoder/block00`, ...), so a CLIP image tower's blocks load
into a modality encoder by path (Meta-Transformer's frozen shared encoder).

- `AudioTokens`: a waveform [B, S, C] -> log-mel spectrogram [B, F, M, C] (computed on
  the device, `log_mel`) -> normalised with the dataset's mean / std (ImageBind:
  -4.268 / 9.138) -> P x P patches over (time, mel), each channel an input channel.
- `MapTokens`: any dense single- or few-channel map [B, H, W, C] (depth, thermal,
  disparity, a segmentation) -> P x P patches.
- `SignalTokens`: a 1-D signal [B, T, C] (IMU, a time series) -> windows of P samples,
  each flattened and projected.

`ModalityEncoder` is a tokenizer + blocks + the ImageBind head (final LayerNorm, the
[CLS] token, a bias-free projection). Shape letters: B batch, S samples, C channels,
F frames, M mel bins, P patch, N tokens, D width, E embedding.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models.attention import padding_mask
from mmjax.models.embed import PatchEmbed
from mmjax.models.fusion import head_dense
from mmjax.models.transformer import LN_EPS, Encoder
from mmjax.parallel.sharding import dense_init, names

Dtype = Any


def hz_to_mel(f):
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None):
    """Triangular HTK-mel filters, [n_fft // 2 + 1, n_mels] float32 (peak 1, no area
    normalisation: torchaudio's `melscale_fbanks(norm=None, mel_scale='htk')`)."""
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo[None]) / (mid - lo)[None]
    down = (hi[None] - freqs[:, None]) / (hi - mid)[None]
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(wave_BxSxC, *, sample_rate: int, n_fft: int, hop: int, n_mels: int, fmin=0.0, fmax=None, eps=1e-6):
    """Waveform [B, S, C] float -> log-mel power spectrogram [B, S // hop, n_mels, C] float32.

    Frame i covers samples [i hop, i hop + n_fft) (the end zero-padded), a periodic
    Hann window, |rfft|^2, the mel filters (`mel_filterbank`), then log(x + eps)."""
    x = jnp.asarray(wave_BxSxC, jnp.float32)
    b, s, c = x.shape
    f = s // hop
    x = jnp.pad(x, ((0, 0), (0, max(0, (f - 1) * hop + n_fft - s)), (0, 0)))
    idx = np.arange(f)[:, None] * hop + np.arange(n_fft)[None]  # [F, n_fft]
    frames = x[:, idx]  # [B, F, n_fft, C]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    spec = jnp.fft.rfft(frames * window[None, None, :, None].astype(np.float32), axis=2)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2  # [B, F, K, C]
    mel = jnp.einsum("bfkc,km->bfmc", power, mel_filterbank(n_fft, n_mels, sample_rate, fmin, fmax))
    return jnp.log(mel + eps)


class _Positions(nn.Module):
    """[CLS] + learned positions over N tokens: [B, N, D] -> [B, 1+N, D] (ViT's names)."""

    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxNxD):
        b, n, d = x_BxNxD.shape
        cls = self.param("cls", names(nn.initializers.zeros, None, None, "embed"), (1, 1, d), self.param_dtype)
        pos = self.param(
            "pos_embedding", names(nn.initializers.normal(0.02), None, None, "embed"), (1, n + 1, d), self.param_dtype
        )
        x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, d)), x_BxNxD.astype(self.dtype)], 1)
        return x + jnp.asarray(pos, self.dtype)


def _with_cls(mask_BxN):
    return jnp.concatenate([jnp.ones((mask_BxN.shape[0], 1), bool), mask_BxN], axis=1)


class AudioTokens(nn.Module):
    """Waveform [B, S, C] (+ valid samples `length` [B]) -> (tokens [B, 1+N, D], mask).

    N = (F / P) (M / P) with F = S // hop frames and M = n_mels; a patch column (P
    frames) is masked when its first frame starts at or past `length`."""

    width: int
    patch: int
    sample_rate: int
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 128
    mean: float = -4.268  # ImageBind's (AudioSet) log-mel statistics
    std: float = 9.138
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, wave_BxSxC, length_B=None):
        spec = log_mel(wave_BxSxC, sample_rate=self.sample_rate, n_fft=self.n_fft, hop=self.hop, n_mels=self.n_mels)
        spec = (spec - self.mean) / self.std  # [B, F, M, C]
        b, f, m, _ = spec.shape
        p = self.patch
        if f % p or m % p:
            raise ValueError(
                f"audio spectrogram {f} frames x {m} mel bins is not divisible by the patch {p}: pick "
                "data.audio.clip_seconds * sample_rate / hop and model.audio.n_mels as multiples of the patch"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(p, self.width, name="patch_embed", **kw)(spec.astype(self.dtype))  # [B, (F/p)(M/p), D]
        if length_B is None:
            mask = jnp.ones((b, x.shape[1]), bool)
        else:
            starts = jnp.arange(f // p) * p * self.hop  # the first sample of each patch column
            col = starts[None] < jnp.asarray(length_B)[:, None]  # [B, F/p]
            mask = jnp.repeat(col, m // p, axis=1)
        return _Positions(self.width, name="positions", **kw)(x), _with_cls(mask)


class MapTokens(nn.Module):
    """A dense map [B, H, W, C] (depth: C = 1) -> (tokens [B, 1+N, D], mask all True)."""

    width: int
    patch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC, length_B=None):
        del length_B
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.patch, self.width, name="patch_embed", **kw)(jnp.asarray(x_BxHxWxC, self.dtype))
        return _Positions(self.width, name="positions", **kw)(x), jnp.ones((x.shape[0], x.shape[1] + 1), bool)


class SignalTokens(nn.Module):
    """A 1-D signal [B, T, C] (+ valid steps `length` [B]) -> (tokens [B, 1+T/P, D], mask):
    windows of P steps, flattened to P C values and projected; a window is masked
    when it starts at or past `length`. T must be a multiple of P."""

    width: int
    patch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxC, length_B=None):
        b, t, c = x_BxTxC.shape
        p = self.patch
        if t % p:
            raise ValueError(f"signal length {t} is not a multiple of the window {p}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        windows = jnp.asarray(x_BxTxC, self.dtype).reshape(b, t // p, p * c)
        x = nn.Dense(self.width, name="patch_embed", **dense_init(None, "embed"), **kw)(windows)
        n = t // p
        mask = (
            jnp.ones((b, n), bool) if length_B is None else (jnp.arange(n) * p)[None] < jnp.asarray(length_B)[:, None]
        )
        return _Positions(self.width, name="positions", **kw)(x), _with_cls(mask)


TOKENIZERS = {"audio": AudioTokens, "depth": MapTokens, "signal": SignalTokens, "image": MapTokens}


def tokenizer(modality: str, width: int, options: dict, **kw) -> nn.Module:
    """The tokenizer of `modality` (MODALITIES) with `options` (patch, and for audio the
    spectrogram settings); ValueError naming the valid modalities."""
    if modality not in TOKENIZERS:
        raise ValueError(f"no tokenizer for modality {modality!r}; valid: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[modality](width=width, **dict(options), **kw)


class ModalityEncoder(nn.Module):
    """tokenizer -> `ln_pre` -> blocks (final LN) -> [CLS] -> bias-free projection to E
    (ImageBind's head; `embed_dim` None: the [CLS] features [B, D]).

    `__call__(x, length=None) -> (emb [B, E] float32, not normalised, aux {'tokens'})`."""

    modality: str
    variant: Any  # {width, depth, heads, mlp_dim}
    options: Any  # the tokenizer's options
    embed_dim: int | None = None
    logit_scale: float | None = None  # a learned logit scale: param `t` = its log at init, in aux['t']
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    remat: Any = False
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, length=None):
        v, kw = self.variant, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens, mask = tokenizer(self.modality, v["width"], self.options, name="tokenizer", **kw)(x, length)
        tokens = nn.LayerNorm(epsilon=self.ln_eps, name="ln_pre", **kw)(tokens)
        out, _ = Encoder(
            v["depth"], v["heads"], v["mlp_dim"], act=self.act, ln_eps=self.ln_eps, remat=self.remat,
            attention=self.attention, name="encoder", **kw,
        )(tokens, padding_mask(mask))  # fmt: skip
        pooled = out[:, 0]
        if self.embed_dim is not None:
            pooled = head_dense(self.embed_dim, use_bias=False, name="proj", param_dtype=self.param_dtype)(pooled)
        aux = {"tokens": out, "mask": mask}
        if self.logit_scale is not None:
            init = nn.initializers.constant(math.log(self.logit_scale))
            aux["t"] = self.param("t", names(init), (), jnp.float32)
        return pooled, aux


def input_shape(modality: str, c, batch: int = 1) -> tuple:
    """One modality's batch shape from a parsed model config `c` (its derived audio keys,
    image_size, signal_shape): audio [B, S, C], depth [B, H, W, 1], image [B, H, W, 3],
    signal [B, T, C]."""
    if modality == "audio":
        return (batch, int(c.audio_samples), int(c.audio_channels))
    if modality in ("depth", "image"):
        return (batch, int(c.image_size), int(c.image_size), 1 if modality == "depth" else 3)
    return (batch, *tuple(int(x) for x in c.signal_shape))


def frontend_flops(modality: str, shape, options: dict) -> int:
    """Matmul FLOPs of a tokenizer's front end per input of `shape` (no batch axis): the
    audio mel projection, 2 F (n_fft/2 + 1) M C (the FFT is not a matmul); 0 otherwise."""
    if modality != "audio":
        return 0
    frames = shape[0] // int(options["hop"])
    return 2 * frames * (int(options["n_fft"]) // 2 + 1) * int(options["n_mels"]) * shape[-1]


def num_tokens(modality: str, shape, options: dict) -> int:
    """Tokens (with [CLS]) a tokenizer makes of one input of `shape` (no batch axis)."""
    p = int(options["patch"])
    if modality == "audio":
        return 1 + (shape[0] // int(options["hop"]) // p) * (int(options["n_mels"]) // p)
    if modality in ("depth", "image"):
        return 1 + (shape[0] // p) * (shape[1] // p)
    return 1 + shape[0] // p
