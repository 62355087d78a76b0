"""The phrasings of the built-in `shapes` questions and caption prompts (the chat data's
user turns; mmjax.data.conversations draws from them): PHRASINGS for training, HELD_OUT
kept aside to measure unseen phrasings, and `parse_question` reading shapes_gen's
canonical questions back into their type and slots. No TensorFlow."""

from __future__ import annotations

from mmjax.data import shapes_gen

# Phrasings of shapes_gen's canonical questions (lower case, no question mark, as its
# captions); HELD_OUT ones are kept aside for measuring unseen phrasings.
PHRASINGS = {
    "colour": ("what colour is the {o}", "which colour is the {o}", "what is the colour of the {o}"),
    "shape": ("what shape is the {o}", "which shape is the {o}", "what kind of shape is the {o}"),
    "size": ("how big is the {o}", "what size is the {o}", "is the {o} small or large"),
    "relation": ("is the {a} {r} the {b}", "is it true that the {a} is {r} the {b}", "is the {b} {f} the {a}"),
    "exists": ("is there a {o}", "does the image contain a {o}", "can you see a {o}"),
    "caption": ("describe the image", "what does the image show", "write a caption for the image"),
}
HELD_OUT = {
    "colour": ("tell me the colour of the {o}",),
    "shape": ("name the shape of the {o}",),
    "size": ("tell me the size of the {o}",),
    "relation": ("would you say the {a} is {r} the {b}",),
    "exists": ("is any {o} in the image",),
    "caption": ("summarize the picture",),
}
CANONICAL = {  # shapes_gen.question_of's forms: question type -> its fixed opening
    "colour": "what colour is the ",
    "shape": "what shape is the ",
    "size": "how big is the ",
    "exists": "is there a ",
    "relation": "is the ",
}


def parse_question(question: str) -> tuple[str, dict] | None:
    """A shapes_gen question -> (question type, its slots), None for other text. Slots:
    'o' the object phrase; a relation question's 'a', 'r' (relation), 'b', 'f' (r flipped)."""
    for qtype, head in CANONICAL.items():
        rest = question[len(head) :] if question.startswith(head) else None
        if rest is None or qtype != "relation":
            if rest is not None:
                return qtype, {"o": rest}
            continue
        for r in shapes_gen.RELATIONS:
            if f" {r} the " in rest:
                a, b = rest.split(f" {r} the ", 1)
                return qtype, {"a": a, "r": r, "b": b, "f": shapes_gen.FLIP[r]}
    return None
