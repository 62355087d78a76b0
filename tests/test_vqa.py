"""VQA-style answer classification: the built-in questions (checked by an independent
interpreter of the question against the scene), the `shapes_vqa` records, the VQA
family's features, head and losses against references, and `mmjax finetune` from
an ALBEF checkpoint end to end."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import cli
from mmjax import config as config_lib
from mmjax.data import shapes_gen as g
from mmjax.eval.run import classification_metrics
from mmjax.models import zoo
from mmjax.models.zoo.vqa import AnswerHead
from mmjax.train import finetune, loop, optim
from mmjax.train import setup as setup_lib
from tiny import ROOT

VQA = f"{ROOT}/configs/finetune_vqa.py"
TINY_DATA = {
    "data.image_size": 16,
    "data.shuffle_buffer": 256,
    "data.shapes.image_size": 16,
    "data.shapes.num_train": 256,
    "data.shapes.num_validation": 32,
    "data.shapes.num_test": 64,
}


# ----------------------------------------------------------------------- questions


def _matches(scene, words):
    """Indices of the scene's objects a noun phrase ('small red circle', 'red object',
    'circle below the other circle', 'red object left of the other one') names."""
    objs, rel = scene
    text = " ".join(words)
    m = re.match(r"(.*?) (left of|right of|above|below) the other .*", text)
    cond, rel_word = (m.group(1), m.group(2)) if m else (text, None)
    out = []
    for k, o in enumerate(objs):
        ok = all(w in ("object",) or w in (g.COLOURS[o[0]], g.SHAPES[o[1]], g.SIZES[o[2]]) for w in cond.split())
        if rel_word is not None:
            r = rel if k == 0 else g.FLIP[rel]  # relation of object k to the other one
            ok = ok and r == rel_word
        if ok:
            out.append(k)
    return out


def _answer(scene, question):
    """Interprets a question against (objects, relation); None if it is ambiguous."""
    objs, rel = scene
    w = question.split()
    for prefix, attr in (
        (["what", "colour", "is", "the"], 0),
        (["what", "shape", "is", "the"], 1),
        (["how", "big", "is", "the"], 2),
    ):
        if w[:4] == prefix:
            hit = _matches(scene, w[4:])
            if len(hit) != 1:
                return None
            return (g.COLOURS, g.SHAPES, g.SIZES)[attr][objs[hit[0]][attr]]
    if w[:3] == ["is", "there", "a"]:
        c, s = g.COLOURS.index(w[3]), g.SHAPES.index(w[4])
        return "yes" if any(o[0] == c and o[1] == s for o in objs) else "no"
    assert w[:2] == ["is", "the"], question
    text = " ".join(w[2:])
    m = re.match(r"(.*) (left of|right of|above|below) the (.*)", text)
    a, b = _matches(scene, m.group(1).split()), _matches(scene, m.group(3).split())
    if len(a) != 1 or len(b) != 1 or a == b:
        return None
    true = rel if a[0] == 0 else g.FLIP[rel]
    return "yes" if true == m.group(2) else "no"


def test_every_question_has_one_answer_the_scene_gives():
    types, answers = set(), []
    for i in range(1500):
        ex = g.vqa_example(3, "train", i, 16)
        got = _answer((ex["objects"], ex["relation"]), ex["question"])
        assert got is not None, f"ambiguous: {ex['question']!r} for {ex['caption']!r}"
        assert got == g.ANSWERS[ex["answer"]], (ex["question"], ex["caption"], g.ANSWERS[ex["answer"]])
        types.add(ex["question_type"])
        answers.append(ex["answer"])
    assert types == set(g.QUESTION_TYPES)
    assert set(answers) == set(range(len(g.ANSWERS)))  # every answer occurs
    yn = [a for a in answers if g.ANSWER_TYPES[a] == "yes/no"]
    assert 0.4 < np.mean([g.ANSWERS[a] == "yes" for a in yn]) < 0.6  # no prior to exploit
    # The same image as the captioning dataset's record of that index.
    np.testing.assert_array_equal(g.vqa_example(3, "test", 5, 16)["image"], g.example(3, "test", 5, 16)["image"])


def test_shapes_vqa_records_and_batches(tmp_path):
    from mmjax.data import pipeline
    from mmjax.data.tokenizer import Tokenizer, train_tokenizer

    cfg = config_lib.load(VQA, [f"{k}={v}" for k, v in {**TINY_DATA, "data.data_dir": tmp_path}.items()]).data
    assert pipeline.num_examples(cfg, "test") == 64
    assert pipeline.label_names(cfg) == list(g.ANSWERS)
    recs = list(pipeline.load_records(cfg, "test").take(6).as_numpy_iterator())
    for r in recs:
        ex = g.vqa_example(0, "test", int(r["id"]), 16)
        assert r["caption"].decode() == ex["question"] and int(r["label"]) == ex["answer"]
    tok = Tokenizer(train_tokenizer(pipeline.captions(cfg, "train"), str(tmp_path / "tok"), 40))
    batch = next(pipeline.make_eval_iterator(cfg, tok, "test", 8))
    np.testing.assert_array_equal(
        batch["text"], tok.encode([g.vqa_example(0, "test", i, 16)["question"] for i in range(8)], cfg.text_len)
    )
    np.testing.assert_array_equal(batch["label"], [g.vqa_example(0, "test", i, 16)["answer"] for i in range(8)])


# --------------------------------------------------------------------------- model


def _backbone_config(name):
    """A tiny pretraining model config of `name` (albef | vlmo | beit3)."""
    c = config_lib.load(f"{ROOT}/configs/{name}.py", [])
    m = c.model
    with m.unlocked():
        m.image, m.image_overrides, m.embed_dim = "mu/4", {"width": 32, "depth": 2, "heads": 2, "mlp_dim": 64}, 16
        m.text_overrides = {"width": 32, "depth": 2, "heads": 2, "mlp_dim": 64} if name == "albef" else {}
        m.vocab_size, m.image_size, m.text_len = 40, 16, 12
        if name == "albef":
            m.fusion_from = 1
        if name == "vlmo":
            m.vl_from = 1
    return m


def _vqa(backbone_cfg, text_len=20, loss="softmax"):
    return zoo.build(
        ml_collections.ConfigDict(
            {
                "family": "vqa",
                "backbone": backbone_cfg.to_dict(),
                "num_answers": 14,
                "vqa_loss": loss,
                "image_size": 16,
                "text_len": text_len,
                "vocab_size": 40,
            }
        )
    )


@pytest.mark.parametrize("name", ["albef", "vlmo", "beit3"])
def test_vqa_reads_the_fused_features_itm_reads(name):
    """After transplanting a pretraining model, the VQA model's logits are its head on
    exactly the fused [CLS] the pretraining family's ITM head reads (computed through
    the family's own ITM path); only the fused path's params are carried over, and a
    longer text position table keeps the pretrained rows."""
    src = zoo.build(_backbone_config(name))
    pre = src.init_params(jax.random.PRNGKey(1))
    vqa = _vqa(_backbone_config(name), text_len=20)
    init = vqa.init_params(jax.random.PRNGKey(2))
    params, report = finetune.transplant(init, pre, "backbone/")
    assert report["kept_init"] and all(k.startswith("head/") for k in report["kept_init"])
    flat = {optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not [p for p in flat if re.search(r"(itm_head|mlm_head|mdm_head|_proj)/", p)]
    flat_new = {optim.param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat_init = {optim.param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(init)[0]}
    flat_pre = {optim.param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(pre)[0]}
    (text_pos,) = [k for k in report["resized"] if flat_new[k].ndim == 2]  # the 1-D text table
    assert flat_new[text_pos].shape[0] == 20 and flat_pre[text_pos[len("backbone/") :]].shape[0] == 12
    np.testing.assert_array_equal(flat_new[text_pos][:12], flat_pre[text_pos[len("backbone/") :]])
    np.testing.assert_array_equal(flat_new[text_pos][12:], flat_init[text_pos][12:])

    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
    ids = jnp.asarray(
        np.concatenate([np.full((3, 1), 2), rng.integers(6, 40, (3, 8)), np.full((3, 1), 3), np.zeros((3, 2), int)], 1),
        jnp.int32,
    )  # [3, 12]
    m = src.model
    if name == "albef":
        _, tok = src._apply(pre, m.image_features, image)
        _, stream = src._apply(pre, m.text_features, ids)
        fused = src._apply(pre, m.fuse, stream, ids, tok)[:, 0]
    else:
        _, tok = src._apply(pre, m.image_features, image)
        _, txt = src._apply(pre, m.text_features, ids)
        fused = src._apply(pre, m.joint_pass, tok, txt, ids)[2]
    want = AnswerHead(14).apply({"params": params["head"]}, fused)
    np.testing.assert_allclose(np.asarray(vqa.logits(params, image, ids)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_text_position_table_extension():
    pre = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)
    fresh = -np.ones((20, 4), np.float32)
    out = finetune.extend_text_posemb(pre, fresh)
    np.testing.assert_array_equal(out[:12], pre)
    np.testing.assert_array_equal(out[12:], fresh[12:])
    np.testing.assert_array_equal(finetune.extend_text_posemb(pre, fresh[:8]), pre[:8])


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_vqa_losses_match_numpy(loss):
    vqa = _vqa(_backbone_config("albef"), text_len=12, loss=loss)
    params = vqa.init_params(jax.random.PRNGKey(0))
    params["head"]["dense2"]["kernel"] = jax.random.normal(
        jax.random.PRNGKey(3), params["head"]["dense2"]["kernel"].shape
    )
    rng = np.random.default_rng(1)
    batch = {
        "image": jnp.asarray(rng.normal(size=(5, 16, 16, 3)), jnp.float32),
        "text": jnp.asarray(rng.integers(6, 40, (5, 12)), jnp.int32),
        "label": jnp.asarray(rng.integers(0, 14, 5), jnp.int32),
    }
    got, metrics, _ = vqa.objective(params, batch)
    z = np.asarray(vqa.logits(params, batch["image"], batch["text"]), np.float64)
    y = np.asarray(batch["label"])
    if loss == "softmax":
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        want = np.mean(lse - z[np.arange(5), y])
    else:
        t = np.eye(14)[y]
        p = 1 / (1 + np.exp(-z))
        want = np.mean(np.sum(-(t * np.log(p) + (1 - t) * np.log(1 - p)), axis=1))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["train_top1"]), np.mean(z.argmax(1) == y))


def test_vqa_needs_a_fusion_backbone():
    clip = config_lib.load(f"{ROOT}/configs/demo.py", []).model
    with pytest.raises(ValueError, match="valid choices: albef, vlmo, beit3"):
        _vqa(clip)
    with pytest.raises(config_lib.ConfigError, match="valid choices: softmax, bce"):
        config_lib.load(VQA, ["model.vqa_loss=focal"])
    with pytest.raises(ValueError, match="valid choices: albef, vlmo, beit3"):
        config_lib.load(VQA + ":clip")


def test_classification_metrics_per_answer_type():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 14, 200)
    top5 = np.stack([rng.permutation(14)[:5] for _ in range(200)])
    top5[:60, 0] = labels[:60]  # some right at top-1
    out = classification_metrics(top5, labels, 14, g.ANSWER_TYPES)
    assert out["top1"] == pytest.approx(np.mean(top5[:, 0] == labels))
    for t in set(g.ANSWER_TYPES):
        sel = [i for i in range(200) if g.ANSWER_TYPES[labels[i]] == t]
        want = sum(top5[i, 0] == labels[i] for i in sel) / len(sel)
        assert out["top1_" + t.replace("/", "_")] == pytest.approx(want)
    assert out["top5"] == pytest.approx(np.mean([labels[i] in top5[i] for i in range(200)]))


def test_head_lr_multiplier_and_fusion_layer_ids():
    params = {
        "head": {"kernel": jnp.ones((3, 2))},
        "backbone": {
            "text_tower": {
                "text_blocks_0": {"w": jnp.ones(2)},
                "text_blocks_1": {"w": jnp.ones(2)},
                "fusion_blocks_0": {"w": jnp.ones(2)},
            }
        },
    }
    ids, n = optim.layer_ids(params)
    assert ids["backbone/text_tower/fusion_blocks_0/w"] == 3 and n == 3 and ids["head/kernel"] == 4
    grads = jax.tree_util.tree_map(lambda x: 0.3 * x, params)

    def update(mult):
        cfg = ml_collections.ConfigDict(
            {"steps": 10, "warmup_steps": 0, "lr": 0.1, "weight_decay": 0.0, "head_lr_mult": mult}
        )
        tx = optim.make_optimizer(cfg)
        u, _ = tx.update(grads, tx.init(params), params)
        return u

    one, ten = update(1.0), update(10.0)
    np.testing.assert_allclose(ten["head"]["kernel"], 10 * one["head"]["kernel"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one["backbone"]), jax.tree.leaves(ten["backbone"])):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(one["head"]["kernel"]).max()) > 0


# ------------------------------------------------------------------- end to end


def test_vqa_finetune_from_albef_checkpoint(tmp_path, capsys):
    from tiny import albef_config

    src = tmp_path / "albef"
    loop.train(
        albef_config(tmp_path, **{"train.steps": 3, "train.ckpt_every": 0, "eval.at_end": False}),
        str(src),
        progress=False,
    )
    flags = [
        f"--config.{k}={v}"
        for k, v in {
            **TINY_DATA,
            "data.data_dir": tmp_path,
            "data.text_len": 24,
            "train.steps": 4,
            "train.batch_size": 16,
            "train.warmup_steps": 1,
            "train.log_every": 2,
            "train.ckpt_every": 0,
            "eval.batch_size": 32,
        }.items()
    ]
    rc = cli.main(
        [
            "finetune",
            "--config",
            VQA,
            "--init-from",
            str(src),
            "--workdir",
            str(tmp_path / "vqa"),
            "--no-progress",
            *flags,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    for key in ('"top1"', '"top1_yes_no"', '"top1_colour"', '"top1_shape"', '"top1_size"', '"num_classes": 14'):
        assert key in out, out
    # The fine-tuned backbone started from the checkpoint: its image patch embedding
    # moved away from the source's, but by a fine-tuning step, not a re-init.
    _, pre = finetune.pretrained_params(str(src))
    got, setup, _ = setup_lib.restore_params(str(tmp_path / "vqa"))
    a = np.asarray(pre["image_tower"]["patch_embed"]["conv"]["kernel"])
    b = np.asarray(got["backbone"]["image_tower"]["patch_embed"]["conv"]["kernel"])
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert setup.config.model.backbone.family == "albef"
