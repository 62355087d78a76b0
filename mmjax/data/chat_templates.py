"""Chat templates of the LMs a LLaVA-style model is trained on, as data, their rendering
into token segments and the checks of a tokenized sample against them (no TensorFlow;
used by `mmjax.data.conversations`; the shapes questions' phrasings are in
`mmjax.data.phrasings`).

A conversation renders round by round; a round is its user prompt (template text around
the user's text, "<image>" marking the image) followed by the assistant's answer: the
template's separator + the answer text, then the piece ending an assistant turn (`end`:
the tokenizer's eos, or a turn-end marker such as "<|im_end|>"), which is part of the
answer's loss. Text after the end piece (`after_end`) is prompt again.

Segmentation (why a correct template tokenizes segment by segment exactly as the whole
text does): the text is cut only where it must be: at bos / eos, the image, a marker the
tokenizer has as one id but does not parse from text (inserted as that id), and around
each answer. The answer is tokenized together with the separator before it (a BPE merges
" red" into one token; a sentencepiece-style tokenizer that starts every call with a word
prefix gets the answer without one leading space); its end piece is one id, or, where the
tokenizer lacks it, text tokenized with the answer. `full_text_ids` tokenizes the same
rendering without the cuts around answers, which is what `check_tokens` compares against.
The LMs' tokenizers pass with their templates (Llama-2's with vicuna / llama2, Qwen2's
with chatml, Gemma's with gemma); one that prefixes every call fails chatml / gemma.

Tokenizer contract: `encode_plain(text) -> list[int]`, `decode_plain(ids) -> str`,
`token_id(piece) -> int | None`, `bos_id`, `eos_id`, `pad_id`.
"""

from __future__ import annotations

import dataclasses
import re
import weakref

import numpy as np

IMAGE = "<image>"  # the image's place in a user text (LLaVA's DEFAULT_IMAGE_TOKEN)
PROMPT, ANSWER, IMAGE_ROLE = 0, 1, 2  # token roles


class TemplateMismatch(ValueError):
    """The tokens a template trains on are not the answers, or not how the whole text tokenizes."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One LM's chat format. `first_user` formats the first round's prompt ({system},
    {text}); `user` a later one's (and the first's when the system prompt is empty).
    `sep` goes between a prompt and its answer and is tokenized with the answer; `end`
    ends an assistant turn ("eos" or a marker piece) and carries loss; `after_end` follows
    it (no loss). `bos`: the sample starts with the tokenizer's bos; `round_bos`: every
    later round too. `markers`: special pieces in the formats (one id each where the
    tokenizer has them). `multi_turn=False` (plain): only the first round is used, and
    `image_only` prompts are the image alone (LLaVA's stage-1 'plain')."""

    name: str
    first_user: str
    user: str
    sep: str = " "
    end: str = "eos"
    after_end: str = ""
    system: str = ""
    bos: bool = True
    round_bos: bool = False
    markers: tuple = ()
    multi_turn: bool = True
    image_only: bool = False


VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to "
    "you. Please answer my questions."
)
TEMPLATES = {
    # LLaVA-1.5 (conv_vicuna_v1): "<s>SYS USER: <image>\nq ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>"
    "vicuna": ChatTemplate(
        "vicuna", "{system} USER: {text} ASSISTANT:", "USER: {text} ASSISTANT:", system=VICUNA_SYSTEM
    ),
    # LLaVA's llava_llama_2: "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nq [/INST] a</s><s>[INST] q2 [/INST] a2</s>"
    "llama2": ChatTemplate(
        "llama2",
        "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{text} [/INST]",
        "[INST] {text} [/INST]",
        system=LLAMA2_SYSTEM,
        round_bos=True,
    ),
    # Qwen2: "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    "chatml": ChatTemplate(
        "chatml",
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        sep="",
        end="<|im_end|>",
        after_end="\n",
        system="You are a helpful assistant.",
        bos=False,
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    # Gemma: "<bos><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\na<end_of_turn>\n" (a system
    # prompt, when given, opens the first user text followed by a blank line)
    "gemma": ChatTemplate(
        "gemma",
        "<start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n",
        sep="",
        end="<end_of_turn>",
        after_end="\n",
        markers=("<start_of_turn>", "<end_of_turn>"),
    ),
    # MiniGPT-4 (Vicuna v0, conversation.py SINGLE with sep '###'):
    # "SYS###Human: <Img><ImageHere></Img> q###Assistant: a###Human: q2###Assistant: a2###"
    "minigpt4": ChatTemplate(
        "minigpt4",
        "{system}###Human: {text}###Assistant:",
        "Human: {text}###Assistant:",
        end="###",
        system=MINIGPT4_SYSTEM,
    ),
    # LLaVA stage-1 pretraining ('plain'): "<s><image>caption</s>", no turns, no system prompt
    "plain": ChatTemplate("plain", "{text}", "{text}", sep="", multi_turn=False, image_only=True),
}


