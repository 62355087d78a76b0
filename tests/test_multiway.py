"""Multiway (VLMo / BEiT-3) encoder, fusion text encoder (ALBEF / BLIP), MLM/ITM heads."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from mmjax.models import (
    BertTextEncoder,
    Encoder,
    ItmHead,
    MlmHead,
    MultiwayBlock,
    MultiwayEncoder,
    WordEmbed,
    padding_mask,
)
from mmjax.models.multiway import normalize_spans

KEY = jax.random.key(0)
WIDTH, HEADS, MLP = 32, 2, 64
B, N, LT = 2, 5, 6  # batch, image tokens, text tokens
IMG = (("image", N),)
TXT = (("text", LT),)
JOINT = (("image", N), ("text", LT))
LAYOUTS = ("vlmo", "beit3")
# XLA:CPU compile time dominates these tests (tiny shapes): compile for speed of
# compiling (about 2x faster), not of running.
jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False,
    },
)


def flat(tree):
    """{'block00/ffn_image/fc1/kernel': leaf, ...} (the 'params' level dropped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(tree["params"])):
        out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def grad_abs(grads, pattern):
    """Sum of |grad| over params whose path contains `pattern` (asserts some do)."""
    leaves = [v for k, v in flat(grads).items() if pattern in k]
    assert leaves, pattern
    return float(sum(np.abs(np.asarray(v)).sum() for v in leaves))


def normal(seed, shape):
    """numpy draws (eager jax.random would compile a program per shape)."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def tokens(seed, length):
    return jnp.asarray(normal(seed, (B, length, WIDTH)))


def weighted(y, seed=7):
    """A random projection of the outputs (a plain sum is ~constant after a LayerNorm)."""
    return (y @ normal(seed, (y.shape[-1],))).sum()


def make_encoder(layout, depth=2, vl_from=None):
    return MultiwayEncoder(depth, HEADS, WIDTH * 2, layout=layout, vl_from=vl_from)


# ---- multiway: routing ----------------------------------------------------


def test_spans_validated():
    assert normalize_spans([["image", 3], ("text", 2)], 5, ("image", "text")) == (("image", 3), ("text", 2))
    for spans, match in [
        ((("audio", 5),), "no expert"),
        ((("image", 4),), "cover 4"),
        ((("image", 0), ("text", 5)), "positive"),
        ((), "empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            normalize_spans(spans, 5, ("image", "text"))
    with pytest.raises(ValueError, match="VL expert"):
        MultiwayBlock(HEADS, MLP, layout="beit3", vl_expert=True).init(
            KEY, jnp.zeros((1, 2, WIDTH)), None, (("text", 2),)
        )


def test_remat_and_bfloat16_trace():
    """remat (spans static) and bf16 compute trace for both towers (shapes only)."""
    x = jnp.ones((B, N + LT, WIDTH))
    for layout, vl_from in (("vlmo", 1), ("beit3", None)):
        enc = MultiwayEncoder(2, HEADS, MLP, layout=layout, vl_from=vl_from, remat=True, dtype=jnp.bfloat16)
        params = jax.eval_shape(lambda k: enc.init(k, x, None, JOINT), KEY)
        loss = lambda p: enc.apply(p, x, None, JOINT)[0].astype(jnp.float32).sum()
        grads = jax.eval_shape(jax.grad(loss), params)
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
        assert jax.eval_shape(lambda p: enc.apply(p, x, None, JOINT)[0], params).dtype == (jnp.bfloat16)
    with pytest.raises(ValueError, match="no VL expert"):
        MultiwayEncoder(2, HEADS, MLP, layout="beit3", vl_from=1).init(KEY, x, None, JOINT)
    bert_enc = BertTextEncoder(50, 8, WIDTH, 2, HEADS, MLP, fusion_from=1, causal=True, remat=True, dtype=jnp.bfloat16)
    ids, img = jnp.ones((B, 8), jnp.int32), jnp.ones((B, N, 24))
    fused, _ = jax.eval_shape(bert_enc.init_with_output, KEY, ids, img)[0]
    assert fused.shape == (B, 8, WIDTH) and fused.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="fusion_from"):
        BertTextEncoder(50, 8, WIDTH, 2, HEADS, MLP, fusion_from=3).init(KEY, ids, img)


def restrict(params, modality, layout, depth):
    """Maps a multiway encoder's params for one modality onto `transformer.Encoder`."""
    p = params["params"]
    out = {}
    for i in range(depth):
        b = p[f"block{i:02d}"]
        if layout == "vlmo":
            blk = dict(ln1=b["ln1"], attn=b["attn"])
        else:
            blk = dict(
                ln1=b[f"ln1_{modality}"], attn=dict(qkv=b["attn"][f"qkv_{modality}"], out=b["attn"][f"out_{modality}"])
            )
        blk.update(ln2=b[f"ln2_{modality}"], mlp=b[f"ffn_{modality}"])
        out[f"block{i:02d}"] = blk
    out["ln_final"] = p[f"ln_final_{modality}"]
    return {"params": out}


