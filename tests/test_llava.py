"""The LLM connectors end to end (configs/llava.py stage1 / stage2 / lora, configs/cogvlm.py)
at tiny shapes: a 2-block 32-wide vision tower (16px images: 4 image tokens) and a 2-layer
32-wide GQA LM, batch 8, 4 steps.

Module fixtures write the parts (the demo CLIP at that vision shape, its random init as a
step-0 checkpoint; configs/lm.py's LM through `mmjax train --stop-at 0`, which trains its
tokenizer on the conversations) and train each recipe through the CLI from them
(finetune.init_parts / init_from). The tests check: what froze (bit for bit the parts'
params) and what trained, CogVLM's experts starting as the LM (finish_init); exact resume
of stage 2; the ChatCollator's batches (slots, loss on the answers only, prefix, too long
conversations); the model (image placement, RoPE positions, prefix-LM attention, the
logits composed by hand from the parts); a sharded train step against one device; the
answer eval (by hand, on the trained model, and with a fake model that knows the
answers); `mmjax generate` (--prompt --images, --chat, no --images) and `mmjax export
--format hf-llava`. Nothing is downloaded.
"""

import contextlib
import io
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import cli
from mmjax import config as config_lib
from mmjax import workdir as workdir_lib
from mmjax.data import shapes_gen
from mmjax.models import zoo
from tiny import DEMO, ROOT

LM = os.path.join(ROOT, "configs", "lm.py")
LLAVA = os.path.join(ROOT, "configs", "llava.py")
COGVLM = os.path.join(ROOT, "configs", "cogvlm.py")
TINY_VISION = "{'width': 32, 'depth': 2, 'heads': 2, 'mlp_dim': 64}"
TINY_LM = "{'width': 32, 'depth': 2, 'heads': 4, 'kv_heads': 2, 'mlp_dim': 64}"
SHAPES = dict(image_size=16, num_train=128, num_validation=16, num_test=16)
STEPS, STOP = 4, 2  # steps of every connector run; the interrupted stage-2 run stops here
IMAGE_TOKENS = 4  # (16 / 8) ** 2


def data_overrides(data_dir) -> dict:
    shapes = {f"data.shapes.{k}": v for k, v in SHAPES.items()}
    return {"data.data_dir": str(data_dir), "data.image_size": 16, "data.shuffle_buffer": 128, **shapes}


def run_overrides(data_dir, steps=STEPS, vision=True, **extra) -> dict:
    """A tiny run: the data above, batch 8, one warmup step, no eval; the tiny LM (and vision tower)."""
    train = {f"train.{k}": v for k, v in dict(batch_size=8, steps=steps, warmup_steps=1, log_every=1).items()}
    model = {"model.lm": TINY_LM, **({"model.image_overrides": TINY_VISION} if vision else {})}
    return {**data_overrides(data_dir), **train, "eval.every": 0, "eval.at_end": False, **model, **extra}


def _mmjax(*argv) -> tuple:
    """cli.main in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _train(config, workdir, overrides: dict, *flags) -> None:
    over = [f"--config.{k}={v}" for k, v in overrides.items()]
    code, _, err = _mmjax("train", "--config", config, "--workdir", workdir, "--no-progress", *flags, *over)
    assert code == 0, err[-3000:]


def _metrics(workdir, kind="train") -> list:
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def parts(tmp_path_factory, data_dir):
    """{'clip': the demo CLIP at the tiny vision shape (its random init written as a
    step-0 checkpoint), 'lm': configs/lm.py's tiny LM (`--stop-at 0`: the tokenizer
    trained on the conversations, the params its fresh init)}."""
    root = tmp_path_factory.mktemp("parts")
    clip, lm = str(root / "clip"), str(root / "lm")
    over = {**data_overrides(data_dir), "model.image": "mu/8", "model.image_overrides": TINY_VISION}
    over.update({"model.text_overrides": TINY_VISION, "model.embed_dim": 32})
    config = config_lib.derive_model_keys(config_lib.load(DEMO, [f"{k}={v}" for k, v in over.items()]), 40)
    family = zoo.build(config.model)
    os.makedirs(clip)
    workdir_lib.save_config_json(config, clip)
    workdir_lib.save_params(clip, jax.device_get(jax.jit(family.init_params)(jax.random.PRNGKey(1))))
    _train(LM, lm, run_overrides(data_dir, 2, vision=False), "--stop-at", 0)
    return {"clip": clip, "lm": lm}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, parts):
    """The connector workdirs, STEPS steps each: stage1 (init_parts; stopped at 0 and
    resumed, so its step-0 checkpoint stays), stage2 and lora (init_from stage1; lora's
    batches cut to length buckets), cogvlm (init_parts; stopped at 0 and resumed)."""
    root = tmp_path_factory.mktemp("runs")
    w = {k: str(root / k) for k in ("stage1", "stage2", "lora", "cogvlm")}
    from_parts = run_overrides(
        data_dir, **{"finetune.init_parts": repr({"vision": parts["clip"] + ":image_tower", "lm": parts["lm"]})}
    )
    for config, name in ((LLAVA + ":stage1", "stage1"), (COGVLM, "cogvlm")):
        _train(config, w[name], from_parts, "--stop-at", 0)
        _train(config, w[name], from_parts)
    for name in ("stage2", "lora"):  # lora with length buckets (data.chat.buckets): its batches vary in length
        extra = {"data.chat.buckets": "(24, 40, 48)"} if name == "lora" else {}
        _train(f"{LLAVA}:{name}", w[name], run_overrides(data_dir, **{"finetune.init_from": w["stage1"]}, **extra))
    return w


@pytest.fixture(scope="module")
def stage2(runs):
    return workdir_lib.open_workdir(runs["stage2"])


# ------------------------------------------------------------------ 1. what trains
def _flat(tree, prefix="") -> dict:
    """{prefix + "['a']['b']": leaf} of a param tree."""
    return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _params(workdir, step=None) -> dict:
    """A workdir's params (host numpy) at `step` (default: the latest)."""
    return workdir_lib.read_params(workdir, step=step)[0]


