"""Video clips as tokens: frame embeddings, the inflation of image checkpoints, and
the temporal modeling of a video ViT (`TEMPORAL`, `VideoBlock`, `LocalTemporal`,
`LocalTemporalBlock`; `vit.ViT` puts them together).

Shape letters: B batch, T frames, H/W height/width, C channels, P patch size,
t tubelet length (frames per token), T' = T / t token frames, N patches per frame
(H/P * W/P), D width.

`FrameEmbed` turns a clip [B, T, H, W, C] into [B, T', N, D]:
  mode 'frames'   every frame through the same patch conv (an image model's
                  `patch_embed/conv/kernel` [P, P, C, D] as is), T' = T;
  mode 'tubelet'  a 3-D conv over t x P x P tubes (ViViT), kernel [t, P, P, C, D];
then a learned temporal embedding [T', D] added to each token frame. The
temporal embedding starts at zero, so with T = 1 (and t = 1) the output is exactly
PatchEmbed's: an image-text model continues on video without starting over.

`inflate_patch_kernel` makes a tubelet kernel from an image kernel: 'central'
(the image kernel on the middle frame, zeros elsewhere: a clip of one repeated frame
embeds like that frame) or 'mean' (the image kernel / t on every frame: same
property, and every frame contributes).
"""

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models.attention import MultiHeadAttention
from mmjax.models.transformer import LN_EPS, Block, Mlp, activation, maybe_remat
from mmjax.parallel.sharding import dense_init, names, norm_init

Dtype = Any
MODES = ("frames", "tubelet")
INFLATIONS = ("central", "mean")


