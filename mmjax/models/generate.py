"""Text generation with a DecoderLM (issue 17): greedy, sampling (temperature + top-p) and
beam search, KV-cached or not (the same tokens), under one jit.

Shape letters: B batch, P prompt length, N new tokens, T = P + N, D width, V vocabulary,
k beams.

The prompt is given as embeddings [B, P, D] (an image's features may sit in it), left-padded
(`prompt_valid` False on the left); new tokens are embedded with `lm.embed`. The decoding
state is either the KV cache of T slots (use_cache: the prompt is written once, then one
token per step) or the [B, T, D] sequence of embeddings, run whole every step (uncached).
The loop stops early once every sequence has emitted an eos; the remaining tokens are pad.
`score` is the summed log-probability (softmax over the vocabulary without pad, temperature
1) of the generated tokens up to and including eos, / length ** length_penalty. pad is
never generated, except where it is also a stop id (an HF tokenizer without a pad token
pads with its eos): then it stays in the vocabulary and ends the text, as in transformers.
"""

from functools import partial

import jax
import jax.numpy as jnp

from mmjax.models.decoder import _length_normalized, top_p_filter
from mmjax.models.llm import DecoderLM, lm_mask

METHODS = ("greedy", "sample", "beam")


def truncate_at_stop(text: str, stops) -> str:
    """`text` cut before the earliest occurrence of any of the stop strings `stops`."""
    cut = len(text)
    for stop in stops or ():
        at = text.find(stop) if stop else -1
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]


def _context(valid_BxP, positions_BxP, prefix_BxP, expert_BxP):
    """The prompt's per-row arrays; `start` [B]: the first new token's position."""
    valid = valid_BxP.astype(bool)
    if positions_BxP is None:
        positions_BxP = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    positions_BxP = positions_BxP.astype(jnp.int32)
    zeros = jnp.zeros(valid.shape, bool)
    return dict(
        valid=valid,
        positions=positions_BxP,
        prefix=zeros if prefix_BxP is None else prefix_BxP.astype(bool),
        expert=zeros if expert_BxP is None else expert_BxP.astype(bool),
        start=jnp.max(positions_BxP, axis=1) + 1,
    )


def _is_index(path) -> bool:
    return bool(path) and getattr(path[-1], "key", None) == "index"


