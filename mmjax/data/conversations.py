"""Instruction data for LLaVA-style training: conversations (LLaVA's JSON, or built from
the `shapes` / `shapes_vqa` records: `shapes_conversations`) encoded with an LM's chat
template (`mmjax.data.chat_templates`) into fixed-bucket token arrays. No TensorFlow.

A sample (`encode_conversation`), all [Lb] with Lb the smallest bucket >= length:
`tokens` int32 (pad at image slots and after `length`), `image_slots` bool (the image's
`image_tokens` positions, filled by the model with image features), `loss_mask` bool (the
positions whose token is an answer token or its turn-end piece; the target tokens[t] is
predicted from position t - 1), `prefix` bool (the image and everything before the first
answer: the prefix-LM's bidirectional part), `valid` bool (t < length), `length` int, and
`turns` / `dropped_turns` (rounds kept / dropped to fit max_len).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from mmjax.data import chat_templates as ct
from mmjax.data import phrasings, shapes_gen
from mmjax.data.chat_templates import IMAGE, get_template

log = logging.getLogger(__name__)
TemplateMismatch = ct.TemplateMismatch  # re-exported: raised by encode_conversation


class ConversationTooLong(ValueError):
    """The image + first prompt + first answer do not fit max_len (the data layer skips and counts it)."""


class MalformedRecord(ValueError):
    """A LLaVA record that is not a conversation this module can train on."""


@dataclasses.dataclass
class Conversation:
    """(user text, assistant answer) rounds; "<image>" in a user text marks the image's
    slots (with an `image` and no marker, encoding puts one before the first user text).
    `image`: a path (LLaVA), an array (shapes) or None; `system`: None for the template's
    default system prompt; `meta`: provenance (e.g. shapes question types)."""

    turns: list
    image: Any = None
    id: str = ""
    system: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------- LLaVA's format
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _messages(record: dict) -> list[tuple[str, str]]:
    msgs = record.get("conversations")
    if not isinstance(msgs, list) or not msgs:
        raise MalformedRecord("no 'conversations' list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("value"), str) or m.get("from") not in ROLES:
            raise MalformedRecord(f"bad message {m!r:.80}")
        out.append((ROLES[m["from"]], m["value"]))
    if out[0][0] != "user":  # LLaVA drops a conversation's leading non-human message
        out = out[1:]
    if len(out) % 2:  # a last question without an answer
        out = out[:-1]
    if not out or any(r != ("user", "assistant")[i % 2] for i, (r, _) in enumerate(out)):
        raise MalformedRecord("turns do not alternate human / gpt")
    return out


def parse_llava(record: dict) -> Conversation:
    """A LLaVA record {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}
    -> Conversation. With an image, its marker is moved to the front of the human turn
    holding it ("<image>\\n" + text, as LLaVA's preprocess_multimodal does), or prepended to
    the first human turn when no turn has one. MalformedRecord for anything else (several
    images or markers, a marker without an image, turns not alternating)."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"record is a {type(record).__name__}, not a dict")
    msgs = _messages(record)
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise MalformedRecord(f"image {image!r:.80}: one path expected")
    users = [v for r, v in msgs if r == "user"]
    answers = [v for r, v in msgs if r == "assistant"]
    n = sum(u.count(IMAGE) for u in users) + sum(a.count(IMAGE) for a in answers)
    if image is None and n:
        raise MalformedRecord(f"{IMAGE} marker without an image")
    if n > 1 or any(IMAGE in a for a in answers):
        raise MalformedRecord(f"{n} {IMAGE} markers (one image per conversation)")
    if image is not None:
        k = next((i for i, u in enumerate(users) if IMAGE in u), 0)
        users[k] = IMAGE + "\n" + users[k].replace(IMAGE, "").strip()
    return Conversation(list(zip(users, answers)), image=image, id=str(record.get("id", "")))


class Conversations(list):
    """A list of Conversation with `skipped`: {reason: count} of the records left out."""

    skipped: dict


def _records(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def read_llava_json(path: str, image_root: str | None) -> Conversations:
    """A LLaVA JSON list (or JSONL) -> the parsed Conversations, image paths joined to
    `image_root` (None: kept as given, not checked). A record that is malformed or whose
    image file is missing is skipped and counted in `.skipped` (logged); ValueError when
    none is left."""
    out, skipped = Conversations(), {"malformed": 0, "missing_image": 0}
    for rec in _records(path):
        try:
            conv = parse_llava(rec)
        except MalformedRecord:
            skipped["malformed"] += 1
            continue
        if conv.image is not None and image_root is not None:
            conv.image = os.path.join(image_root, conv.image)
            if not os.path.isfile(conv.image):
                skipped["missing_image"] += 1
                continue
        out.append(conv)
    out.skipped = skipped
    if any(skipped.values()):
        log.warning("%s: %d conversations read, skipped %s", path, len(out), skipped)
    if not out:
        raise ValueError(f"{path}: no usable conversation (skipped {skipped})")
    return out


# -------------------------------------------------------------------------- encoding


def default_buckets(max_len: int) -> tuple[int, ...]:
    """64, 128, 256, ... below max_len, then max_len."""
    out, b = [], 64
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, int(max_len))


def _rounds(conv: Conversation, template) -> list:
    """The rounds a template uses; with an image and no marker, "<image>\n" opens the first."""
    if not conv.turns:
        raise MalformedRecord(f"conversation {conv.id!r} has no turns")
    rounds = [tuple(r) for r in conv.turns] if get_template(template).multi_turn else [tuple(conv.turns[0])]
    if conv.image is not None and not any(IMAGE in u for u, _ in conv.turns):
        rounds[0] = (IMAGE + "\n" + rounds[0][0], rounds[0][1])
    return rounds


def _fit(rounds_ids: list, max_len: int, conv_id: str) -> int:
    """How many leading rounds fit max_len (whole rounds only); ConversationTooLong for none."""
    total, kept = 0, 0
    for ids, _ in rounds_ids:
        if total + len(ids) > max_len:
            break
        total, kept = total + len(ids), kept + 1
    if not kept:
        n = len(rounds_ids[0][0])
        raise ConversationTooLong(f"conversation {conv_id!r}: image + first prompt + answer = {n} tokens > {max_len}")
    return kept


def encode_conversation(
    conv: Conversation, tokenizer, template, *, image_tokens: int, max_len: int, buckets=None, check: bool = True
) -> dict:
    """Conversation -> a sample (module docstring): rendered with `template` (a name in
    chat_templates.TEMPLATES or a ChatTemplate), tokenized segment by segment, "<image>"
    expanded to `image_tokens` slots, rounds that do not fit max_len dropped from the end
    (an answer is never cut). `buckets`: sorted lengths (default `default_buckets`), Lb the
    smallest >= length (max_len when none is). `check`: `check_sample` (TemplateMismatch)."""
    t = get_template(template)
    rounds = _rounds(conv, t)
    segs = ct.render(t, rounds, tokenizer, conv.system)
    if sum(s[0] == "image" for r in segs for s in r) > 1:
        raise MalformedRecord(f"conversation {conv.id!r}: more than one {IMAGE} marker")
    per_round = [ct.tokenize_round(r, tokenizer, image_tokens) for r in segs]
    kept = _fit(per_round, max_len, conv.id)
    ids = [i for r in per_round[:kept] for i in r[0]]
    roles = np.array([x for r in per_round[:kept] for x in r[1]], np.int8)
    n = len(ids)
    size = next((b for b in sorted(buckets or default_buckets(max_len)) if n <= b <= max_len), max_len)
    out = {k: np.zeros([size], bool) for k in ("image_slots", "loss_mask", "prefix", "valid")}
    out["tokens"] = np.full([size], tokenizer.pad_id, np.int32)
    out["tokens"][:n] = ids
    out["image_slots"][:n] = roles == ct.IMAGE_ROLE
    out["loss_mask"][:n] = roles == ct.ANSWER
    out["prefix"][: int(np.argmax(roles == ct.ANSWER))] = True
    out["valid"][:n] = True
    out.update(length=n, turns=kept, dropped_turns=len(rounds) - kept)
    if check:
        check_sample(out, conv, tokenizer, t, image_tokens=image_tokens)
    return out


def check_sample(sample: dict, conv: Conversation, tokenizer, template, *, image_tokens: int) -> None:
    """TemplateMismatch unless the sample is this conversation's kept rounds under `template`
    (`chat_templates.check_tokens`: loss tokens = the answers, segment-wise = in one go)."""
    t = get_template(template)
    n, kept = int(sample["length"]), int(sample["turns"])
    cut = {k: sample[k][:n] for k in ("tokens", "loss_mask", "image_slots")}
    ct.check_tokens(
        cut, _rounds(conv, t)[:kept], tokenizer, t, image_tokens=image_tokens, system=conv.system, name=conv.id
    )


def encode_prompt(conv: Conversation, tokenizer, template, *, image_tokens: int) -> dict:
    """A generation prompt: the conversation's rounds, the last one's answer left out
    (the model continues after the prompt; stop at `chat_templates.stop_ids` /
    `stop_strings`) -> {'tokens' int32 [P], 'image_slots' bool [P]} (no padding)."""
    t = get_template(template)
    rounds = _rounds(conv, t)
    rounds[-1] = (rounds[-1][0], None)
    per_round = [ct.tokenize_round(r, tokenizer, image_tokens) for r in ct.render(t, rounds, tokenizer, conv.system)]
    roles = np.array([x for r in per_round for x in r[1]], np.int8)
    return {
        "tokens": np.array([i for r in per_round for i in r[0]], np.int32),
        "image_slots": roles == ct.IMAGE_ROLE,
    }


class ConversationEncoder:
    """`encode_conversation` with fixed settings that counts what it skips: `__call__(conv)`
    -> a sample, or None for a conversation too long (`too_long`) or malformed
    (`malformed`); `truncated` counts samples that lost rounds, `dropped_turns` the rounds.
    A TemplateMismatch propagates (the template is wrong for this tokenizer) unless
    on_mismatch="skip" (then counted in `mismatch`; for data whose odd text trips it)."""

    def __init__(
        self, tokenizer, template, *, image_tokens: int, max_len: int, buckets=None, check=True, on_mismatch="raise"
    ):
        if on_mismatch not in ("raise", "skip"):
            raise ValueError(f"on_mismatch={on_mismatch!r}; valid choices: raise, skip")
        self.tokenizer, self.template, self.on_mismatch = tokenizer, get_template(template), on_mismatch
        if check:
            ct.check_vocabulary(tokenizer, self.template)  # before any record: a template it cannot write
        self.kw = dict(image_tokens=image_tokens, max_len=max_len, buckets=buckets, check=check)
        self.counts = dict.fromkeys(("encoded", "too_long", "malformed", "mismatch", "truncated", "dropped_turns"), 0)

    def __call__(self, conv: Conversation) -> dict | None:
        try:
            s = encode_conversation(conv, self.tokenizer, self.template, **self.kw)
        except ConversationTooLong:
            self.counts["too_long"] += 1
            return None
        except MalformedRecord:
            self.counts["malformed"] += 1
            return None
        except TemplateMismatch:
            if self.on_mismatch == "raise":
                raise
            self.counts["mismatch"] += 1
            return None
        self.counts["encoded"] += 1
        self.counts["truncated"] += bool(s["dropped_turns"])
        self.counts["dropped_turns"] += s["dropped_turns"]
        return s


# ------------------------------------------------------------------ shapes / shapes_vqa
def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v.item() if isinstance(v, np.ndarray) else v)


