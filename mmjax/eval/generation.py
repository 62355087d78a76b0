"""`mmjax generate` and `mmjax.load(W).generate(...)`: continue text prompts (and,
for a family with an image input, images + prompts) with a workdir's model.

Prompts are tokenized without truncation, left-padded to a multiple of
`PROMPT_BUCKET` (so prompts of similar length share one compiled program), and
continued by the family's `generate` (the KV-cached loop of mmjax/models/generate.py):
greedy, beam search or temperature + top-p sampling. Stop strings cut the decoded
text at their first occurrence (the tokens are cut to match).
"""

from __future__ import annotations

import jax
import numpy as np

PROMPT_BUCKET = 16
METHODS = ("greedy", "sample", "beam")


def left_pad(rows: list[list[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
    """Token lists -> (ids [B, P] int32, valid [B, P] bool), right-aligned, P the
    longest row rounded up to a multiple of `bucket`."""
    if not rows or not all(rows):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(map(len, rows)) // bucket) * bucket
    ids = np.full((len(rows), length), pad_id, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = r
        valid[i, length - len(r) :] = True
    return ids, valid


def truncate_at_stop(text: str, stops) -> tuple[str, bool]:
    """(text up to the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops or () if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def prompt_tokens(tokenizer, text: str) -> list[int]:
    """A prompt's ids: bos (where the tokenizer has one), then the text (case as the
    tokenizer treats it), no eos."""
    bos = [] if tokenizer.bos_id is None or tokenizer.bos_id < 0 else [int(tokenizer.bos_id)]
    return bos + [int(i) for i in tokenizer.encode_plain(text)]


def sampling_options(method: str, *, temperature=1.0, top_p=1.0, seed=0, beams=1, length_penalty=0.0) -> dict:
    """The family.generate keywords of a decoding method; ValueError for a bad one."""
    if method not in METHODS:
        raise ValueError(f"decoding method {method!r}; valid choices: {', '.join(METHODS)}")
    if method == "sample" and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"--temperature {temperature} --top-p {top_p}: need temperature > 0 and 0 < top_p <= 1")
    if method == "beam" and beams < 1:
        raise ValueError(f"--beams {beams}: need at least 1")
    opts = dict(method=method)
    if method == "sample":
        opts.update(temperature=float(temperature), top_p=float(top_p), rng=jax.random.PRNGKey(int(seed)))
    if method == "beam":
        opts.update(beams=int(beams), length_penalty=float(length_penalty))
    return opts


def _decode_row(tokenizer, ids, pad_id: int, stop_ids, stops) -> dict:
    ids = [int(i) for i in ids]
    cut = next((k for k, t in enumerate(ids) if t in stop_ids or t == pad_id), len(ids))
    kept = ids[:cut]
    text, stopped = truncate_at_stop(tokenizer.decode_plain(kept), stops)
    if stopped:  # the fewest tokens that spell the kept text
        k = next((k for k in range(len(kept) + 1) if len(tokenizer.decode_plain(kept[:k])) >= len(text)), len(kept))
        kept = kept[:k]
    return {"text": text, "ids": kept}


def chat_prompts(convs, tokenizer, template, image_tokens: int):
    """Conversations (the last round's answer missing) -> left-padded prompt arrays
    {'ids', 'valid', 'image_slots'} rendered with the chat template."""
    from mmjax.data import conversations

    got = [conversations.encode_prompt(c, tokenizer, template, image_tokens=image_tokens) for c in convs]
    ids, valid = left_pad([g["tokens"].tolist() for g in got], int(tokenizer.pad_id))
    slots = np.zeros_like(valid)
    for i, g in enumerate(got):
        slots[i, ids.shape[1] - len(g["image_slots"]) :] = g["image_slots"]
    return {"ids": ids, "valid": valid, "image_slots": slots}


class Generator:
    """A workdir's model continuing prompts (`texts`) or conversations (`chat`).

    With the run's data.chat template a prompt is one user turn rendered with it (the
    image, when the model reads one, at its <image> place), and generation stops at
    the template's stop pieces; without a template it is raw text to continue."""

    def __init__(self, family, params, tokenizer, config, batch_size: int = 32):
        from mmjax.data import chat_data, chat_templates

        if not family.can("generate"):
            raise ValueError(f"model.family {family.names[0]!r} does not generate text (no 'generate' capability)")
        self.family, self.params, self.tokenizer, self.batch_size = family, params, tokenizer, int(batch_size)
        self.chat = chat_data.chat_options(config.data)
        self.image_tokens = int(family.image_tokens)
        self.stops = chat_templates.stop_strings(self.chat["template"]) if self.chat else ()
        self._runs = {}

    def _run(self, opts: dict, max_new_tokens: int):
        key = (tuple(sorted((k, str(v)) for k, v in opts.items())), max_new_tokens)
        if key not in self._runs:
            fam = self.family
            self._runs[key] = jax.jit(lambda p, x: fam.generate(p, x, max_new_tokens=max_new_tokens, **opts))
        return self._runs[key]

    def texts(self, prompts, images=None, **kw) -> list[dict]:
        """Prompts (and images [N, S, S, 3], one per prompt) -> one dict each."""
        from mmjax.data.chat_templates import IMAGE
        from mmjax.data.conversations import Conversation

        if not self.chat:
            rows = [prompt_tokens(self.tokenizer, p) for p in prompts]
            pad = int(self.family.pad_id)
            make = lambda c: dict(zip(("ids", "valid"), left_pad([rows[i] for i in c], pad)))
            return self._generate(list(prompts), make, None, **kw)
        mark = IMAGE + "\n" if self.image_tokens else ""
        image = "given" if self.image_tokens else None
        convs = [Conversation([(mark + p, None)], image=image, system=self.chat["system"]) for p in prompts]
        return self.chat_turns(convs, images, labels=list(prompts), **kw)

    def chat_turns(self, convs, images=None, *, labels=None, **kw) -> list[dict]:
        """Conversations whose last round awaits its answer -> one dict each."""
        if self.image_tokens and images is None:
            raise ValueError("this model reads an image with each prompt: pass --images")
        labels = labels or [c.id for c in convs]
        for c in convs:  # the run's system prompt, as its conversations were rendered in training
            c.system = self.chat["system"] if c.system is None else c.system
        make = lambda c: chat_prompts([convs[i] for i in c], self.tokenizer, self.chat["template"], self.image_tokens)
        return self._generate(labels, make, images, **kw)

    def _generate(self, labels, make, images, *, max_new_tokens=32, stops=(), **method_opts) -> list[dict]:
        opts = sampling_options(**method_opts)
        run = self._run(opts, int(max_new_tokens))
        pad, out = int(self.family.pad_id), []
        for start in range(0, len(labels), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(labels))))
            prompt = make(chunk)
            prompt["ids"] = np.where(prompt["valid"], prompt["ids"], pad).astype(np.int32)
            if self.image_tokens:
                prompt["image"] = np.asarray(images)[chunk]
            tokens, _ = run(self.params, prompt)
            for k, row in zip(chunk, np.asarray(tokens)):
                got = _decode_row(self.tokenizer, row, pad, self.family.stop_ids(), tuple(stops) + self.stops)
                out.append({"prompt": labels[k], **got})
        return out


def generate_texts(family, params, tokenizer, prompts, *, config=None, images=None, **kw):
    """`Generator(family, params, tokenizer, config).texts(prompts, images, **kw)`; without
    a config, raw text continuation."""
    import ml_collections

    config = config or ml_collections.ConfigDict({"data": {}})
    return Generator(family, params, tokenizer, config).texts(prompts, images, **kw)


def read_chat_file(path: str):
    """A JSONL (or JSON list) of LLaVA-format conversations whose last human turn awaits
    its answer -> (conversations, image paths or None each); image paths relative to the
    file's directory. A record that does not parse is a ValueError naming its line."""
    import json
    import os

    from mmjax.data.conversations import parse_llava

    with open(path) as f:
        text = f.read()
    lines = [x for x in text.splitlines() if x.strip()]
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in lines]
    convs, images = [], []
    for n, rec in enumerate(records, 1):
        msgs = list(rec.get("conversations", []))
        if not msgs or msgs[-1].get("from") not in ("human", "user"):
            raise ValueError(f"{path}: conversation {n} must end with a human turn to answer")
        try:
            conv = parse_llava({**rec, "conversations": msgs + [{"from": "gpt", "value": "-"}]})
        except ValueError as e:
            raise ValueError(f"{path}: conversation {n}: {e}") from None
        conv.turns[-1] = (conv.turns[-1][0], None)
        convs.append(conv)
        img = rec.get("image")
        images.append(None if img is None else os.path.join(os.path.dirname(os.path.abspath(path)), img))
    return convs, images
