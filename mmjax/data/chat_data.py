"""Instruction batches: the pipeline's records -> conversations -> token arrays
(`data.chat`, read when `data.chat.template` is set). No TensorFlow.

`data.chat` keys (CHAT_KEYS): template (a chat_templates.TEMPLATES name; None: no chat,
the caption batches of docs/architecture.md), task (what conversation a record
gives: 'caption' (a caption prompt -> the caption; LLaVA's stage 1), 'vqa' (its
question -> the answer), 'vqa_multi' (the question, then questions of other types
about the same scene), 'caption_vqa' (caption or question, alternating by id),
'llava' (the conversation of a `llava_json` record: a user's LLaVA-format data)),
turns (rounds of 'vqa_multi'), held_out (the held-out phrasings: an eval of unseen
instructions), system (the template's system prompt; None: the template's default),
image_tokens (set by the run from the model: the image's slots; 0: a text-only LM,
the <image> marker then takes no slots), on_mismatch ('raise' | 'skip'), buckets
(None: every train batch is [B, data.text_len]; a list of lengths: each train batch is
cut to the smallest bucket (or text_len) that holds its longest conversation, so jit
compiles one step per bucket and short batches do not pay for padding. One process
only: the hosts of a multi-process run would pick different lengths for one global
batch).

A batch (`ChatCollator.__call__`), every array [B, L] with L = data.text_len (or its bucket):
`tokens` int32, `image_slots`, `loss_mask`, `prefix`, `valid` bool (mmjax.data.
conversations), `text` (= tokens: what a text-only LM reads), plus `image` and `id`.
A conversation that cannot fit L (ConversationTooLong) leaves its row all-invalid (no
loss, no attention) and is counted in `counts['too_long']`, never cut silently.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import conversations as conv_lib
from mmjax.data.chat_templates import TEMPLATES
from mmjax.data.schema import COMMON

CHAT_KEYS = COMMON["chat"]  # the keys and their defaults (declared in the data schema)
TASKS = ("caption", "vqa", "vqa_multi", "caption_vqa", "llava")
ARRAYS = ("tokens", "image_slots", "loss_mask", "prefix", "valid")


def chat_options(data_config) -> dict | None:
    """The data.chat section with defaults, checked; None when no template is set."""
    from mmjax.data.schema import cfg_get

    opts = {k: cfg_get(data_config, "chat." + k, v) for k, v in CHAT_KEYS.items()}
    if opts["template"] is None:
        return None
    if opts["template"] not in TEMPLATES:
        raise ValueError(f"data.chat.template={opts['template']!r}; valid choices: {', '.join(TEMPLATES)}")
    if opts["task"] not in TASKS:
        raise ValueError(f"data.chat.task={opts['task']!r}; valid choices: {', '.join(TASKS)}")
    return opts


def _scene_kw(data_config, split: str) -> dict:
    from mmjax.data.schema import cfg_get

    return dict(
        seed=int(cfg_get(data_config, "shapes.seed", 0)),
        split=split,
        image_size=int(cfg_get(data_config, "shapes.image_size", 32)),
    )


def record_conversation(record: dict, opts: dict, scene_kw: dict):
    """One record (a dict of its fields) -> the Conversation `opts['task']` asks for
    ('llava': the conversation a `llava_json` record carries as JSON in 'caption')."""
    rid = int(record["id"])
    task = opts["task"]
    if task == "llava":
        import json

        got = json.loads(conv_lib._text(record["caption"]))
        system = opts["system"] if opts["system"] is not None else got.get("system")
        return conv_lib.Conversation([tuple(t) for t in got["turns"]], image="given", id=str(rid), system=system)
    if task == "caption_vqa":
        task = "caption" if rid % 2 else "vqa"
    out = conv_lib.shapes_conversations(
        record,
        rid,
        multi_turn=task == "vqa_multi",
        turns=int(opts["turns"]),
        held_out=bool(opts["held_out"]),
        **scene_kw,
    )
    conv = out["caption"] if task == "caption" else out["qa"]
    if conv is None:
        raise ValueError(f"record {rid} gives no {task!r} conversation (data.chat.task); is it a shapes set?")
    if opts["system"] is not None:
        conv.system = opts["system"]
    return conv


class ChatCollator:
    """A tf.data batch of records (numpy) -> an instruction batch (module docstring)."""

    def __init__(self, data_config, tokenizer, *, text_len: int, split: str = "train", process_count: int = 1):
        self.opts = chat_options(data_config)
        if self.opts is None:
            raise ValueError("ChatCollator needs data.chat.template")
        self.text_len, self.pad = int(text_len), int(tokenizer.pad_id)
        self.buckets = train_buckets(self.opts["buckets"], self.text_len, int(process_count))
        self.scene_kw = _scene_kw(data_config, split)
        self.encoder = conv_lib.ConversationEncoder(
            tokenizer,
            self.opts["template"],
            image_tokens=int(self.opts["image_tokens"]),
            max_len=self.text_len,
            buckets=(self.text_len,),
            on_mismatch=self.opts["on_mismatch"],
        )

    @property
    def counts(self) -> dict:
        return self.encoder.counts

    def rows(self, b) -> list:
        """The records of a batch as dicts of python values (bytes stay bytes)."""
        n = len(b["id"])
        keys = [k for k in ("caption", "label", "id", "question", "answer") if k in b]
        return [{k: (b[k][i].item() if hasattr(b[k][i], "item") else b[k][i]) for k in keys} for i in range(n)]

    def encode(self, records) -> dict:
        """Records -> the [B, L] arrays (an unfit conversation: an all-invalid row)."""
        b, length = len(records), self.text_len
        out = {k: np.zeros((b, length), np.int32 if k == "tokens" else bool) for k in ARRAYS}
        out["tokens"][:] = self.pad
        for i, rec in enumerate(records):
            sample = self.encoder(record_conversation(rec, self.opts, self.scene_kw))
            if sample is None:
                continue
            for k in ARRAYS:
                out[k][i] = sample[k][:length]
        out["text"] = out["tokens"].copy()
        return out

    def __call__(self, b) -> dict:
        if b is None:
            raise StopIteration
        out = self.encode(self.rows(b))
        used = int(out["valid"].sum(1).max(initial=0))  # rows are valid from position 0 on
        length = next(n for n in self.buckets if n >= used)
        out = {k: v[:, :length] for k, v in out.items()}
        out["image"], out["id"] = b["image"], b["id"].astype(np.int64)
        return out


def train_buckets(buckets, text_len: int, process_count: int = 1) -> tuple[int, ...]:
    """data.chat.buckets checked -> the sorted train lengths, text_len last."""
    if not buckets:
        return (int(text_len),)
    got = sorted({int(n) for n in buckets})
    if got[0] < 1 or got[-1] > text_len:
        raise ValueError(f"data.chat.buckets={list(buckets)}: every length must be in 1..data.text_len={text_len}")
    if process_count > 1:
        raise ValueError(
            f"data.chat.buckets={list(buckets)} needs a single process ({process_count} here): the hosts would "
            "pick different lengths for one global batch; leave it None (every batch data.text_len long)"
        )
    return (*[n for n in got if n < text_len], int(text_len))


def tokenizer_corpus(data_config, n: int = 2000) -> list[str]:
    """Texts to train a tokenizer for chat data on: the rendered question-answer and
    caption conversations of the first `n` train scenes and the text of every built-in
    chat template, so that prompts, answers and any template's pieces are not unknown
    pieces (an LM trained with vicuna turns can later be tuned with MiniGPT-4's '###')."""
    kw = _scene_kw(data_config, "train")
    texts = []
    for i in range(int(n)):
        got = conv_lib.shapes_conversations({"id": i}, i, multi_turn=True, turns=3, **kw)
        for conv in (got["qa"], got["caption"]):
            if conv is not None:
                texts.extend(t for turn in conv.turns for t in turn if t)
    for template in TEMPLATES.values():  # every built-in template's text, so any of them can be written
        texts.extend(str(v) for v in vars(template).values() if isinstance(v, str) and v)
    texts.append("? ! . , : ; ' \" ( ) - what is the colour? is it big?")  # punctuation a user may type
    return texts


def derive_image_tokens(data_config, image_tokens: int) -> None:
    """Sets data.chat.image_tokens to the model's count of image slots (the run
    derives it, as the model's vocabulary); a config that sets another value is a
    ValueError naming both."""
    if chat_options(data_config) is None:
        return
    chat = data_config.chat
    old = chat.get("image_tokens", None)
    if old not in (None, 0, int(image_tokens)):
        raise ValueError(
            f"data.chat.image_tokens={old} contradicts the model's {image_tokens} image tokens: it is derived "
            "from the model at run time; remove it from the config"
        )
    with data_config.unlocked(), data_config.ignore_type():
        chat["image_tokens"] = int(image_tokens)
