"""The decoder LM (issue 17): logits against an independent numpy forward (GQA, q/k/v biases,
Gemma's norm offset / embedding scale / GeGLU, tied and untied heads, the visual expert),
scan == unrolled, RoPE's relative positions, the prefix-LM mask through gradients, the KV
cache of a left-padded batch, and generation (cached == uncached, beam 1 == greedy,
sampling seeds, top-p)."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.generate import generate, truncate_at_stop
from mmjax.models.llm import DecoderLM, LMSpec, init_params, lm_mask, rope, stack_layers, unstack_layers

SPEC = LMSpec(vocab_size=50, width=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64)
CONFIGS = {
    "gqa": SPEC,
    "qkv_bias": dataclasses.replace(SPEC, qkv_bias=True),
    "gemma": dataclasses.replace(
        SPEC, norm_offset=True, embed_scale=True, act="gelu_tanh", tie_embeddings=True, kv_heads=1, head_dim=16
    ),
    "tied": dataclasses.replace(SPEC, tie_embeddings=True, rope_theta=500.0),
    "visual_expert": dataclasses.replace(SPEC, visual_expert=True, qkv_bias=True),
}


def _params(spec, seed=0, **module_kw):
    """Random params with spread (distinct logits: no greedy ties), norm scales around their init."""
    params = jax.eval_shape(partial(init_params, spec, **module_kw), jax.random.PRNGKey(seed))  # shapes only
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        z = rng.normal(size=x.shape)
        if "scale" in name:
            z = 0.2 * z + (0.0 if spec.norm_offset else 1.0)
        elif "embedding" in name:
            z = z * (0.3 if spec.embed_scale else 1.0)
        elif "bias" in name:
            z = 0.3 * z
        else:
            z = 1.5 * z / np.sqrt(x.shape[0] * (x.shape[1] if "'o'" in name else 1))
        return jnp.asarray(z, jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


@partial(jax.jit, static_argnums=0)
def _forward(lm, params, ids, positions, mask, expert=None):
    """Jitted `lm.forward_ids` (one compile per module and shapes, not an eager op per op)."""
    return lm.apply({"params": params}, ids, positions, mask, expert, method="forward_ids")


# ----------------------------------------------------------------- the numpy reference


def _np_rms(x, scale, spec):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.norm_eps)
    return y * (1.0 + scale if spec.norm_offset else scale)


def _np_rope(x, pos, theta):
    """Rotate the pairs (i, i + Dh/2) by pos * theta^(-2i/Dh)."""
    half = x.shape[-1] // 2
    ang = pos[:, :, None, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def _np_act(x, act):
    if act == "silu":
        return x / (1.0 + np.exp(-x))
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_proj(x, p, name):
    y = np.einsum("bld,dhk->blhk", x, p[name]["kernel"])
    return y + p[name]["bias"] if "bias" in p[name] else y


def _np_attention(x, p, pos, see, spec, ex):
    """see [B, L, L] bool; ex [B, L] image tokens (visual expert) or None."""
    sel = lambda name, f: f(p["attn"], name) if ex is None else np.where(ex, f(p["attn_img"], name), f(p["attn"], name))
    q = _np_rope(sel("q", lambda pp, n: _np_proj(x, pp, n)), pos, spec.rope_theta)
    k = _np_rope(sel("k", lambda pp, n: _np_proj(x, pp, n)), pos, spec.rope_theta)
    v = sel("v", lambda pp, n: _np_proj(x, pp, n))
    ctx = np.zeros(q.shape)
    for h in range(spec.heads):
        kv = h // (spec.heads // spec.kv_heads)
        s = np.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, kv]) / np.sqrt(spec.head_dim)
        s = np.where(see, s, -np.inf)
        w = np.exp(s - np.max(np.where(see, s, -1e30), axis=-1, keepdims=True))
        w = np.where(see.any(-1, keepdims=True), w / np.maximum(w.sum(-1, keepdims=True), 1e-30), 0.0)
        ctx[:, :, h] = np.einsum("bqk,bkd->bqd", w, v[:, :, kv])
    out = lambda pp: np.einsum("blhk,hkd->bld", ctx, pp["o"]["kernel"])
    return out(p["attn"]) if ex is None else np.where(ex[..., 0, 0][..., None], out(p["attn_img"]), out(p["attn"]))


def np_forward(params, spec, ids, pos, see, expert=None):
    """float64 logits [B, L, V] of the LM, written from the architecture alone."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][ids] * (np.sqrt(spec.width) if spec.embed_scale else 1.0)
    ex = None if expert is None else expert[:, :, None, None]
    for i in range(spec.depth):
        lp = p[f"layer{i:02d}"]
        x = x + _np_attention(_np_rms(x, lp["attn_norm"]["scale"], spec), lp, pos, see, spec, ex)
        h = _np_rms(x, lp["mlp_norm"]["scale"], spec)

        def mlp(m):
            return (_np_act(h @ m["gate"]["kernel"], spec.act) * (h @ m["up"]["kernel"])) @ m["down"]["kernel"]

        x = x + (mlp(lp["mlp"]) if ex is None else np.where(ex[..., 0], mlp(lp["mlp_img"]), mlp(lp["mlp"])))
    h = _np_rms(x, p["final_norm"]["scale"], spec)
    return h @ (p["embed"]["embedding"].T if spec.tie_embeddings else p["lm_head"]["kernel"])


