"""BLIP-2 Q-Former: masks, who-sees-what through the model, block vs numpy, text-only path."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from mmjax.models.attention import padding_mask
from mmjax.models.fusion import FusionBlock
from mmjax.models.qformer import MODES, QFormer, QFormerBlock, qformer_mask
from mmjax.parallel.sharding import unnamed_params

WIDTH, DEPTH, HEADS, MLP = 32, 4, 2, 64
Q, N, DI, L, V, B = 4, 6, 24, 7, 50, 2
VALID = np.array([[True] * L, [True] * (L - 2) + [False] * 2])  # row 1: two padded positions
LN_EPS = 1e-6  # flax's LayerNorm default (mmjax's norm_init)
# XLA:CPU compile time dominates (tiny shapes): compile for speed of compiling.
jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    },
)


def normal(seed, shape, scale=1.0):
    """numpy draws (eager jax.random would compile a program per shape)."""
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def model(cross_every=2):
    return QFormer(V, 16, WIDTH, DEPTH, HEADS, MLP, num_query=Q, cross_every=cross_every)


IMAGE = normal(1, (B, N, DI))
IDS = np.random.default_rng(2).integers(1, V, size=(B, L)).astype(np.int32)


@pytest.fixture(scope="module")
def qf():
    """(params, forward(params, image, ids, valid, mode) -> (queries, text) as numpy)."""
    m = model()
    params = jit(m.init, static_argnums=(4,))(jax.random.key(0), IMAGE, IDS, VALID, "unimodal")
    fwd = jit(m.apply, static_argnums=(4,))
    return params, lambda *a: tuple(np.asarray(o) for o in fwd(params, *a))


def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------- 1. the mask


def np_mask(num_query, valid, mode):
    b, length = valid.shape
    s = num_query + length
    out = np.zeros((b, 1, s, s), bool)
    for i in range(b):
        for r in range(s):
            for k in range(s):
                key_ok = k < num_query or valid[i, k - num_query]
                if mode == "bidirectional":
                    out[i, 0, r, k] = key_ok
                elif r < num_query:  # unimodal / causal query rows: queries only
                    out[i, 0, r, k] = k < num_query
                elif mode == "unimodal":
                    out[i, 0, r, k] = k >= num_query and key_ok
                else:
                    out[i, 0, r, k] = key_ok and (k < num_query or k <= r)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_query", [0, Q])
def test_mask_matches_numpy(mode, num_query):
    got = np.asarray(qformer_mask(num_query, jnp.asarray(VALID), mode))
    assert got.shape == (B, 1, num_query + L, num_query + L) and got.dtype == bool
    np.testing.assert_array_equal(got, np_mask(num_query, VALID, mode))


def test_mask_modes_differ_and_queries_only():
    masks = {m: np.asarray(qformer_mask(Q, jnp.asarray(VALID), m)) for m in MODES}
    assert not np.array_equal(masks["unimodal"], masks["causal"])
    assert not np.array_equal(masks["causal"], masks["bidirectional"])
    np.testing.assert_array_equal(np.asarray(qformer_mask(Q, None, "causal")), np.ones((1, 1, Q, Q), bool))


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match=r"mode='itm'.*unimodal, bidirectional, causal"):
        qformer_mask(Q, jnp.asarray(VALID), "itm")


# ----------------------------------------------------------------- 2. who sees what


def other_ids(ids, positions):
    """ids with the tokens at `positions` replaced (by other ids, never pad 0)."""
    out = ids.copy()
    out[:, positions] = (ids[:, positions] % (V - 1)) + 1 + (ids[:, positions] == V - 1)
    assert np.all(out[:, positions] != ids[:, positions]) and np.all(out > 0)
    return out


IMAGE2 = normal(3, (B, N, DI))


def test_unimodal_separates_queries_and_text(qf):
    _, fwd = qf
    q1, t1 = fwd(IMAGE, IDS, VALID, "unimodal")
    q2, t2 = fwd(IMAGE, other_ids(IDS, slice(None)), VALID, "unimodal")
    assert maxdiff(q1, q2) == 0.0  # queries do not see the text
    assert maxdiff(t1, t2) > 1e-4
    q3, t3 = fwd(IMAGE2, IDS, VALID, "unimodal")
    assert maxdiff(t1, t3) == 0.0  # text sees neither the queries nor (so) the image
    assert maxdiff(q1, q3) > 1e-4


def test_causal_text_sees_past_and_queries(qf):
    _, fwd = qf
    t_cut = 3  # valid in both rows
    q1, t1 = fwd(IMAGE, IDS, VALID, "causal")
    q2, t2 = fwd(IMAGE, other_ids(IDS, slice(t_cut + 1, None)), VALID, "causal")
    assert maxdiff(t1[:, : t_cut + 1], t2[:, : t_cut + 1]) == 0.0  # no peeking at tokens > t
    assert maxdiff(t1[:, t_cut + 1 :], t2[:, t_cut + 1 :]) > 1e-4
    assert maxdiff(q1, q2) == 0.0  # queries do not see the text
    q_uni, _ = fwd(IMAGE, IDS, VALID, "unimodal")
    np.testing.assert_allclose(q1, q_uni, atol=1e-6)  # same query rows of the mask
    _, t3 = fwd(IMAGE2, IDS, VALID, "causal")
    per_position = np.abs(t1 - t3).max(axis=-1)  # [B, L]
    assert per_position.min() > 1e-4  # every text position sees the image through the queries


def test_bidirectional_queries_see_text_but_not_padding(qf):
    _, fwd = qf
    q1, t1 = fwd(IMAGE, IDS, VALID, "bidirectional")
    q2, t2 = fwd(IMAGE, other_ids(IDS, [1]), VALID, "bidirectional")
    assert maxdiff(q1, q2) > 1e-4  # queries see the text
    assert maxdiff(t1[:, 0], t2[:, 0]) > 1e-4  # and text sees other text
    # changing the padded tokens of row 1 changes nothing that is attended to
    padded = other_ids(IDS, [L - 2, L - 1])
    padded[0] = IDS[0]
    q3, t3 = fwd(IMAGE, padded, VALID, "bidirectional")
    assert maxdiff(q1, q3) == 0.0 and maxdiff(t1[:, : L - 2], t3[:, : L - 2]) == 0.0
    _, t4 = fwd(IMAGE2, IDS, VALID, "bidirectional")
    assert maxdiff(t1, t4) > 1e-4


# ----------------------------------------------------------------- 3. params


def param_shapes(module, *args):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))  # args stay python / numpy
    return nn.unbox(shapes)["params"], shapes


@pytest.mark.parametrize("cross_every", [1, 2, 3])
def test_cross_attention_only_in_cross_layers(cross_every):
    params, boxed = param_shapes(model(cross_every), IMAGE, IDS, VALID, "causal")
    assert set(params) == {"embed", "query_tokens", "ln_out"} | {f"block{i:02d}" for i in range(DEPTH)}
    assert params["query_tokens"].shape == (1, Q, WIDTH)
    assert set(params["embed"]) == {"token", "pos_embedding"}
    base = {"ln1", "attn", "ln2", "mlp", "ln2_query", "mlp_query"}
    for i in range(DEPTH):
        want = base | ({"ln_cross", "cross_attn"} if i % cross_every == 0 else set())
        assert set(params[f"block{i:02d}"]) == want, (i, sorted(params[f"block{i:02d}"]))
    assert params["block00"]["cross_attn"]["key"]["kernel"].shape == (DI, HEADS, WIDTH // HEADS)
    assert unnamed_params(boxed["params"]) == []


def test_block_params_transplant_from_fusion_block():
    """A FusionBlock's params (mmjax's text encoder block) have the names and shapes of
    the cross block's matching sublayers."""
    block, _ = param_shapes(QFormerBlock(HEADS, MLP, cross=True), jnp.zeros((B, Q + L, WIDTH)), Q, None, IMAGE)
    fusion, _ = param_shapes(FusionBlock(HEADS, MLP), jnp.zeros((B, L, WIDTH)), None, IMAGE)
    shape = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shape({k: block[k] for k in fusion}) == shape(fusion)
    assert shape(block["mlp_query"]) == shape(block["mlp"]) and shape(block["ln2_query"]) == shape(block["ln2"])


