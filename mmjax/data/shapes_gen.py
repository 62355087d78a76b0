"""Pure-numpy scene generator for the built-in `shapes` dataset (no TensorFlow).

A scene holds two non-overlapping objects (colour, shape, size) on a dark, noisy
background. Its caption names the objects in a canonical order (by colour index, then
shape index, then size index) and states the spatial relation from the first-named
object's point of view, so one scene has exactly one caption.
"""

from __future__ import annotations

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
COLOUR_RGB = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 220, 40], [170, 60, 220], [245, 245, 245]], np.float32
)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
SIZE_FRAC = (0.22, 0.38)  # object diameter as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # 24 zero-shot classes
SPLITS = ("train", "validation", "test")
MAX_NEGATIVES = 4


def obj_key(obj) -> tuple[int, int, int]:
    """(colour, shape, size) indices; the canonical sort key of an object."""
    return (obj[0], obj[1], obj[2])


def describe(obj) -> str:
    c, s, z = obj[:3]
    return f"a {SIZES[z]} {COLOURS[c]} {SHAPES[s]}"


def canonical(a, b, rel: str) -> tuple[tuple, tuple, str]:
    """Order (a rel b) canonically: smaller key first, relation flipped if swapped."""
    if obj_key(b) < obj_key(a):
        return b, a, FLIP[rel]
    return a, b, rel


def caption_of(a, b, rel: str) -> str:
    """Canonical caption of the scene "a rel b" (a, b: (colour, shape, size) tuples)."""
    a, b, rel = canonical(a, b, rel)
    return f"{describe(a)} {rel} {describe(b)}"


def relation_of(ca, cb) -> str:
    """Relation of an object centred at ca=(x, y) to one at cb (image coords, y down)."""
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def hard_negatives(a, b, rel: str) -> list[str]:
    """Captions with the same words as the true one but describing another scene.

    Swaps colours / shapes / sizes between the objects (when they differ) and reverses
    the relation; each re-canonicalised, deduplicated, never equal to the true caption.
    """
    a, b, rel = canonical(tuple(a[:3]), tuple(b[:3]), rel)
    true = caption_of(a, b, rel)
    cands = []
    for k in range(3):  # colour, shape, size
        if a[k] != b[k]:
            a2, b2 = list(a), list(b)
            a2[k], b2[k] = b[k], a[k]
            cands.append(caption_of(tuple(a2), tuple(b2), rel))
    cands.append(caption_of(a, b, FLIP[rel]))
    out = []
    for c in cands:
        if c != true and c not in out:
            out.append(c)
    return out[:MAX_NEGATIVES]


def _mask(shape_idx: int, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Boolean [n, n] mask of a shape of radius r centred at (cx, cy)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape_idx == 0:  # circle
        return dx * dx + dy * dy <= r * r
    if shape_idx == 1:  # square (a bit smaller so its area is close to the circle's)
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape_idx == 2:  # upward triangle filling the box
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    w = r / 3.0  # cross
    return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))


mask = _mask  # public: the footprint of a shape as the image draws it (shapes_av_gen's depth map)


def radius(size_idx: int, n: int) -> float:
    """The radius of an object of size `size_idx` in an image of side n."""
    return SIZE_FRAC[size_idx] * n / 2.0


def _place(rng, r1: float, r2: float, n: int):
    """Centres of two objects: disjoint boxes, one axis clearly dominant."""
    for _ in range(200):
        c1 = rng.uniform(r1, n - r1, size=2)
        c2 = rng.uniform(r2, n - r2, size=2)
        d = np.abs(c2 - c1)
        gap = r1 + r2 + 1.0
        if max(d) >= gap and max(d) >= 2.0 * min(d):
            return c1, c2
    # Fallback: side by side on a horizontal line (always fits for the default sizes).
    y = n / 2.0
    return np.array([r1 + 0.5, y]), np.array([n - r2 - 0.5, y])


def background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Float [n, n, 3] canvas of one dark colour (jittered per scene)."""
    bg = np.array([18, 18, 28], np.float32) + rng.uniform(-6, 6, size=3).astype(np.float32)
    return np.broadcast_to(bg, (n, n, 3)).copy()


def add_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float [..., 3] -> uint8 with i.i.d. Gaussian pixel noise (std 6) added."""
    img = img + rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate(rng: np.random.Generator, image_size: int = 32) -> dict:
    """One scene: {'image': uint8 [S, S, 3], 'objects': [(c, s, z, cx, cy)] * 2,
    'caption': str, 'hard_negatives': list[str], 'label': int, 'relation': str}.

    `objects` are in canonical order and `relation` is from objects[0]'s point of view.
    """
    n = image_size
    while True:
        attrs = [
            (int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES))), int(rng.integers(len(SIZES))))
            for _ in range(2)
        ]
        if attrs[0] != attrs[1]:
            break
    radii = [radius(a[2], n) for a in attrs]
    c1, c2 = _place(rng, radii[0], radii[1], n)
    img = background(rng, n)
    for a, r, c in zip(attrs, radii, (c1, c2)):
        img[_mask(a[1], c[0], c[1], r, n)] = COLOUR_RGB[a[0]]
    img = add_noise(img, rng)
    a = attrs[0] + (float(c1[0]), float(c1[1]))
    b = attrs[1] + (float(c2[0]), float(c2[1]))
    rel = relation_of(c1, c2)
    a, b, rel = canonical(a, b, rel)
    return {
        "image": img,
        "objects": [a, b],
        "caption": caption_of(a, b, rel),
        "hard_negatives": hard_negatives(a, b, rel),
        "label": a[0] * len(SHAPES) + a[1],
        "relation": rel,
    }


