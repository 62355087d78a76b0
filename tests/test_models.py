"""Models: shapes, masks, causality, variants, param counts, CLIP family."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.models import (
    Encoder,
    MultiHeadAttention,
    PatchEmbed,
    TextEncoder,
    ViT,
    WordEmbed,
    causal_mask,
    combine_masks,
    padding_mask,
    parse_variant,
    zoo,
)

N_DEV = 8
KEY = jax.random.key(0)


def clip_config(**kw):
    """The 'mu' sizes with one block per tower: CPU compile time dominates tests."""
    cfg = dict(
        family="clip",
        image="mu/8",
        text="mu",
        image_overrides={"depth": 1},
        text_overrides={"depth": 1},
        embed_dim=32,
        image_size=32,
        text_len=16,
        vocab_size=100,
        loss="softmax",
        pool="cls",
        dtype="float32",
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def jit_init(module, *args, **kw):
    """Jitted `module.init` (eager init dispatches op by op and is slow on CPU)."""
    return jax.jit(functools.partial(module.init, **kw))(KEY, *args)


def init_family(fam, image_shape=(2, 32, 32, 3), text_shape=(2, 16)):
    return jax.jit(fam.init_params, static_argnums=(1, 2))(KEY, image_shape, text_shape)


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def random_text(rng, b, length, vocab=100):
    """`bos w.. eos pad..` rows with random lengths >= 2 (pad id 0)."""
    ids = rng.integers(3, vocab, size=(b, length)).astype(np.int32)
    lens = rng.integers(2, length + 1, size=b)
    ids[np.arange(length)[None, :] >= lens[:, None]] = 0
    return ids


def random_batch(b, seed=0, image_size=32, text_len=16):
    rng = np.random.default_rng(seed)
    return dict(
        image=rng.normal(size=(b, image_size, image_size, 3)).astype(np.float32), text=random_text(rng, b, text_len)
    )


# ---- embeddings -----------------------------------------------------------


def test_patch_embed_shape():
    x = jnp.zeros((2, 32, 48, 3))
    out = jax.eval_shape(lambda x: PatchEmbed(8, 64).init_with_output(KEY, x)[0], x)
    assert out.shape == (2, 4 * 6, 64)
    with pytest.raises(ValueError, match="divisible"):
        PatchEmbed(7, 64).init(KEY, x)


def test_word_embed_shape_and_tied_attend():
    ids = jnp.ones((2, 5), jnp.int32)
    m = WordEmbed(100, 16, max_len=8)
    params = jit_init(m, ids)
    assert jax.jit(m.apply)(params, ids).shape == (2, 5, 16)
    logits = jax.jit(functools.partial(m.apply, method=m.attend))(params, jnp.ones((2, 5, 16)))
    assert logits.shape == (2, 5, 100)


# ---- masks and attention -------------------------------------------------


def test_mask_helpers():
    pad = padding_mask(jnp.array([[1, 1, 0]], bool))
    assert pad.shape == (1, 1, 1, 3)
    cm = causal_mask(3)
    assert cm.shape == (1, 1, 3, 3) and bool(cm[0, 0, 0, 1]) is False
    both = combine_masks(pad, cm, None)
    np.testing.assert_array_equal(both[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    assert combine_masks(None) is None


def test_fully_masked_rows_are_finite():
    x = jax.random.normal(KEY, (2, 4, 16))
    mask = jnp.zeros((2, 1, 4, 4), bool).at[0, :, :2, :2].set(True)
    attn = MultiHeadAttention(num_heads=2)
    params = jit_init(attn, x, mask=mask)
    out = jax.jit(attn.apply)(params, x, mask=mask)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(out[1], 0.0)  # rows with nothing to attend -> 0
    grads = jax.jit(jax.grad(lambda p: attn.apply(p, x, mask=mask).sum()))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_fused_and_separate_qkv():
    x = jax.random.normal(KEY, (2, 4, 16))
    for fused in (True, False):
        out, p = jax.eval_shape(MultiHeadAttention(2, fused_qkv=fused).init_with_output, KEY, x)
        assert out.shape == x.shape and n_params(p) == 4 * (16 * 16 + 16)


def test_encoder_causal_by_gradient():
    length, width = 6, 16
    x = jax.random.normal(KEY, (1, length, width))
    enc = Encoder(depth=2, num_heads=2, mlp_dim=32)
    params = jit_init(enc, x, causal_mask(length))
    w = jax.random.normal(jax.random.key(1), (width,))
    f = lambda x: enc.apply(params, x, causal_mask(length))[0][0] @ w  # [L]
    jac = np.abs(np.asarray(jax.jit(jax.jacrev(f))(x))[:, 0]).sum(-1)  # [L_out, L_in]
    assert np.all(jac[np.triu_indices(length, k=1)] == 0.0)
    assert np.all(np.abs(np.diag(jac)) > 0)


# ---- towers --------------------------------------------------------------


@pytest.mark.parametrize("pool,tokens", [("cls", 17), ("gap", 16)])
def test_vit_shapes(pool, tokens):
    v = parse_variant("mu/8")
    vit = ViT(v["patch"], v["width"], v["depth"], v["heads"], v["mlp_dim"], pool=pool)
    (pooled, aux), _ = jax.eval_shape(vit.init_with_output, KEY, jnp.zeros((2, 32, 32, 3)))
    assert pooled.shape == (2, 64) and aux["tokens"].shape == (2, tokens, 64)


@pytest.fixture(scope="module")
def text_tower():
    v = parse_variant("mu", kind="text")
    make = lambda causal: TextEncoder(100, 16, v["width"], v["depth"], v["heads"], v["mlp_dim"], causal=causal)
    params = jit_init(make(True), jnp.ones((1, 16), jnp.int32))
    return make, params


@pytest.mark.parametrize("causal", [True, False])
def test_text_padding_masked_out(text_tower, causal):
    make, params = text_tower
    tower = make(causal)
    ids = random_text(np.random.default_rng(1), 4, 16)
    ids[:, -1] = 0  # at least one pad per row
    pooled, aux = jax.jit(tower.apply)(params, ids)
    assert pooled.shape == (4, 64) and aux["tokens"].shape == (4, 16, 64)
    np.testing.assert_array_equal(aux["eos_index"], (ids != 0).sum(1) - 1)
    # Other embeddings in padded slots must not reach the pooled output.
    x = jax.jit(functools.partial(tower.apply, method=lambda m, i: m.embed(i)))(params, ids)
    noise = jax.random.normal(KEY, x.shape) * jnp.asarray(ids == 0)[..., None]
    pooled2, _ = jax.jit(functools.partial(tower.apply, method=TextEncoder.encode_embedded))(
        params, x + 10 * noise, ids
    )
    np.testing.assert_allclose(pooled2, pooled, atol=1e-5)


def test_text_causal_by_gradient(text_tower):
    make, params = text_tower
    tower = make(True)
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 100, (1, 16)), jnp.int32)
    x = jax.jit(functools.partial(tower.apply, method=lambda m, i: m.embed(i)))(params, ids)
    w = jax.random.normal(jax.random.key(1), (x.shape[-1],))
    f = lambda x: tower.apply(params, x, ids, method=TextEncoder.encode_embedded)[1]["tokens"][0] @ w  # [L]
    jac = np.abs(np.asarray(jax.jit(jax.jacrev(f))(x))[:, 0]).sum(-1)  # [L_out, L_in]
    assert np.all(jac[np.triu_indices(16, k=1)] == 0.0)
    assert np.all(np.abs(np.diag(jac)) > 0)


# ---- variants and parameter counts -------------------------------------


def test_parse_variant():
    assert parse_variant("B/16") == dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16)
    assert parse_variant("L/14")["depth"] == 24
    assert parse_variant("B", kind="text")["width"] == 512
    assert parse_variant("mu/8", {"width": 128, "depth": None})["width"] == 128
    for bad, kind in [("X/16", "image"), ("B", "image"), ("B/16", "text")]:
        with pytest.raises(ValueError, match="mu" if bad == "X/16" else bad):
            parse_variant(bad, kind=kind)
    with pytest.raises(ValueError, match="mlp_dim"):
        parse_variant("mu/8", {"ffn": 3})


FULL = dict(image_overrides={}, text_overrides={})
PARAM_COUNTS = {
    # OpenAI CLIP ViT-B/16 (incl. logit scale): bias-free conv + ln_pre + CLS.
    "B/16-softmax": (
        dict(image="B/16", text="B", embed_dim=512, image_size=224, text_len=77, vocab_size=49408, **FULL),
        149_620_737,
    ),
    # SigLIP loss: + the bias b.
    "B/16-sigmoid": (
        dict(
            image="B/16", text="B", embed_dim=512, image_size=224, text_len=77, vocab_size=49408, loss="sigmoid", **FULL
        ),
        149_620_738,
    ),
    # OpenAI ViT-L/14 (visual 1024/24/16, text 768/12/12, embed 768).
    "L/14-softmax": (
        dict(image="L/14", text="L", embed_dim=768, image_size=224, text_len=77, vocab_size=49408, **FULL),
        427_616_513,
    ),
    "mu/8-gap": (dict(pool="gap", **FULL), None),
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts(name):
    kw, want = PARAM_COUNTS[name]
    fam = zoo.build(clip_config(**kw))
    shapes = jax.eval_shape(fam.init_params, KEY)
    if want is None:  # gap: no CLS token and one position fewer than cls.
        cls_cfg = clip_config(**FULL)
        want = n_params(jax.eval_shape(zoo.build(cls_cfg).init_params, KEY)) - 2 * 64
    assert n_params(shapes) == want


def test_build_unknown_family():
    with pytest.raises(ValueError, match="clip"):
        zoo.build(clip_config(family="no_such_family"))


# ---- CLIP family ----------------------------------------------------------
# XLA's CPU compile dominates these tests (seconds per program), so each
# program is compiled once and shared.


def _loss_and_grads(fam, params, batch, gather=None):
    kw = {} if gather is None else dict(gather=gather)
    fn = lambda p, b: fam.objective(p, b, KEY, **kw)[0]
    return jax.value_and_grad(fn)(params, batch)


@pytest.fixture(scope="module")
def clip_reference():
    """Softmax CLIP, its params, a global batch of 16 and the 1-device loss/grads."""
    fam = zoo.build(clip_config())
    params = init_family(fam)
    batch = random_batch(2 * N_DEV, seed=3)
    loss, grads = jax.jit(functools.partial(_loss_and_grads, fam))(params, batch)
    return fam, params, batch, loss, grads


def _outputs(fam, params, batch):
    emb = fam.embed(params, batch, KEY)
    return (
        emb,
        fam.encode_image(params, batch["image"]),
        fam.encode_text(params, batch["text"]),
        fam.objective(params, batch, KEY),
    )


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_clip_outputs(clip_reference, loss):
    if loss == "softmax":
        fam, params, batch, *_ = clip_reference
    else:
        fam = zoo.build(clip_config(loss=loss))
        params, batch = init_family(fam), clip_reference[2]
    emb, img, txt, (value, metrics, updates) = jax.jit(functools.partial(_outputs, fam))(params, batch)
    assert emb["img"].shape == emb["txt"].shape == (16, 32)
    np.testing.assert_allclose(jnp.linalg.norm(emb["img"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(emb["txt"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(img, emb["img"], atol=1e-6)
    np.testing.assert_allclose(txt, emb["txt"], atol=1e-6)
    assert np.isfinite(value) and updates == {}
    assert {"loss", "logit_scale", "i2t_acc", "t2i_acc"} <= set(metrics)
    t0 = np.log(1 / 0.07) if loss == "softmax" else np.log(10.0)
    np.testing.assert_allclose(params["t"], t0, rtol=1e-6)
    assert ("b" in params) == (loss == "sigmoid")
    if loss == "sigmoid":
        np.testing.assert_allclose(params["b"], -10.0)


def _assert_tree_close(got, want, rtol=1e-4):
    # Summation order differs across devices; tiny entries get an absolute
    # tolerance relative to the largest entry of their leaf.
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.max(np.abs(w)))), got, want
    )


def test_clip_objective_jit_on_mesh(clip_reference):
    """Batch sharded over 8 devices on 'data', params replicated: same loss/grads."""
    fam, params, batch, want, want_g = clip_reference
    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    repl = jax.device_put(params, NamedSharding(mesh, P()))
    got, got_g = jax.jit(functools.partial(_loss_and_grads, fam))(repl, sharded)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _assert_tree_close(got_g, want_g)


def test_clip_objective_pmap_all_gather(clip_reference):
    """pmap with an explicit all_gather; pmean of loss and grads = global values."""
    fam, params, batch, want, want_g = clip_reference
    gather = lambda x: jax.lax.all_gather(x, "data", tiled=True)

    def step(p, b):
        loss, g = _loss_and_grads(fam, p, b, gather)
        return jax.lax.pmean(loss, "data"), jax.lax.pmean(g, "data")

    split = jax.tree.map(lambda x: x.reshape((N_DEV, -1) + x.shape[1:]), batch)
    rep = jax.tree.map(lambda x: jnp.broadcast_to(x, (N_DEV,) + x.shape), params)
    got, got_g = jax.pmap(step, axis_name="data")(rep, split)
    np.testing.assert_allclose(got, np.full(N_DEV, want), rtol=1e-5)
    _assert_tree_close(jax.tree.map(lambda x: x[0], got_g), want_g)


# bf16 compute vs fp32 on the same params and batch: the relative loss
# difference measured on this model is ~1e-3; 2e-2 leaves room for bf16's
# 8-bit mantissa (the loss itself is computed in float32).
BF16_RTOL = 2e-2


def test_clip_bf16_compute(clip_reference):
    _, params, batch, l32, _ = clip_reference
    fam16 = zoo.build(clip_config(dtype="bfloat16"))
    shapes = jax.eval_shape(functools.partial(fam16.init_params, image_shape=(2, 32, 32, 3), text_shape=(2, 16)), KEY)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    l16, g16 = jax.jit(functools.partial(_loss_and_grads, fam16))(params, batch)
    assert np.isfinite(l16)
    assert all(bool(jnp.all(jnp.isfinite(g))) and g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    np.testing.assert_allclose(l16, l32, rtol=BF16_RTOL)
