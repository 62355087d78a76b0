"""ViT image encoder.

Shape letters: B batch, H/W image size, C channels, N patches, T tokens
(N + 1 with a [CLS] token, N without), D width.
"""
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.embed import PatchEmbed
from mmjax.models.transformer import LN_EPS, Encoder
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
  omega = 1.0 / (temperature ** omega)
  y_ = jnp.einsum("m,d->md", y.reshape(-1).astype(jnp.float32), omega)
  x_ = jnp.einsum("m,d->md", x.reshape(-1).astype(jnp.float32), omega)
  pe = jnp.concatenate([jnp.sin(x_), jnp.cos(x_), jnp.sin(y_), jnp.cos(y_)], axis=1)
  return pe[None]


class ViT(nn.Module):
  """Patches + [CLS] (pool='cls' only) + learned positions + Encoder + final LN.

  `__call__(images: [B, H, W, C] float32) -> (pooled: [B, D], aux)` with
  aux['tokens']: [B, T, D] (after the final LN), aux['patch_grid']: (H/P, W/P),
  and aux['encoder'] the per-block outputs.
  pool='cls' takes the [CLS] token; pool='gap' averages the patch tokens (no
  [CLS] token is then added). `pre_norm` adds OpenAI CLIP's `ln_pre` after the
  position embedding; `patch_bias=False` matches OpenAI CLIP's bias-free conv.
  `act` (MLP activation name) and `ln_eps` (every LayerNorm's epsilon) go to the
  Encoder; transformers' CLIP needs act='quick_gelu' or 'gelu' and ln_eps=1e-5.
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWxC):
    chex.assert_rank(images_BxHxWxC, 4)
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, _ = images_BxHxWxC.shape
    x_BxNxD = PatchEmbed(self.patch_size, self.width, use_bias=self.patch_bias,
                         name="patch_embed", **kw)(images_BxHxWxC)
    if self.pool == "cls":
      cls_1x1xD = self.param("cls", names(nn.initializers.zeros, None, None, "embed"), (1, 1, self.width),
                             self.param_dtype)
      cls_Bx1xD = jnp.broadcast_to(jnp.asarray(cls_1x1xD, self.dtype),
                                   (b, 1, self.width))
      x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxNxD.astype(self.dtype)], axis=1)
    else:
      x_BxTxD = x_BxNxD
    t = x_BxTxD.shape[1]
    if self.posemb == "learn":
      pos_1xTxD = self.param("pos_embedding", names(nn.initializers.normal(0.02), None, None, "embed"),
                             (1, t, self.width), self.param_dtype)
    elif self.posemb == "sincos2d":
      gh, gw = h // self.patch_size, w // self.patch_size
      pos_1xTxD = posemb_sincos_2d(gh, gw, self.width)
      if self.pool == "cls":  # the [CLS] token gets no position
        pos_1xTxD = jnp.concatenate([jnp.zeros((1, 1, self.width)), pos_1xTxD], axis=1)
    else:
      raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}.")
    x_BxTxD = x_BxTxD + jnp.asarray(pos_1xTxD, self.dtype)
    if self.pre_norm:
      x_BxTxD = nn.LayerNorm(epsilon=self.ln_eps, **norm_init(), name="ln_pre", **kw)(x_BxTxD)
    x_BxTxD, enc_aux = Encoder(self.depth, self.num_heads, self.mlp_dim,
                               final_norm=True, act=self.act, ln_eps=self.ln_eps,
                               remat=self.remat, attention=self.attention, scan=self.scan, name="encoder", **kw)(x_BxTxD)
    if self.pool == "cls":
      pooled_BxD = x_BxTxD[:, 0]
    else:
      pooled_BxD = jnp.mean(x_BxTxD, axis=1)
    chex.assert_shape(pooled_BxD, (b, self.width))
    aux = dict(tokens=x_BxTxD, patch_grid=(h // self.patch_size, w // self.patch_size),
               encoder=enc_aux, pooled=pooled_BxD)
    return pooled_BxD, aux