def example(seed: int, split: str, index: int, image_size: int = 32) -> dict:
    """Example `index` of `split`, from default_rng([seed, split_index, index])."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    return generate(rng, image_size)


# ------------------------------------------------------------------ questions (VQA)
# Answer vocabulary of the `shapes_vqa` dataset: one class per answer, grouped by type
# the way VQA reports accuracy (per answer type).
ANSWERS = COLOURS + SHAPES + SIZES + ("yes", "no")
ANSWER_TYPES = ("colour",) * len(COLOURS) + ("shape",) * len(SHAPES) + ("size",) * len(SIZES) + ("yes/no",) * 2
QUESTION_TYPES = ("colour", "shape", "size", "relation", "exists")


def _rel_from(target: int, rel: str) -> str:
    """Relation of objects[target] to the other one (`rel` is objects[0]'s)."""
    return rel if target == 0 else FLIP[rel]


def question_of(objects, rel: str, rng: np.random.Generator) -> tuple[str, int, str]:
    """One question about the scene with an unambiguous answer: (question, answer index
    into ANSWERS, question type). `objects` / `rel` as `generate` returns them.

    Types (uniform): colour / shape / size of one object, named by the fewest
    attributes that single it out (falling back to its relation to the other one);
    relation ("is the X left of the Y": half yes, half another relation) and
    existence ("is there a red circle": half present, half absent, an absent one
    being the other object's colour on this one's shape when that is absent, the
    binding trap). No question mark: the pretraining tokenizer never saw one.
    """
    attrs = [tuple(o[:3]) for o in objects]
    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    t = int(rng.integers(2))
    o = 1 - t
    (ct, st, zt), (co, so, zo) = attrs[t], attrs[o]
    rt = _rel_from(t, rel)
    if qtype == "colour":
        if st != so:
            q = f"what colour is the {SHAPES[st]}"
        elif zt != zo:
            q = f"what colour is the {SIZES[zt]} {SHAPES[st]}"
        else:
            q = f"what colour is the {SHAPES[st]} {rt} the other {SHAPES[so]}"
        return q, ANSWERS.index(COLOURS[ct]), qtype
    if qtype == "shape":
        if ct != co:
            q = f"what shape is the {COLOURS[ct]} object"
        elif zt != zo:
            q = f"what shape is the {SIZES[zt]} {COLOURS[ct]} object"
        else:
            q = f"what shape is the {COLOURS[ct]} object {rt} the other one"
        return q, ANSWERS.index(SHAPES[st]), qtype
    if qtype == "size":
        if (ct, st) != (co, so):
            q = f"how big is the {COLOURS[ct]} {SHAPES[st]}"
        else:
            q = f"how big is the {COLOURS[ct]} {SHAPES[st]} {rt} the other one"
        return q, ANSWERS.index(SIZES[zt]), qtype

    def name(k):
        c, s, z = attrs[k]
        same = attrs[k][:2] == attrs[1 - k][:2]
        return f"{SIZES[z]} {COLOURS[c]} {SHAPES[s]}" if same else f"{COLOURS[c]} {SHAPES[s]}"

    if qtype == "relation":
        yes = bool(rng.integers(2))
        r = rt if yes else [x for x in RELATIONS if x != rt][int(rng.integers(len(RELATIONS) - 1))]
        return f"is the {name(t)} {r} the {name(o)}", ANSWERS.index("yes" if yes else "no"), qtype
    present = {a[:2] for a in attrs}
    if rng.integers(2):
        c, s = ct, st
    else:
        swap = (co, st)
        if swap not in present and rng.integers(2):
            c, s = swap
        else:
            absent = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)) if (c, s) not in present]
            c, s = absent[int(rng.integers(len(absent)))]
    ans = "yes" if (c, s) in present else "no"
    return f"is there a {COLOURS[c]} {SHAPES[s]}", ANSWERS.index(ans), qtype


def vqa_example(seed: int, split: str, index: int, image_size: int = 32) -> dict:
    """`example(seed, split, index)` (the same image as the `shapes` record) plus
    'question', 'answer' (index into ANSWERS) and 'question_type', drawn from
    default_rng([seed, split_index, index, 1])."""
    ex = example(seed, split, index, image_size)
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
    q, a, qt = question_of(ex["objects"], ex["relation"], rng)
    return dict(ex, question=q, answer=a, question_type=qt)
