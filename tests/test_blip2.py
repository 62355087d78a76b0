"""BLIP-2 (stage 1: ITC max-over-queries, ITM, ITG on a Q-Former over a frozen ViT; stage 2:
the queries as an LM's soft prefix), InstructBLIP and MiniGPT-4 at tiny shapes: the
demo CLIP's 2-block 32-wide tower (16px: 5 image tokens with [CLS]), a 2-block 32-wide
Q-Former with 4 queries, configs/lm.py's LM at 2 layers; batch 8, 4 steps.

The parts (CLIP, LM) come from test_llava's fixtures. Checked: ITC against numpy and under
pmap; the attention patterns through the family; the retrieval score (best query);
frozen parts bit-identical and the rest trained in every recipe; exact resume of stage 1
and stage 2; InstructBLIP's queries reading the instruction; the answer eval's captions.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import test_llava
from test_llava import _assert_changed, _assert_same, _flat, _metrics, _params, _split, _train, run_overrides

from mmjax import workdir as workdir_lib
from mmjax.eval import retrieval
from mmjax.models import zoo
from mmjax.objectives import itc_max_loss
from tiny import ROOT

BLIP2 = os.path.join(ROOT, "configs", "blip2.py")
INSTRUCT = os.path.join(ROOT, "configs", "instructblip.py")
MINIGPT4 = os.path.join(ROOT, "configs", "minigpt4.py")
TINY_QFORMER = "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}"
QUERIES, STEPS = 4, 4
QF = {"model.qformer_overrides": TINY_QFORMER, "model.num_query": QUERIES}
data_dir, parts = test_llava.data_dir, test_llava.parts  # its module fixtures: the CLIP and LM parts


def _ref_itc(img, txt, temp, s):
    """numpy: s(i, t) = max_q img[i, q] . txt[t]; symmetric smoothed cross entropy."""
    sim = np.einsum("iqd,td->itq", img, txt).max(-1) / temp
    n = len(sim)
    target = (1 - s) * np.eye(n) + s / n
    ce = lambda logits: -(target * scipy.special.log_softmax(logits, axis=1)).sum(1).mean()
    return 0.5 * (ce(sim) + ce(sim.T))


def test_itc_max_over_queries_matches_numpy_and_pmap():
    rng = np.random.RandomState(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    img, txt = unit(rng.normal(size=(8, 3, 6))).astype(np.float32), unit(rng.normal(size=(8, 6))).astype(np.float32)
    for s in (0.0, 0.1):
        loss, m = itc_max_loss(img, txt, 0.2, label_smoothing=s)
        np.testing.assert_allclose(float(loss), _ref_itc(img, txt, 0.2, s), rtol=1e-5)
    # 4 devices with 2 rows each, the global batch gathered: the mean over devices is the loss.
    gather = lambda x: jax.lax.all_gather(x, "d", tiled=True)
    got = jax.pmap(
        lambda i, t: jax.lax.pmean(itc_max_loss(i, t, 0.2, label_smoothing=0.1, gather=gather)[0], "d"),
        "d",
        devices=jax.devices()[:4],
    )(img.reshape(4, 2, 3, 6), txt.reshape(4, 2, 6))
    np.testing.assert_allclose(np.asarray(got), _ref_itc(img, txt, 0.2, 0.1), rtol=1e-5)


def test_retrieval_scores_an_image_by_its_best_query():
    rng = np.random.RandomState(1)
    img, txt = rng.normal(size=(5, 3, 4)), rng.normal(size=(7, 4))
    want = np.array([[max(img[i, q] @ txt[t] for q in range(3)) for t in range(7)] for i in range(5)])
    np.testing.assert_allclose(retrieval.similarity(img, txt), want)
    np.testing.assert_allclose(retrieval.pair_similarity(img, txt[:5]), np.diag(want[:, :5]))
    np.testing.assert_allclose(retrieval.similarity(img[:, 0], txt), img[:, 0] @ txt.T)


def _family(family="blip2", **extra):
    cfg = {
        **dict(
            family=family,
            image="mu/8",
            image_overrides=dict(width=32, depth=2, heads=2, mlp_dim=64),
            qformer_overrides=dict(width=32, depth=2, heads=2, mlp_dim=64),
            num_query=QUERIES,
            embed_dim=16,
            vocab_size=40,
            image_size=16,
            text_len=8,
        ),
        **extra,
    }
    return zoo.build(cfg)


def test_the_three_masks_through_the_model():
    """ITG: a text position's logits ignore later text and depend on the image; ITM: the
    pair's logits depend on text and image; the ITC text embedding ignores padding."""
    fam = _family()
    m, p = fam.model, fam.init_params(jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    image = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    ids = np.concatenate([np.full((2, 1), 2), rng.randint(6, 40, (2, 5)), np.zeros((2, 2), int)], 1).astype(np.int32)
    ap = lambda method, *a: np.asarray(jax.jit(lambda p, *a: m.apply({"params": p}, *a, method=method))(p, *a))
    feats = ap(m.vision_features, image)
    other = ap(m.vision_features, image[::-1])
    later = ids.copy()
    later[:, 4:6] = 7
    lm, lm_later = ap(m.lm_logits, feats, ids), ap(m.lm_logits, feats, later)
    np.testing.assert_allclose(lm[:, :4], lm_later[:, :4], atol=1e-6)  # causal: positions < 4 unchanged
    assert not np.allclose(lm[:, 4:6], lm_later[:, 4:6])
    assert not np.allclose(ap(m.lm_logits, other, ids)[:, 0], lm[:, 0])  # text sees the queries
    itm = ap(m.itm_logits, feats, ids)
    assert not np.allclose(ap(m.itm_logits, feats, later), itm) and not np.allclose(ap(m.itm_logits, other, ids), itm)
    padded = ids.copy()
    padded[:, 6:] = 9  # the pad ids replaced: now valid text
    t = ap(m.text_embedding, ids)
    assert not np.allclose(ap(m.text_embedding, padded), t)
    junk = ids.copy()
    junk[:, 0] = 11  # position 0 is <cls> whatever it held
    np.testing.assert_allclose(ap(m.text_embedding, junk), t, atol=1e-6)


def test_stage1_sharded_step_equals_single_device():
    """Two stage-1 steps (ITC, ITM with hard negatives, ITG over the global batch) under
    pmap on the 8 host devices (each loss gathers the global batch) give one device's
    losses and params."""
    import ml_collections
    from test_parallel import run

    fam = _family(text_len=16)
    train = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, steps=4, weight_decay=0.05, grad_clip=1.0))
    rng = np.random.RandomState(0)
    batches = []
    for _ in range(2):
        text = rng.randint(6, 40, (8, 16)).astype(np.int32)
        text[:, 0], text[:, 12:] = 2, 0
        batches.append(dict(image=rng.normal(size=(8, 16, 16, 3)).astype(np.float32), text=text, id=np.arange(8)))
    ref_loss, ref, _ = run(fam, train, batches, "mesh", {"data": 1}, jax.devices()[:1])
    loss, state, _ = run(fam, train, batches, "pmap")
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    for (path, v), got in zip(jax.tree_util.tree_leaves_with_path(ref.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(got, v, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ the recipes end to end
def _stage1_overrides(data_dir, parts, steps=STEPS) -> dict:
    over = run_overrides(
        data_dir,
        steps,
        **QF,
        **{
            "model.embed_dim": 16,
            "finetune.init_parts": repr({"vision": parts["clip"] + ":image_tower"}),
            "finetune.tokenizer_from": parts["lm"],
            "data.text_len": 16,
            "eval.rerank_k": 4,
        },
    )
    del over["model.lm"]  # no LM in stage 1
    return over


def _stage2_overrides(data_dir, parts, s1, steps=STEPS, **extra) -> dict:
    src = {k: f"{s1}:{k}" for k in ("vision", "ln_vision", "qformer")}
    return run_overrides(data_dir, steps, **QF, **{"finetune.init_parts": repr({**src, "lm": parts["lm"]})}, **extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, parts):
    """Workdirs: s1 (stage 1 stopped at 2, then to the end), s1_full (the same,
    uninterrupted), s2 / s2_full (stage 2 from s1 the same two ways), instruct (InstructBLIP,
    2 steps) and mgpt (MiniGPT-4 stage 1, stopped at 1, then to 2)."""
    root = tmp_path_factory.mktemp("blip2")
    w = {k: str(root / k) for k in ("s1", "s1_full", "s2", "s2_full", "instruct", "mgpt")}
    s1 = _stage1_overrides(data_dir, parts)
    for flags in (("--stop-at", 2), ()):
        _train(BLIP2, w["s1"], s1, *flags)
    _train(BLIP2, w["s1_full"], s1)
    s2 = _stage2_overrides(data_dir, parts, w["s1"])
    for flags in (("--stop-at", 2), ()):
        _train(BLIP2 + ":stage2", w["s2"], s2, *flags)
    _train(BLIP2 + ":stage2", w["s2_full"], s2)
    _train(INSTRUCT, w["instruct"], _stage2_overrides(data_dir, parts, w["s1"], 2, **{"model.instruction_len": 12}))
    for flags in (("--stop-at", 1), ()):
        _train(MINIGPT4 + ":stage1", w["mgpt"], _stage2_overrides(data_dir, parts, w["s1"], 2), *flags)
    return w


def test_stage1_keeps_the_tower_and_trains_the_qformer(runs, parts):
    clip = _flat(_params(parts["clip"])["image_tower"])
    start, end = _params(runs["s1"], 2), _params(runs["s1"])
    assert set(end) == {"vision", "ln_vision", "qformer", "vision_proj", "text_proj", "itm_head", "temp"}
    for p in (start, end):
        _assert_same(_flat(p["vision"]), clip)
    trained = {k: v for k, v in _flat(end).items() if not k.startswith("['vision']")}
    _assert_changed(trained, {k: v for k, v in _flat(start).items() if not k.startswith("['vision']")})
    rows = _metrics(runs["s1"])
    assert len(rows) == STEPS and {"loss_itc", "loss_itm", "loss_lm", "i2t_acc"} <= set(rows[-1])


def test_stage1_resumes_exactly(runs):
    _assert_same(_flat(_params(runs["s1"])), _flat(_params(runs["s1_full"])))
    assert [r["loss"] for r in _metrics(runs["s1"])] == [r["loss"] for r in _metrics(runs["s1_full"])]


def test_stage1_eval_ranks_by_the_best_query(runs):
    """The evaluator's recall equals numpy's on the family's embeddings (max over queries),
    and ITM re-ranking and the binding probe run."""
    from mmjax.eval.run import Evaluator
    from mmjax.parallel import mesh as mesh_lib

    w = workdir_lib.open_workdir(runs["s1"])
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    ev = Evaluator(w.family, w.config.data, w.tokenizer, mesh, split="test", batch_size=16, rerank_k=4)
    m = ev(w.params)
    assert {"i2t_r@1", "t2i_r@1", "i2t_itm_r@1", "binding_acc", "binding_acc_itm"} <= set(m), sorted(m)
    got, _ = ev._embed_split(w.params)
    img, txt = np.concatenate(got["img"]), np.concatenate(got["txt"])
    assert img.shape[1:] == (QUERIES, 16) and txt.shape[1:] == (16,)
    _, inverse, first = retrieval.caption_index(got["caps"])
    sims = np.einsum("nqe,me->nmq", img, txt[first]).max(-1)  # each image by its best query
    assert m["i2t_r@1"] == np.mean(np.argsort(-sims, axis=1, kind="stable")[:, 0] == inverse)


def test_stage2_loads_stage1_and_trains_qformer_and_projection(runs, parts):
    s1, s2 = _flat(_params(runs["s1"])), _flat(_params(runs["s2"]))
    frozen, trained = _split(s2, r"^\['(vision|lm)'\]")
    _assert_same({k: v for k, v in frozen.items() if k.startswith("['vision']")}, s1)
    _assert_same(
        {k[len("['lm']") :]: v for k, v in frozen.items() if k.startswith("['lm']")}, _flat(_params(parts["lm"]))
    )
    qf = {k: v for k, v in trained.items() if k.startswith(("['qformer']", "['ln_vision']"))}
    _assert_changed(qf, {k: s1[k] for k in qf})
    assert not any("embed" in k or "['mlp']" in k for k in qf)  # no text in BLIP-2's stage-2 Q-Former


def test_stage2_resumes_exactly(runs):
    _assert_same(_flat(_params(runs["s2"])), _flat(_params(runs["s2_full"])))
    assert [r["loss"] for r in _metrics(runs["s2"])] == [r["loss"] for r in _metrics(runs["s2_full"])]


def test_instructblip_queries_read_the_instruction(runs):
    """InstructBLIP's image features change with the prompt and BLIP-2's do not; the
    instruction is the prompt's non-image tokens before the first answer, in order."""
    from mmjax.models.zoo.blip2_lm import instruction_tokens

    sel = np.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1]], bool)
    toks = np.arange(12).reshape(2, 6)
    ids, ok = instruction_tokens(jnp.asarray(toks), jnp.asarray(sel), 4, 0)
    np.testing.assert_array_equal(ids, [[1, 2, 4, 0], [6, 11, 0, 0]])
    np.testing.assert_array_equal(ok, [[1, 1, 1, 0], [1, 1, 0, 0]])
    for name, reads in (("instruct", True), ("s2", False)):
        w = workdir_lib.open_workdir(runs[name])
        fam, b = w.family, w.family.dummy_batch(2, 24)
        b["prefix"] = b["prefix"].at[:, :12].set(True)
        b["image"] = jnp.asarray(np.random.RandomState(0).normal(size=b["image"].shape), jnp.float32)
        feats = lambda tokens: np.asarray(
            fam.model.apply(
                {"params": w.params}, *(dict(b, tokens=tokens)[k] for k in zoo.llava.BATCH), method="image_features"
            )
        )
        other = b["tokens"].at[:, 8].set(7)
        assert np.allclose(feats(b["tokens"]), feats(other)) != reads, name
        if reads:  # a token after the prefix (an answer) is not instruction
            np.testing.assert_array_equal(feats(b["tokens"]), feats(b["tokens"].at[:, 20].set(7)))


