"""BLIP's text transformer: one param set run in three modes (zoo/blip.py's
docstring): 'text' (unimodal encoder), 'encode' (image-grounded encoder), 'decode'
(image-grounded decoder, with `TextDecoder`'s interface for cached captioning).

Shape letters: B batch, T image tokens, L text length, Di image width, D text width,
V vocabulary.
"""

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from mmjax.models.embed import WordEmbed
from mmjax.models.tokens import MMJAX
from mmjax.models.transformer import Mlp, maybe_remat
from mmjax.parallel.sharding import constrain, names, norm_init

Dtype = Any
MODES = ("text", "encode", "decode")


class BlipBlock(nn.Module):
    """Pre-LN block, one param set for the three modes (module docstring).

    `__call__(x [B,L,D], self_mask, memory [B,T,Di] | None, memory_mask, mode)`:
    x + SelfAttn(LN(x)) with `attn` ('text', 'encode') or `attn_dec` ('decode');
    x + CrossAttn(LN(x), memory) with the shared `cross_attn` (not in 'text');
    x + Mlp(LN(x)) with the shared `mlp`. The causal mask comes with `self_mask`.
    """

    num_heads: int
    mlp_dim: int
    decode: bool = False  # KV caches for captioning (decoder self-attention, cross-attention)
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, self_mask, memory_BxTxDi=None, memory_mask=None, mode: str = "text"):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dec = mode == "decode"
        sfx = "_dec" if dec else ""
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        h = nn.LayerNorm(name="ln1" + sfx, **kw, **norm_init())(x_BxLxD)
        x_BxLxD = x_BxLxD + MultiHeadAttention(
            self.num_heads, attention=self.attention, decode=self.decode and dec, name="attn" + sfx, **kw
        )(h, mask=self_mask)
        if mode != "text":
            h = nn.LayerNorm(name="ln_cross", **kw, **norm_init())(x_BxLxD)
            x_BxLxD = x_BxLxD + MultiHeadAttention(
                self.num_heads, attention=self.attention, decode=self.decode and dec, name="cross_attn", **kw
            )(h, inputs_kv=memory_BxTxDi, mask=memory_mask)
        h = nn.LayerNorm(name="ln2", **kw, **norm_init())(x_BxLxD)
        return x_BxLxD + Mlp(self.mlp_dim, name="mlp", **kw)(h)


class BlipText(nn.Module):
    """BLIP's text transformer. Params: `embed` (token/embedding, pos_embedding),
    `enc_token` [D], `block<i>` (BlipBlock), `ln_final`, `bias` [V].

    `run(ids, mode, memory, memory_valid) -> [B, L, D]` (after ln_final);
    `logits(y) -> [B, L, V]`; `__call__(ids, memory, memory_valid=None,
    positions_L=None) -> [B, L, V]` is the decoder mode with TextDecoder's
    interface, so `decoder.greedy_decode` / `beam_search` drive it (`decode=True`:
    cached decoder self-attention and cross-attention keys / values).
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    decode: bool = False
    remat: Any = "none"
    attention: str = "xla"
    pad_id: int = MMJAX["pad"]  # the tokenizer's ids (model.token_ids); bos = [Decode]
    cls_id: int = MMJAX["cls"]  # <cls>: ITC's [CLS]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = WordEmbed(self.vocab_size, self.width, self.max_len, **kw)
        self.enc_token = self.param(
            "enc_token", names(nn.initializers.normal(0.02), "embed"), (self.width,), self.param_dtype
        )
        # mode (argument 5, counting self) is a python string: static under remat.
        block_cls = BlipBlock if self.decode else maybe_remat(BlipBlock, self.remat, static_argnums=(5,))
        self.blocks = [
            block_cls(self.num_heads, self.mlp_dim, self.decode, self.attention, name=f"block{i:02d}", **kw)
            for i in range(self.depth)
        ]
        self.ln_final = nn.LayerNorm(**kw, **norm_init())
        self.bias = self.param("bias", names(nn.initializers.zeros, "vocab"), (self.vocab_size,), self.param_dtype)

    def embed_tokens(self, ids_BxL, mode: str, positions_L=None):
        """Word + position embeddings; position 0 becomes <cls> ('text') or the
        learned [Encode] embedding ('encode'); 'decode' keeps bos = [Decode]."""
        chex.assert_rank(ids_BxL, 2)
        if mode == "text":
            ids_BxL = ids_BxL.at[:, 0].set(self.cls_id)
        x_BxLxD = self.embed(ids_BxL, positions_L)
        if mode == "encode":
            enc_D = jnp.asarray(self.enc_token, x_BxLxD.dtype) + jnp.asarray(self.embed.pos[0], x_BxLxD.dtype)
            x_BxLxD = x_BxLxD.at[:, 0].set(jnp.broadcast_to(enc_D, x_BxLxD[:, 0].shape))
        return x_BxLxD

    def self_mask(self, ids_BxL, mode: str, positions_L=None):
        """Key padding (+ causal in 'decode'); None for a cached decoding step."""
        if self.decode and positions_L is not None:
            return None
        return combine_masks(
            padding_mask(ids_BxL != self.pad_id), causal_mask(ids_BxL.shape[1]) if mode == "decode" else None
        )

    def run(self, ids_BxL, mode: str, memory_BxTxDi=None, memory_valid_BxT=None, positions_L=None):
        if mode not in MODES:
            raise ValueError(f"BLIP text mode {mode!r}; valid choices: {', '.join(MODES)}")
        if (memory_BxTxDi is None) != (mode == "text"):
            raise ValueError(f"BLIP text mode {mode!r} {'takes no' if mode == 'text' else 'needs'} image tokens")
        x = self.embed_tokens(ids_BxL, mode, positions_L)
        mask = self.self_mask(ids_BxL, mode, positions_L)
        memory_mask = None if memory_valid_BxT is None else padding_mask(memory_valid_BxT)
        for block in self.blocks:
            x = block(x, mask, memory_BxTxDi, memory_mask, mode)
        return self.ln_final(x)

    def logits(self, y_BxLxD):
        # float32 logits: float32 accumulation in WordEmbed.attend, the bias added in float32.
        return self.embed.attend(y_BxLxD) + jnp.asarray(self.bias, jnp.float32)[None, None]

    def __call__(self, ids_BxL, memory_BxTxDi, memory_valid_BxT=None, positions_L=None):
        chex.assert_rank(memory_BxTxDi, 3)
        return self.logits(self.run(ids_BxL, "decode", memory_BxTxDi, memory_valid_BxT, positions_L))