def _batch(seed=0, length=7, pad=2):
    """ids [2, L]; row 1 left-padded by `pad` with a 3-token prefix; positions, see [2, L, L]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 50, (2, length))
    valid = np.ones((2, length), bool)
    valid[1, :pad] = False
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    prefix = np.zeros((2, length), bool)
    prefix[1, pad : pad + 3] = True
    i = np.arange(length)
    see = ((i[None, :] <= i[:, None])[None] | (prefix[:, :, None] & prefix[:, None, :])) & valid[:, None, :]
    return ids, valid, prefix, pos, see


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_numpy(name):
    spec = CONFIGS[name]
    params = _params(spec)
    ids, valid, prefix, pos, see = _batch()
    expert = np.zeros(ids.shape, bool)
    expert[:, 1:4] = True
    ex = expert if spec.visual_expert else None
    mask = lm_mask(jnp.asarray(valid), jnp.asarray(prefix))
    np.testing.assert_array_equal(np.asarray(mask)[:, 0], see)
    got = _forward(DecoderLM(spec), params, ids, pos, mask, ex)
    want = np_forward(params, spec, ids, pos, see, ex)
    assert got.dtype == jnp.float32 and got.shape == (2, 7, 50)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert ("lm_head" in params) != spec.tie_embeddings


def test_scan_equals_unrolled_and_layers_round_trip():
    params = _params(SPEC)
    ids, valid, prefix, pos, _ = _batch(1)
    mask = lm_mask(jnp.asarray(valid), jnp.asarray(prefix))
    want = _forward(DecoderLM(SPEC), params, ids, pos, mask)
    stacked = stack_layers(params, SPEC.depth)
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(partial(init_params, SPEC, scan=True), jax.random.PRNGKey(1)))
    assert jax.tree.map(jnp.shape, stacked) == shapes and "layer00" not in stacked
    for remat in ("none", "full"):
        got = _forward(DecoderLM(SPEC, scan=True, remat=remat), stacked, ids, pos, mask)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    back = unstack_layers(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_rope_depends_on_position_differences_only():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(2))
    pos = jnp.asarray([[0, 1, 2, 5, 9, 10]])

    def scores(shift):
        return jnp.einsum("bqhd,bkhd->bhqk", rope(q, pos + shift, 100.0), rope(k, pos + shift, 100.0))

    np.testing.assert_allclose(np.asarray(scores(37)), np.asarray(scores(0)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(rope(q, pos + 1, 100.0)), np.asarray(rope(q, pos, 100.0)))
    # The whole model: shifting every position leaves the logits unchanged.
    params, (ids, valid, prefix, pos, _) = _params(SPEC), _batch(2)
    mask = lm_mask(jnp.asarray(valid), jnp.asarray(prefix))
    f = lambda p: _forward(DecoderLM(SPEC), params, ids, p, mask)
    np.testing.assert_allclose(np.asarray(f(pos + 11)), np.asarray(f(pos)), rtol=1e-4, atol=1e-4)


def test_prefix_lm_mask_through_gradients():
    """d logits[i] / d x[j]: answer positions (i >= 3) see j <= i only; the prefix 0..2 sees
    itself both ways and never the answer."""
    params = _params(SPEC)
    lm, n = DecoderLM(SPEC), 6
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, n, SPEC.width)), jnp.float32)
    r = jnp.asarray(np.random.default_rng(1).normal(size=(SPEC.vocab_size,)), jnp.float32)
    mask = lm_mask(jnp.ones((1, n), bool), jnp.arange(n)[None] < 3)
    pos = jnp.arange(n)[None]
    f = lambda x: lm.apply({"params": params}, x, pos, mask, method=lambda m, *a: m.logits(m(*a)))[0] @ r
    jac = np.abs(np.asarray(jax.jit(jax.jacrev(f))(x))[:, 0]).sum(-1)  # [i, j]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    sees = (j <= i) | ((i < 3) & (j < 3))
    assert (jac[~sees] == 0).all() and (jac[sees] > 1e-6).all()


def _cached_logits(lm, p, ids, pos, mask, expert):
    """The logits of `ids` [B, 6] through the KV cache: its creation, the 4-token prompt, then
    one token at a time (each call's mask over the 6 cache slots)."""
    x = lm.apply({"params": p}, ids, method="embed")
    _, mut = lm.apply({"params": p}, jnp.zeros_like(x), pos, None, mutable=["cache"])  # the empty cache
    hs = []
    for s, e in ((0, 4), (4, 5), (5, 6)):
        h, mut = lm.apply(
            {"params": p, "cache": mut["cache"]},
            x[:, s:e],
            pos[:, s:e],
            mask[:, :, s:e],
            expert[:, s:e],
            mutable=["cache"],
        )
        hs.append(h)
    return lm.apply({"params": p}, jnp.concatenate(hs, 1), method="logits"), mut


def test_cache_of_a_left_padded_batch_gives_the_uncached_logits():
    for scan, spec in ((False, CONFIGS["visual_expert"]), (True, CONFIGS["gemma"])):
        params = _params(spec, scan=False)
        ids, valid, prefix, pos, _ = _batch(3, length=6, pad=1)  # the prefix (1..3) within the prompt
        expert = jnp.asarray(prefix)  # the prefix as image tokens
        full = lm_mask(jnp.asarray(valid), jnp.asarray(prefix))
        want = _forward(DecoderLM(spec), params, ids, pos, full, expert)
        lm = DecoderLM(spec, scan=scan, decode=True)
        got, mut = jax.jit(partial(_cached_logits, lm, pos=pos, mask=full, expert=expert))(
            stack_layers(params, spec.depth) if scan else params, ids
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        index = [v for k, v in jax.tree_util.tree_leaves_with_path(mut) if "index" in jax.tree_util.keystr(k)]
        assert index and all(np.all(np.asarray(i) == 6) for i in index)


def test_visual_expert_routes_image_tokens():
    spec = CONFIGS["visual_expert"]
    params = _params(spec)
    ids, valid, _, pos, _ = _batch(4)
    mask = lm_mask(jnp.asarray(valid))
    expert = np.zeros(ids.shape, bool)
    expert[:, 3:5] = True
    f = lambda p, ex: np.asarray(_forward(DecoderLM(spec), p, ids, pos, mask, ex))
    base = f(params, expert)
    changed = jax.tree.map(lambda a: a, params)
    changed["layer00"]["attn_img"] = jax.tree.map(lambda a: a * 1.5, params["layer00"]["attn_img"])
    other = f(changed, expert)
    np.testing.assert_allclose(other[:, :3], base[:, :3], rtol=1e-6, atol=1e-6)  # text before the image
    assert np.abs(other[:, 3:5] - base[:, 3:5]).min() > 1e-4  # the image tokens
    # No image token: the plain LM with the text weights.
    plain = {k: {n: v for n, v in t.items() if not n.endswith("_img")} for k, t in params.items()}
    want = _forward(DecoderLM(dataclasses.replace(spec, visual_expert=False)), plain, ids, pos, mask)
    np.testing.assert_allclose(f(params, np.zeros_like(expert)), np.asarray(want), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- generation

EOS, PAD, N = (5, 9, 13, 17, 21), 0, 6


def _prompts(spec, seed=0):
    """3 left-padded prompts of 5, 3 and 1 tokens (the first two of each a bidirectional
    prefix, image tokens for the visual expert) as embeddings."""
    params = _params(spec, seed)
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(22, 50, (3, 5)), jnp.int32)
    valid = jnp.asarray(np.arange(5)[None] >= np.array([[0], [2], [4]]))
    prefix = valid & (jnp.cumsum(valid, 1) <= 2)
    x = DecoderLM(spec).apply({"params": params}, ids, method="embed")
    kw = dict(prompt_prefix_BxP=prefix, prompt_expert_BxP=prefix, max_new_tokens=N, eos_ids=EOS, pad_id=PAD)
    return params, ids, valid, x, kw


def _check_against_forward(spec, params, ids, valid, prefix, tokens, scores, pad=PAD):
    """Each generated token is the argmax (pad excluded, unless it is an eos) of the full
    forward at its prefix; pad follows the first eos; scores are the summed
    log-probabilities up to it."""
    toks = np.asarray(tokens)
    full_valid = jnp.concatenate([valid, jnp.ones(toks.shape, bool)], 1)
    full_prefix = jnp.concatenate([prefix, jnp.zeros(toks.shape, bool)], 1)
    pos = jnp.maximum(jnp.cumsum(full_valid, 1) - 1, 0)
    logits = _forward(
        DecoderLM(spec), params, jnp.concatenate([ids, tokens], 1), pos, lm_mask(full_valid, full_prefix), full_prefix
    )
    logits = np.asarray(logits[:, ids.shape[1] - 1 : -1]).astype(np.float64)
    if pad not in EOS:
        logits[:, :, pad] = -np.inf
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1)[..., None]
    )
    ended = 0
    for b, row in enumerate(toks):
        stop = next((i for i, t in enumerate(row) if t in EOS), len(row) - 1)
        ended += stop < len(row) - 1
        assert (row[stop + 1 :] == pad).all() and (row[:stop] != pad).all()
        np.testing.assert_array_equal(row[: stop + 1], logits[b, : stop + 1].argmax(-1))
        np.testing.assert_allclose(scores[b], logp[b, np.arange(stop + 1), row[: stop + 1]].sum(), rtol=1e-4)
    assert ended  # some row stopped at an eos