class _Runner:
    """The model side of a decoding loop for prompts of length P and N new tokens:
    `prefill(x [B, P, D]) -> (state, logits [B, V])` (the next token after the prompt),
    `feed(state, tok [B], t) -> (state, logits [B, V])` (new token t at slot P + t),
    `take(state, rows)` / `repeat(state, k)` pick / repeat batch rows of the state."""

    def __init__(self, lm: DecoderLM, params, ctx, n_new: int, use_cache: bool):
        self.lm, self.params, self.ctx, self.n, self.use_cache = lm, params, ctx, n_new, use_cache
        self.p = ctx["valid"].shape[1]
        self.total = self.p + n_new
        self.dec = lm.clone(decode=True)

    def _map(self, state, fn):
        axis = 1 if (self.use_cache and self.lm.scan) else 0  # scanned caches: [depth, B, ...]
        return jax.tree_util.tree_map_with_path(lambda path, c: c if _is_index(path) else fn(c, axis), state)

    def take(self, state, rows):
        return self._map(state, lambda c, axis: jnp.take(c, rows, axis=axis))

    def repeat(self, state, k: int):
        return self._map(state, lambda c, axis: jnp.repeat(c, k, axis=axis))

    def _full(self):
        """positions, mask, expert of the whole T-long sequence (uncached)."""
        c, b = self.ctx, self.ctx["valid"].shape[0]
        new = jnp.arange(self.n)[None, :]
        positions = jnp.concatenate([c["positions"], c["start"][:, None] + new], axis=1)
        off = jnp.zeros((b, self.n), bool)
        valid = jnp.concatenate([c["valid"], ~off], axis=1)
        mask = lm_mask(valid, jnp.concatenate([c["prefix"], off], axis=1))
        return positions, mask, jnp.concatenate([c["expert"], off], axis=1)

    def _logits_at(self, xs_BxTxD, i):
        last = lambda m, x, pos, mask, ex: m.logits(jax.lax.dynamic_slice_in_dim(m(x, pos, mask, ex), i, 1, 1))
        return self.lm.apply({"params": self.params}, xs_BxTxD, *self._full(), method=last)[:, 0]

    def _empty_cache(self, b, d, dtype):
        """Zero keys / values [B, T, K, Dh] and index 0 per layer (the cache's shapes from
        an abstract first call; nothing is computed)."""
        x = jax.ShapeDtypeStruct((b, self.total, d), dtype)
        pos = jax.ShapeDtypeStruct((b, self.total), jnp.int32)
        make = lambda params, x, pos: self.dec.apply({"params": params}, x, pos, None, mutable=["cache"])[1]
        shapes = jax.eval_shape(make, self.params, x, pos)["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def prefill(self, x_BxPxD):
        c, (b, _, d) = self.ctx, x_BxPxD.shape
        if not self.use_cache:
            xs = jnp.concatenate([x_BxPxD, jnp.zeros((b, self.n, d), x_BxPxD.dtype)], axis=1)
            return xs, self._logits_at(xs, self.p - 1)
        cache = self._empty_cache(b, d, x_BxPxD.dtype)
        mask = jnp.pad(lm_mask(c["valid"], c["prefix"]), ((0, 0), (0, 0), (0, 0), (0, self.n)))
        last = lambda m, x, pos, mask, ex: m.logits(m(x, pos, mask, ex)[:, -1:])
        logits, mut = self.dec.apply(
            {"params": self.params, "cache": cache},
            x_BxPxD,
            c["positions"],
            mask,
            c["expert"],
            method=last,
            mutable=["cache"],
        )
        return mut["cache"], logits[:, 0]

    def feed(self, state, tok_B, t):
        c, b = self.ctx, tok_B.shape[0]
        if not self.use_cache:
            emb = self.lm.apply({"params": self.params}, tok_B[:, None], method="embed")
            xs = jax.lax.dynamic_update_slice_in_dim(state, emb.astype(state.dtype), self.p + t, axis=1)
            return xs, self._logits_at(xs, self.p + t)
        # The new token (slot P + t) sees the valid prompt slots and the new tokens up to itself.
        slots = jnp.arange(self.total)[None, :]
        see_BxT = jnp.concatenate([c["valid"], jnp.ones((b, self.n), bool)], axis=1) & (slots <= self.p + t)
        logits, mut = self.dec.apply(
            {"params": self.params, "cache": state},
            tok_B[:, None],
            (c["start"] + t)[:, None],
            see_BxT[:, None, None, :],
            None,
            method="forward_ids",
            mutable=["cache"],
        )
        return mut["cache"], logits[:, 0]


def _loop(runner, state, logits_BxV, sel, select, n: int):
    """Token 0..n-1: `select(sel, logits, t) -> (sel, tok, rows | None)` picks token t (rows:
    the state rows each beam continues), then the runner feeds it, until every sequence is
    done or n - 1 tokens were fed; the last token is picked after the loop."""

    def body(carry):
        t, state, logits, sel = carry
        sel, tok, rows = select(sel, logits, t)
        if rows is not None:
            state = runner.take(state, rows)
        state, logits = runner.feed(state, tok, t)
        return t + 1, state, logits, sel

    cond = lambda carry: (carry[0] < n - 1) & ~jnp.all(carry[3]["done"])
    t, _, logits_BxV, sel = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, logits_BxV, sel))
    return select(sel, logits_BxV, t)[0]


def _is_eos(tok, eos: tuple):
    out = jnp.zeros(tok.shape, bool)
    for e in eos:
        out = out | (tok == e)
    return out


def _without_pad(logits, pad: int, eos: tuple):
    """float32 logits with pad at -inf (a filler, never generated) unless pad is a stop id."""
    logits = logits.astype(jnp.float32)
    return logits if pad in eos else logits.at[..., pad].set(-jnp.inf)


def _token_select(pick, eos: tuple, pad: int):
    """Greedy / sampling: `pick(logits without pad [B, V], t) -> tok [B]`; done rows get pad."""

    def select(sel, logits_BxV, t):
        masked = _without_pad(logits_BxV, pad, eos)
        logp = jax.nn.log_softmax(masked, axis=-1)
        done = sel["done"]
        tok = jnp.where(done, pad, pick(masked, t))
        lp = jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]
        return (
            dict(
                tokens=sel["tokens"].at[:, t].set(tok),
                score=sel["score"] + jnp.where(done, 0.0, lp),
                length=sel["length"] + (~done).astype(jnp.int32),
                done=done | _is_eos(tok, eos),
            ),
            tok,
            None,
        )

    return select


