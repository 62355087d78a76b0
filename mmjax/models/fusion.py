"""Fusion text encoder with cross-attention to image tokens (ALBEF, BLIP, CoCa).

ALBEF's text side is one BERT split at `fusion_layer`: the lower layers are a
text-only (bidirectional) encoder, the upper layers add cross-attention to the
image tokens. BLIP's image-grounded encoder has cross-attention in every block
(`fusion_from=0`) and its decoder is the same with causal self-attention
(`causal=True`); CoCa's text decoder is a causal unimodal half followed by a
causal cross-attending half.

The BERT release (and so ALBEF/BLIP) is post-LN; mmjax uses pre-LN blocks
everywhere, with a final LayerNorm on each output (`ln_text`, `ln_fused`).

Token ids look like `bos w1 ... wn eos pad ... pad` with pad id 0; the bos at
position 0 plays BERT's [CLS].
Shape letters: B batch, L text length, D text width, N image tokens, Di image
width, V vocabulary size.
"""

from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from mmjax.models.embed import WordEmbed
from mmjax.models.tokens import MMJAX
from mmjax.models.transformer import Block, Mlp, gelu_exact, maybe_remat
from mmjax.parallel.sharding import dense_init, names, norm_init

Dtype = Any


class FusionBlock(nn.Module):
    """Pre-LN block with cross-attention to image tokens.

    x + SelfAttn(LN(x), mask); x + CrossAttn(LN(x), image, image_mask); x + Mlp(LN(x)).

    `__call__(x: [B, L, D], mask: [B, 1|Hh, L, L] bool | None,
    image: [B, N, Di] | None, image_mask: [B, 1|Hh, 1|L, N] bool | None) -> [B, L, D]`.
    Di may differ from D (the key/value projections map Di to D). With
    `image=None` the cross-attention sublayer is skipped (BLIP's text-only mode
    through shared blocks); params are then only created if `init` saw an image.
    Params: `ln1`, `attn` (fused qkv, out), `ln_cross`, `cross_attn` (query,
    key, value, out), `ln2`, `mlp` (fc1, fc2).
    """

    num_heads: int
    mlp_dim: int
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, mask, image_BxNxDi=None, image_mask=None):
        chex.assert_rank(x_BxLxD, 3)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(**norm_init(), name="ln1", **kw)(x_BxLxD)
        h = MultiHeadAttention(self.num_heads, attention=self.attention, name="attn", **kw)(h, mask=mask)
        x_BxLxD = x_BxLxD + h
        if image_BxNxDi is not None:
            chex.assert_rank(image_BxNxDi, 3)
            chex.assert_equal(image_BxNxDi.shape[0], x_BxLxD.shape[0])
            h = nn.LayerNorm(**norm_init(), name="ln_cross", **kw)(x_BxLxD)
            h = MultiHeadAttention(self.num_heads, attention=self.attention, name="cross_attn", **kw)(
                h, inputs_kv=image_BxNxDi, mask=image_mask
            )
            x_BxLxD = x_BxLxD + h
        h = nn.LayerNorm(**norm_init(), name="ln2", **kw)(x_BxLxD)
        h = Mlp(self.mlp_dim, name="mlp", **kw)(h)
        return x_BxLxD + h


