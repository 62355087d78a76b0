"""A causal text decoder with cross-attention to image or video tokens, and its
KV-cached greedy decoding (issue 7: the captioning half of CoCa and BLIP).

Shape letters: B batch, L text length, S memory (image / video) tokens, Dm memory
width, D width, H heads, Dh head width, V vocabulary.

`TextDecoder.__call__(ids [B, L], memory [B, S, Dm], memory_valid [B, S] | None)
-> logits [B, L, V]`: word + position embeddings, `depth` pre-LN blocks of causal
self-attention, cross-attention to the memory and an MLP, a final LayerNorm and the
tied output embedding (+ a bias). Position i sees tokens 0..i only.

With `decode=True` the self-attention keeps its keys and values in the `cache`
collection: call it once on a [B, max_len] input with `mutable=["cache"]` to create
the cache (empty self-attention keys / values, and the memory's cross-attention
keys / values, computed once), then feed one token per call with `positions=[i]`.
`greedy_decode(..., use_cache=True|False)` runs either way under jit; both give the
same tokens (tested), the cached one in O(L) instead of O(L^2) token passes.
`sample_decode` samples from the top-p nucleus instead (per-row keys), `beam_search`
keeps the best beams; all three share the cache and prefill.
"""

from functools import partial
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import MultiHeadAttention, causal_mask, combine_masks, padding_mask
from mmjax.models.embed import WordEmbed
from mmjax.models.tokens import MMJAX
from mmjax.models.transformer import Mlp
from mmjax.parallel.sharding import names, norm_init

Dtype = Any


class DecoderBlock(nn.Module):
    """x + SelfAttn(LN(x)) [causal]; x + CrossAttn(LN(x), memory) [if cross];
    x + Mlp(LN(x)). `cross=False` is a unimodal (text-only) causal block."""

    num_heads: int
    mlp_dim: int
    decode: bool = False
    attention: str = "xla"
    cross: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, self_mask, memory_BxSxDm=None, memory_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(name="ln1", **kw, **norm_init())(x_BxLxD)
        x_BxLxD = x_BxLxD + MultiHeadAttention(
            self.num_heads, attention=self.attention, decode=self.decode, name="attn", **kw
        )(h, mask=self_mask)
        if self.cross:
            h = nn.LayerNorm(name="ln_cross", **kw, **norm_init())(x_BxLxD)
            x_BxLxD = x_BxLxD + MultiHeadAttention(
                self.num_heads, attention=self.attention, decode=self.decode, name="cross_attn", **kw
            )(h, inputs_kv=memory_BxSxDm, mask=memory_mask)
        h = nn.LayerNorm(name="ln2", **kw, **norm_init())(x_BxLxD)
        return x_BxLxD + Mlp(self.mlp_dim, name="mlp", **kw)(h)