def rephrase(question: str, rng: np.random.Generator, held_out: bool = False) -> str:
    """A canonical shapes question in one of its type's phrasings (HELD_OUT with held_out)."""
    qtype, slots = phrasings.parse_question(question)
    pool = (phrasings.HELD_OUT if held_out else phrasings.PHRASINGS)[qtype]
    return pool[int(rng.integers(len(pool)))].format(**slots)


def rephrase_caption(rng: np.random.Generator, held_out: bool = False) -> str:
    """A caption prompt from PHRASINGS["caption"] (HELD_OUT with held_out)."""
    pool = (phrasings.HELD_OUT if held_out else phrasings.PHRASINGS)["caption"]
    return pool[int(rng.integers(len(pool)))]


def shapes_scene(record: dict, *, seed=None, split=None, image_size: int = 32):
    """(objects [(colour, shape, size), ...] * 2, relation of objects[0]) of a shapes
    record: from its 'objects'/'relation' (shapes_gen dicts), its caption, or regenerated
    from its 'id' with `seed` and `split` (shapes_gen.example); None when none applies."""
    if "objects" in record and "relation" in record:
        return [tuple(int(x) for x in o[:3]) for o in record["objects"]], _text(record["relation"])
    cap = _text(record["caption"]) if "caption" in record else ""
    for rel in shapes_gen.RELATIONS:
        words = cap.split(f" {rel} ")
        if len(words) == 2 and all(w.startswith("a ") and len(w.split()) == 4 for w in words):
            try:
                objs = [_obj(w.split()[1:]) for w in words]
            except ValueError:
                break
            return objs, rel
    if seed is not None and split is not None and "id" in record:
        ex = shapes_gen.example(int(seed), str(split), int(record["id"]), image_size)
        return [tuple(o[:3]) for o in ex["objects"]], ex["relation"]
    return None


