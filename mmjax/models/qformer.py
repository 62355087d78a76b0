"""BLIP-2's Q-Former: learned query tokens that read a frozen image encoder.

One BERT-style transformer runs over the concatenation [queries ; text]
(LAVIS `Qformer.py`): `num_query` learned query tokens (32 in BLIP-2, no
position embedding) and the text tokens (word + position embeddings) share the
self-attention of every block; only the QUERY positions cross-attend to the
image features, in blocks i with `i % cross_every == 0` (every other block in
BLIP-2); queries and text then go through separate FFNs (`mlp_query`, `mlp`).
Which positions see which is set by the self-attention mask (`qformer_mask`):

  'unimodal'       (ITC) queries see queries, text sees valid text: one forward
                   gives the query embeddings and the text [CLS] (position 0).
  'bidirectional'  (ITM; InstructBLIP's instruction + queries) every position
                   sees every query and every valid text position.
  'causal'         (ITG) queries see queries; text position t sees all queries
                   and the valid text positions <= t.

The BERT release (and so LAVIS) is post-LN; mmjax uses pre-LN blocks with a
final LayerNorm (`ln_out`). LAVIS reports an INF loss in fp16: keep the
Q-Former in float32 (the defaults).

Block params carry FusionBlock's names (`ln1`, `attn`, `ln_cross`,
`cross_attn`, `ln2`, `mlp`), so an mmjax text encoder's block can be
transplanted by name; BLIP-2 also starts the query FFN (`ln2_query`,
`mlp_query`) from the text FFN.
Shape letters: B batch, Q query tokens, L text length, S = Q + L, D width,
N image tokens, Di image width, V vocabulary size.
"""

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention, padding_mask
from mmjax.models.embed import WordEmbed
from mmjax.models.transformer import Mlp, maybe_remat
from mmjax.parallel.sharding import constrain, names, norm_init

Dtype = Any
MODES = ("unimodal", "bidirectional", "causal")


def qformer_mask(num_query: int, text_valid_BxL, mode: str):
    """Self-attention mask over [queries ; text]: bool [B, 1, S, S], True = may attend.

    `num_query`: Q (a python int, 0 for text only); `text_valid: [B, L] bool`
    (False = padding, never attended to) or None for queries only (then an
    all-True [1, 1, Q, Q]); `mode`: one of MODES (see the module docstring).
    Padded text rows still attend (their outputs are unused).
    """
    if mode not in MODES:
        raise ValueError(f"Q-Former mode={mode!r}; valid choices: {', '.join(MODES)}")
    if text_valid_BxL is None:
        return jnp.ones((1, 1, num_query, num_query), bool)
    chex.assert_rank(text_valid_BxL, 2)
    b, length = text_valid_BxL.shape
    s = num_query + length
    key_valid_BxS = jnp.concatenate([jnp.ones((b, num_query), bool), text_valid_BxL.astype(bool)], axis=1)
    pos_S = jnp.arange(s)
    query_row_Sx1 = (pos_S < num_query)[:, None]
    query_key_1xS = (pos_S < num_query)[None, :]
    if mode == "bidirectional":
        allowed_SxS = jnp.ones((s, s), bool)
    elif mode == "unimodal":
        allowed_SxS = query_row_Sx1 == query_key_1xS
    else:  # causal: a text row r sees keys <= r, i.e. every query and the text before it
        allowed_SxS = jnp.where(query_row_Sx1, query_key_1xS, pos_S[None, :] <= pos_S[:, None])
    return allowed_SxS[None, None] & key_valid_BxS[:, None, None, :]


class QFormerBlock(nn.Module):
    """Pre-LN Q-Former block over [queries ; text].

    x + SelfAttn(LN(x), mask) over all S positions; queries only (with `cross`):
    q + CrossAttn(LN(q), image, image_mask); then q + MlpQuery(LNQuery(q)) and
    t + Mlp(LN(t)).

    `__call__(x: [B, S, D], num_query: int (Q, static), mask: [B, 1|Hh, S, S] bool | None,
    image: [B, N, Di] | None, image_mask: [B, 1|Hh, 1|Q, N] bool | None) -> [B, S, D]`,
    with x[:, :Q] the queries and x[:, Q:] the text. The cross-attention is
    skipped when `image` is None or Q = 0.
    Params: `ln1`, `attn` (fused qkv, out), `ln_cross`, `cross_attn` (query, key,
    value, out; only with `cross`), `ln2`, `mlp` (text FFN), `ln2_query`,
    `mlp_query` (query FFN). linen creates params lazily: a sublayer's params
    exist once `init` has run it (init with queries, text and an image).
    """

    num_heads: int
    mlp_dim: int
    cross: bool = False
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD, num_query: int, mask, image_BxNxDi=None, image_mask=None):
        chex.assert_rank(x_BxSxD, 3)
        if not 0 <= num_query <= x_BxSxD.shape[1]:
            raise ValueError(f"num_query={num_query} is not in [0, sequence length {x_BxSxD.shape[1]}].")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(**norm_init(), name=name, **kw)
        x_BxSxD = constrain(x_BxSxD, ("batch", "length", "act_embed"))
        h = MultiHeadAttention(self.num_heads, attention=self.attention, name="attn", **kw)(
            ln("ln1")(x_BxSxD), mask=mask
        )
        x_BxSxD = x_BxSxD + h
        q_BxQxD, t_BxLxD = x_BxSxD[:, :num_query], x_BxSxD[:, num_query:]
        if num_query:
            if self.cross and image_BxNxDi is not None:
                chex.assert_rank(image_BxNxDi, 3)
                chex.assert_equal(image_BxNxDi.shape[0], x_BxSxD.shape[0])
                h = MultiHeadAttention(self.num_heads, attention=self.attention, name="cross_attn", **kw)(
                    ln("ln_cross")(q_BxQxD), inputs_kv=image_BxNxDi, mask=image_mask
                )
                q_BxQxD = q_BxQxD + h
            q_BxQxD = q_BxQxD + Mlp(self.mlp_dim, name="mlp_query", **kw)(ln("ln2_query")(q_BxQxD))
        if t_BxLxD.shape[1]:
            t_BxLxD = t_BxLxD + Mlp(self.mlp_dim, name="mlp", **kw)(ln("ln2")(t_BxLxD))
        return jnp.concatenate([q_BxQxD, t_BxLxD], axis=1)