class BertTextEncoder(nn.Module):
    """WordEmbed + `fusion_from` text-only Blocks + `depth - fusion_from` FusionBlocks.

    `__call__(ids: [B, L] int32, image: [B, N, Di], image_valid: [B, N] bool | None)
    -> (fused: [B, L, D], aux)` = `encode_text` then `fuse` (use it for init: it
    creates every param).

    Self-attention masks padding (`pad_id`, the tokenizer's) and, with `causal=True`, future
    positions (BLIP/CoCa decoders). `fusion_from=0` gives BLIP's image-grounded
    encoder (cross-attention in every block); `fusion_from=6, depth=12` ALBEF.

    Params (freeze by regex on the '/'-joined path): `embed` (token/embedding,
    pos_embedding), text-only blocks `text_blocks_<i>/...`, fusion blocks
    `fusion_blocks_<j>/...` (cross-attention only: r'fusion_blocks_\\d+/(ln_cross|cross_attn)/'),
    `ln_text`, `ln_fused`.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    fusion_from: int
    causal: bool = False
    pad_id: int = MMJAX["pad"]  # the tokenizer's (model.token_ids)
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if not 0 <= self.fusion_from <= self.depth:
            raise ValueError(f"fusion_from must be in [0, depth={self.depth}], got {self.fusion_from}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = WordEmbed(self.vocab_size, self.width, self.max_len, **kw)
        block_cls = maybe_remat(Block, self.remat)
        fusion_cls = maybe_remat(FusionBlock, self.remat)
        self.text_blocks = [
            block_cls(self.num_heads, self.mlp_dim, attention=self.attention, **kw) for _ in range(self.fusion_from)
        ]
        self.fusion_blocks = [
            fusion_cls(self.num_heads, self.mlp_dim, attention=self.attention, **kw)
            for _ in range(self.depth - self.fusion_from)
        ]
        self.ln_text = nn.LayerNorm(**norm_init(), **kw)
        self.ln_fused = nn.LayerNorm(**norm_init(), **kw)

    def self_mask(self, ids_BxL):
        """Self-attention mask [B, 1, L|1, L] bool: padding (and causal if set)."""
        chex.assert_rank(ids_BxL, 2)
        return combine_masks(
            padding_mask(ids_BxL != self.pad_id), causal_mask(ids_BxL.shape[1]) if self.causal else None
        )

    def __call__(self, ids_BxL, image_BxNxDi, image_valid_BxN=None):
        _, text_aux = self.encode_text(ids_BxL)
        fused_BxLxD, aux = self.fuse(text_aux["tokens"], ids_BxL, image_BxNxDi, image_valid_BxN)
        aux["text"] = text_aux
        return fused_BxLxD, aux

    def encode_text(self, ids_BxL, through_fusion: bool = False):
        """The text-only encoder: `ids: [B, L] -> (cls: [B, D], aux)`.

        cls = `ln_text` of the output at position 0 (bos, BERT's [CLS]).
        aux['tokens']: the residual stream [B, L, D] (un-normed; what `fuse`
        continues from), aux['normed']: `ln_text` of it, aux['mask'] the
        self-attention mask, aux['encoder'] per-block outputs, aux['cls'].
        `through_fusion=True` also runs the fusion blocks with their
        cross-attention skipped (BLIP's text mode: the unimodal encoder shares
        every param with the image-grounded one).
        """
        chex.assert_rank(ids_BxL, 2)
        return self.encode_embedded(self.embed(ids_BxL), ids_BxL, through_fusion)

    def encode_embedded(self, x_BxLxD, ids_BxL, through_fusion: bool = False):
        """`encode_text` after the embedding (for gradient tests, prompt tuning)."""
        b, length = ids_BxL.shape
        chex.assert_shape(x_BxLxD, (b, length, self.width))
        mask = self.self_mask(ids_BxL)
        blocks = {}
        for i, blk in enumerate(self.text_blocks):
            x_BxLxD = blk(x_BxLxD, mask)
            blocks[f"text_blocks_{i}"] = x_BxLxD
        if through_fusion:
            for i, blk in enumerate(self.fusion_blocks):
                x_BxLxD = blk(x_BxLxD, mask, None, None)
                blocks[f"fusion_blocks_{i}"] = x_BxLxD
        normed_BxLxD = self.ln_text(x_BxLxD)
        cls_BxD = normed_BxLxD[:, 0]
        chex.assert_shape(cls_BxD, (b, self.width))
        aux = dict(tokens=x_BxLxD, normed=normed_BxLxD, mask=mask, encoder=blocks, cls=cls_BxD)
        return cls_BxD, aux

    def fuse(self, tokens_BxLxD, ids_BxL, image_BxNxDi, image_valid_BxN=None):
        """Fusion blocks over text tokens cross-attending to image tokens.

        `tokens: [B, L, D]` (encode_text's aux['tokens']), `ids: [B, L]` (for the
        masks), `image: [B, N, Di]`, `image_valid: [B, N] bool | None` (False =
        the image token is ignored) -> `(fused: [B, L, D] normed by ln_fused, aux)`.
        fused[:, 0] is the fused [CLS] (ITM). aux['tokens'] the un-normed stream,
        aux['mask'], aux['cross_mask'] ([B, 1, 1, N] or None), aux['encoder'],
        aux['cls'].
        """
        b, length = ids_BxL.shape
        chex.assert_shape(tokens_BxLxD, (b, length, self.width))
        chex.assert_rank(image_BxNxDi, 3)
        chex.assert_equal(image_BxNxDi.shape[0], b)
        mask = self.self_mask(ids_BxL)
        cross_mask = None
        if image_valid_BxN is not None:
            chex.assert_shape(image_valid_BxN, image_BxNxDi.shape[:2])
            cross_mask = padding_mask(image_valid_BxN)
        x_BxLxD = tokens_BxLxD
        blocks = {}
        for i, blk in enumerate(self.fusion_blocks):
            x_BxLxD = blk(x_BxLxD, mask, image_BxNxDi, cross_mask)
            blocks[f"fusion_blocks_{i}"] = x_BxLxD
        fused_BxLxD = self.ln_fused(x_BxLxD)
        aux = dict(tokens=x_BxLxD, mask=mask, cross_mask=cross_mask, encoder=blocks, cls=fused_BxLxD[:, 0])
        return fused_BxLxD, aux

    def attend(self, x):
        """Tied LM/MLM head: `[..., D] -> [..., V]` logits (word-embedding table)."""
        return self.embed.attend(x)


class MlmHead(nn.Module):
    """BERT's MLM transform + tied decoder.

    `__call__(x: [..., D], attend) -> [..., V]` float32:
    `attend(LN(gelu(Dense_D(x)))) + bias`, where `attend` maps [..., D] to
    [..., V] with the word-embedding table (e.g. `BertTextEncoder.attend`;
    `WordEmbed.attend` accumulates and returns float32) and `bias: [V]` is learned,
    added in float32. Params: `dense`, `ln`, `bias`. BERT's gelu is the exact (erf) one.
    """

    vocab_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, attend: Callable):
        chex.assert_rank(x_BxLxD, {2, 3})
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(x_BxLxD.shape[-1], name="dense", **kw, **dense_init("embed", "act_embed"))(x_BxLxD)
        h = gelu_exact(h)
        h = nn.LayerNorm(**norm_init(), name="ln", **kw)(h)
        logits = jnp.asarray(attend(h), jnp.float32)
        chex.assert_shape(logits, x_BxLxD.shape[:-1] + (self.vocab_size,))
        bias_V = self.param("bias", names(nn.initializers.zeros, "vocab"), (self.vocab_size,), self.param_dtype)
        bias = jnp.asarray(bias_V, jnp.float32).reshape((1,) * (logits.ndim - 1) + (-1,))
        return logits + bias


def head_dense(
    features: int, *, name=None, use_bias: bool = True, param_dtype: Dtype = jnp.float32, axes=("embed", None)
):
    """A small head's Dense computed in float32 whatever the model's compute dtype: the
    hidden states are upcast (exactly), the kernel read in float32, the matmul at
    HIGHEST precision (a real float32 matmul on TPUs too) with a float32 output. For
    heads over a few rows or features (ITM's 2 logits, the contrastive projections),
    where this costs nothing next to the towers."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        precision=jax.lax.Precision.HIGHEST,
        name=name,
        **dense_init(*axes),
    )


class ItmHead(nn.Module):
    """Image-text matching: `[B, D] -> Dense(2) -> [B, 2]` float32 logits (1 = match),
    from a float32 matmul (`head_dense`) even when the model computes in bf16."""

    dtype: Dtype = jnp.float32  # the model's compute dtype; the head itself is float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cls_BxD):
        chex.assert_rank(cls_BxD, 2)
        return head_dense(2, param_dtype=self.param_dtype, name="dense")(cls_BxD)
