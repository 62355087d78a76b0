"""CoCa (issue 7, in progress): the one training forward against a contrastive-only
pass over the unimodal layers, captioning through the cached decoder, and a run."""

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import bench
from mmjax import config as config_lib
from mmjax.models.decoder import TextDecoder
from mmjax.objectives import itc_loss
from mmjax.train import loop
from tiny import ROOT, tiny_overrides

TINY = [
    "data.image_size=16",
    "data.text_len=12",
    "data.tokenizer.vocab_size=50",
    "model.image_overrides={'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}",
    "model.text_overrides={'width': 32, 'depth': 4, 'heads': 2, 'mlp_dim': 64}",
    "model.cap_queries=4",
]


def _family():
    cfg = config_lib.load(f"{ROOT}/configs/coca.py", TINY)
    fam, *_ = bench._prepare(cfg)
    params = fam.init_params(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(cfg, fam, 6).items()}
    return fam, params, batch


def test_one_forward_gives_the_contrastive_only_itc():
    """The text embedding equals a separate 2-layer text-only decoder run on the
    unimodal params with [CLS] appended; the ITC loss of the combined forward equals
    that contrastive-only pass; ITC gets no gradient from the multimodal layers."""
    fam, params, batch = _family()
    loss, metrics, _ = fam.objective(params, batch)
    m = fam.model
    d = params["decoder"]
    uni = TextDecoder(m.vocab_size, m.text_len, 32, 2, 2, 64, cross_from=2)
    uni_params = {
        "embed": d["embed"],
        "block00": d["block00"],
        "block01": d["block01"],
        "ln_final": d["ln_final"],
        "bias": d["bias"],
    }
    ids = batch["text"]
    b, length = ids.shape

    def text_emb(ids):
        x = uni.apply({"params": uni_params}, ids, method=uni.embed_tokens)
        x = jnp.concatenate([x, jnp.broadcast_to(params["text_cls"][None, None], (b, 1, 32))], axis=1)
        ids_c = jnp.concatenate([ids, jnp.full((b, 1), 5, ids.dtype)], axis=1)
        mask = uni.apply({"params": uni_params}, ids_c, method=uni.self_mask)
        y = uni.apply({"params": uni_params}, x, mask, method=uni.run_blocks)
        mu, var = jnp.mean(y[:, -1], -1, keepdims=True), jnp.var(y[:, -1], -1, keepdims=True)
        h = (y[:, -1] - mu) / jnp.sqrt(var + 1e-6) * params["ln_cls"]["scale"][None] + params["ln_cls"]["bias"][None]
        e = h @ params["text_proj"]["kernel"]
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    txt = text_emb(ids)
    np.testing.assert_allclose(np.asarray(fam.encode_text(params, ids)), np.asarray(txt), rtol=1e-4, atol=1e-5)
    img = fam.encode_image(params, batch["image"])
    ref, _ = itc_loss(img, txt, params["t"], max_scale=fam.max_logit_scale)
    np.testing.assert_allclose(float(metrics["loss_itc"]), float(ref), rtol=1e-5)
    np.testing.assert_allclose(
        float(loss), fam.con_weight * float(ref) + fam.cap_weight * float(metrics["loss_lm"]), rtol=1e-5
    )
    g = jax.grad(lambda p: fam.objective(p, batch)[1]["loss_itc"])(params)
    for name in ("block02", "block03"):
        assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["decoder"][name]))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["cap_pool"]))
    assert float(jnp.abs(g["decoder"]["block00"]["attn"]["qkv"]["kernel"]).max()) > 0