def _assert_same(got: dict, want: dict):
    """Every leaf of `got` equals the leaf at its path in `want`, bit for bit."""
    assert got and set(got) <= set(want), sorted(set(got) - set(want))[:5]
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def _assert_changed(got: dict, before: dict):
    """Every leaf of `got` differs from the leaf at its path in `before` (the same paths)."""
    assert got and set(got) == set(before)
    same = [k for k in got if np.array_equal(got[k], before[k])]
    assert not same, same


def _split(flat: dict, pattern: str) -> tuple[dict, dict]:
    """(the leaves whose path matches `pattern` (re.search), the others)."""
    pat = re.compile(pattern)
    return {k: v for k, v in flat.items() if pat.search(k)}, {k: v for k, v in flat.items() if not pat.search(k)}


def test_stage1_loads_the_parts_and_trains_the_projector(runs, parts):
    """Stage 1 keeps the CLIP's image_tower (vision) and the LM workdir's params (lm)
    exactly, at step 0 and after training; every projector leaf moved."""
    clip, lm = _flat(_params(parts["clip"])["image_tower"]), _flat(_params(parts["lm"]))
    for step in (0, None):
        p = _params(runs["stage1"], step)
        assert set(p) == {"vision", "projector", "lm"}
        _assert_same(_flat(p["vision"]), clip)
        _assert_same(_flat(p["lm"]), lm)
        assert set(_flat(p["lm"])) == set(lm)
    _assert_changed(_flat(_params(runs["stage1"])["projector"]), _flat(_params(runs["stage1"], 0)["projector"]))
    assert len(_metrics(runs["stage1"])) == STEPS


def test_stage2_and_lora_freeze_what_their_recipes_say(runs, parts):
    """Stage 2: vision = the CLIP's; the projector and every LM leaf moved from stage 1's.
    LoRA: vision and the LM's base = the CLIP's and the LM workdir's; the projector moved
    from stage 1's and every adapter's b from its zero init."""
    s1 = _flat(_params(runs["stage1"]))
    clip = _flat(_params(parts["clip"])["image_tower"], "['vision']")
    s2 = _flat(_params(runs["stage2"]))
    vision, rest = _split(s2, r"^\['vision'\]")
    _assert_same(vision, clip)
    _assert_changed(rest, {k: s1[k] for k in rest})
    lora = _flat(_params(runs["lora"]))
    adapters, base = _split(lora, r"_lora'\]")
    assert len(adapters) == 2 * 7 * 2  # {a, b} of q, k, v, o, gate, up, down in 2 layers
    trained, frozen = _split(base, r"^\['projector'\]")
    _assert_same(frozen, {**clip, **_flat(_params(parts["lm"]), "['lm']")})
    assert set(frozen) | set(trained) == set(s1)
    _assert_changed(trained, {k: s1[k] for k in trained})
    assert all(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("['b']"))