class FrameEmbed(nn.Module):
    """`__call__(clip: [B, T, H, W, C]) -> [B, T', N, D]` (see the module docstring).

    Params: `conv/kernel` ([P, P, C, D] for 'frames', [t, P, P, C, D] for 'tubelet'),
    `conv/bias` (if use_bias), `temporal_embedding` [max_frames / t, D].
    """

    patch_size: int
    width: int
    max_frames: int
    mode: str = "frames"
    tubelet: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, clip_BxTxHxWxC):
        chex.assert_rank(clip_BxTxHxWxC, 5)
        if self.mode not in MODES:
            raise ValueError(f"FrameEmbed mode {self.mode!r}; valid choices: {', '.join(MODES)}")
        b, t, h, w, c = clip_BxTxHxWxC.shape
        p, k = self.patch_size, (self.tubelet if self.mode == "tubelet" else 1)
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} is not divisible by patch size {p}")
        if t % k or t > self.max_frames:
            raise ValueError(
                f"{t} frames: need a multiple of the tubelet length {k} and at most max_frames={self.max_frames}"
            )
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        if self.mode == "frames":
            conv = nn.Conv(
                self.width, (p, p), strides=(p, p), padding="VALID", **dense_init(None, None, None, "embed"), **kw
            )
            x = conv(clip_BxTxHxWxC.reshape(b * t, h, w, c))  # [B*T, H/P, W/P, D]
            x_BxTpxNxD = x.reshape(b, t, (h // p) * (w // p), self.width)
        else:
            conv = nn.Conv(
                self.width,
                (k, p, p),
                strides=(k, p, p),
                padding="VALID",
                **dense_init(None, None, None, None, "embed"),
                **kw,
            )
            x = conv(clip_BxTxHxWxC)  # [B, T/t, H/P, W/P, D]
            x_BxTpxNxD = x.reshape(b, t // k, (h // p) * (w // p), self.width)
        temporal = self.param(
            "temporal_embedding",
            names(nn.initializers.zeros, None, "embed"),
            (self.max_frames // k, self.width),
            self.param_dtype,
        )
        tp = t // k
        return x_BxTpxNxD + jnp.asarray(temporal[:tp], x_BxTpxNxD.dtype)[None, :, None, :]


def inflate_patch_kernel(kernel_PxPxCxD, tubelet: int, how: str = "central"):
    """An image patch kernel [P, P, C, D] -> a tubelet kernel [t, P, P, C, D]."""
    if how not in INFLATIONS:
        raise ValueError(f"inflation {how!r}; valid choices: {', '.join(INFLATIONS)}")
    kernel = np.asarray(kernel_PxPxCxD)
    if kernel.ndim != 4:
        raise ValueError(f"an image patch kernel is [P, P, C, D], got shape {kernel.shape}")
    t = int(tubelet)
    if how == "mean":
        return np.repeat(kernel[None] / t, t, axis=0).astype(kernel.dtype)
    out = np.zeros((t,) + kernel.shape, kernel.dtype)
    out[t // 2] = kernel
    return out


# ------------------------------------------------------------------ temporal modeling
# model.temporal: how a video encoder mixes information across frames.
#   'none'     no temporal module: the [CLS] and every frame's tokens attend jointly
#              (one sequence of 1 + T'N tokens; the temporal embedding tells frames apart)
#   'divided'  TimeSformer's divided space-time attention: in each block, attention over
#              time (the tokens at one spatial position across frames), then attention
#              over space (one frame's tokens and the [CLS]), then the MLP
#   'local'    mPLUG-2's local temporal module: a grouped (depthwise) temporal convolution
#              over the tokens at one spatial position in neighbouring frames, around
#              attention over space per frame (model.local_temporal picks the variant,
#              LOCAL_VARIANTS below)
#   'mean'     no temporal modeling at all, the order-blind baseline (CLIP4Clip's mean
#              pooling): every frame goes through the image encoder alone, no temporal
#              embedding, and the clip embedding is the mean of the frame embeddings
TEMPORAL = ("none", "divided", "local", "mean")


# model.local_temporal: which 'local' module.
#   'release'   mPLUG-2's (models/clip_video.py TemporalBlock, the default): a local temporal
#               module before attention and another after it (`time_conv1`, `time_conv2`),
#               each LN -> down to D/2 -> depthwise conv over frames -> QuickGELU -> up;
#               every frame keeps its own [CLS] through the blocks (attention per frame
#               on [its CLS; its N tokens]), the T' [CLS] outputs averaged once, after
#               the last block (`LocalTemporalBlock`)
#   'mmjax_v1'  mmjax's first version (kept for its checkpoints): one module after attention,
#               no activation (so the module is one low-rank linear filter), D/4 wide
#               (`time_conv`); one [CLS] shared by the frames, copied into each and averaged
#               in every block (`VideoBlock`)
LOCAL_VARIANTS = ("release", "mmjax_v1")
# A model config without model.local_temporal: a workdir written before the key existed,
# whose 'local' model is mmjax_v1 (as a missing model.mlm_weight keeps VLMo's old
# objective). The recipes (configs/demo.py) set 'release', mPLUG-2's module.
LOCAL_WHEN_UNSET = "mmjax_v1"


def check_temporal(temporal: str) -> str:
    if temporal not in TEMPORAL:
        raise ValueError(f"model.temporal={temporal!r}; valid choices: {', '.join(TEMPORAL)}")
    return temporal


def check_local_variant(variant: str) -> str:
    if variant not in LOCAL_VARIANTS:
        raise ValueError(f"model.local_temporal={variant!r}; valid choices: {', '.join(LOCAL_VARIANTS)}")
    return variant


class LocalTemporal(nn.Module):
    """mPLUG-2 / UniFormerV2 local temporal module, a residual bottleneck:
    `x + Up(act(DWConv_t(Down(LN(x)))))` on `x: [B, T, N, D]`, the convolution (kernel
    `kernel` over T, 'SAME' (zero) padding, one group per channel) mixing each token with
    the tokens at its spatial position in the neighbouring frames; Down to D / reduction.
    `act` None: no activation (mmjax_v1; the module is then one low-rank linear filter).
    `Up` starts at zero, so the module starts as the identity (an image checkpoint
    continues unchanged). The release: reduction 2, act 'quick_gelu'."""

    kernel: int = 3
    reduction: int = 2
    act: Any = "quick_gelu"  # a transformer.ACTIVATIONS name, or None
    ln_eps: float = LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxNxD):
        chex.assert_rank(x_BxTxNxD, 4)
        b, t, n, d = x_BxTxNxD.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        r = max(d // self.reduction, 1)
        h = nn.LayerNorm(epsilon=self.ln_eps, name="ln", **kw, **norm_init())(x_BxTxNxD)
        h = nn.Dense(r, name="down", **kw, **dense_init("embed", "mlp"))(h)
        h_BNxTxR = h.transpose(0, 2, 1, 3).reshape(b * n, t, r)
        h_BNxTxR = nn.Conv(
            r, (self.kernel,), padding="SAME", feature_group_count=r, name="conv", **kw, **dense_init(None, None, "mlp")
        )(h_BNxTxR)
        if self.act is not None:
            h_BNxTxR = activation(self.act)(h_BNxTxR)
        h = h_BNxTxR.reshape(b, n, t, r).transpose(0, 2, 1, 3)
        up = nn.Dense(
            d,
            name="up",
            kernel_init=names(nn.initializers.zeros, "mlp", "embed"),
            bias_init=names(nn.initializers.zeros, "embed"),
            **kw,
        )
        return x_BxTxNxD + up(h)


class VideoBlock(nn.Module):
    """A pre-LN block over a clip's tokens `x: [B, c + T'N, D]` (a [CLS] first if
    `cls_token`, c = 1; then frame by frame), for temporal 'divided' or 'local' with
    model.local_temporal='mmjax_v1' (see TEMPORAL, LOCAL_VARIANTS; 'none' is the image
    `Block` over the joint sequence, the release's 'local' `LocalTemporalBlock`).
    `num_frames` is T'.

    Spatial attention runs per frame on [CLS; that frame's N tokens], the [CLS] copied
    into every frame and its T' outputs averaged (TimeSformer). The params of an image
    `Block` (`ln1`, `attn`, `ln2`, `mlp`) keep their names and roles; the temporal parts
    (`ln_time`, `time_attn`, `time_proj` / `time_conv`) start as the identity
    (`time_proj` and the local module's up-projection at zero), so with them at init an
    image checkpoint computes on a one-frame clip exactly what it computes on the image.
    """

    num_heads: int
    mlp_dim: int
    num_frames: int
    temporal: str = "divided"
    temporal_kernel: int = 3
    cls_token: bool = True  # the sequence starts with a [CLS] token
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD):
        chex.assert_rank(x_BxSxD, 3)
        b, s, d = x_BxSxD.shape
        t, c = self.num_frames, int(self.cls_token)
        if self.temporal not in ("divided", "local") or (s - c) % t:
            raise ValueError(
                f"VideoBlock: temporal={self.temporal!r} (need 'divided' or 'local') over "
                f"{s} tokens, which must be {c} + {t} frames x N"
            )
        n = (s - c) // t
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, name=name, **kw, **norm_init())
        cls_Bx1xD, p_BxTxNxD = x_BxSxD[:, :c], x_BxSxD[:, c:].reshape(b, t, n, d)
        if self.temporal == "divided":
            p_BNxTxD = p_BxTxNxD.transpose(0, 2, 1, 3).reshape(b * n, t, d)
            h = MultiHeadAttention(self.num_heads, attention=self.attention, name="time_attn", **kw)(
                ln("ln_time")(p_BNxTxD)
            )
            h = nn.Dense(
                d,
                name="time_proj",
                kernel_init=names(nn.initializers.zeros, "embed", "embed"),
                bias_init=names(nn.initializers.zeros, "embed"),
                **kw,
            )(h)
            p_BxTxNxD = p_BxTxNxD + h.reshape(b, n, t, d).transpose(0, 2, 1, 3)
        cls_BxTxcxD = jnp.broadcast_to(cls_Bx1xD[:, None], (b, t, c, d))
        seq_BTxSfxD = jnp.concatenate([cls_BxTxcxD, p_BxTxNxD], axis=2).reshape(b * t, c + n, d)
        h = MultiHeadAttention(self.num_heads, attention=self.attention, name="attn", **kw)(ln("ln1")(seq_BTxSfxD))
        h_BxTxSfxD = h.reshape(b, t, c + n, d)
        cls_Bx1xD = cls_Bx1xD + jnp.mean(h_BxTxSfxD[:, :, :c], axis=1)
        p_BxTxNxD = p_BxTxNxD + h_BxTxSfxD[:, :, c:]
        if self.temporal == "local":  # mmjax_v1 (the release: LocalTemporalBlock)
            p_BxTxNxD = LocalTemporal(
                self.temporal_kernel, reduction=4, act=None, ln_eps=self.ln_eps, name="time_conv", **kw
            )(p_BxTxNxD)
        x_BxSxD = jnp.concatenate([cls_Bx1xD, p_BxTxNxD.reshape(b, t * n, d)], axis=1)
        h = Mlp(self.mlp_dim, act=self.act, name="mlp", **kw)(ln("ln2")(x_BxSxD))
        return x_BxSxD + h


class LocalTemporalBlock(Block):
    """mPLUG-2's TemporalBlock (model.temporal='local', model.local_temporal='release'), a
    pre-LN block over a clip kept frame by frame, `x: [B, T', c + N, D]` (each frame's own
    [CLS] first if `cls_token`, c = 1) -> the same shape:

      patches += LocalTemporal(time_conv1)(patches)      before attention
      x       += attn(ln1(x))                            per frame: [its CLS; its N tokens]
      patches += LocalTemporal(time_conv2)(patches)      after attention
      x       += mlp(ln2(x))

    The [CLS] tokens take no part in the temporal modules (as in the release); they see
    the other frames only through their own frame's tokens. The image `Block` params
    (`ln1`, `attn`, `ln2`, `mlp`) keep their names; both temporal modules start as the
    identity (their up-projections at zero), so an image checkpoint computes every frame
    as it computes the image. The fields are `Block`'s plus these two.
    """

    temporal_kernel: int = 3
    cls_token: bool = True

    @nn.compact
    def __call__(self, x_BxTxSfxD):
        chex.assert_rank(x_BxTxSfxD, 4)
        b, t, sf, d = x_BxTxSfxD.shape
        c = int(self.cls_token)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, name=name, **kw, **norm_init())
        local = lambda name: LocalTemporal(
            self.temporal_kernel, reduction=2, act="quick_gelu", ln_eps=self.ln_eps, name=name, **kw
        )
        x_BxTxSfxD = jnp.concatenate([x_BxTxSfxD[:, :, :c], local("time_conv1")(x_BxTxSfxD[:, :, c:])], axis=2)
        seq_BTxSfxD = x_BxTxSfxD.reshape(b * t, sf, d)
        h = MultiHeadAttention(self.num_heads, fused_qkv=self.fused_qkv, attention=self.attention, name="attn", **kw)(
            ln("ln1")(seq_BTxSfxD)
        )
        x_BxTxSfxD = (seq_BTxSfxD + h).reshape(b, t, sf, d)
        x_BxTxSfxD = jnp.concatenate([x_BxTxSfxD[:, :, :c], local("time_conv2")(x_BxTxSfxD[:, :, c:])], axis=2)
        h = Mlp(self.mlp_dim, act=self.act, name="mlp", **kw)(ln("ln2")(x_BxTxSfxD))
        return x_BxTxSfxD + h


class VideoEncoder(nn.Module):
    """`depth` VideoBlocks then a final LayerNorm, named like `transformer.Encoder`
    (`block00`, ..., `ln_final`) so an image encoder's params load into it.
    `__call__(x: [B, c + T'N, D]) -> (y, aux)` with aux['blockNN'] each block's output.

    temporal 'local' with local_temporal 'release': LocalTemporalBlocks over the clip
    frame by frame, the [CLS] copied into every frame before the first block and the
    T' frame [CLS] tokens averaged after the last (before `ln_final`, which is per
    token); aux['blockNN'] is then [B, T', c + N, D]."""

    depth: int
    num_heads: int
    mlp_dim: int
    num_frames: int
    temporal: str = "divided"
    temporal_kernel: int = 3
    local_temporal: str = "release"  # LOCAL_VARIANTS, for temporal 'local'
    cls_token: bool = True
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    remat: Any = False
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD):
        if self.temporal == "local" and check_local_variant(self.local_temporal) == "release":
            return self._per_frame(x_BxSxD)
        block_cls = maybe_remat(VideoBlock, self.remat)
        aux = {}
        for i in range(self.depth):
            x_BxSxD = block_cls(
                self.num_heads,
                self.mlp_dim,
                self.num_frames,
                temporal=self.temporal,
                **self._block_kw(),
                name=f"block{i:02d}",
            )(x_BxSxD)
            aux[f"block{i:02d}"] = x_BxSxD
        return self._final_norm(x_BxSxD), aux

    def _block_kw(self) -> dict:
        return dict(
            temporal_kernel=self.temporal_kernel,
            cls_token=self.cls_token,
            act=self.act,
            ln_eps=self.ln_eps,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _final_norm(self, x):
        return nn.LayerNorm(
            epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final", **norm_init()
        )(x)

    def _per_frame(self, x_BxSxD):
        """The release's 'local' encoder: every frame its own [CLS] until the end."""
        b, s, d = x_BxSxD.shape
        t, c = self.num_frames, int(self.cls_token)
        if (s - c) % t:
            raise ValueError(f"VideoEncoder: {s} tokens must be {c} + {t} frames x N")
        n = (s - c) // t
        cls_BxTxcxD = jnp.broadcast_to(x_BxSxD[:, None, :c], (b, t, c, d))
        x_BxTxSfxD = jnp.concatenate([cls_BxTxcxD, x_BxSxD[:, c:].reshape(b, t, n, d)], axis=2)
        block_cls = maybe_remat(LocalTemporalBlock, self.remat)
        aux = {}
        for i in range(self.depth):
            x_BxTxSfxD = block_cls(self.num_heads, self.mlp_dim, **self._block_kw(), name=f"block{i:02d}")(x_BxTxSfxD)
            aux[f"block{i:02d}"] = x_BxTxSfxD
        cls_BxcxD = jnp.mean(x_BxTxSfxD[:, :, :c], axis=1)  # averaged once, after the last block
        x_BxSxD = jnp.concatenate([cls_BxcxD, x_BxTxSfxD[:, :, c:].reshape(b, t * n, d)], axis=1)
        return self._final_norm(x_BxSxD), aux