class TextDecoder(nn.Module):
    """See the module docstring. Params: `embed` (token/embedding, pos_embedding),
    `block<i>` (ln1, attn, [ln_cross, cross_attn,] ln2, mlp), `ln_final`, `bias` [V].

    Blocks below `cross_from` are unimodal (no cross-attention): CoCa's text-only
    lower half. `embed_tokens`, `run_blocks` and `logits` are the pieces of
    `__call__` (CoCa runs the unimodal blocks with a [CLS] token appended).
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    cross_from: int = 0
    decode: bool = False
    attention: str = "xla"
    pad_id: int = MMJAX["pad"]  # the tokenizer's (model.token_ids): key padding, never emitted
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if not 0 <= self.cross_from <= self.depth:
            raise ValueError(f"cross_from={self.cross_from} must lie in [0, depth={self.depth}]")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = WordEmbed(self.vocab_size, self.width, self.max_len, **kw)
        self.blocks = [
            DecoderBlock(
                self.num_heads,
                self.mlp_dim,
                self.decode,
                self.attention,
                cross=i >= self.cross_from,
                name=f"block{i:02d}",
                **kw,
            )
            for i in range(self.depth)
        ]
        self.ln_final = nn.LayerNorm(**kw, **norm_init())
        self.bias = self.param("bias", names(nn.initializers.zeros, "vocab"), (self.vocab_size,), self.param_dtype)

    def embed_tokens(self, ids_BxL, positions_L=None):
        chex.assert_rank(ids_BxL, 2)
        return self.embed(ids_BxL, positions_L)

    def self_mask(self, ids_BxL, positions_L=None):
        """Causal + key padding; None for a cached decoding step (the cache masks)."""
        if self.decode and positions_L is not None:
            return None
        return combine_masks(padding_mask(ids_BxL != self.pad_id), causal_mask(ids_BxL.shape[1]))

    def run_blocks(self, x_BxLxD, self_mask, memory_BxSxDm=None, memory_valid_BxS=None, start=0, stop=None):
        memory_mask = None if memory_valid_BxS is None else padding_mask(memory_valid_BxS)
        for block in self.blocks[start:stop]:
            x_BxLxD = block(x_BxLxD, self_mask, memory_BxSxDm, memory_mask)
        return x_BxLxD

    def logits(self, x_BxLxD):
        x = self.ln_final(x_BxLxD)
        # float32 logits: the tied matmul accumulates in float32 (WordEmbed.attend), the bias is added in float32.
        return self.embed.attend(x) + jnp.asarray(self.bias, jnp.float32)[None, None]

    def __call__(self, ids_BxL, memory_BxSxDm, memory_valid_BxS=None, positions_L=None):
        chex.assert_rank(memory_BxSxDm, 3)
        x = self.embed_tokens(ids_BxL, positions_L)
        x = self.run_blocks(x, self.self_mask(ids_BxL, positions_L), memory_BxSxDm, memory_valid_BxS)
        return self.logits(x)


def _prefill(dec, params, tokens_BxL, memory_BxSxDm, memory_valid_BxS):
    """The decoding cache: empty self-attention keys / values for `tokens`' length,
    and the cross-attention keys / values of the memory, computed once here."""
    _, mut = dec.apply({"params": params}, tokens_BxL, memory_BxSxDm, memory_valid_BxS, mutable=["cache"])
    return mut["cache"]


def _decode(model, params, memory_BxSxDm, memory_valid_BxS, max_len: int, bos_id: int, eos_id: int, use_cache, choose):
    """The token loop of greedy_decode / sample_decode: [B, max_len] int32, bos first, then
    `choose(logits [B, V] float32 with PAD at -inf, step i) -> next tokens [B]`; after eos, PAD."""
    b = memory_BxSxDm.shape[0]
    pad = model.pad_id  # the tokenizer's (a static attribute of the module)
    tokens = jnp.full((b, max_len), pad, jnp.int32).at[:, 0].set(bos_id)
    done = jnp.zeros((b,), bool)

    def pick(logits_BxV, done, i):
        logits_BxV = logits_BxV.astype(jnp.float32).at[:, pad].set(-jnp.inf)  # a caption never emits padding
        nxt = jnp.where(done, pad, choose(logits_BxV, i).astype(jnp.int32))
        return nxt, done | (nxt == eos_id)

    if use_cache:
        dec = model.clone(decode=True)
        cache = _prefill(dec, params, tokens, memory_BxSxDm, memory_valid_BxS)

        def step(carry, i):
            cache, tokens, done = carry
            logits, mut = dec.apply(
                {"params": params, "cache": cache},
                jax.lax.dynamic_slice_in_dim(tokens, i, 1, 1),
                memory_BxSxDm,
                memory_valid_BxS,
                i[None],
                mutable=["cache"],
            )
            nxt, done = pick(logits[:, 0], done, i)
            return (mut["cache"], tokens.at[:, i + 1].set(nxt), done), None

        (_, tokens, _), _ = jax.lax.scan(step, (cache, tokens, done), jnp.arange(max_len - 1))
        return tokens

    def step(carry, i):
        tokens, done = carry
        logits = model.apply({"params": params}, tokens, memory_BxSxDm, memory_valid_BxS)
        nxt, done = pick(jax.lax.dynamic_index_in_dim(logits, i, 1, keepdims=False), done, i)
        return (tokens.at[:, i + 1].set(nxt), done), None

    (tokens, _), _ = jax.lax.scan(step, (tokens, done), jnp.arange(max_len - 1))
    return tokens


@partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id", "use_cache"))
def greedy_decode(
    model: TextDecoder,
    params,
    memory_BxSxDm,
    memory_valid_BxS=None,
    *,
    max_len: int,
    bos_id: int,
    eos_id: int,
    use_cache: bool = True,
):
    """Greedy captions: [B, max_len] int32 starting with bos; after eos, PAD.

    `model` is the training-mode TextDecoder (decode=False); with use_cache the
    decode=True clone of it keeps keys and values, otherwise every step re-runs the
    whole prefix through the causal decoder."""
    argmax = lambda logits_BxV, i: jnp.argmax(logits_BxV, axis=-1)
    return _decode(model, params, memory_BxSxDm, memory_valid_BxS, max_len, bos_id, eos_id, use_cache, argmax)


def top_p_filter(z_BxV, top_p):
    """Logits outside the nucleus -> -inf: the smallest set of the most probable tokens whose
    probability mass is >= top_p (the most probable always stays; top_p >= 1: all)."""
    sorted_BxV = -jnp.sort(-z_BxV, axis=-1)
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p) | (jnp.arange(z_BxV.shape[-1]) == 0)[None, :] | (top_p >= 1.0)
    thresh_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(z_BxV >= thresh_Bx1, z_BxV, -jnp.inf)


def row_keys(rng, b: int):
    """One PRNG key per row: `rng` is a single key (split into `b`) or already `b` row keys
    (raw uint32 [b, 2] or typed [b])."""
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (0 if typed else 1):
        return jax.random.split(rng, b)
    if rng.shape[0] != b:
        raise ValueError(f"rng holds {rng.shape[0]} row keys for a batch of {b}")
    return rng


@partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id", "use_cache"))
def sample_decode(
    model: TextDecoder,
    params,
    memory_BxSxDm,
    rng,
    memory_valid_BxS=None,
    *,
    max_len: int,
    bos_id: int,
    eos_id: int,
    top_p=0.9,
    temperature=1.0,
    use_cache: bool = True,
):
    """Nucleus-sampled captions (BLIP's CapFilt captioner): [B, max_len] int32 starting
    with bos; after eos, PAD. Step i draws row b's next token from softmax(logits /
    temperature) restricted to the top_p nucleus (`top_p_filter`; PAD never), with the key
    fold_in(row key b, i). `rng`: one key, split into B row keys, or B row keys (`row_keys`):
    a row's caption then depends on its own key alone, not on the batch it is in. top_p
    -> 0 is greedy decoding. Cache and prefill as greedy_decode."""
    keys_B = row_keys(rng, memory_BxSxDm.shape[0])

    def choose(logits_BxV, i):
        z_BxV = top_p_filter(logits_BxV / temperature, top_p)
        draw = lambda key, z_V: jax.random.categorical(jax.random.fold_in(key, i), z_V)
        return jax.vmap(draw)(keys_B, z_BxV)

    return _decode(model, params, memory_BxSxDm, memory_valid_BxS, max_len, bos_id, eos_id, use_cache, choose)


def _length_normalized(score, length, alpha: float):
    """score / length ** alpha (alpha = 0: raw log-probability; 1: per token)."""
    return score / jnp.maximum(length.astype(jnp.float32), 1.0) ** alpha


@partial(jax.jit, static_argnames=("model", "max_len", "bos_id", "eos_id", "beams", "length_penalty"))
def beam_search(
    model: TextDecoder,
    params,
    memory_BxSxDm,
    memory_valid_BxS=None,
    *,
    max_len: int,
    bos_id: int,
    eos_id: int,
    beams: int = 4,
    length_penalty: float = 0.6,
):
    """KV-cached beam search. -> (tokens [B, max_len] of the best beam, its score).

    Each step extends every live beam by every token (PAD excluded), keeps the
    `beams` best by summed log-probability, and reorders the cache to follow them;
    a beam that emitted eos stays finished (only PAD follows, at no cost). The
    answer is the beam with the best summed log-probability / length **
    `length_penalty`, length counting the generated tokens up to and including eos.
    """
    b, k = memory_BxSxDm.shape[0], int(beams)
    rep = lambda x: None if x is None else jnp.repeat(x, k, axis=0)  # [B, ...] -> [B*K, ...]
    memory, valid = rep(memory_BxSxDm), rep(memory_valid_BxS)
    pad = model.pad_id  # the tokenizer's (a static attribute of the module)
    tokens = jnp.full((b, k, max_len), pad, jnp.int32).at[:, :, 0].set(bos_id)
    scores = jnp.full((b, k), -jnp.inf).at[:, 0].set(0.0)  # one live beam at the start
    done = jnp.zeros((b, k), bool)
    lengths = jnp.zeros((b, k), jnp.int32)
    dec = model.clone(decode=True)
    cache = _prefill(dec, params, tokens.reshape(b * k, max_len), memory, valid)

    def step(carry, i):
        cache, tokens, scores, done, lengths = carry
        logits, mut = dec.apply(
            {"params": params, "cache": cache},
            jax.lax.dynamic_slice_in_dim(tokens.reshape(b * k, max_len), i, 1, 1),
            memory,
            valid,
            i[None],
            mutable=["cache"],
        )
        v = logits.shape[-1]
        logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1).reshape(b, k, v)
        logp = logp.at[:, :, pad].set(-jnp.inf)
        finished = jnp.full((v,), -jnp.inf).at[pad].set(0.0)
        logp = jnp.where(done[:, :, None], finished, logp)
        cand = (scores[:, :, None] + logp).reshape(b, k * v)
        scores, idx = jax.lax.top_k(cand, k)
        src, tok = idx // v, (idx % v).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, src.reshape((b, k) + (1,) * (x.ndim - 2)), axis=1)
        tokens = take(tokens).at[:, :, i + 1].set(tok)
        was_done = take(done)
        lengths = take(lengths) + (~was_done).astype(jnp.int32)
        done = was_done | (tok == eos_id)
        flat_src = (jnp.arange(b)[:, None] * k + src).reshape(-1)
        # Self-attention keys / values follow their beam; the memory's cross-attention
        # keys / values are the same for every beam of a caption, so they stay put.
        cache = jax.tree_util.tree_map_with_path(
            lambda path, c: c if (not c.ndim or "cross_" in jax.tree_util.keystr(path)) else c[flat_src], mut["cache"]
        )
        return (cache, tokens, scores, done, lengths), None

    (_, tokens, scores, done, lengths), _ = jax.lax.scan(
        step, (cache, tokens, scores, done, lengths), jnp.arange(max_len - 1)
    )
    final = _length_normalized(scores, lengths, length_penalty)
    best = jnp.argmax(final, axis=1)
    pick = lambda x: jnp.take_along_axis(x, best.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
    return pick(tokens), pick(final)


def decode(
    model,
    params,
    memory,
    *,
    max_len,
    bos_id,
    eos_id,
    beams=1,
    length_penalty=0.6,
    top_p=None,
    temperature=1.0,
    rng=None,
):
    """A captioning family's `caption`: token ids [B, max_len] (bos first, PAD after eos) by
    greedy decoding, beam search (`beams` > 1), or, with `rng` (one key or B row keys),
    nucleus sampling (`top_p`, default 0.9; `temperature`). ValueError for top_p without
    rng, or sampling with beams."""
    sample = rng is not None or top_p is not None
    if sample and (rng is None or beams > 1):
        raise ValueError("caption: sampling (top_p) needs rng and beams=1")
    kw = dict(max_len=max_len, bos_id=bos_id, eos_id=eos_id)
    if beams > 1:
        return beam_search(model, params, memory, beams=beams, length_penalty=length_penalty, **kw)[0]
    if sample:
        top_p = 0.9 if top_p is None else top_p
        return sample_decode(model, params, memory, rng, top_p=top_p, temperature=temperature, **kw)
    return greedy_decode(model, params, memory, **kw)