def test_an_imported_hf_clip_is_the_vision_tower(tmp_path, data_dir, parts):
    """A random transformers CLIP (quick_gelu, 48 wide, patch 4) converted with `mmjax
    convert --from hf-clip` loads as LLaVA's vision tower (init_parts 'W:image_tower'):
    with the demo's vision keys the run is refused (exit 2, naming the differing keys and
    the overrides); with those overrides the tower's feature layer -2 tokens are HF's
    hidden_states[-2] without [CLS] (LLaVA's select layer) on the same pixels."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    from mmjax.export import hf_parity

    hf = hf_parity.random_hf_clip(hf_parity.PARITY_CONFIGS["quickgelu-argmax"], seed=3)
    src, clip, w = (str(tmp_path / n) for n in ("hf", "clip", "llava"))
    hf.save_pretrained(src)
    assert _mmjax("convert", "--from", "hf-clip", "--src", src, "--workdir", clip)[0] == 0
    over = run_overrides(data_dir, vision=False, **{"finetune.init_parts": repr({"vision": clip + ":image_tower"})})
    code, _, err = _mmjax("train", "--config", LLAVA + ":stage1", "--workdir", w, "--no-progress", "--stop-at", 0,
                          *[f"--config.{k}={v}" for k, v in over.items()])  # fmt: skip
    assert code == 2 and "model keys" in err and "act" in err and "--config.model.ln_eps=" in err, err[-2000:]
    theirs = workdir_lib.load_config_json(clip).model
    for k in ("image", "image_overrides", "pool", "posemb", "act", "ln_eps"):
        v = theirs[k]
        over[f"model.{k}"] = v if isinstance(v, str) else repr(v.to_dict() if hasattr(v, "to_dict") else v)
    _train(LLAVA + ":stage1", w, over, "--stop-at", 0)
    opened = workdir_lib.open_workdir(w)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = hf.vision_model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    vision = jax.jit(lambda p, x: opened.family.model.apply({"params": p}, x, method=lambda m, y: m.vision(y)[1]))
    aux = vision(opened.params, pixels.transpose(0, 2, 3, 1))
    got = np.asarray(aux["encoder"]["block00"])[:, 1:]
    assert got.shape == want.shape == (2, 16, 48)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_cogvlm_experts_start_as_the_lm_and_train_alone(runs, parts):
    """CogVLM at step 0: each layer's attn_img / mlp_img equal its attn / mlp (finish_init),
    which are the LM workdir's. After training the LM and vision are unchanged and the
    projector and experts moved, except the last layer's expert q, o and MLP: they only
    make the image tokens' own outputs, which reach no loss (zero gradient; the recipes
    have no weight decay), so they stay exactly as they started."""
    lm, clip = _flat(_params(parts["lm"]), "['lm']"), _flat(_params(parts["clip"])["image_tower"], "['vision']")
    p0, p = _flat(_params(runs["cogvlm"], 0)), _flat(_params(runs["cogvlm"]))
    experts, base = _split(p0, r"_img'\]")
    assert len(experts) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for k, v in experts.items():
        np.testing.assert_array_equal(v, p0[k.replace("_img']", "']")], err_msg=k)
    assert set(base) == set(lm) | set(clip) | {k for k in base if k.startswith("['projector']")}
    vision, lm_now = _split(_split(p, r"^\['(vision|lm)'\]")[0], r"^\['vision'\]")
    _assert_same(vision, clip)
    _assert_same(_split(lm_now, r"_img'\]")[1], lm)
    trained = _split(p, r"_img'\]|^\['projector'\]")[0]
    idle, moved = _split(trained, r"layer01'\]\['(attn_img'\]\['[qo]'|mlp_img')")
    assert (len(idle), len(moved)) == (2 + 3, 7 + 2 + 4)  # moved: layer00's experts, layer01's k, v; projector
    _assert_same(idle, p0)
    _assert_changed(moved, {k: p0[k] for k in moved})


# ------------------------------------------------------------------ 2. exact resume
def test_stage2_resumes_exactly(runs, data_dir, tmp_path):
    """Stage 2 stopped at step STOP and run again ends with the uninterrupted run's
    params, bit for bit, and the same losses."""
    part = str(tmp_path / "part")
    over = run_overrides(data_dir, **{"finetune.init_from": runs["stage1"]})
    _train(LLAVA + ":stage2", part, over, "--stop-at", STOP)
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == [str(STOP)]
    _train(LLAVA + ":stage2", part, over)
    _assert_same(_flat(_params(part)), _flat(_params(runs["stage2"])))
    full, resumed = _metrics(runs["stage2"]), _metrics(part)
    assert len(full) == STEPS and [r["loss"] for r in resumed] == [r["loss"] for r in full]


# ------------------------------------------------------------------ 3. the batches
@pytest.fixture(scope="module")
def records(stage2):
    """The test split's records (caption = the question, label, id, image), in order."""
    from mmjax.data import pipeline

    (b,) = list(pipeline.make_eval_iterator(stage2.config.data, stage2.tokenizer, "test", SHAPES["num_test"]))
    assert np.asarray(b["valid"]).all()
    return {k: np.asarray(b[k]) for k in ("caption", "label", "id", "image")}