# ----------------------------------------------------------------- 4. one block vs numpy


def np_ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def np_mlp(x, p):
    h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))  # Mlp's gelu_tanh
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def np_mha(x, p, mask, kv=None):
    if kv is None:  # fused qkv [D, 3, Hh, Dh]
        qkv = np.einsum("bld,dthk->blthk", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        proj = lambda t, name: np.einsum("bld,dhk->blhk", t, p[name]["kernel"]) + p[name]["bias"]
        q, k, v = proj(x, "query"), proj(kv, "key"), proj(kv, "value")
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    probs = scipy.special.softmax(np.where(mask, logits, -np.inf), axis=-1)
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def np_block(p, x, num_query, mask, image, image_mask):
    x = x + np_mha(np_ln(x, p["ln1"]), p["attn"], mask)
    q, t = x[:, :num_query], x[:, num_query:]
    q = q + np_mha(np_ln(q, p["ln_cross"]), p["cross_attn"], image_mask, kv=image)
    q = q + np_mlp(np_ln(q, p["ln2_query"]), p["mlp_query"])
    t = t + np_mlp(np_ln(t, p["ln2"]), p["mlp"])
    return np.concatenate([q, t], axis=1)


def test_block_matches_numpy():
    block = QFormerBlock(HEADS, MLP, cross=True)
    x = normal(4, (B, Q + L, WIDTH))
    mask = qformer_mask(Q, jnp.asarray(VALID), "bidirectional")
    image_valid = np.array([[True] * N, [True] * (N - 2) + [False] * 2])
    image_mask = padding_mask(jnp.asarray(image_valid))
    params = nn.unbox(jit(block.init, static_argnums=(2,))(jax.random.key(1), x, Q, mask, IMAGE, image_mask))
    # Random offsets on every param (LayerNorm scales and biases included), so that a
    # swapped sublayer (ln2 vs ln2_query, mlp vs mlp_query) shows.
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [np.asarray(v) + normal(10 + i, v.shape, 0.2) for i, v in enumerate(leaves)])
    got = jit(block.apply, static_argnums=(2,))(params, x, Q, mask, IMAGE, image_mask)
    p64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)["params"]
    want = np_block(p64, x.astype(np.float64), Q, np.asarray(mask), IMAGE.astype(np.float64), np.asarray(image_mask))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    assert np.abs(want).max() > 0.5  # not a degenerate comparison