def _obj(words) -> tuple[int, int, int]:
    z, c, s = words
    return shapes_gen.COLOURS.index(c), shapes_gen.SHAPES.index(s), shapes_gen.SIZES.index(z)


def _record_qa(record: dict):
    """(question, answer index) a shapes_vqa record holds ('question' and 'answer' or
    'label'; or, as the catalog selector leaves it, the question in 'caption'), else None."""
    q = _text(record["question"]) if "question" in record else _text(record.get("caption", ""))
    if phrasings.parse_question(q) is None:
        return None
    a = record.get("answer", record.get("label"))
    a = _text(a) if isinstance(a, (str, bytes)) else int(a)
    return q, shapes_gen.ANSWERS.index(a) if isinstance(a, str) else a


_SALT = 0x5C4A7


def _rng(rng_or_index) -> np.random.Generator:
    if isinstance(rng_or_index, np.random.Generator):
        return rng_or_index
    return np.random.default_rng([_SALT, *np.atleast_1d(np.asarray(rng_or_index, np.int64)).tolist()])


def _qa_rounds(qa, scene, rng, multi_turn: bool, turns: int):
    """[(canonical question, answer index, type)]: the record's question (or one drawn
    from the scene), then (multi_turn) questions of other types about the same scene."""
    out = [(qa[0], qa[1], phrasings.parse_question(qa[0])[0])] if qa else []
    want = max(turns, 1) if multi_turn else 1
    for _ in range(50):
        if len(out) >= want:
            break
        q, a, qt = shapes_gen.question_of(scene[0], scene[1], rng)
        if qt not in {x[2] for x in out}:
            out.append((q, a, qt))
    return out