def _collator(opened, text_len):
    """The run's batch finisher (a ChatCollator) at `text_len`, for the test split's scenes."""
    from mmjax.data import chat_data, collate

    data = ml_collections.ConfigDict(opened.config.data.to_dict())
    chat_data.derive_image_tokens(data, IMAGE_TOKENS)
    assert isinstance(collate.train_finisher(data, opened.tokenizer, text_len, 0), chat_data.ChatCollator)
    return chat_data.ChatCollator(data, opened.tokenizer, text_len=text_len, split="test")


def test_chat_batch_marks_slots_answers_and_prefix(stage2, records):
    """A ChatCollator batch of shapes_vqa records (vqa_multi, two turns): in each row the
    image's 4 slots follow bos + 'USER: ' and hold pad; the loss tokens are, turn by turn,
    an answer's pieces + eos, the first the record's label (shapes_gen.ANSWERS); prefix is
    everything before the first answer token; valid rows are left-aligned within text_len."""
    from mmjax.data.chat_templates import loss_runs

    tok, text_len = stage2.tokenizer, int(stage2.config.data.text_len)
    batch = _collator(stage2, text_len)(dict(records))
    assert batch["tokens"].shape == (len(records["id"]), text_len)
    np.testing.assert_array_equal(batch["text"], batch["tokens"])
    for i, row in enumerate(zip(*(batch[k] for k in ("tokens", "image_slots", "loss_mask", "prefix", "valid")))):
        tokens, slots, loss, prefix, valid = row
        n = int(valid.sum())
        assert valid[:n].all() and n <= text_len and (tokens[n:] == tok.pad_id).all()
        (at,) = np.flatnonzero(np.diff(np.r_[0, slots.astype(int)]) == 1)  # one run of slots
        assert slots.sum() == IMAGE_TOKENS and slots[at : at + IMAGE_TOKENS].all()
        assert (tokens[slots] == tok.pad_id).all()
        assert tokens[0] == tok.bos_id and tok.decode_plain(tokens[1:at].tolist()).strip().lower() == "user:"
        runs = loss_runs(tokens, loss)
        assert len(runs) >= 1 and not (loss & ~valid).any() and not (loss & slots).any()
        answers = [tok.decode_plain(r[:-1]).strip() for r in runs]
        assert all(r[-1] == tok.eos_id for r in runs) and set(answers) <= set(shapes_gen.ANSWERS), answers
        assert answers[0] == shapes_gen.ANSWERS[int(records["label"][i])]
        first = int(np.argmax(loss))
        assert prefix[:first].all() and not prefix[first:].any() and first > at + IMAGE_TOKENS
        assert tok.decode_plain(tokens[at + IMAGE_TOKENS : first].tolist()).strip().lower().endswith("assistant:")


def test_too_long_conversation_is_an_invalid_row(stage2, records):
    """With text_len below some rows' first round (image + question + answer), those rows
    are all-invalid (no token, slot, loss or prefix) and counted in counts['too_long'];
    the others keep their first round."""
    full = _collator(stage2, int(stage2.config.data.text_len))(dict(records))
    ends = np.array([int(np.flatnonzero(np.diff(np.r_[m.astype(int), 0]) == -1)[0]) + 1 for m in full["loss_mask"]])
    text_len = int(np.median(ends))
    chat = _collator(stage2, text_len)
    short = chat(dict(records))
    cut = ends > text_len
    assert 0 < cut.sum() < len(cut) and chat.counts["too_long"] == cut.sum()
    for k in ("valid", "image_slots", "loss_mask", "prefix"):
        assert short[k].shape == (len(cut), text_len) and not short[k][cut].any()
    assert (short["tokens"][cut] == stage2.tokenizer.pad_id).all()
    for k in ("tokens", "loss_mask", "image_slots"):  # a kept row: the full row's leading rounds
        np.testing.assert_array_equal(
            short[k][~cut][short["valid"][~cut]], full[k][~cut, :text_len][short["valid"][~cut]]
        )