def get_template(template) -> ChatTemplate:
    """A ChatTemplate, or its name in TEMPLATES."""
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"chat template {template!r}; valid choices: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


# ----------------------------------------------------------------- tokenizer probes


def _single_id(tokenizer, piece: str) -> int | None:
    """The one id of a special piece ('bos', 'eos' or a marker), None where the tokenizer has none."""
    if piece in ("bos", "eos"):
        i = getattr(tokenizer, piece + "_id", None)
    else:
        i = tokenizer.token_id(piece)
    return None if i is None or int(i) < 0 else int(i)


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {probe: answer}


def _cached(tokenizer, key, fn):
    """fn(), remembered per tokenizer (recomputed for one that cannot be weakly referenced)."""
    try:
        memo = _CACHE.setdefault(tokenizer, {})
    except TypeError:
        return fn()
    return memo[key] if key in memo else memo.setdefault(key, fn())


def adds_word_prefix(tokenizer) -> bool:
    """Whether every encode_plain call starts a new word (sentencepiece's dummy prefix:
    'a' tokenizes as the 'a' of 'a a'); such a tokenizer gets an answer without one
    leading space, the space the separator would give."""

    def probe():
        a, aa = tokenizer.encode_plain("a"), tokenizer.encode_plain("a a")
        return bool(a) and len(aa) == 2 * len(a) and list(aa[len(a) :]) == list(a)

    return _cached(tokenizer, "word_prefix", probe)


def end_ids(tokenizer, template) -> list[int]:
    """Ids of the piece ending an assistant turn when it is one token, else [] (then its
    text is tokenized with the answer)."""
    i = _single_id(tokenizer, get_template(template).end)
    if i is None and get_template(template).end == "eos":
        raise ValueError("chat template ends turns with eos but the tokenizer has no eos")
    return [] if i is None else [i]


def answer_text(tokenizer, template, answer: str) -> str:
    """The text of one answer segment as the template writes it: separator + answer (+ the
    end marker's text when the tokenizer lacks it as a token)."""
    t = get_template(template)
    return t.sep + answer + ("" if end_ids(tokenizer, t) else t.end)


def segment_text(tokenizer, text: str) -> str:
    """An answer segment's text as tokenized on its own: without one leading space for a
    tokenizer that starts every call with a word prefix (`adds_word_prefix`)."""
    return text[1:] if text.startswith(" ") and adds_word_prefix(tokenizer) else text


def answer_ids(tokenizer, template, answer: str) -> list[int]:
    """The tokens one assistant turn trains on: its answer segment's tokens + the end piece's id."""
    text = segment_text(tokenizer, answer_text(tokenizer, template, answer))
    return [int(i) for i in tokenizer.encode_plain(text)] + end_ids(tokenizer, template)


def stop_ids(tokenizer, template) -> tuple[int, ...]:
    """Ids that end generation under this template (its end piece, and eos)."""
    ids = end_ids(tokenizer, template) + [i for i in [_single_id(tokenizer, "eos")] if i is not None]
    return tuple(dict.fromkeys(ids))