def shapes_conversations(
    record: dict, rng_or_index, *, multi_turn: bool, turns: int = 2, held_out: bool = False, **scene_kw
) -> dict:
    """Conversations of one shapes / shapes_vqa record -> {'qa': Conversation | None,
    'caption': Conversation | None}. 'qa': the record's question -> its answer (drawn from
    the scene for a shapes record), and with multi_turn `turns` rounds in all, each a
    question of another type about the same scene, answered from shapes_gen's ground truth;
    'caption': a caption prompt -> the scene's caption. Questions and prompts are drawn from
    PHRASINGS (HELD_OUT with held_out) by an rng from `rng_or_index` (an int such as the
    record's id: deterministic) or a Generator (independent streams for the extra questions,
    the phrasings and the caption prompt: a turn's phrasing does not depend on `turns`). `scene_kw`: seed, split, image_size for a
    record that carries neither the scene nor its caption (see shapes_scene)."""
    rng, phrasing, cap_rng = (np.random.default_rng(x) for x in _rng(rng_or_index).integers(2**62, size=3))
    scene, qa = shapes_scene(record, **scene_kw), _record_qa(record)
    if scene is None and (multi_turn or qa is None):
        raise ValueError("shapes_conversations: the record's scene is unknown (pass seed= and split=)")
    rid, image = _text(record.get("id", "")), record.get("image")
    rounds = _qa_rounds(qa, scene, rng, multi_turn, turns)
    texts = [rephrase(q, phrasing, held_out) for q, _, _ in rounds]
    users = [(IMAGE + "\n" if k == 0 else "") + t for k, t in enumerate(texts)]
    meta = dict(canonical=[q for q, _, _ in rounds], answers=[a for _, a, _ in rounds], types=[x for *_, x in rounds])
    qa_conv = Conversation([(u, shapes_gen.ANSWERS[a]) for u, (_, a, _) in zip(users, rounds)], image, rid, meta=meta)
    cap_conv = None
    if scene is not None:
        prompt = rephrase_caption(cap_rng, held_out)
        caption = shapes_gen.caption_of(scene[0][0], scene[0][1], scene[1])
        cap_conv = Conversation([(IMAGE + "\n" + prompt, caption)], image, rid, meta=dict(types=["caption"]))
    return {"qa": qa_conv, "caption": cap_conv}