def test_bucketed_batches_are_the_full_batch_cut(stage2, records):
    """data.chat.buckets: a train batch is cut to the smallest bucket (or text_len) that
    holds its longest row: the full batch's leading columns (only padding dropped), and the
    objective on it equals the full-length batch's. Out-of-range buckets and buckets in a
    multi-process run are ValueErrors naming data.chat.buckets."""
    from mmjax.data import chat_data

    text_len = int(stage2.config.data.text_len)
    full = _collator(stage2, text_len)(dict(records))
    used = full["valid"].sum(1)
    short = np.argsort(used)[:4]  # the shortest rows: a smaller bucket
    buckets = sorted({int(used[short].max()) + 1, int(used.max()), text_len - 1})
    chat = _collator(stage2, text_len)
    chat.buckets = chat_data.train_buckets(buckets, text_len)
    fam = stage2.family
    objective = jax.jit(lambda p, b: fam.objective(p, b)[0])
    for rows, want_len in ((np.arange(len(used)), int(used.max())), (short, int(used[short].max()) + 1)):
        got = chat({k: v[rows] for k, v in records.items()})
        assert got["tokens"].shape == (len(rows), want_len), (got["tokens"].shape, want_len, buckets)
        for k in chat_data.ARRAYS:
            np.testing.assert_array_equal(got[k], full[k][rows, :want_len])
        assert not full["valid"][rows, want_len:].any()
        cut = {k: got[k] for k in (*chat_data.ARRAYS, "image")}
        whole = {k: full[k][rows] for k in (*chat_data.ARRAYS, "image")}
        np.testing.assert_allclose(objective(stage2.params, cut), objective(stage2.params, whole), rtol=2e-5)
    assert chat_data.train_buckets(None, text_len) == (text_len,)
    for bad, procs in (([0, 8], 1), ([text_len + 1], 1), ([8], 2)):
        with pytest.raises(ValueError, match="data.chat.buckets"):
            chat_data.train_buckets(bad, text_len, procs)


# ------------------------------------------------------------------ 4. the model
def test_place_images_and_positions_match_numpy():
    """place_images: feature k at a row's k-th slot (slots need not be contiguous; a row
    without any is unchanged). positions_of: valid tokens count up; CogVLM puts the
    image's tokens on one position and continues +1 after it (left / right padding too)."""
    from mmjax.models.zoo.llava import place_images, positions_of

    rng = np.random.RandomState(0)
    x, feats = rng.randn(3, 12, 5).astype(np.float32), rng.randn(3, 4, 5).astype(np.float32)
    slots = np.zeros((3, 12), bool)
    slots[0, 1:5], slots[1, [2, 3, 7, 9]] = True, True
    want = x.copy()
    for b in range(3):
        for k, t in enumerate(np.flatnonzero(slots[b])):
            want[b, t] = feats[b, k]
    np.testing.assert_array_equal(np.asarray(place_images(x, feats, slots)), want)

    valid, slots = np.ones((3, 12), bool), np.zeros((3, 12), bool)
    valid[1, :2], valid[2, 9:] = False, False  # left-padded (a prompt), right-padded (a batch row)
    slots[0, 1:5], slots[1, 3:7] = True, True
    cog = [[0, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 5, 6], [*range(9), 8, 8, 8]]
    llava = [list(range(12)), [0, 0, *range(10)], [*range(9), 8, 8, 8]]
    np.testing.assert_array_equal(np.asarray(positions_of(valid, slots, True)), cog)
    np.testing.assert_array_equal(np.asarray(positions_of(valid, slots, False)), llava)


def test_prefix_lm_attends_within_the_prompt_only(stage2, records):
    """With model.prefix_lm=True a prompt position's logits change with a later prompt
    token (not so when causal); an answer position's never change with a later token."""
    row = {k: v[:1] for k, v in _collator(stage2, int(stage2.config.data.text_len))(dict(records)).items()}
    first = int(np.argmax(row["loss_mask"][0]))  # the first answer token; first - 1: the prompt's last
    prompt_pos = int(np.flatnonzero(row["image_slots"][0])[-1]) + 1  # the first text token after the image
    batch = {k: np.repeat(row[k], 3, axis=0) for k in ("image", "tokens", "image_slots", "valid", "prefix")}
    for b, t in ((1, first - 1), (2, first + 1)):  # another (non-special) token there
        batch["tokens"][b, t] = max(3, (batch["tokens"][b, t] + 1) % stage2.family.spec.vocab_size)
    assert (batch["tokens"][1:] != batch["tokens"][0]).sum() == 2 and row["prefix"][0, first - 1]
    for prefix_lm in (True, False):
        cfg = ml_collections.ConfigDict(dict(stage2.config.model.to_dict(), prefix_lm=prefix_lm))
        z = np.asarray(jax.jit(zoo.build(cfg).forward)(stage2.params, batch))
        moved = np.abs(z[1, prompt_pos] - z[0, prompt_pos]).max()
        assert moved > 1e-4 if prefix_lm else moved == 0, (prefix_lm, moved)
        np.testing.assert_array_equal(z[2, : first + 1], z[0, : first + 1])