def test_captioning_decoder_is_the_training_forward():
    """The cached captioning decoder (no [CLS]) computes the training forward's caption
    logits; greedy captions follow them."""
    fam, params, batch = _family()
    _, _, logits = fam._apply(params, fam.model.__call__, batch["image"], batch["text"])
    _, memory = fam._apply(params, fam.model.image_features, batch["image"])
    plain = fam.decoder.apply({"params": params["decoder"]}, batch["text"], memory)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(logits), rtol=1e-4, atol=1e-5)
    caps = np.asarray(fam.caption(params, batch["image"], max_len=8))
    assert caps.shape == (6, 8) and (caps[:, 0] == 2).all()
    full = np.asarray(fam.decoder.apply({"params": params["decoder"]}, jnp.asarray(caps), memory))
    for r in range(6):
        for i in range(7):
            if caps[r, i] in (0, 3) and i > 0:
                break
            lg = full[r, i].copy()
            lg[0] = -np.inf
            assert caps[r, i + 1] == int(np.argmax(lg))
    beams = fam.caption(params, batch["image"], max_len=8, beams=3)
    assert beams.shape == (6, 8)


def test_coca_trains_evaluates_and_captions_files(tmp_path, capsys):
    over = {k: v for k, v in tiny_overrides(tmp_path).items() if not k.startswith("model.")}
    over.update({"train.steps": 12, "train.log_every": 4, "train.ckpt_every": 0})
    cfg = config_lib.load(f"{ROOT}/configs/coca.py", [f"{k}={v}" for k, v in over.items()] + TINY[3:])
    result = loop.train(cfg, str(tmp_path / "coca"), progress=False)
    assert "i2t_r@1" in result and result["num_images"] == 64
    assert 0 <= result["caption_exact"] <= 1 and result["num_captions_scored"] == 64
    assert result["caption_cider"] >= 0 and 0 <= result["caption_bleu4"] <= 1
    import json

    rows = [json.loads(x) for x in open(tmp_path / "coca" / "metrics.jsonl") if '"train"' in x]
    assert rows[-1]["loss_lm"] < rows[0]["loss_lm"]
    # `mmjax caption` on image files: one line per readable file, in order; the
    # unreadable one is skipped. Greedy captions equal the family's own decoding.
    from PIL import Image

    from mmjax import cli
    from mmjax.data import shapes_gen

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(shapes_gen.example(0, "test", i, 16)["image"]).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    capsys.readouterr()  # drop the training output
    assert (
        cli.main(
            ["caption", "--workdir", str(tmp_path / "coca"), "--images", paths[0], str(tmp_path / "bad.png"), paths[1]]
        )
        == 0
    )
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if "\t" in ln]
    assert [ln.split("\t")[0] for ln in lines] == paths
    assert cli.main(["caption", "--workdir", str(tmp_path / "coca"), "--images", paths[0], "--beams", "3"]) == 0
    assert [ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines() if "\t" in ln] == paths[:1]


def test_caption_metrics_against_hand_counts():
    from mmjax.eval.retrieval import caption_metrics

    refs = ["a small red circle left of a large blue square", "a large green cross above a small white circle"]
    same = caption_metrics(refs, refs)
    assert same["caption_exact"] == 1.0 and same["caption_bleu4"] > 0.99
    one_off = caption_metrics([refs[0], "a large green cross below a small white circle"], refs)
    assert one_off["caption_exact"] == 0.5 and one_off["caption_cider"] < same["caption_cider"]
    # Corpus BLEU-4 by hand: clipped 1-4-gram matches over both captions (10+8 of 19,
    # 9+6 of 17, 8+4 of 15, 7+2 of 13; "below" breaks 1, 2, 3 and 4 n-grams of the
    # second), brevity penalty 1, geometric mean.
    want = (18 / 19 * 15 / 17 * 12 / 15 * 9 / 13) ** 0.25
    assert abs(one_off["caption_bleu4"] - want) < 1e-6


def test_coca_base_size():
    """CoCa-Base as configured: ViT-B/16 + a 24-layer 768-wide decoder (12 unimodal) with
    tied 64k embeddings and 256 captioning queries. The paper's 383M counts an untied
    output projection (64,000 x 768 = 49M)."""
    cfg = config_lib.load(f"{ROOT}/configs/coca_base.py", [])
    fam, *_ = bench._prepare(cfg)
    shapes = jax.eval_shape(lambda: fam.init_params(jax.random.PRNGKey(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == 339_698_945