DEPTH = 2


@pytest.fixture(scope="module", params=LAYOUTS)
def mw(request):
    """Everything the multiway tests check, for one layout, in ONE compiled program.

    (CPU compile time dominates: init, grads and the reference passes share it.)
    """
    layout = request.param
    enc = make_encoder(layout, depth=DEPTH)
    ref = Encoder(DEPTH, HEADS, WIDTH * 2)
    img, txt = tokens(0, N), tokens(1, LT)
    x = jnp.concatenate([img, txt], axis=1)
    modality = np.array([0] * N + [1] * LT)
    diag_mask = jnp.asarray(modality[:, None] == modality[None, :])[None, None]
    # Text padding: row 1 has 3 valid tokens; ids2 differs from ids only in pad slots.
    rng = np.random.default_rng(0)
    table = jnp.asarray(normal(3, (50, WIDTH)))
    ids = rng.integers(1, 50, (B, LT))
    ids[1, 3:] = 0
    valid = ids != 0
    ids2 = np.where(valid, ids, rng.integers(1, 50, (B, LT)))
    txt_mask = padding_mask(jnp.asarray(valid))
    joint_mask = padding_mask(jnp.concatenate([jnp.ones((B, N), bool), valid], axis=1))

    # Cotangents of (full-attention out, block-diagonal out) for 4 scores: text
    # outputs, image outputs (full), text outputs, image outputs (block-diagonal).
    w = normal(7, (WIDTH,))
    cot = np.zeros((4, 2, B, N + LT, WIDTH), np.float32)
    cot[0, 0, :, N:], cot[1, 0, :, :N], cot[2, 1, :, N:], cot[3, 1, :, :N] = w, w, w, w

    @jit
    def everything(key):
        params = nn.unbox(enc.init(key, x, None, JOINT))
        run = functools.partial(enc.apply, params)
        fwd = lambda p: tuple(enc.apply(p, x, m, JOINT)[0] for m in (None, diag_mask))
        (_, joint_diag), vjp = jax.vjp(fwd, params)
        g = jax.vmap(lambda c: vjp((c[0], c[1]))[0])(cot)  # leaves [4, ...]
        names = ("g_full_txt", "g_full_img", "g_diag_txt", "g_diag_img")
        out = {k: jax.tree.map(lambda a, i=i: a[i], g) for i, k in enumerate(names)}
        pads = run(
            jnp.concatenate([jnp.concatenate([img, img]), table[np.concatenate([ids, ids2])]], 1),
            jnp.concatenate([joint_mask, joint_mask]),
            JOINT,
        )[0]
        return dict(
            out,
            params=params,
            joint_diag=joint_diag,
            img=run(img, None, IMG)[0],
            txt=run(txt, None, TXT)[0],
            txt_padded=run(txt, txt_mask, TXT)[0],
            ref_img=ref.apply(restrict(params, "image", layout, DEPTH), img)[0],
            ref_txt=ref.apply(restrict(params, "text", layout, DEPTH), txt, txt_mask)[0],
            ref_txt_on_img=ref.apply(restrict(params, "text", layout, DEPTH), img)[0],
            pad1=pads[:B],
            pad2=pads[B:],
        )

    out = jax.tree.map(np.asarray, everything(KEY))
    out.update(layout=layout, enc=enc, ref=ref, img_in=img, valid=valid)
    return out


def test_block_routing_with_joint_attention(mw):
    """[image ; text] with full attention: a token's own FFN expert only.

    Text queries attend image keys/values, so text outputs depend on lower
    layers' image experts and (beit3) on `attn/qkv_image`; but in the top block
    they never depend on the image FFN expert, its LN, the image final norm or
    (beit3) the image output projection -- and vice versa.
    """
    g_txt, g_img = mw["g_full_txt"], mw["g_full_img"]
    own_only = ["block01/ln2_{}", "block01/ffn_{}", "ln_final_{}"]
    if mw["layout"] == "beit3":
        own_only.append("block01/attn/out_{}")
    for pat in own_only:
        assert grad_abs(g_txt, pat.format("image")) == 0.0, pat
        assert grad_abs(g_img, pat.format("text")) == 0.0, pat
        assert grad_abs(g_txt, pat.format("text")) > 0, pat
        assert grad_abs(g_img, pat.format("image")) > 0, pat
    # The cross-modal path is through attention only.
    shared = "block01/attn/" if mw["layout"] == "vlmo" else "block01/attn/qkv_image"
    assert grad_abs(g_txt, shared) > 0 and grad_abs(g_txt, "block00/ffn_image") > 0