def test_minigpt4_trains_only_the_projection(runs, parts):
    """Vision, ln_vision and Q-Former are stage 1's, the LM the LM workdir's, bit for bit;
    the projection moved between steps 1 and 2."""
    s1, mg = _flat(_params(runs["s1"])), _flat(_params(runs["mgpt"]))
    trained, frozen = _split(mg, r"^\['projector'\]")
    lm, rest = _split(frozen, r"^\['lm'\]")
    _assert_same(rest, s1)
    _assert_same({k[len("['lm']") :]: v for k, v in lm.items()}, _flat(_params(parts["lm"])))
    _assert_changed(trained, {k: v for k, v in _flat(_params(runs["mgpt"], 1)).items() if k in trained})
    w = workdir_lib.open_workdir(runs["mgpt"])
    assert w.config.data.chat.template == "minigpt4"
    # The answer eval cuts a generated answer at the template's text end piece ('###').
    from types import SimpleNamespace

    from mmjax.eval.answers import AnswerEvaluator

    ev = SimpleNamespace(family=w.family, tokenizer=w.tokenizer, opts={"template": "minigpt4"})
    ids = np.asarray(w.tokenizer.encode_plain("red###Human: is it"))
    assert AnswerEvaluator._text(ev, ids).strip() == "red"


