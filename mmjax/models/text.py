"""Causal text encoder (CLIP's text tower).

Token ids look like `bos w1 ... wn eos pad ... pad` with pad id 0.
Shape letters: B batch, L length, D width.
"""
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.attention import causal_mask, combine_masks, padding_mask
from mmjax.models.embed import WordEmbed
from mmjax.models.transformer import Encoder

Dtype = Any
PAD_ID = 0


def last_valid_index(ids_BxL, pad_id=PAD_ID):
  """Index of the last non-pad token per row ([B] int32); 0 for an all-pad row."""
  valid_BxL = ids_BxL != pad_id
  length = ids_BxL.shape[1]
  from_end_B = jnp.argmax(valid_BxL[:, ::-1], axis=1)
  return jnp.where(jnp.any(valid_BxL, axis=1), length - 1 - from_end_B, 0)


class TextEncoder(nn.Module):
  """WordEmbed + causal, padding-masked Encoder + final LN, pooled at eos.

  `__call__(ids: [B, L] int32) -> (pooled: [B, D], aux)`; eos is the last
  non-pad position. aux['tokens']: [B, L, D], aux['eos_index']: [B],
  aux['mask']: [B, 1, L, L] bool, aux['encoder']: per-block outputs.
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed = WordEmbed(self.vocab_size, self.width, self.max_len, **kw)
    self.encoder = Encoder(self.depth, self.num_heads, self.mlp_dim,
                           final_norm=True, remat=self.remat, **kw)

  def __call__(self, ids_BxL):
    chex.assert_rank(ids_BxL, 2)
    x_BxLxD = self.embed(ids_BxL)
    return self.encode_embedded(x_BxLxD, ids_BxL)

  def encode_embedded(self, x_BxLxD, ids_BxL):
    """The tower after the embedding (for gradient tests, prompt tuning)."""
    b, length = ids_BxL.shape
    chex.assert_shape(x_BxLxD, (b, length, self.width))
    mask = combine_masks(padding_mask(ids_BxL != PAD_ID),
                         causal_mask(length) if self.causal else None)
    x_BxLxD, enc_aux = self.encoder(x_BxLxD, mask)
    eos_B = last_valid_index(ids_BxL)
    pooled_BxD = jnp.take_along_axis(x_BxLxD, eos_B[:, None, None], axis=1)[:, 0]
    chex.assert_shape(pooled_BxD, (b, self.width))
    aux = dict(tokens=x_BxLxD, eos_index=eos_B, mask=mask, encoder=enc_aux,
               pooled=pooled_BxD)
    return pooled_BxD, aux

  def attend(self, x):
    """Tied LM head: `[..., D] -> [..., V]` logits."""
    return self.embed.attend(x)