def test_generate_cached_equals_uncached_greedy_and_beam1():
    spec = CONFIGS["visual_expert"]
    params, ids, valid, x, kw = _prompts(spec)
    lm = DecoderLM(spec)
    tokens, scores = generate(lm, params, x, valid, **kw)
    assert tokens.shape == (3, N) and tokens.dtype == jnp.int32
    plain = generate(lm, params, x, valid, **kw, use_cache=False)
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(plain[1]), np.asarray(scores), rtol=1e-5)
    _check_against_forward(spec, params, ids, valid, kw["prompt_prefix_BxP"], tokens, np.asarray(scores))
    beam1 = generate(lm, params, x, valid, **kw, method="beam", beams=1)
    np.testing.assert_array_equal(np.asarray(beam1[0]), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(beam1[1]), np.asarray(scores), rtol=1e-5)


def test_a_pad_that_is_an_eos_ends_the_text():
    """An HF tokenizer without a pad token pads with its eos: that id stays in the
    vocabulary (as in transformers) and ends a row, instead of being masked as a filler."""
    params, ids, valid, x, kw = _prompts(SPEC)
    lm = DecoderLM(SPEC)
    first = np.asarray(generate(lm, params, x, valid, **kw)[0])
    ended = [t for row in first for t in row if t in EOS]
    assert ended, first  # the eos the model ends a row with: now also the pad
    kw = dict(kw, pad_id=int(ended[0]))
    tokens, scores = generate(lm, params, x, valid, **kw)
    _check_against_forward(SPEC, params, ids, valid, kw["prompt_prefix_BxP"], tokens, np.asarray(scores), ended[0])
    assert (np.asarray(tokens) == ended[0]).any()
    beam = generate(lm, params, x, valid, **kw, method="beam", beams=1)
    np.testing.assert_array_equal(np.asarray(beam[0]), np.asarray(tokens))