def test_the_qformer_loads_from_a_blip_text_tower():
    """finetune.transplant of a BLIP workdir's `text_tower` into `qformer/` fills the word
    and position embeddings and every block's self-attention, FFN and (in the Q-Former's
    cross blocks) cross-attention by name; query_ffn_init='text' then starts each block's
    query FFN as its text FFN (BLIP-2's init from BERT)."""
    from mmjax.train import finetune

    blip = zoo.build(
        dict(
            family="blip",
            image="mu/8",
            image_overrides=dict(width=32, depth=2, heads=2, mlp_dim=64),
            text_overrides=dict(width=32, depth=2, heads=2, mlp_dim=64),
            embed_dim=16,
            vocab_size=40,
            image_size=16,
            text_len=8,
        )
    )
    tower = blip.init_params(jax.random.PRNGKey(3))["text_tower"]
    text, fam = _flat(tower), _family(query_ffn_init="text")
    params, report = finetune.transplant(fam.init_params(jax.random.PRNGKey(0)), tower, "qformer/")
    params = _flat(fam.finish_init(params)["qformer"])
    for k, v in params.items():
        src = k.replace("mlp_query", "mlp").replace("ln2_query", "ln2")
        if src in text:
            np.testing.assert_array_equal(v, text[src], err_msg=k)
    assert "['block00']['cross_attn']['query']['kernel']" in params and "['block01']['cross_attn']" not in str(
        list(params)
    )
    assert {"['ln_out']['scale']", "['query_tokens']"} <= set(params) and report["kept_init"]
    loaded = [k for k in params if k.replace("mlp_query", "mlp").replace("ln2_query", "ln2") in text]
    assert len(loaded) == len(params) - 3  # all but query_tokens and ln_out's scale and bias
