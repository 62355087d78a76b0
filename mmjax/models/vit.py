"""ViT image encoder.

Shape letters: B batch, H/W image size, C channels, N patches per frame, T frames of
a clip, L tokens (T N + 1 with a [CLS] token, T N without; T = 1 for an image), D width.
"""

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.embed import PatchEmbed
from mmjax.models.transformer import LN_EPS, Encoder
from mmjax.models.video import FrameEmbed, VideoEncoder, check_temporal
from mmjax.parallel.sharding import names, norm_init

Dtype = Any


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
    """Fixed 2-D sine-cosine position embedding (MoCo v3, big_vision): [1, h*w, width].

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y) at
    geometric frequencies. Unlike a learned table initialised near zero, it gives
    every patch a distinct, full-scale position code from the first step.
    """
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {width}.")
    y, x = jnp.mgrid[:h, :w]
    omega = jnp.arange(width // 4) / max(width // 4 - 1, 1)
    omega = 1.0 / (temperature**omega)
    y_ = jnp.einsum("m,d->md", y.reshape(-1).astype(jnp.float32), omega)
    x_ = jnp.einsum("m,d->md", x.reshape(-1).astype(jnp.float32), omega)
    pe = jnp.concatenate([jnp.sin(x_), jnp.cos(x_), jnp.sin(y_), jnp.cos(y_)], axis=1)
    return pe[None]


class ViT(nn.Module):
    """Patches + [CLS] (pool='cls' only) + learned positions + Encoder + final LN.

    `__call__(images: [B, H, W, C] float32 | clips [B, T, H, W, C]) -> (pooled: [B, D], aux)`
    with aux['tokens']: [B, T, D] (after the final LN), aux['patch_grid']: (H/P, W/P),
    aux['frames']: the token frames (1 for an image) and aux['encoder'] the per-block outputs.
    pool='cls' takes the [CLS] token; pool='gap' averages the patch tokens (no
    [CLS] token is then added). `pre_norm` adds OpenAI CLIP's `ln_pre` after the
    position embedding; `patch_bias=False` matches OpenAI CLIP's bias-free conv.
    `act` (MLP activation name) and `ln_eps` (every LayerNorm's epsilon) go to the
    Encoder; transformers' CLIP needs act='quick_gelu' or 'gelu' and ln_eps=1e-5.

    Video (`num_frames` > 0, the longest clip; an image is then a one-frame clip): the
    clip's frames become tokens through `video.FrameEmbed` (`tubelet` > 1: t x P x P
    tubes), each token frame gets the spatial position embedding plus a temporal
    embedding, and the blocks mix frames as `temporal` says (video.TEMPORAL: 'none'
    joint attention, 'divided' space-time attention, 'local' temporal convolution,
    'mean' frames encoded alone and averaged; `local_temporal` picks the 'local'
    variant, video.LOCAL_VARIANTS). The params of an image ViT keep their
    names, so an image checkpoint loads and computes exactly the same on one frame.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "cls"
    posemb: str = "learn"  # 'learn' (a learned table) or 'sincos2d' (fixed)
    patch_bias: bool = True
    pre_norm: bool = False
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    scan: bool = False  # nn.scan over the blocks (transformer.Encoder)
    num_frames: int = 0  # > 0: a video encoder for clips of up to this many frames
    temporal: str = "none"  # video.TEMPORAL
    tubelet: int = 1  # frames per token (video.FrameEmbed 'tubelet' mode when > 1)
    temporal_kernel: int = 3  # the 'local' module's convolution length
    local_temporal: str = "release"  # the 'local' variant: video.LOCAL_VARIANTS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        self._check(images)
        video = self.num_frames > 0
        x = images[:, None] if video and images.ndim == 4 else images  # an image: a one-frame clip
        clips = x.shape[0]
        if video and self.temporal == "mean":  # the order-blind baseline: frames as images
            x = x.reshape((-1,) + x.shape[2:])
            video = False
        b, h, w = x.shape[0], x.shape[-3], x.shape[-2]
        x_BxTxNxD = self._embed_patches(x, video).astype(self.dtype)
        _, t, n, _ = x_BxTxNxD.shape
        x_BxLxD = self._add_positions(x_BxTxNxD, h, w)
        if self.pre_norm:
            x_BxLxD = nn.LayerNorm(epsilon=self.ln_eps, **norm_init(), name="ln_pre", **self._kw())(x_BxLxD)
        x_BxLxD, enc_aux = self._encode(x_BxLxD, video and self.temporal in ("divided", "local"), t)
        cls = self.pool == "cls"
        pooled_BxD = x_BxLxD[:, 0] if cls else jnp.mean(x_BxLxD, axis=1)
        if b != clips:  # 'mean': the clip is the mean of its frames; its tokens are all frames' tokens
            pooled_BxD = jnp.mean(pooled_BxD.reshape(clips, -1, self.width), axis=1)
            x_BxLxD = x_BxLxD.reshape(clips, -1, self.width)
            t = b // clips
        chex.assert_shape(pooled_BxD, (clips, self.width))
        aux = dict(
            tokens=x_BxLxD,
            patch_grid=(h // self.patch_size, w // self.patch_size),
            frames=t,
            encoder=enc_aux,
            pooled=pooled_BxD,
        )
        return pooled_BxD, aux

    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _check(self, images):
        if images.ndim not in (4, 5):
            raise ValueError(f"ViT takes images [B, H, W, C] or clips [B, T, H, W, C], got shape {images.shape}")
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}.")
        if images.ndim == 5 and not self.num_frames:
            raise ValueError(f"a clip {images.shape} needs a video model: set model.num_frames (> 0)")
        check_temporal(self.temporal)

    def _embed_patches(self, x, video: bool):
        """images [B, H, W, C] or clips [B, T, H, W, C] -> tokens [B, T, N, D] (T = 1 for images)."""
        if video:
            return FrameEmbed(
                self.patch_size,
                self.width,
                self.num_frames,
                mode="tubelet" if self.tubelet > 1 else "frames",
                tubelet=self.tubelet,
                use_bias=self.patch_bias,
                name="patch_embed",
                **self._kw(),
            )(x)
        return PatchEmbed(self.patch_size, self.width, use_bias=self.patch_bias, name="patch_embed", **self._kw())(x)[
            :, None
        ]

    def _add_positions(self, x_BxTxNxD, h: int, w: int):
        """tokens [B, T, N, D] -> [B, L, D]: each frame's tokens plus the spatial position
        embedding, and the [CLS] token (pool='cls') in front with its own position."""
        b, t, n, _ = x_BxTxNxD.shape
        cls = self.pool == "cls"
        if cls:  # created before the position table, as always (param init order sets their values)
            cls_1x1xD = self.param(
                "cls", names(nn.initializers.zeros, None, None, "embed"), (1, 1, self.width), self.param_dtype
            )
        if self.posemb == "learn":
            pos_1xSxD = self.param(
                "pos_embedding",
                names(nn.initializers.normal(0.02), None, None, "embed"),
                (1, n + cls, self.width),
                self.param_dtype,
            )
        elif self.posemb == "sincos2d":
            pos_1xSxD = posemb_sincos_2d(h // self.patch_size, w // self.patch_size, self.width)
            if cls:  # the [CLS] token gets no position
                pos_1xSxD = jnp.concatenate([jnp.zeros((1, 1, self.width)), pos_1xSxD], axis=1)
        else:
            raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}.")
        pos_1xSxD = jnp.asarray(pos_1xSxD, self.dtype)
        x_BxLxD = (x_BxTxNxD + pos_1xSxD[:, None, cls:]).reshape(b, t * n, self.width)
        if cls:
            cls_Bx1xD = jnp.broadcast_to(jnp.asarray(cls_1x1xD, self.dtype) + pos_1xSxD[:, :1], (b, 1, self.width))
            x_BxLxD = jnp.concatenate([cls_Bx1xD, x_BxLxD], axis=1)
        return x_BxLxD

    def _encode(self, x_BxLxD, mixes_frames: bool, t: int):
        """The blocks: `VideoEncoder` where frames mix ('divided', 'local'), else `Encoder`."""
        common = dict(act=self.act, ln_eps=self.ln_eps, remat=self.remat, attention=self.attention, name="encoder")
        if mixes_frames:
            if self.scan:
                raise ValueError(f"model.scan_layers works with model.temporal 'none' or 'mean', not {self.temporal!r}")
            return VideoEncoder(
                self.depth,
                self.num_heads,
                self.mlp_dim,
                t,
                temporal=self.temporal,
                temporal_kernel=self.temporal_kernel,
                local_temporal=self.local_temporal,
                cls_token=self.pool == "cls",
                **common,
                **self._kw(),
            )(x_BxLxD)
        return Encoder(
            self.depth, self.num_heads, self.mlp_dim, final_norm=True, scan=self.scan, **common, **self._kw()
        )(x_BxLxD)


def image_tower(variant: dict, owner: nn.Module, **kw) -> ViT:
    """A family module's image tower: a ViT of `variant` (`parse_variant(kind='image')`:
    patch, width, depth, heads, mlp_dim) with the owner module's `remat`, `attention`,
    `scan` (where it has one), `video` keywords and dtypes; `kw` (pool, posemb, ...) on top.
    Call it in the owner's `setup`."""
    own = dict(
        remat=owner.remat,
        attention=owner.attention,
        scan=getattr(owner, "scan", False),
        dtype=owner.dtype,
        param_dtype=owner.param_dtype,
        **dict(getattr(owner, "video", None) or {}),
    )
    return ViT(variant["patch"], variant["width"], variant["depth"], variant["heads"], variant["mlp_dim"], **own, **kw)