def test_beam_search_cached_equals_uncached():
    params, _, valid, x, kw = _prompts(SPEC, seed=1)
    kw = dict(kw, method="beam", beams=3, length_penalty=0.6)
    lm = DecoderLM(SPEC)
    tokens, scores = generate(lm, params, x, valid, **kw)
    plain = generate(lm, params, x, valid, **kw, use_cache=False)
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(plain[1]), np.asarray(scores), rtol=1e-5)
    # The scanned layout (caches [depth, B, ...]: beams reorder axis 1), rematerialised.
    scanned = generate(DecoderLM(SPEC, scan=True, remat="full"), stack_layers(params, SPEC.depth), x, valid, **kw)
    np.testing.assert_array_equal(np.asarray(scanned[0]), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(scanned[1]), np.asarray(scores), rtol=1e-5)


def test_sampling_seeds_and_top_p():
    params, _, valid, x, kw = _prompts(SPEC, seed=2)
    lm = DecoderLM(SPEC)
    sample = lambda seed, **k: np.asarray(
        generate(lm, params, x, valid, **kw, method="sample", rng=jax.random.PRNGKey(seed), **k)[0]
    )
    a = sample(0, temperature=2.0)
    np.testing.assert_array_equal(sample(0, temperature=2.0), a)
    assert not np.array_equal(sample(1, temperature=2.0), a)
    greedy = np.asarray(generate(lm, params, x, valid, **kw)[0])
    np.testing.assert_array_equal(sample(3, top_p=1e-6), greedy)
    assert (a != PAD).any()


def test_truncate_at_stop():
    assert truncate_at_stop("a cat.\nUser: hi", ["\nUser:", "###"]) == "a cat."
    assert truncate_at_stop("x ### y \nUser:", ("\nUser:", "###")) == "x "
    assert truncate_at_stop("no stop", ["###"]) == "no stop" and truncate_at_stop("abc", []) == "abc"