class QFormer(nn.Module):
    """BLIP-2's Q-Former (module docstring): `depth` QFormerBlocks + `ln_out`.

    `__call__(image: [B, N, Di] | None, ids: [B, L] int | None, text_valid: [B, L] bool | None,
    mode: str, image_valid: [B, N] bool | None = None) -> (queries: [B, Q, D], text: [B, L, D])`,
    both normed by `ln_out`. `image=None`: no query tokens at all (text only,
    queries [B, 0, D]); `ids=None`: queries only (text [B, 0, D]); `text_valid=None`
    with ids: every text token is valid. `mode` picks the self-attention mask
    (`qformer_mask`); `image_valid` (False = image token ignored) masks the
    cross-attention. Call it with an image and ids to `init` (creates every param).
    `attend(x: [..., D]) -> [..., V]`: tied LM head (the word-embedding table), for ITG.

    Params: `embed` (token/embedding, pos_embedding), `query_tokens` [1, Q, D],
    `block00` ... (`cross_attn` / `ln_cross` only in blocks i % cross_every == 0;
    see QFormerBlock), `ln_out`.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_query: int = 32
    cross_every: int = 2
    remat: Any = False  # False | 'none' | True | 'full' | 'dots' (transformer.REMAT_POLICIES)
    attention: str = "xla"  # 'xla' | 'cudnn', '/N' pads lengths to a multiple of N (attention.py)
    dtype: Dtype = jnp.float32  # float32: LAVIS reports an INF loss with fp16
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.cross_every < 1:
            raise ValueError(f"cross_every must be >= 1, got {self.cross_every}.")
        if self.num_query < 1:
            raise ValueError(f"num_query must be >= 1, got {self.num_query}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = WordEmbed(self.vocab_size, self.width, self.max_len, **kw)
        self.query_tokens = self.param(
            "query_tokens",
            names(nn.initializers.normal(0.02), None, None, "embed"),
            (1, self.num_query, self.width),
            self.param_dtype,
        )
        # num_query (argument 2, counting self) is a python int: static under remat.
        block_cls = maybe_remat(QFormerBlock, self.remat, static_argnums=(2,))
        self.blocks = [
            block_cls(
                self.num_heads,
                self.mlp_dim,
                cross=i % self.cross_every == 0,
                attention=self.attention,
                name=f"block{i:02d}",
                **kw,
            )
            for i in range(self.depth)
        ]
        self.ln_out = nn.LayerNorm(**norm_init(), **kw)

    def embed_inputs(self, image_BxNxDi, ids_BxL, text_valid_BxL):
        """-> (x: [B, S, D] = [queries ; embedded text], Q, text_valid: [B, L] bool | None)."""
        if image_BxNxDi is None and ids_BxL is None:
            raise ValueError("QFormer needs an image, text ids or both; got neither.")
        parts, num_query = [], 0
        if image_BxNxDi is not None:
            chex.assert_rank(image_BxNxDi, 3)
            num_query = self.num_query
            shape = (image_BxNxDi.shape[0], num_query, self.width)
            parts.append(jnp.broadcast_to(jnp.asarray(self.query_tokens, self.dtype), shape))
        if ids_BxL is None:
            if text_valid_BxL is not None:
                raise ValueError("text_valid was given without ids.")
            return parts[0], num_query, None
        chex.assert_rank(ids_BxL, 2)
        if image_BxNxDi is not None:
            chex.assert_equal(ids_BxL.shape[0], image_BxNxDi.shape[0])
        if text_valid_BxL is None:
            text_valid_BxL = jnp.ones(ids_BxL.shape, bool)
        chex.assert_shape(text_valid_BxL, ids_BxL.shape)
        parts.append(self.embed(ids_BxL))
        return jnp.concatenate(parts, axis=1), num_query, text_valid_BxL

    def __call__(self, image_BxNxDi, ids_BxL, text_valid_BxL, mode: str, image_valid_BxN=None):
        x_BxSxD, num_query, text_valid_BxL = self.embed_inputs(image_BxNxDi, ids_BxL, text_valid_BxL)
        mask = qformer_mask(num_query, text_valid_BxL, mode)
        cross_mask = None
        if image_valid_BxN is not None and image_BxNxDi is not None:
            chex.assert_shape(image_valid_BxN, image_BxNxDi.shape[:2])
            cross_mask = padding_mask(image_valid_BxN)
        for blk in self.blocks:
            x_BxSxD = blk(x_BxSxD, num_query, mask, image_BxNxDi, cross_mask)
        out_BxSxD = self.ln_out(x_BxSxD)
        return out_BxSxD[:, :num_query], out_BxSxD[:, num_query:]

    def attend(self, x):
        """Tied LM head: `[..., D] -> [..., V]` float32 logits (word-embedding table)."""
        return self.embed.attend(x)
