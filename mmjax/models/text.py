"""Causal text encoder (CLIP's text tower).

Token ids look like `bos w1 ... wn eos pad ... pad` with pad id 0.
Shape letters: B batch, L length, D width.

Pooling rules (`pool`, config key `model.text_pool`):
  'last'    the last non-pad position (mmjax's tokenizer: eos is the last token,
            pad id 0), keys with id 0 masked out of attention. The default.
  'argmax'  the position of the largest id (OpenAI CLIP's rule, where eos has the
            largest id; transformers uses it when `eos_token_id == 2`).
  'eos'     the first position whose id equals `eos_id` (transformers' rule
            otherwise); 0 when a row has no eos.
With 'argmax' and 'eos' id 0 is an ordinary token and attention is causal only, as in
transformers' `get_text_features(input_ids)` (no attention_mask).
"""

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.attention import causal_mask, combine_masks, padding_mask
from mmjax.models.embed import WordEmbed
from mmjax.models.tokens import MMJAX
from mmjax.models.transformer import LN_EPS, Encoder

Dtype = Any
PAD_ID = MMJAX["pad"]  # the default: mmjax tokenizer's (a family passes its tokenizer's)
POOLS = ("last", "argmax", "eos")


def last_valid_index(ids_BxL, pad_id=PAD_ID):
    """Index of the last non-pad token per row ([B] int32); 0 for an all-pad row."""
    valid_BxL = ids_BxL != pad_id
    length = ids_BxL.shape[1]
    from_end_B = jnp.argmax(valid_BxL[:, ::-1], axis=1)
    return jnp.where(jnp.any(valid_BxL, axis=1), length - 1 - from_end_B, 0)


def pool_index(ids_BxL, pool="last", eos_id=None, pad_id=PAD_ID):
    """The pooled position per row ([B] int32) under a rule from POOLS (module docstring)."""
    if pool == "last":
        return last_valid_index(ids_BxL, pad_id)
    if pool == "argmax":
        return jnp.argmax(ids_BxL, axis=1).astype(jnp.int32)
    if pool == "eos":
        if eos_id is None:
            raise ValueError("text pool 'eos' needs eos_id (model.eos_id), got None.")
        return jnp.argmax(ids_BxL == eos_id, axis=1).astype(jnp.int32)
    raise ValueError(f"text pool {pool!r}; valid choices: {', '.join(POOLS)}")


class TextEncoder(nn.Module):
    """WordEmbed + causal, padding-masked Encoder + final LN, pooled at eos.

    `__call__(ids: [B, L] int32) -> (pooled: [B, D], aux)`; eos is found by `pool`
    (module docstring; default: the last non-pad position). aux['tokens']: [B, L, D],
    aux['eos_index']: [B], aux['mask']: [B|1, 1, L, L] bool, aux['encoder']: per-block
    outputs. `act` / `ln_eps`: the Encoder's MLP activation and LayerNorm epsilon.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    pool: str = "last"
    eos_id: Any = None  # int, for pool='eos'
    pad_id: int = PAD_ID  # the tokenizer's, for pool='last' (model.token_ids)
    act: str = "gelu_tanh"
    ln_eps: float = LN_EPS
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    scan: bool = False  # nn.scan over the blocks (transformer.Encoder)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = WordEmbed(self.vocab_size, self.width, self.max_len, **kw)
        if self.pool not in POOLS:
            raise ValueError(f"text pool {self.pool!r}; valid choices: {', '.join(POOLS)}")
        if self.pool == "eos" and self.eos_id is None:
            raise ValueError("text pool 'eos' needs eos_id (model.eos_id), got None.")
        self.encoder = Encoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            final_norm=True,
            act=self.act,
            ln_eps=self.ln_eps,
            remat=self.remat,
            attention=self.attention,
            scan=self.scan,
            **kw,
        )

    def __call__(self, ids_BxL):
        chex.assert_rank(ids_BxL, 2)
        x_BxLxD = self.embed(ids_BxL)
        return self.encode_embedded(x_BxLxD, ids_BxL)

    def encode_embedded(self, x_BxLxD, ids_BxL):
        """The tower after the embedding (for gradient tests, prompt tuning)."""
        b, length = ids_BxL.shape
        chex.assert_shape(x_BxLxD, (b, length, self.width))
        # Only mmjax's own rule knows a pad id; transformers' rules attend causally.
        pad = padding_mask(ids_BxL != self.pad_id) if self.pool == "last" else None
        mask = combine_masks(pad, causal_mask(length) if self.causal else None)
        x_BxLxD, enc_aux = self.encoder(x_BxLxD, mask)
        eos_B = pool_index(ids_BxL, self.pool, self.eos_id, self.pad_id)
        pooled_BxD = jnp.take_along_axis(x_BxLxD, eos_B[:, None, None], axis=1)[:, 0]
        chex.assert_shape(pooled_BxD, (b, self.width))
        aux = dict(tokens=x_BxLxD, eos_index=eos_B, mask=mask, encoder=enc_aux, pooled=pooled_BxD)
        return pooled_BxD, aux

    def attend(self, x):
        """Tied LM head: `[..., D] -> [..., V]` float32 logits (float32 accumulation in the
        compute dtype's matmul, `WordEmbed.attend`)."""
        return self.embed.attend(x)