def test_encoder_routing_block_diagonal(mw):
    """With attention kept within each modality, a joint pass is two separate passes.

    Then every layer's image-expert params get exactly zero gradient from the
    text outputs and vice versa.
    """
    g_txt, g_img = mw["g_diag_txt"], mw["g_diag_img"]
    assert grad_abs(g_txt, "_image") == 0.0 and grad_abs(g_img, "_text") == 0.0
    for i in range(DEPTH):  # every expert weight of every layer is used by its own tokens
        for g, m in ((g_txt, "text"), (g_img, "image")):
            used = [
                np.any(v != 0)
                for k, v in flat(g).items()
                if k.startswith(f"block{i:02d}/") and f"_{m}" in k and "bias" not in k
            ]
            assert used and all(used), (i, m)
    np.testing.assert_allclose(mw["joint_diag"], np.concatenate([mw["img"], mw["txt"]], axis=1), atol=1e-5)


def test_one_param_set_and_reference_blocks(mw):
    """One param set runs all three inputs; per modality it is a plain pre-LN ViT."""
    enc, ref, img = mw["enc"], mw["ref"], mw["img_in"]
    # An image-only init input already creates every expert (the tree of a joint
    # init, and of init_all).
    image_only = jax.eval_shape(lambda k: nn.unbox(enc.init(k, img, None, IMG)), KEY)
    explicit = jax.eval_shape(lambda k: nn.unbox(enc.init(k, img, img[:, :3], method=MultiwayEncoder.init_all)), KEY)
    for tree in (mw["params"], explicit):
        assert jax.tree.structure(image_only) == jax.tree.structure(tree)
    ref_shapes = jax.eval_shape(lambda k: nn.unbox(ref.init(k, img)), KEY)
    for m in ("image", "text"):
        assert jax.tree.structure(restrict(mw["params"], m, mw["layout"], DEPTH)) == jax.tree.structure(ref_shapes)
    assert mw["joint_diag"].shape == (B, N + LT, WIDTH)
    np.testing.assert_allclose(mw["img"], mw["ref_img"], atol=1e-5)
    np.testing.assert_allclose(mw["txt_padded"], mw["ref_txt"], atol=1e-5)
    # The experts differ (different init), so the two restrictions are not the same net.
    assert not np.allclose(mw["ref_txt_on_img"], mw["img"], atol=1e-3)


def test_multiway_padding(mw):
    """Changing the ids in padded text slots changes no valid output."""
    keep = np.concatenate([np.ones((B, N), bool), mw["valid"]], axis=1)
    y1, y2 = mw["pad1"], mw["pad2"]
    np.testing.assert_allclose(y1[keep], y2[keep], atol=1e-6)
    assert not np.allclose(y1[~keep], y2[~keep], atol=1e-3)  # the change did happen


def test_vl_expert_routing():
    """Layers >= vl_from send all tokens of an image-text pass through ffn_vl."""
    enc = make_encoder("vlmo", depth=2, vl_from=1)
    img, txt = tokens(0, N), tokens(1, LT)
    x = jnp.concatenate([img, txt], axis=1)

    @jit
    def everything(key):
        params = nn.unbox(enc.init(key, img, txt, method=MultiwayEncoder.init_all))
        g_joint = jax.grad(lambda p: weighted(enc.apply(p, x, None, JOINT)[0]))(params)
        g_img = jax.grad(lambda p: weighted(enc.apply(p, img, None, IMG)[0]))(params)
        return params, g_joint, g_img

    params, g_joint, g_img = everything(KEY)
    names = set(flat(params))
    assert not any(k.startswith("block00/") and "_vl" in k for k in names)
    assert {"block01/ffn_vl/fc1/kernel", "ln_final_vl/scale"} <= names
    for pat in ("block01/ln2_vl", "block01/ffn_vl", "ln_final_vl", "block00/ffn_image", "block00/ffn_text"):
        assert grad_abs(g_joint, pat) > 0, pat
    for pat in (
        "block01/ln2_image",
        "block01/ffn_image",
        "block01/ln2_text",
        "block01/ffn_text",
        "ln_final_image",
        "ln_final_text",
    ):
        assert grad_abs(g_joint, pat) == 0.0, pat
    # Single-modality passes keep their own expert in the top layers.
    assert grad_abs(g_img, "block01/ffn_image") > 0
    for pat in ("_vl", "_text"):
        assert grad_abs(g_img, pat) == 0.0, pat