def test_llava_logits_are_the_parts_composed(stage2, records):
    """family.forward = by hand: the ViT's block depth-2 tokens without [CLS] -> the
    projector (fc2(gelu(fc1)), computed here) -> written at the slots of the LM's token
    embeddings -> DecoderLM with positions 0..L-1 and a causal mask -> its logits."""
    from mmjax.models.llm import DecoderLM
    from mmjax.models.vit import ViT

    fam, p, m = stage2.family, stage2.params, stage2.config.model
    rows = _collator(stage2, int(stage2.config.data.text_len))(dict(records))
    batch = {k: rows[k][:2] for k in ("image", "tokens", "image_slots")}
    length = batch["tokens"].shape[1]
    batch.update(valid=np.ones((2, length), bool), prefix=np.zeros((2, length), bool))
    want = np.asarray(jax.jit(fam.forward)(p, batch))

    vit = ViT(8, 32, 2, 2, 64, pool="cls", posemb=m.posemb, patch_bias=False, pre_norm=True, act=m.act, ln_eps=m.ln_eps)
    _, aux = jax.jit(vit.apply)({"params": p["vision"]}, batch["image"])
    feats = np.asarray(aux["encoder"]["block00"])[:, 1:]  # feature_layer -2 of 2 blocks; [CLS] dropped
    assert feats.shape == (2, IMAGE_TOKENS, 32) and not np.allclose(feats, np.asarray(aux["tokens"])[:, 1:])
    fc1, fc2 = p["projector"]["fc1"], p["projector"]["fc2"]
    h = np.asarray(jax.nn.gelu(feats @ np.asarray(fc1["kernel"]) + np.asarray(fc1["bias"]), approximate=False))
    feats = h @ np.asarray(fc2["kernel"]) + np.asarray(fc2["bias"])
    lm = DecoderLM(fam.spec)
    apply = jax.jit(lm.apply, static_argnames="method")
    x = np.array(apply({"params": p["lm"]}, batch["tokens"], method=DecoderLM.embed))
    for b in range(2):
        x[b, batch["image_slots"][b]] = feats[b]
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))
    causal = np.broadcast_to(np.tril(np.ones((length, length), bool)), (2, 1, length, length))
    hidden = apply({"params": p["lm"]}, x, positions, causal)
    got = np.asarray(apply({"params": p["lm"]}, hidden, method=DecoderLM.logits))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ 5. sharded step
def _random_batch(seed, vocab, pad, b=8, length=16) -> dict:
    """Image, tokens, 4 slots after bos, a 7-token prefix, answers after it, 10..16 valid."""
    rng = np.random.RandomState(seed)
    pos = np.arange(length)[None]
    valid = pos < rng.randint(10, length + 1, size=(b, 1))
    slots = np.broadcast_to((pos >= 1) & (pos < 1 + IMAGE_TOKENS), (b, length))
    prefix = np.broadcast_to(pos < 7, (b, length))
    tokens = np.where(valid & ~slots, rng.randint(3, vocab, size=(b, length)), pad).astype(np.int32)
    image = rng.normal(size=(b, 16, 16, 3)).astype(np.float32)
    return dict(image=image, tokens=tokens, image_slots=slots, valid=valid, prefix=prefix, loss_mask=valid & ~prefix)


