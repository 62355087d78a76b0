"""Tests of the instruction data: chat templates (mmjax.data.chat_templates), conversations
(mmjax.data.conversations) and the chat side of the tokenizers (encode_plain, load_tokenizer),
for mmjax's sentencepiece tokenizer and a HF byte-level BPE tokenizer.json trained here."""

import dataclasses
import json
import os

import numpy as np
import pytest

from mmjax.data import chat_templates as T
from mmjax.data import conversations as C
from mmjax.data import phrasings as P
from mmjax.data import shapes_gen
from mmjax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
QUESTIONS = ["what colour is the circle", "is there a blue square", "how big is the red cross", "describe the image"]


def _corpus():
    caps = [shapes_gen.example(0, "train", i, 16)["caption"] for i in range(150)]
    chat = [t.first_user + " " + t.user + " " + t.end + " " + t.system for t in T.TEMPLATES.values()]
    phr = [p for d in (P.PHRASINGS, P.HELD_OUT) for v in d.values() for p in v]
    return caps + chat + phr + QUESTIONS + ["yes no red green blue yellow purple white small large"]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return Tokenizer(train_tokenizer(_corpus(), str(tmp_path_factory.mktemp("sp")), 300))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HT
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HT(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        _corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return load_tokenizer(str(hf_dir))


@pytest.fixture(params=["sp", "hf"])
def tok(request, sp_tok, hf_tok):
    return sp_tok if request.param == "sp" else hf_tok


def _conv(n=2, image="img.png"):
    qa = [("what colour is the circle", "red"), ("is there a blue square", "no"), ("how big is the red cross", "small")]
    turns = [(q, a) for q, a in (qa * 3)[:n]]
    if image:
        turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
    return C.Conversation(turns, image=image, id="c0")


def _norm(tok, text):
    return text.lower() if getattr(tok, "lowercase", False) else text


# ------------------------------------------------------------------------- tokenizer


def test_tokenizer_plain_interface(sp_tok, hf_tok, hf_dir, tmp_path):
    ids = sp_tok.encode_plain("A Red Circle")
    assert ids == sp_tok.encode_plain("a red circle") and sp_tok.bos_id not in ids and sp_tok.eos_id not in ids
    assert sp_tok.decode_plain(ids + [sp_tok.pad_id]) == "a red circle"
    assert sp_tok.encode(["A Red Circle"], 8)[0, 1 : 1 + len(ids)].tolist() == ids  # encode unchanged
    assert sp_tok.token_id("</s>") == sp_tok.eos_id and sp_tok.token_id("<mask>") == 4
    assert sp_tok.token_id("<|no such piece|>") is None
    cased = load_tokenizer(sp_tok.model_path)  # an LLM's .model: case kept
    assert isinstance(cased, Tokenizer) and not cased.lowercase and cased.encode_plain("Red") != ids[:1]
    os.symlink(sp_tok.model_path, tmp_path / "tokenizer.model")
    assert not load_tokenizer(str(tmp_path)).lowercase
    assert load_tokenizer(sp_tok.model_path, lowercase=True).encode_plain("A Red Circle") == ids
    from mmjax.data.hf_tokenizer import HFTokenizer

    by_file = load_tokenizer(str(hf_dir / "tokenizer.json"))
    assert isinstance(hf_tok, HFTokenizer) and isinstance(by_file, HFTokenizer)
    assert hf_tok.decode_plain(hf_tok.encode_plain("A Red circle")) == "A Red circle"
    assert hf_tok.token_id("<|im_end|>") is not None and hf_tok.eos_id == hf_tok.token_id("</s>")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


# -------------------------------------------------------------------------- templates


@pytest.mark.parametrize("name", list(T.TEMPLATES))
def test_only_answers_carry_loss(tok, name):
    conv = _conv(3)
    s = C.encode_conversation(conv, tok, name, image_tokens=5, max_len=256)
    n, t = s["length"], T.get_template(name)
    kept = conv.turns if t.multi_turn else conv.turns[:1]
    assert s["turns"] == len(kept) and s["dropped_turns"] == 0
    assert all(s[k].shape == s["tokens"].shape for k in ("image_slots", "loss_mask", "prefix", "valid"))
    assert s["tokens"].dtype == np.int32 and s["valid"].sum() == n and not s["loss_mask"][n:].any()
    runs = T.loss_runs(s["tokens"], s["loss_mask"])
    assert len(runs) == len(kept)
    end = T.end_ids(tok, name)  # the end piece: one id, or text after the answer
    for run, (_, answer) in zip(runs, kept):
        if end:
            assert run[-len(end) :] == end and run[-1] in T.stop_ids(tok, name)
            text = tok.decode_plain(run[: -len(end)])
        else:
            text = tok.decode_plain(run)
            assert text.endswith(t.end) and T.stop_strings(name) == (t.end,)
            text = text[: -len(t.end)]
        assert text.strip() == _norm(tok, answer)
    first = int(np.argmax(s["loss_mask"]))  # prefix: image + everything before the first answer
    assert s["prefix"][:first].all() and not s["prefix"][first:].any()
    assert not (s["loss_mask"] & s["image_slots"]).any()
    # The generation prompt is the sample up to the first answer.
    p = C.encode_prompt(dataclasses.replace(conv, turns=conv.turns[:1]), tok, name, image_tokens=5)
    assert p["tokens"].tolist() == s["tokens"][:first].tolist() and (p["image_slots"] == s["image_slots"][:first]).all()


def test_word_prefix_tokenizer(tmp_path):
    """A Llama-2-style tokenizer.json (every call starts a word with "▁"): vicuna / llama2 / plain
    pass (the answer goes without its separator's space); chatml cannot start an answer mid-line."""
    from tokenizers import Tokenizer as HT
    from tokenizers import decoders, models, pre_tokenizers, trainers

    ht = HT(models.BPE(unk_token="<unk>", byte_fallback=True))
    ht.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    ht.decoder = decoders.Metaspace(prepend_scheme="always")
    ht.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>"] + SPECIALS))
    ht.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(str(tmp_path))
    assert T.adds_word_prefix(tok)
    for name in ("vicuna", "llama2", "plain"):
        s = C.encode_conversation(_conv(2), tok, name, image_tokens=3, max_len=256)
        runs = T.loss_runs(s["tokens"], s["loss_mask"])
        assert [tok.decode_plain(r[:-1]) for r in runs] == ["red", "no"][: len(runs)]
    with pytest.raises(C.TemplateMismatch, match="chatml"):
        C.encode_conversation(_conv(2), tok, "chatml", image_tokens=3, max_len=256)


def test_image_expansion(tok):
    for k in (1, 7):
        s = C.encode_conversation(_conv(1), tok, "vicuna", image_tokens=k, max_len=256)
        idx = np.flatnonzero(s["image_slots"])
        assert len(idx) == k and (np.diff(idx) == 1).all() and (s["tokens"][idx] == tok.pad_id).all()
        before = tok.decode_plain(s["tokens"][: idx[0]])
        assert _norm(tok, "USER:") in before and _norm(tok, "what colour") not in before
    s = C.encode_conversation(_conv(1, image=None), tok, "chatml", image_tokens=9, max_len=256)
    assert not s["image_slots"].any()
    unmarked = C.encode_conversation(
        dataclasses.replace(_conv(1, image=None), image="x"), tok, "vicuna", image_tokens=4, max_len=256
    )
    assert (
        unmarked["tokens"].tolist()
        == C.encode_conversation(_conv(1), tok, "vicuna", image_tokens=4, max_len=256)["tokens"].tolist()
    )
    two = C.Conversation([("<image> <image> what", "red")], image="x")
    with pytest.raises(C.MalformedRecord):
        C.encode_conversation(two, tok, "vicuna", image_tokens=3, max_len=256)


def test_mismatched_template_raises(tok, hf_tok):
    conv = _conv(2)
    s = C.encode_conversation(conv, tok, "vicuna", image_tokens=4, max_len=256)
    with pytest.raises(C.TemplateMismatch, match="chatml"):  # rendered with one template, checked with another
        C.check_sample(s, conv, tok, "chatml", image_tokens=4)
    bad = dict(s, loss_mask=np.roll(s["loss_mask"], 1))  # LLaVA's silent off-by-one
    with pytest.raises(C.TemplateMismatch, match="turn 0"):
        C.check_sample(bad, conv, tok, "vicuna", image_tokens=4)
    none = dict(s, loss_mask=np.zeros_like(s["loss_mask"]))
    with pytest.raises(C.TemplateMismatch, match="no loss token"):
        C.check_sample(none, conv, tok, "vicuna", image_tokens=4)
    # The separator's space in the prompt: a BPE merges " red" across the boundary.
    vic = T.TEMPLATES["vicuna"]
    spaced = dataclasses.replace(vic, name="spaced", first_user=vic.first_user + " ", user=vic.user + " ", sep="")
    with pytest.raises(C.TemplateMismatch, match="spaced.*one go"):
        C.encode_conversation(conv, hf_tok, spaced, image_tokens=4, max_len=256)
    skip = C.ConversationEncoder(hf_tok, spaced, image_tokens=4, max_len=256, on_mismatch="skip")
    assert skip(conv) is None and skip.counts["mismatch"] == 1
    with pytest.raises(C.TemplateMismatch):
        C.ConversationEncoder(hf_tok, spaced, image_tokens=4, max_len=256)(conv)


def test_truncation_and_buckets(tok):
    conv = _conv(6)
    full = C.encode_conversation(conv, tok, "vicuna", image_tokens=8, max_len=1024)
    per_turn = np.flatnonzero(np.diff(full["loss_mask"].astype(int)) == -1) + 1  # ends of answers
    for max_len in (int(per_turn[0]), int(per_turn[2]) + 3, full["length"] - 1):
        s = C.encode_conversation(conv, tok, "vicuna", image_tokens=8, max_len=max_len, buckets=(16, 32, 64))
        kept = int(np.sum(per_turn <= max_len))
        assert s["length"] <= max_len and len(s["tokens"]) <= max_len
        assert s["turns"] == kept and s["dropped_turns"] == 6 - kept
        assert s["tokens"][: s["length"]].tolist() == full["tokens"][: per_turn[kept - 1]].tolist()
        assert len(T.loss_runs(s["tokens"], s["loss_mask"])) == kept
        assert len(s["tokens"]) == min([b for b in (16, 32, 64) if s["length"] <= b <= max_len] or [max_len])
    with pytest.raises(C.ConversationTooLong):
        C.encode_conversation(conv, tok, "vicuna", image_tokens=8, max_len=int(per_turn[0]) - 1)
    with pytest.raises(C.ConversationTooLong):
        C.encode_conversation(conv, tok, "plain", image_tokens=200, max_len=128)
    assert C.default_buckets(300) == (64, 128, 256, 300) and C.default_buckets(64) == (64,)
    enc = C.ConversationEncoder(tok, "vicuna", image_tokens=8, max_len=int(per_turn[1]))
    outs = [enc(conv), enc(_conv(1)), enc(C.Conversation([], id="empty"))]
    enc.kw["max_len"] = 4
    assert enc(conv) is None and outs[0]["turns"] == 2 and outs[2] is None
    assert enc.counts == {
        "encoded": 2,
        "too_long": 1,
        "malformed": 1,
        "mismatch": 0,
        "truncated": 1,
        "dropped_turns": 4,
    }


# ------------------------------------------------------------------------ LLaVA JSON


def test_parse_llava():
    rec = {
        "id": "a",
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": "What is this?\n<image>"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Black."},
        ],
    }
    c = C.parse_llava(rec)
    assert c.turns == [("<image>\nWhat is this?", "A cat."), ("Colour?", "Black.")] and c.image == "x.jpg"
    no_marker = dict(rec, conversations=[{"from": "gpt", "value": "hi"}] + [dict(m) for m in rec["conversations"]])
    no_marker["conversations"][1]["value"] = "What is this?"
    assert C.parse_llava(no_marker).turns[0][0] == "<image>\nWhat is this?"  # leading gpt dropped, marker added
    text_only = {"id": 1, "conversations": rec["conversations"][2:] + [{"from": "human", "value": "unanswered"}]}
    assert C.parse_llava(text_only).turns == [("Colour?", "Black.")] and C.parse_llava(text_only).image is None
    bad = [
        {"id": 2},
        dict(text_only, conversations=rec["conversations"][:2]),  # a marker without an image
        dict(rec, conversations=[{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]),
        dict(rec, conversations=[{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]),
        dict(rec, image=["a.jpg", "b.jpg"]),
    ]
    for r in bad:
        with pytest.raises(C.MalformedRecord):
            C.parse_llava(r)


def test_read_llava_json(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.jpg").write_bytes(b"")
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    recs = [
        {"id": 1, "image": "1.jpg", "conversations": conv},
        {"id": 2, "image": "2.jpg", "conversations": conv},  # missing file
        {"id": 3, "conversations": conv[:1]},  # malformed
        {"id": 4, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    a = C.read_llava_json(str(tmp_path / "d.json"), str(tmp_path / "img"))
    assert [c.id for c in a] == ["1", "4"] and a[0].image == str(tmp_path / "img" / "1.jpg")
    assert a.skipped == {"malformed": 1, "missing_image": 1}
    b = C.read_llava_json(str(tmp_path / "d.jsonl"), str(tmp_path / "img"))
    assert [c.id for c in b] == ["1", "4"] and b.skipped == {"malformed": 2, "missing_image": 1}
    assert len(C.read_llava_json(str(tmp_path / "d.json"), None)) == 3  # paths not checked
    (tmp_path / "none.json").write_text(json.dumps(recs[1:3]))
    with pytest.raises(ValueError, match="no usable"):
        C.read_llava_json(str(tmp_path / "none.json"), str(tmp_path / "img"))


# ----------------------------------------------------------------------------- shapes


def _truth(question: str, objects, rel: str) -> str:
    """The answer to a canonical shapes_gen question, computed from the scene directly."""
    names = lambda o: {shapes_gen.COLOURS[o[0]], shapes_gen.SHAPES[o[1]], shapes_gen.SIZES[o[2]]}
    rels = [rel, shapes_gen.FLIP[rel]]  # objects[k]'s relation to the other one
    qtype, slots = P.parse_question(question)
    if qtype == "exists":
        return "yes" if any(set(slots["o"].split()) <= names(o) for o in objects) else "no"
    if qtype == "relation":
        k = [set(slots["a"].split()) <= names(o) for o in objects].index(True)
        return "yes" if rels[k] == slots["r"] else "no"
    words = slots["o"].split()
    for r in shapes_gen.RELATIONS:  # "the X rel the other Y": pick by relation
        if f" {r} the other" in slots["o"]:
            k = rels.index(r)
            break
    else:
        k = [set(w for w in words if w != "object") <= names(o) for o in objects].index(True)
    c, s, z = objects[k][:3]
    return {"colour": shapes_gen.COLOURS[c], "shape": shapes_gen.SHAPES[s], "size": shapes_gen.SIZES[z]}[qtype]


def test_shapes_conversations_ground_truth_and_determinism(sp_tok):
    seen_types = set()
    for i in range(40):
        ex = shapes_gen.vqa_example(0, "train", i, 16)
        builder_rec = {"id": i, "question": ex["question"].encode(), "label": ex["answer"], "image": ex["image"]}
        out = C.shapes_conversations(builder_rec, i, multi_turn=True, turns=3, seed=0, split="train", image_size=16)
        again = C.shapes_conversations(builder_rec, i, multi_turn=True, turns=3, seed=0, split="train", image_size=16)
        qa = out["qa"]
        assert qa.turns == again["qa"].turns and out["caption"].turns == again["caption"].turns
        assert qa.turns[0][0].startswith("<image>\n") and len(qa.turns) == 3 and len(set(qa.meta["types"])) == 3
        assert qa.meta["canonical"][0] == ex["question"] and qa.turns[0][1] == shapes_gen.ANSWERS[ex["answer"]]
        for (user, answer), q in zip(qa.turns, qa.meta["canonical"]):
            assert answer == _truth(q, ex["objects"], ex["relation"])
            assert user.replace("<image>\n", "") in {
                p.format(**P.parse_question(q)[1]) for p in P.PHRASINGS[qa.meta["types"][qa.meta["canonical"].index(q)]]
            }
        assert out["caption"].turns[0][1] == ex["caption"] and out["caption"].image is ex["image"]
        seen_types |= set(qa.meta["types"])
        # The same record in other forms: the generator's dict, the catalog selector's, a shapes record.
        assert C.shapes_conversations(ex, i, multi_turn=True, turns=3)["qa"].turns == qa.turns
        sel = {"id": i, "caption": ex["question"], "label": ex["answer"]}
        assert (
            C.shapes_conversations(sel, i, multi_turn=False, seed=0, split="train", image_size=16)["qa"].turns
            == qa.turns[:1]
        )
        shp = C.shapes_conversations({"id": i, "caption": ex["caption"], "label": 3}, i, multi_turn=True)
        for (_, answer), q in zip(shp["qa"].turns, shp["qa"].meta["canonical"]):
            assert answer == _truth(q, ex["objects"], ex["relation"])
        held = C.shapes_conversations(
            builder_rec, i, multi_turn=False, held_out=True, seed=0, split="train", image_size=16
        )
        q0 = held["qa"].turns[0][0].replace("<image>\n", "")
        assert q0 in {p.format(**P.parse_question(ex["question"])[1]) for p in P.HELD_OUT[ex["question_type"]]}
        assert held["caption"].turns[0][0].replace("<image>\n", "") in P.HELD_OUT["caption"]
        s = C.encode_conversation(qa, sp_tok, "vicuna", image_tokens=4, max_len=512)
        assert [sp_tok.decode_plain(r) for r in T.loss_runs(s["tokens"], s["loss_mask"])] == [a for _, a in qa.turns]
    assert seen_types == set(shapes_gen.QUESTION_TYPES)
    assert not any(set(P.PHRASINGS[k]) & set(P.HELD_OUT[k]) for k in P.PHRASINGS)
    phr = {
        C.shapes_conversations(shapes_gen.vqa_example(0, "train", 0, 16), j, multi_turn=False)["qa"].turns[0][0]
        for j in range(30)
    }
    assert len(phr) > 1  # phrasings vary with the index
    with pytest.raises(ValueError, match="scene"):
        C.shapes_conversations({"id": 0, "question": "is there a red circle", "label": 12}, 0, multi_turn=True)


def test_a_template_the_tokenizer_cannot_write_is_refused(tmp_path, sp_tok):
    """A tokenizer trained without '#' writes MiniGPT-4's '###' as its unk id: the encoder
    refuses the template at once, naming the text (it would train on unk pieces and never
    generate the end piece); a tokenizer whose corpus had every template passes them all."""
    caps = [shapes_gen.example(0, "train", i, 16)["caption"] for i in range(150)]
    tok = Tokenizer(train_tokenizer(caps + QUESTIONS + ["USER: ASSISTANT: ?"], str(tmp_path), 120))
    assert tok.unk_id in tok.encode_plain("###")
    with pytest.raises(T.TemplateMismatch, match="'minigpt4'.*'###Human:'.*unk"):
        C.ConversationEncoder(tok, "minigpt4", image_tokens=5, max_len=64)
    C.ConversationEncoder(tok, "plain", image_tokens=5, max_len=64)  # nothing but the user text: fine
    for name in T.TEMPLATES:
        T.check_vocabulary(sp_tok, name)