# ---- fusion text encoder -----------------------------------------------------

VOCAB, TLEN, DI = 50, 8, 24  # image width differs from the text width


def bert(fusion_from=1, causal=False, depth=2):
    return BertTextEncoder(VOCAB, TLEN, WIDTH, depth, HEADS, MLP, fusion_from=fusion_from, causal=causal)


def text_ids(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (B, TLEN)).astype(np.int32)
    ids[1, 5:] = 0
    return jnp.asarray(ids)


def image_feats(seed):
    return jnp.asarray(normal(seed, (B, N, DI)))


@pytest.fixture(scope="module")
def bert_out():
    """The BertTextEncoder checks' values, from one compiled program."""
    enc = bert()
    ids, img, img2 = text_ids(), image_feats(1), image_feats(2)
    image_valid = jnp.asarray(np.arange(N)[None, :] < np.array([[N], [2]]))
    noise = 10 * image_feats(5) * ~image_valid[..., None]

    @jit
    def everything(key):
        params = nn.unbox(enc.init(key, ids, img))
        run_valid = lambda p, im: enc.apply(p, ids, im, image_valid)[0]
        # params2: the pad token's embedding row moved.
        params2 = jax.tree.map(lambda a: a, params)
        table = params["params"]["embed"]["token"]["embedding"]
        params2["params"]["embed"]["token"]["embedding"] = table.at[0].add(
            jax.random.normal(jax.random.key(6), (WIDTH,))
        )
        return dict(
            params=params,
            call1=enc.apply(params, ids, img),
            call2=enc.apply(params, ids, img2),
            text=enc.apply(params, ids, method=BertTextEncoder.encode_text),
            valid1=run_valid(params, img),
            valid2=run_valid(params, img + noise),
            g_img=jax.grad(lambda im: weighted(run_valid(params, im)))(img),
            pad_moved=run_valid(params2, img),
        )

    out = jax.tree.map(np.asarray, everything(KEY))
    out["valid"] = np.asarray(ids != 0)
    return out


