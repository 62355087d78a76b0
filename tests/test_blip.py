"""BLIP: encoder and decoder share every param but their self-attention (structurally:
one array per shared layer), the decoder mode is causal and its cached decoding is
the uncached one, the objective's parts equal independent references, and a tiny
run trains, evaluates (ITC, ITM re-ranked, captions) and captions files."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.models import zoo
from mmjax.models.decoder import greedy_decode
from mmjax.objectives import itc_distill_loss, itm_loss, lm_loss, sample_hard_negatives
from mmjax.train import loop
from tiny import ROOT, tiny_overrides

D, DI, F, V, L, E, DEPTH = 32, 64, 64, 50, 12, 16, 2  # text width, image width (mu/4), mlp, vocab, length, embed


def _family(**model):
    cfg = ml_collections.ConfigDict(
        dict(
            family="blip",
            image="mu/4",
            text="mu",
            image_overrides={},
            text_overrides=dict(width=D, depth=DEPTH, heads=2, mlp_dim=F),
            embed_dim=E,
            vocab_size=V,
            image_size=16,
            text_len=L,
            queue_size=24,
            alpha_ramp_steps=0,
        )
    )
    cfg.update(model)
    return zoo.build(cfg)


def _batch(b=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, L + 1, size=b)
    text = np.where(np.arange(L)[None] < lengths[:, None], rng.integers(6, V, size=(b, L)), 0)
    text[:, 0] = 2
    text[np.arange(b), lengths - 1] = 3
    return {
        "image": jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
        "text": jnp.asarray(text, jnp.int32),
        "id": jnp.arange(b, dtype=jnp.int32),
    }


@pytest.fixture(scope="module")
def blip():
    fam = _family()
    params = jax.jit(lambda r: fam.init_params(r))(jax.random.PRNGKey(0))
    m = fam.model
    itm = jax.jit(lambda p, x, t: fam._apply(p, m.itm_logits, fam._apply(p, m.image_features, x)[1], t))
    lm = jax.jit(lambda p, x, t: fam._apply(p, m.lm_logits, fam._apply(p, m.image_features, x)[1], t))
    txt = jax.jit(fam.encode_text)
    return fam, params, _batch(), itm, lm, txt


def _perturb(params, path, scale=0.5):
    """A copy of params with the leaf at 'a/b/c' moved by `scale` (seeded noise)."""
    keys = path.split("/")

    def go(tree, i):
        if i == len(keys):
            return tree + scale * jax.random.normal(jax.random.PRNGKey(1), tree.shape, tree.dtype)
        return {**tree, keys[i]: go(tree[keys[i]], i + 1)}

    return go(params, 0)


def _changed(a, b):
    return float(jnp.abs(a - b).max()) > 1e-5


def test_param_tree_has_one_copy_of_the_shared_layers():
    """Every block holds exactly the encoder's and the decoder's self-attention and one
    cross-attention and MLP; the count equals the formula with one copy of each shared
    layer; every param carries logical axis names."""
    fam = _family()
    boxed = jax.eval_shape(lambda r: fam.init_params(r, boxed=True), jax.random.PRNGKey(0))
    from mmjax.parallel import sharding

    assert sharding.unnamed_params(boxed) == []
    params = jax.eval_shape(fam.init_params, jax.random.PRNGKey(0))
    text = params["text_tower"]
    assert sorted(text) == ["bias", "block00", "block01", "embed", "enc_token", "ln_final"]
    for i in range(DEPTH):
        assert sorted(text[f"block{i:02d}"]) == [
            "attn",
            "attn_dec",
            "cross_attn",
            "ln1",
            "ln1_dec",
            "ln2",
            "ln_cross",
            "mlp",
        ]
    n = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    self_attn = 4 * D * D + 4 * D  # fused qkv + out, with biases
    cross_attn = 2 * D * D + 2 * DI * D + 4 * D  # query and out from D, key and value from the image width
    mlp, ln = 2 * D * F + F + D, 2 * D
    block = 2 * (self_attn + ln) + cross_attn + ln + mlp + ln  # encoder + decoder self-attn, shared rest
    text_count = V * D + L * D + D + DEPTH * block + ln + V  # embeddings, enc_token, blocks, ln_final, bias
    heads = (DI * E + E) + (D * E + E) + (D * 2 + 2) + 1  # image_proj, text_proj, itm_head, temp
    assert n(text) == text_count
    assert n(params) == n(params["image_tower"]) + text_count + heads


def test_encoder_and_decoder_read_the_same_arrays(blip):
    """A shared leaf moves both the ITM and the LM logits; a decoder self-attention
    leaf moves the LM logits only (not ITM, not ITC); an encoder one the reverse. The
    ITM loss has exactly zero gradient on attn_dec, the LM loss on attn, and both reach
    the shared cross-attention and MLP."""
    fam, params, batch, itm, lm, txt = blip
    x, t = batch["image"], batch["text"]
    itm0, lm0, txt0 = itm(params, x, t), lm(params, x, t), txt(params, t)
    for leaf in ("cross_attn/query/kernel", "mlp/fc1/kernel", "ln_cross/scale", "ln2/bias"):
        p = _perturb(params, f"text_tower/block01/{leaf}")
        assert _changed(itm(p, x, t), itm0) and _changed(lm(p, x, t), lm0), leaf
    for leaf in ("attn_dec/qkv/kernel", "ln1_dec/scale"):
        p = _perturb(params, f"text_tower/block00/{leaf}")
        assert _changed(lm(p, x, t), lm0), leaf
        np.testing.assert_array_equal(itm(p, x, t), itm0)
        np.testing.assert_array_equal(txt(p, t), txt0)
    p = _perturb(params, "text_tower/block00/attn/qkv/kernel")
    assert _changed(itm(p, x, t), itm0) and _changed(txt(p, t), txt0)
    np.testing.assert_array_equal(lm(p, x, t), lm0)

    extra = fam.init_extra(params)
    grad = jax.jit(
        jax.grad(
            lambda p, key: fam.objective(
                p, batch, jax.random.PRNGKey(3), teacher=extra["ema_params"], queues=extra["queues"]
            )[1][key]
        ),
        static_argnums=1,
    )
    g_itm, g_lm = grad(params, "loss_itm"), grad(params, "loss_lm")
    for i in range(DEPTH):
        gi, gl = g_itm["text_tower"][f"block{i:02d}"], g_lm["text_tower"][f"block{i:02d}"]
        for name in ("attn_dec", "ln1_dec"):
            assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(gi[name])), name
        for name in ("attn", "ln1"):
            assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(gl[name])), name
        for name in ("cross_attn", "mlp", "attn"):
            assert float(jnp.abs(gi[name]["out" if "attn" in name else "fc1"]["kernel"]).max()) > 0, name
        for name in ("cross_attn", "mlp", "attn_dec"):
            assert float(jnp.abs(gl[name]["out" if "attn" in name else "fc1"]["kernel"]).max()) > 0, name
    assert float(jnp.abs(g_lm["text_tower"]["enc_token"]).max()) == 0
    assert float(jnp.abs(g_itm["text_tower"]["enc_token"]).max()) > 0


def test_decoder_is_causal_and_cached_decoding_is_uncached(blip):
    """LM logits at i ignore tokens after i (the grounded encoder's [Encode] output
    does not); the standalone decoder on params['text_tower'] is the training LM
    forward; cached greedy captions equal uncached ones token for token."""
    fam, params, batch, itm, lm, txt = blip
    x, t = batch["image"], batch["text"]
    i = 4
    t2 = t.at[:, i + 1 :].set(jnp.where(t[:, i + 1 :] > 0, (t[:, i + 1 :] + 7) % (V - 6) + 6, 0))
    a, b = lm(params, x, t), lm(params, x, t2)
    np.testing.assert_allclose(a[:, : i + 1], b[:, : i + 1], rtol=1e-5, atol=1e-5)
    assert _changed(a[:, i + 1 :], b[:, i + 1 :])
    assert _changed(itm(params, x, t), itm(params, x, t2))
    # The first token is replaced: <cls> for ITC, the learned [Encode] for ITM.
    t0 = t.at[:, 0].set(17)
    np.testing.assert_array_equal(txt(params, t0), txt(params, t))
    np.testing.assert_array_equal(itm(params, x, t0), itm(params, x, t))

    _, memory = jax.jit(fam.image_features)(params, x)
    plain = jax.jit(fam.decoder.apply)({"params": params["text_tower"]}, t, memory)
    np.testing.assert_allclose(plain, a, rtol=1e-5, atol=1e-5)
    cached = np.asarray(fam.caption(params, x, max_len=8))
    uncached = np.asarray(
        greedy_decode(fam.decoder, params["text_tower"], memory, max_len=8, bos_id=2, eos_id=3, use_cache=False)
    )
    np.testing.assert_array_equal(cached, uncached)
    assert cached.shape == (6, 8) and (cached[:, 0] == 2).all()


def test_objective_parts_equal_references(blip):
    """ITC = itc_distill_loss on the towers' and teacher's embeddings, ITM = itm_loss on
    the grounded encoder's logits of the same hard negatives, LM = lm_loss (smoothing
    0.1) on the decoder logits; the total is the weighted sum."""
    fam0, params, batch, itm, lm, txt = blip
    fam = _family(itc_weight=0.5, itm_weight=2.0, lm_weight=3.0, alpha_ramp_steps=10)
    teacher = jax.tree.map(lambda p: p + 0.01, params)
    queues = fam.init_extra(params)["queues"]
    step, rng = jnp.asarray(5, jnp.int32), jax.random.PRNGKey(7)
    loss, metrics, updates = jax.jit(lambda p: fam.objective(p, batch, rng, teacher=teacher, queues=queues, step=step))(
        params
    )
    x, t, ids = batch["image"], batch["text"], batch["id"]
    temp = jnp.clip(params["temp"], 0.001, 0.5)
    enc_img = jax.jit(fam.encode_image)
    img, txt_e = enc_img(params, x), txt(params, t)
    t_img, t_txt = enc_img(teacher, x), txt(teacher, t)
    l_itc, _ = itc_distill_loss(img, txt_e, ids, t_img, t_txt, queues, temp, 0.4 * 5 / 10)
    r_i2t, r_t2i = jax.random.split(rng)
    neg_t, _ = sample_hard_negatives(r_i2t, img @ txt_e.T / temp, ids, ids)
    neg_i, _ = sample_hard_negatives(r_t2i, txt_e @ img.T / temp, ids, ids)
    logits = jnp.concatenate([itm(params, x, t), itm(params, x, t[neg_t]), itm(params, x[neg_i], t)])
    l_itm, _ = itm_loss(logits, jnp.asarray([1] * 6 + [0] * 12))
    l_lm, _ = lm_loss(lm(params, x, t), t, label_smoothing=0.1)
    for key, want in (("loss_itc", l_itc), ("loss_itm", l_itm), ("loss_lm", l_lm)):
        np.testing.assert_allclose(metrics[key], want, rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(loss, 0.5 * l_itc + 2.0 * l_itm + 3.0 * l_lm, rtol=1e-4)
    # BLIP's label smoothing is the default (near-uniform logits at init: a small gap).
    assert fam0.label_smoothing == 0.1
    np.testing.assert_allclose(metrics["loss_lm"], l_lm, rtol=1e-5)
    assert abs(float(metrics["loss_lm"]) - float(lm_loss(lm(params, x, t), t)[0])) > 1e-4
    np.testing.assert_allclose(updates["queues"]["txt"][:6], t_txt, rtol=1e-5, atol=1e-6)
    # The evaluator's ITM score is the grounded encoder's log-odds on the token ids.
    _, ids_for_itm = fam.text_features(params, t)
    _, tok = jax.jit(fam.image_features)(params, x)
    want = itm(params, x, t)
    np.testing.assert_allclose(
        jax.jit(fam.itm_scores)(params, tok, ids_for_itm, t), want[:, 1] - want[:, 0], rtol=1e-5, atol=1e-6
    )


def test_config_errors_name_the_key():
    for bad, key in (
        (dict(tasks=("itc", "mlm")), "itc, itm, lm"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(lm_weight=-1.0), "lm_weight"),
        (dict(temp_range=(0.5, 0.1)), "temp_range"),
    ):
        with pytest.raises(ValueError, match=key):
            _family(**bad)


def test_blip_trains_evaluates_and_captions(tmp_path, capsys):
    """A tiny run through the real loop: the losses fall, the eval reports ITC and
    ITM-re-ranked recall and caption metrics, and `mmjax caption` reads the workdir."""
    over = {k: v for k, v in tiny_overrides(tmp_path).items() if not k.startswith("model.")}
    over.update(
        {
            "model.image": "mu/4",
            "model.image_overrides": "{}",
            "model.embed_dim": E,
            "model.text_overrides": f"{{'width': {D}, 'depth': {DEPTH}, 'heads': 2, 'mlp_dim': {F}}}",
            "model.queue_size": 48,
            "model.alpha_ramp_steps": 4,
            "train.steps": 16,
            "train.log_every": 4,
            "train.ckpt_every": 0,
            "eval.rerank_k": 4,
            "train.lr": 3e-3,
        }
    )
    cfg = config_lib.load(f"{ROOT}/configs/blip.py", [f"{k}={v}" for k, v in over.items()])
    result = loop.train(cfg, str(tmp_path / "blip"), progress=False)
    assert result["num_images"] == 64 and 0 <= result["i2t_r@1"] <= 1 and 0 <= result["i2t_itm_r@1"] <= 1
    assert result["rerank_k"] == 4 and "t2i_itm_r@1" in result
    # BLIP's own re-ranking score (ITM + ITC) and the binding probe through the ITM head
    assert 0 <= result["t2i_itm_itc_r@1"] <= 1 and 0 <= result["binding_acc_itm"] <= 1
    assert 0 <= result["caption_exact"] <= 1 and result["num_captions_scored"] == 64 and result["caption_cider"] >= 0
    rows = [json.loads(x) for x in open(tmp_path / "blip" / "metrics.jsonl") if '"train"' in x]
    assert rows[-1]["loss_lm"] < rows[0]["loss_lm"] and rows[-1]["loss"] < rows[0]["loss"]
    assert {"loss_itc", "loss_itm", "itm_acc", "lm_acc", "i2t_acc", "alpha"} <= set(rows[-1])

    from PIL import Image

    from mmjax import cli
    from mmjax.data import shapes_gen

    path = str(tmp_path / "img.png")
    Image.fromarray(shapes_gen.example(0, "test", 0, 16)["image"]).save(path)
    capsys.readouterr()
    assert cli.main(["caption", "--workdir", str(tmp_path / "blip"), "--images", path, "--beams", "2"]) == 0
    assert [ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines() if "\t" in ln] == [path]


# The release (model_base.pth without its momentum encoders) has 252,441,919: 963,074
# more, from its 512-row position table (mmjax: text_len 30 rows, -370,176), its LM
# head's dense + LayerNorm transform (-592,128) and two more vocabulary rows (+ biases)
# instead of the learned [Encode] vector (-770).
BLIP_BASE_PARAMS = 251_478_845


def test_blip_base_size():
    """configs/blip_base.py: ViT-B/16 + a 12-layer, 768-wide text transformer; the
    image-grounded encoder alone (BLIP's ~224M) and with the decoder's self-attention."""
    cfg = config_lib.recipe(f"{ROOT}/configs/blip_base.py")
    with cfg.unlocked():
        cfg.model.vocab_size = cfg.data.tokenizer.vocab_size
        cfg.model.image_size, cfg.model.text_len = cfg.data.image_size, cfg.data.text_len
    params = jax.eval_shape(zoo.build(cfg.model).init_params, jax.random.PRNGKey(0))
    n = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    dec = sum(n(b["attn_dec"]) + n(b["ln1_dec"]) for k, b in params["text_tower"].items() if k.startswith("block"))
    assert n(params) == BLIP_BASE_PARAMS
    assert dec == 12 * (4 * 768 * 768 + 6 * 768)