def _beam_select(b: int, k: int, eos: tuple, pad: int):
    """Beam search (as decoder.beam_search): every live beam extended by every token but
    pad, the k best by summed log-probability kept; a finished beam is followed by pad only,
    at no cost. Returns the state rows each new beam continues."""

    def select(sel, logits_BKxV, t):
        v = logits_BKxV.shape[-1]
        masked = _without_pad(logits_BKxV, pad, eos)
        logp = jax.nn.log_softmax(masked, axis=-1).reshape(b, k, v)
        finished = jnp.full((v,), -jnp.inf).at[pad].set(0.0)
        logp = jnp.where(sel["done"][:, :, None], finished[None, None, :], logp)
        score, idx = jax.lax.top_k((sel["score"][:, :, None] + logp).reshape(b, k * v), k)
        src, tok = idx // v, (idx % v).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, src.reshape((b, k) + (1,) * (x.ndim - 2)), axis=1)
        was_done = take(sel["done"])
        new = dict(
            tokens=take(sel["tokens"]).at[:, :, t].set(tok),
            score=score,
            length=take(sel["length"]) + (~was_done).astype(jnp.int32),
            done=was_done | _is_eos(tok, eos),
        )
        return new, tok.reshape(-1), (jnp.arange(b)[:, None] * k + src).reshape(-1)

    return select


def _beam(runner, state, logits_BxV, *, n, k, eos, pad, length_penalty):
    """Beam search from the prefilled state of B rows -> (tokens [B, N], scores [B])."""
    b = logits_BxV.shape[0]
    ctx_k = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), runner.ctx)
    runner_k = _Runner(runner.lm, runner.params, ctx_k, n, runner.use_cache)
    sel = dict(
        tokens=jnp.full((b, k, n), pad, jnp.int32),
        score=jnp.full((b, k), -jnp.inf).at[:, 0].set(0.0),  # one live beam at the start
        length=jnp.zeros((b, k), jnp.int32),
        done=jnp.zeros((b, k), bool),
    )
    state, logits = runner.repeat(state, k), jnp.repeat(logits_BxV, k, axis=0)
    sel = _loop(runner_k, state, logits, sel, _beam_select(b, k, eos, pad), n)
    final = _length_normalized(sel["score"], sel["length"], length_penalty)
    best = jnp.argmax(final, axis=1)
    tokens = jnp.take_along_axis(sel["tokens"], best[:, None, None], axis=1)[:, 0]
    return tokens, jnp.take_along_axis(final, best[:, None], axis=1)[:, 0]


@partial(jax.jit, static_argnames=("lm", "max_new_tokens", "eos_ids", "pad_id", "method", "beams", "use_cache"))
def generate(
    lm: DecoderLM,
    params,
    prompt_x_BxPxD,
    prompt_valid_BxP,
    *,
    max_new_tokens: int,
    eos_ids: tuple,
    pad_id: int,
    prompt_positions_BxP=None,
    prompt_prefix_BxP=None,
    prompt_expert_BxP=None,
    method: str = "greedy",
    temperature=1.0,
    top_p=1.0,
    rng=None,
    beams: int = 1,
    length_penalty=0.0,
    use_cache: bool = True,
):
    """Continue left-padded prompts (embeddings [B, P, D]) -> (tokens [B, N] int32, pad after
    the first eos; scores [B], see the module docstring). `lm` is the training-mode module
    (decode=False); `eos_ids` a tuple (static). Positions default to cumsum(valid) - 1; new
    tokens continue from the prompt's largest position. `prompt_prefix`: bidirectional prompt
    positions (prefix-LM); `prompt_expert`: image tokens (visual expert). method "greedy",
    "sample" (softmax(logits / temperature) within the top_p nucleus, keys from `rng`
    folded with the step) or "beam" (`beams` beams, length_penalty as decoder.beam_search)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid choices: {', '.join(METHODS)}")
    if method == "sample" and rng is None:
        raise ValueError("method='sample' needs rng (a jax PRNGKey)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    eos = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids)
    ctx = _context(prompt_valid_BxP, prompt_positions_BxP, prompt_prefix_BxP, prompt_expert_BxP)
    runner = _Runner(lm, params, ctx, max_new_tokens, use_cache)
    state, logits = runner.prefill(prompt_x_BxPxD.astype(lm.dtype))
    if method == "beam":
        kw = dict(n=max_new_tokens, k=int(beams), eos=eos, pad=pad_id, length_penalty=length_penalty)
        return _beam(runner, state, logits, **kw)
    if method == "greedy":
        pick = lambda z, t: jnp.argmax(z, axis=-1).astype(jnp.int32)
    else:
        pick = lambda z, t: jax.random.categorical(
            jax.random.fold_in(rng, t), top_p_filter(z / temperature, top_p), axis=-1
        ).astype(jnp.int32)
    b = logits.shape[0]
    sel = dict(
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        score=jnp.zeros((b,), jnp.float32),
        length=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
    )
    sel = _loop(runner, state, logits, sel, _token_select(pick, eos, pad_id), max_new_tokens)
    return sel["tokens"], _length_normalized(sel["score"], sel["length"], length_penalty)