def stop_strings(template) -> tuple[str, ...]:
    """Text that ends an answer under this template (when its end piece is not one token)."""
    t = get_template(template)
    return () if t.end == "eos" else (t.end,)


# ------------------------------------------------------------------------ rendering


def _split_text(text: str, template: ChatTemplate, tokenizer) -> list[tuple]:
    """Prompt text -> segments ('text', str, PROMPT) / ('piece', marker, PROMPT) / ('image', None, PROMPT):
    a marker is a piece where the tokenizer has it as one id but does not parse it from text
    (a sentencepiece user symbol); one it parses (a HF added token) stays in the text."""
    pieces = [m for m in template.markers if _single_id(tokenizer, m) is not None and not _parses(tokenizer, m)]
    pat = "(" + "|".join(re.escape(p) for p in [IMAGE, *pieces]) + ")"
    out = []
    for part in re.split(pat, text):
        if part == IMAGE:
            out.append(("image", None, PROMPT))
        elif part in pieces:
            out.append(("piece", part, PROMPT))
        elif part:
            out.append(("text", part, PROMPT))
    return out


def render(template, rounds, tokenizer, system: str | None = None) -> list[list[tuple]]:
    """(user text, answer) rounds -> per round a list of segments (kind, value, role):
    kind 'text' (value a str; role ANSWER for the answer, see `answer_text`),
    'piece' (value 'bos', 'eos' or a marker; one id) or 'image' (value None). A round
    whose answer is None renders its prompt only (a generation prompt)."""
    t = get_template(template)
    system = t.system if system is None else system
    out = []
    for r, (user, answer) in enumerate(rounds):
        segs = []
        if (r == 0 and t.bos) or (r > 0 and t.round_bos):
            if _single_id(tokenizer, "bos") is not None:
                segs.append(("piece", "bos", PROMPT))
        if t.image_only:
            user = IMAGE if IMAGE in user else ""
        fmt = t.first_user if r == 0 and system and "{system}" in t.first_user else t.user
        segs += _split_text(fmt.format(system=system, text=user), t, tokenizer)
        if answer is not None:
            segs.append(("text", answer_text(tokenizer, t, answer), ANSWER))
            segs += [("piece", t.end, ANSWER)] if end_ids(tokenizer, t) else []
            segs += _split_text(t.after_end, t, tokenizer)
        out.append(segs)
    return out


def tokenize_round(segs, tokenizer, image_tokens: int) -> tuple[list[int], list[int]]:
    """One rendered round -> (ids, roles): each segment tokenized on its own, the image
    as `image_tokens` pad slots (role IMAGE_ROLE)."""
    ids, roles = [], []
    for kind, value, role in segs:
        if kind == "image":
            new, role = [int(tokenizer.pad_id)] * image_tokens, IMAGE_ROLE
        elif kind == "piece":
            new = [_single_id(tokenizer, value)]
        else:
            new = [int(i) for i in tokenizer.encode_plain(segment_text(tokenizer, value) if role == ANSWER else value)]
        ids += new
        roles += [role] * len(new)
    return ids, roles


def full_text_ids(rounds_segs, tokenizer, image_tokens: int) -> list[int]:
    """The rendered text tokenized in as few encode_plain calls as the tokenizer allows:
    split only at the image, bos/eos and markers that encode_plain does not turn into
    their one id (sentencepiece control pieces); a marker it parses stays in the text.
    The answer's text keeps the separator as the template writes it."""
    out, buf = [], []

    def flush():
        out.extend(int(i) for i in tokenizer.encode_plain("".join(buf)))
        buf.clear()

    for segs in rounds_segs:
        for kind, value, _ in segs:
            if kind == "text":
                buf.append(value)
            elif kind == "piece" and value not in ("bos", "eos") and _parses(tokenizer, value):
                buf.append(value)
            else:
                flush()
                out.extend(
                    [int(tokenizer.pad_id)] * image_tokens if kind == "image" else [_single_id(tokenizer, value)]
                )
    flush()
    return out