def test_sharded_step_equals_single_device(stage2):
    """Two llava train steps on an (fsdp 4, tensor 2) mesh of the 8 host devices give the
    single device's losses and params; the params really are split."""
    from test_parallel import run

    fam = stage2.family
    batches = [_random_batch(s, fam.spec.vocab_size, fam.pad_id) for s in range(2)]
    ref_loss, ref_state, _ = run(fam, stage2.config.train, batches, "mesh", {"data": 1}, jax.devices()[:1])
    loss, state, shard = run(fam, stage2.config.train, batches, "mesh", {"fsdp": 4, "tensor": 2})
    specs = [str(s.spec) for s in jax.tree_util.tree_leaves(shard.params)]
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
    assert np.all(np.isfinite(loss)) and ref_loss[0] > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert jax.tree.structure(state.params) == jax.tree.structure(ref_state.params)
    for (path, v), got in zip(jax.tree_util.tree_leaves_with_path(ref_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(
        ref_state.params["projector"]["fc1"]["kernel"], stage2.params["projector"]["fc1"]["kernel"]
    )


# ------------------------------------------------------------------ 6. answer accuracy
def test_answer_metrics_by_hand():
    """Exact match after strip / lower-case / a final '.', overall and per answer type;
    answer_format_ok: the share of answers that are a label name at all."""
    from mmjax.eval.answers import answer_metrics

    names, types = shapes_gen.ANSWERS, shapes_gen.ANSWER_TYPES
    idx = {a: i for i, a in enumerate(names)}
    answers = ["Red.", " green", "circle", "large", "yes", "maybe"]
    labels = [idx[a] for a in ("red", "blue", "circle", "small", "yes", "no")]
    got = answer_metrics(answers, labels, names, types)
    want = dict(answer_acc=3 / 6, answer_format_ok=5 / 6, answer_count=6)
    want.update(answer_acc_colour=1 / 2, answer_acc_shape=1.0, answer_acc_size=0.0, answer_acc_yes_no=1 / 2)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(v) for k, v in want.items()), got
    assert answer_metrics([], [], names) == {"answer_count": 0}


def _evaluator(opened, family):
    from mmjax.eval.answers import AnswerEvaluator
    from mmjax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    data = opened.config.data
    return AnswerEvaluator(family, data, opened.tokenizer, mesh, split="test", batch_size=SHAPES["num_test"])


def test_answer_eval_of_the_trained_stage2(stage2):
    m = _evaluator(stage2, stage2.family)(stage2.params)
    assert m["answer_count"] == SHAPES["num_test"], m
    accs = {k: v for k, v in m.items() if k.startswith("answer_acc") or k == "answer_format_ok"}
    assert {"answer_acc", "answer_acc_colour", "answer_acc_yes_no"} <= set(accs)
    assert all(0 <= v <= 1 for v in accs.values()), accs


class AnswerKey:
    """A fake connector: `generate` answers each prompt with the tokens of its record's
    label (found by the image) + eos (+ tokens after it, which the eval must cut), after
    checking the prompt is the training turn: bos, 'USER: ', the image's slots, a question
    of the label's type, ' ASSISTANT:'."""

    QUESTION_WORDS = {"colour": ("colour",), "shape": ("shape",), "size": ("big", "size", "small or large")}

    def __init__(self, tokenizer, records):
        self.tok, self.prompts = tokenizer, []
        self.labels = {img.tobytes(): int(lab) for img, lab in zip(records["image"], records["label"])}

    def stop_ids(self):
        return (self.tok.eos_id,)

    def _answer(self, ids, valid, slots, image, n):
        tok, out = self.tok, np.full((len(ids), n), self.tok.pad_id, np.int32)
        for i in range(len(ids)):
            label = self.labels.get(np.asarray(image[i]).tobytes())
            if label is None:  # a padding row of the last batch
                continue
            row, s = ids[i][valid[i]], slots[i][valid[i]]
            at = int(np.argmax(s))
            text = tok.decode_plain(row[at + IMAGE_TOKENS :].tolist()).strip().lower()
            assert row[0] == tok.bos_id and s.sum() == IMAGE_TOKENS and s[at : at + IMAGE_TOKENS].all()
            assert tok.decode_plain(row[1:at].tolist()).strip().lower() == "user:" and text.endswith("assistant:")
            words = self.QUESTION_WORDS.get(shapes_gen.ANSWER_TYPES[label])  # None: a yes/no question
            assert words is None or any(w in text for w in words), (text, shapes_gen.ANSWERS[label])
            self.prompts.append(text)
            answer = list(tok.encode_plain(shapes_gen.ANSWERS[label])) + [tok.eos_id]
            out[i, : len(answer)] = answer
            out[i, len(answer) :] = answer[0]  # after eos: to be cut
        return out

    def generate(self, params, prompt, *, max_new_tokens, method):
        assert method == "greedy"
        b = prompt["ids"].shape[0]
        shape = jax.ShapeDtypeStruct((b, max_new_tokens), jnp.int32)
        fn = lambda *a: self._answer(*a, max_new_tokens)
        keys = ("ids", "valid", "image_slots", "image")
        return jax.pure_callback(fn, shape, *(prompt[k] for k in keys)), jnp.zeros((b,), jnp.float32)


def test_answer_eval_scores_the_right_answers_one(stage2, records):
    """The AnswerEvaluator with a family that 'generates' each record's label scores 1.0
    on every type: prompts are built from the records as in training and the generated
    ids are decoded and compared as they should be."""
    key = AnswerKey(stage2.tokenizer, records)
    m = _evaluator(stage2, key)(None)
    assert m["answer_count"] == SHAPES["num_test"] and len(key.prompts) == SHAPES["num_test"]
    assert all(v == 1.0 for k, v in m.items() if k != "answer_count"), m


# ------------------------------------------------------------------ 7. the CLI
@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A test scene as a PNG ('a.png') in its own directory."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    scene = shapes_gen.example(0, "test", 0, 16)["image"]
    Image.fromarray(np.asarray(scene, np.uint8)).save(d / "a.png")
    return str(d / "a.png")


def _generate(*argv) -> list:
    code, out, err = _mmjax("generate", "--max-new-tokens", 4, *argv)
    assert code == 0, err[-3000:]
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def test_generate_cli_prompt_with_image(runs, stage2, image_file):
    """--prompt with --images: one JSON line {prompt, text (the ids decoded), ids, image}."""
    (row,) = _generate("--workdir", runs["stage2"], "--prompt", "What colour is the circle?", "--images", image_file)
    assert set(row) == {"prompt", "text", "ids", "image"} and row["image"] == image_file
    assert row["prompt"] == "What colour is the circle?" and len(row["ids"]) <= 4
    assert row["text"] == stage2.tokenizer.decode_plain(row["ids"])


def test_generate_cli_chat_answers_the_last_turn(runs, stage2, image_file, tmp_path):
    """--chat with a two-turn LLaVA record: the prompt is both rounds (the first answer
    included) ending at the second question, and the ids are the argmax loop of the
    model's forward over that prompt and what was generated so far."""
    from mmjax.api import Model
    from mmjax.data.conversations import encode_prompt
    from mmjax.eval.generation import read_chat_file

    msgs = [("human", "<image>\nWhat colour is the circle"), ("gpt", "red"), ("human", "What shape is the red object")]
    rec = {
        "id": "two",
        "image": os.path.basename(image_file),
        "conversations": [dict(zip(("from", "value"), m)) for m in msgs],
    }
    path = os.path.join(os.path.dirname(image_file), "chat.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(rec) + "\n")
    (row,) = _generate("--workdir", runs["stage2"], "--chat", path)
    (conv,), _ = read_chat_file(path)
    conv.system = stage2.config.data.chat.system
    p = encode_prompt(conv, stage2.tokenizer, "vicuna", image_tokens=IMAGE_TOKENS)
    text = stage2.tokenizer.decode_plain(p["tokens"][~p["image_slots"]].tolist()).lower()
    assert (
        " ".join(text.split())
        == "user: what colour is the circle assistant: red user: what shape is the red object assistant:"
    )
    ids, n, length = p["tokens"].tolist(), len(p["tokens"]), int(stage2.config.data.text_len)
    forward, image = jax.jit(stage2.family.forward), Model(stage2).preprocess([image_file])
    for _ in range(4):
        tokens = np.full((1, length), stage2.tokenizer.pad_id, np.int32)
        tokens[0, : len(ids)] = ids
        slots = np.zeros((1, length), bool)
        slots[0, :n] = p["image_slots"]
        valid = np.arange(length)[None] < len(ids)
        batch = dict(image=image, tokens=tokens, image_slots=slots, valid=valid, prefix=np.zeros_like(valid))
        nxt = int(np.argmax(np.asarray(forward(stage2.params, batch))[0, len(ids) - 1]))
        if nxt in stage2.family.stop_ids() or nxt == stage2.tokenizer.pad_id:
            break
        ids.append(nxt)
    assert row["prompt"] == "two" and row["ids"] == ids[n:], (row, ids[n:])


def test_generate_cli_without_images_and_export(runs, tmp_path):
    """A prompt without --images on a connector exits 2 with one line; `mmjax export
    --format hf-llava` writes config.json and model.safetensors."""
    code, out, err = _mmjax("generate", "--workdir", runs["stage2"], "--prompt", "What colour is the circle?")
    assert code == 2 and not out.strip() and err.strip().count("\n") == 0 and err.startswith("mmjax: error: "), err
    assert "--images" in err
    out_dir = str(tmp_path / "hf")
    code, out, err = _mmjax("export", "--workdir", runs["stage2"], "--format", "hf-llava", "--out", out_dir)
    assert code == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["format"] == "hf-llava" and summary["step"] == STEPS and summary["out"] == out_dir
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out_dir))
    assert json.load(open(os.path.join(out_dir, "config.json")))["image_seq_length"] == IMAGE_TOKENS