def test_bert_text_part_ignores_image(bert_out):
    names = set(flat(bert_out["params"]))
    assert "fusion_blocks_0/cross_attn/key/kernel" in names
    assert flat(bert_out["params"])["fusion_blocks_0/cross_attn/key/kernel"].shape == (DI, HEADS, WIDTH // HEADS)
    assert {k.split("/")[0] for k in names} == {"embed", "text_blocks_0", "fusion_blocks_0", "ln_text", "ln_fused"}
    assert not any(k.startswith("text_blocks_0/cross") for k in names)
    (f1, a1), (f2, a2) = bert_out["call1"], bert_out["call2"]
    cls, text_aux = bert_out["text"]
    np.testing.assert_array_equal(a1["text"]["tokens"], a2["text"]["tokens"])
    np.testing.assert_allclose(a1["text"]["tokens"], text_aux["tokens"], atol=1e-6)
    np.testing.assert_allclose(cls, text_aux["normed"][:, 0], atol=1e-6)
    assert cls.shape == (B, WIDTH) and f1.shape == (B, TLEN, WIDTH)
    valid = bert_out["valid"]
    assert np.abs(f1 - f2)[valid].min() > 1e-4  # the fused output depends on the image
    np.testing.assert_allclose(a1["cls"], f1[:, 0])


def test_bert_image_valid(bert_out):
    """Masked-out image tokens have no effect on the fused output."""
    np.testing.assert_allclose(bert_out["valid1"], bert_out["valid2"], atol=1e-5)
    g = bert_out["g_img"]
    assert np.abs(g[1, 2:]).sum() == 0.0 and np.abs(g[1, :2]).sum() > 0
    assert np.abs(g[0]).sum(-1).min() > 0


def test_bert_padding(bert_out):
    """The pad token's embedding row reaches no valid position."""
    valid, y1, y2 = bert_out["valid"], bert_out["valid1"], bert_out["pad_moved"]
    np.testing.assert_allclose(y1[valid], y2[valid], atol=1e-5)
    assert not np.allclose(y1[~valid], y2[~valid], atol=1e-3)


def test_bert_text_mode_through_fusion_blocks():
    """BLIP text mode = the image-grounded encoder with zero cross-attention output."""
    enc = bert(fusion_from=0, depth=2)
    ids, img = text_ids(), image_feats(1)

    @jit
    def everything(key):
        params = nn.unbox(enc.init(key, ids, img))
        for i in range(2):
            out = params["params"][f"fusion_blocks_{i}"]["cross_attn"]["out"]
            out["kernel"], out["bias"] = jnp.zeros_like(out["kernel"]), jnp.zeros_like(out["bias"])
        text = enc.apply(params, ids, True, method=BertTextEncoder.encode_text)[1]
        plain = enc.apply(params, ids, method=BertTextEncoder.encode_text)[1]
        return text["tokens"], enc.apply(params, ids, img)[1]["tokens"], plain["tokens"]

    text_tokens, fused_tokens, plain_tokens = everything(KEY)
    np.testing.assert_allclose(text_tokens, fused_tokens, atol=1e-5)
    assert not np.allclose(text_tokens, plain_tokens, atol=1e-3)  # blocks did run


@pytest.mark.parametrize("depth,fusion_from,causal", [(2, 1, True), (1, 0, True), (1, 0, False)])
def test_bert_causal_by_gradient(depth, fusion_from, causal):
    """causal=True: output i does not depend on inputs > i (text and fusion blocks)."""
    enc = bert(fusion_from=fusion_from, causal=causal, depth=depth)
    ids = jnp.asarray(np.random.default_rng(2).integers(3, VOCAB, (1, TLEN)), jnp.int32)
    img = image_feats(1)[:1]
    w = normal(1, (WIDTH,))

    def fwd(m, x):
        return m.fuse(m.encode_embedded(x, ids)[1]["tokens"], ids, img)[0]

    @jit
    def jacobian(key):
        params = nn.unbox(enc.init(key, ids, img))
        x = enc.apply(params, ids, method=lambda m, i: m.embed(i))
        f = lambda x: enc.apply(params, x, method=fwd)[0] @ w  # [L]
        return jax.jacrev(f)(x)  # [L_out, 1, L_in, D]

    jac = np.abs(np.asarray(jacobian(KEY))[:, 0]).sum(-1)  # [L_out, L_in]
    upper = jac[np.triu_indices(TLEN, k=1)]
    if causal:
        assert np.all(upper == 0.0)
    else:
        assert np.all(upper > 0)
    assert np.all(np.diag(jac) > 0)


# ---- heads --------------------------------------------------------------


class _TiedMlm(nn.Module):
    def setup(self):
        self.embed = WordEmbed(VOCAB, WIDTH, TLEN)
        self.head = MlmHead(VOCAB)

    def __call__(self, x):
        return self.head(x, self.embed.attend)


def test_mlm_head_tied_and_itm_head():
    x = tokens(0, 4)
    mlm = _TiedMlm()

    @jit
    def everything(key):
        params = nn.unbox(mlm.init(key, x))
        p = params["params"]
        p["head"]["bias"] = jax.random.normal(jax.random.key(4), (VOCAB,))
        logits = mlm.apply(params, x)
        params2 = jax.tree.map(lambda a: a, params)
        table = p["embed"]["token"]["embedding"]
        params2["params"]["embed"]["token"]["embedding"] = table * 2 + jax.random.normal(key, table.shape)
        return params, logits, params2, mlm.apply(params2, x)

    params, logits, params2, logits2 = everything(KEY)

    def by_hand(params):  # numpy float64
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
        hp = p["head"]
        h = np.asarray(x, np.float64) @ hp["dense"]["kernel"] + hp["dense"]["bias"]
        h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))  # exact gelu
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        h = (h - mu) / np.sqrt(var + 1e-6) * hp["ln"]["scale"] + hp["ln"]["bias"]
        return h @ p["embed"]["token"]["embedding"].T + hp["bias"]

    head = params["params"]["head"]
    assert set(head) == {"dense", "ln", "bias"} and head["bias"].shape == (VOCAB,)
    assert logits.shape == (B, 4, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, by_hand(params), atol=1e-4)
    np.testing.assert_allclose(logits2, by_hand(params2), atol=1e-4)
    assert not np.allclose(logits2, logits, atol=1e-2)
    itm = ItmHead()
    out, _ = jax.eval_shape(itm.init_with_output, KEY, jnp.zeros((B, WIDTH)))
    assert out.shape == (B, 2) and out.dtype == jnp.float32