def _parses(tokenizer, marker: str) -> bool:
    """Whether encode_plain turns the marker's text into its one id (a HF added token)."""
    return _cached(tokenizer, marker, lambda: list(tokenizer.encode_plain(marker)) == [_single_id(tokenizer, marker)])


def decoded(tokenizer, ids) -> str:
    return f"{tokenizer.decode_plain(ids)!r} {list(map(int, ids))}"  # for error messages


def loss_runs(tokens, loss_mask) -> list[list[int]]:
    """The tokens under loss_mask, split into maximal runs (one per assistant turn)."""
    runs, cur = [], []
    for t, m in zip(np.asarray(tokens).tolist(), np.asarray(loss_mask).tolist()):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def check_vocabulary(tokenizer, template) -> None:
    """TemplateMismatch when the template's own text (its formats around the user and
    system text, separator, text end piece) holds characters this tokenizer can only
    write as its unk id: such a template would train on unk pieces, and a text end piece
    could never be generated (MiniGPT-4's '###' with a tokenizer trained without '#').
    The system prompt is the run's text, like the user's, and is not checked."""
    t = get_template(template)
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None:
        return
    texts = [t.first_user.replace("{system}", " ").replace("{text}", " "), t.user.replace("{text}", " ")]
    texts += [t.sep, t.after_end] + ([] if t.end == "eos" else [t.end])
    for text in texts:
        for m in t.markers:
            text = text.replace(m, " ")
        for word in text.split():
            if unk in tokenizer.encode_plain(word):
                raise TemplateMismatch(
                    f"template {t.name!r}: its text {word!r} is not in this tokenizer's vocabulary (it encodes to "
                    "the unk id); use a template the tokenizer can write, or a tokenizer trained with that text"
                )


def check_tokens(sample: dict, rounds, tokenizer, template, *, image_tokens: int, system=None, name="") -> None:
    """TemplateMismatch unless (1) the tokens under loss_mask, split per assistant turn,
    are each round's `answer_ids` (separator + answer tokens + end piece), (2) the tokens
    equal the rounds' rendering tokenized in one go (`full_text_ids`), (3) rounds with
    answers have loss tokens, (4) an image has exactly image_tokens slots. `sample`:
    'tokens', 'loss_mask', 'image_slots' [n] (the valid part); `rounds`: those it holds."""
    t = get_template(template)
    tokens = [int(i) for i in sample["tokens"]]
    runs = loss_runs(tokens, sample["loss_mask"])
    if rounds and not runs:
        raise TemplateMismatch(f"template {t.name!r}: conversation {name!r} has answers but no loss token")
    want = [answer_ids(tokenizer, t, a) for _, a in rounds]
    for k in range(max(len(runs), len(want))):
        got, exp = (runs[k] if k < len(runs) else []), (want[k] if k < len(want) else [])
        if got != exp:
            raise TemplateMismatch(
                f"template {t.name!r}, conversation {name!r}, turn {k}: the loss tokens "
                f"{decoded(tokenizer, got)} are not the answer's {decoded(tokenizer, exp)}"
            )
    full = full_text_ids(render(t, rounds, tokenizer, system), tokenizer, image_tokens)
    if full != tokens:
        k = next((i for i, (a, b) in enumerate(zip(full, tokens)) if a != b), min(len(full), len(tokens)))
        turn = len(loss_runs(tokens[:k], sample["loss_mask"][:k]))
        lo = max(0, k - 8)
        raise TemplateMismatch(
            f"template {t.name!r}, conversation {name!r}, turn {turn}: tokenized segment by segment "
            f"{decoded(tokenizer, tokens[lo : k + 8])} but in one go {decoded(tokenizer, full[lo : k + 8])} "
            f"(from token {lo})"
        )
    slots, images = int(np.sum(sample["image_slots"])), sum(IMAGE in u for u, _ in rounds)
    if slots != image_tokens * images:
        raise TemplateMismatch(f"conversation {name!r}: {slots} image slots, expected {image_tokens} x {images}")