# ----------------------------------------------------------------- 5. text-only, queries-only, LM head


def test_text_only_equals_unimodal_text(qf):
    params, fwd = qf
    q, t = fwd(IMAGE, IDS, VALID, "unimodal")
    q0, t0 = fwd(None, IDS, VALID, "unimodal")
    assert q0.shape == (B, 0, WIDTH) and t0.shape == (B, L, WIDTH)
    np.testing.assert_allclose(t0, t, atol=1e-5)
    _, t_bi = fwd(IMAGE, IDS, VALID, "bidirectional")
    assert maxdiff(t0, t_bi) > 1e-4  # with queries in view the text does change
    q_only, t_none = fwd(IMAGE, None, None, "bidirectional")
    assert q_only.shape == (B, Q, WIDTH) and t_none.shape == (B, 0, WIDTH)
    np.testing.assert_allclose(q_only, q, atol=1e-5)  # unimodal queries see only queries


def test_attend_is_tied_lm_head(qf):
    params, fwd = qf
    _, t = fwd(IMAGE, IDS, VALID, "causal")
    logits = jit(functools.partial(model().apply, method=QFormer.attend))(params, t)
    table = np.asarray(nn.unbox(params)["params"]["embed"]["token"]["embedding"])
    assert logits.shape == (B, L, V) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), t @ table.T, atol=1e-5, rtol=1e-5)


def test_remat_same_output(qf):
    """remat (num_query a static argument of the checkpointed block) changes nothing."""
    params, fwd = qf
    m = QFormer(V, 16, WIDTH, DEPTH, HEADS, MLP, num_query=Q, remat="full")
    q, t = jit(m.apply, static_argnums=(4,))(params, IMAGE, IDS, VALID, "causal")
    q_ref, t_ref = fwd(IMAGE, IDS, VALID, "causal")
    np.testing.assert_allclose(np.asarray(q), q_ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t), t_ref, atol=1e-6)


def test_neither_input_raises(qf):
    params, _ = qf
    with pytest.raises(ValueError, match="neither"):
        model().apply(params, None, None, None, "unimodal")
