"""Pre-LN transformer parts: Mlp, Block, Encoder.

All modules take `dtype` (compute, e.g. bfloat16) and `param_dtype` (storage,
float32). Shape letters: B batch, L length, D width, F mlp width.
"""
from typing import Any, Callable

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention
from mmjax.parallel.sharding import constrain, dense_init, norm_init

Dtype = Any


class Mlp(nn.Module):
  """`[B, L, D] -> Dense(F) -> act -> Dense(D) -> [B, L, D]`."""
  mlp_dim: int
  act: Callable = nn.gelu
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    width = x_BxLxD.shape[-1]
    h_BxLxF = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="fc1", **dense_init("embed", "mlp"))(x_BxLxD)
    h_BxLxF = constrain(self.act(h_BxLxF), ("batch", "length", "mlp"))
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc2", **dense_init("mlp", "embed"))(h_BxLxF)


class Block(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + Mlp(LN(x)).

  `__call__(x: [B, L, D], mask: [B, 1|Hh, L, L] bool | None) -> [B, L, D]`.
  """
  num_heads: int
  mlp_dim: int
  fused_qkv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD, mask=None):
    chex.assert_rank(x_BxLxD, 3)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
    h = nn.LayerNorm(name="ln1", **kw, **norm_init())(x_BxLxD)
    h = MultiHeadAttention(self.num_heads, fused_qkv=self.fused_qkv,
                           name="attn", **kw)(h, mask=mask)
    x_BxLxD = x_BxLxD + h
    h = nn.LayerNorm(name="ln2", **kw, **norm_init())(x_BxLxD)
    h = Mlp(self.mlp_dim, name="mlp", **kw)(h)
    return x_BxLxD + h


class Encoder(nn.Module):
  """A stack of `depth` pre-LN Blocks, then an optional final LayerNorm.

  `__call__(x: [B, L, D], mask) -> (y: [B, L, D], aux)`; aux holds each block's
  output as `aux['block00']`, ... (unused entries are removed by XLA under jit).
  `remat=True` recomputes block activations in the backward pass.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  final_norm: bool = True
  fused_qkv: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD, mask=None):
    chex.assert_rank(x_BxLxD, 3)
    block_cls = nn.remat(Block) if self.remat else Block
    aux = {}
    for i in range(self.depth):
      x_BxLxD = block_cls(self.num_heads, self.mlp_dim, fused_qkv=self.fused_qkv,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"block{i:02d}")(x_BxLxD, mask)
      aux[f"block{i:02d}"] = x_BxLxD
    if self.final_norm:
      x_BxLxD = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                             name="ln_final", **norm_init())(x_BxLxD)
    return x_BxLxD, aux
