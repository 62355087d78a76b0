"""Pure-numpy clip generator for the built-in `moving_shapes` video dataset (no TensorFlow).

A clip is `num_frames` frames (T, a multiple of 4; default 8) of two objects with
different (colour, shape, size) on the `shapes` background, with fresh pixel noise per
frame. Two events happen in sequence, each to a different object: event 1 during the
first half of the frames (to objects[0]), event 2 during the second half (objects[1]):

  moves left | right | up | down   translates steadily across its half (frames k*h ..
                                   k*h+h-1, h = T/2) by 25-35% of the image side,
                                   still otherwise; it stays inside the frame and clear
                                   of the other object's whole path;
  appears | disappears             absent | present before the middle frame of its half
                                   (k*h + h/2), present | absent from it on;
  turns <colour>                   takes another colour from that middle frame on.

Visible objects differ in (colour, shape, size) in every frame. Caption (one per clip,
lower case, no punctuation): "<event 1> then <event 2>", an event being
"a <size> <colour> <shape> <verb>" (the object's colour when its event starts), e.g.
"a small red circle moves left then a large blue square appears".

Every change falls between frames k*h + h/2 - 1 and k*h + h/2, so a model sampling 4 of
the T frames (frames 0, T/4, T/2, 3T/4 or the centres of 4 equal segments) sees each
event's before and after state.

Time probe: the frames reversed in time are a clip this generator can produce (the
change frames and the motion are symmetric within each half), whose caption reverses
each event (left <-> right, up <-> down, appears <-> disappears, "Y turns X" <-> "X
turns Y") and swaps their order. `hard_negatives[0]` is that caption: a model that
sees the frames as an unordered set cannot tell it from the true one. When valid (the
objects stay distinct), the clip with the two events in swapped order and its reversal
follow (also order-only negatives: their frames show the same object states).
"""

from __future__ import annotations

import numpy as np

from mmjax.data.shapes_gen import (
    COLOUR_RGB,
    COLOURS,
    MAX_NEGATIVES,
    SHAPES,
    SIZE_FRAC,
    SPLITS,
    _mask,
    add_noise,
    background,
    describe,
)

EVENT_KINDS = ("moves", "appears", "disappears", "turns")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "appears": "disappears",
    "disappears": "appears",
}
MOVE_FRAC = (0.25, 0.35)  # total displacement of a move, as a fraction of the side
GAP = 2.0  # min. pixels between the boxes swept by the two objects


# A clip is (objects, events):
#   objects: [(colour, shape, size, x0, y0, x1, y1)] * 2, colour at frame 0 and the
#            centre before / after its move (equal unless it moves), in pixels;
#   events:  [(obj, kind, arg)] * 2 in time order, events[k] during half k; arg is the
#            direction of a move, the new colour index of a turn, else None.


def _change_frame(k: int, num_frames: int) -> int:
    """First frame in the state after event k's change: the middle frame of half k."""
    h = num_frames // 2
    return k * h + h // 2


def states(objects, events, num_frames: int = 8) -> list[list]:
    """[T][2] per-frame object states: (colour, x, y), or None while absent."""
    h = num_frames // 2
    out = []
    for t in range(num_frames):
        row = []
        for o, (c, _, _, x0, y0, x1, y1) in enumerate(objects):
            present, f = True, 0.0
            for k, (obj, kind, arg) in enumerate(events):
                if obj != o:
                    continue
                after = t >= _change_frame(k, num_frames)
                if kind == "moves":
                    f = float(np.clip((t - k * h) / (h - 1), 0.0, 1.0))
                elif kind == "appears":
                    present = after
                elif kind == "disappears":
                    present = not after
                elif after:  # turns
                    c = arg
            row.append((c, x0 + f * (x1 - x0), y0 + f * (y1 - y0)) if present else None)
        out.append(row)
    return out


def valid(objects, events, num_frames: int = 8) -> bool:
    """Whether the visible objects differ in (colour, shape, size) in every frame."""
    for row in states(objects, events, num_frames):
        seen = [(s[0],) + tuple(objects[o][1:3]) for o, s in enumerate(row) if s is not None]
        if len(set(seen)) != len(seen):
            return False
    return True


def event_text(objects, event) -> str:
    """'a small red circle moves left' (the object's colour when its event starts)."""
    obj, kind, arg = event
    verb = f"moves {arg}" if kind == "moves" else f"turns {COLOURS[arg]}" if kind == "turns" else kind
    return f"{describe(objects[obj])} {verb}"


def caption_of(objects, events) -> str:
    """The clip's caption: '<event 1> then <event 2>'."""
    return " then ".join(event_text(objects, e) for e in events)


def reverse(objects, events):
    """The clip played backwards: objects in their final colour at their move's end
    point, events in reverse order, each inverted."""
    objects, new_events = [list(o) for o in objects], []
    for obj, kind, arg in reversed(events):
        o = objects[obj]
        if kind == "moves":
            o[3:7] = o[5:7] + o[3:5]
            arg = OPPOSITE[arg]
        elif kind == "turns":
            o[0], arg = arg, o[0]
        else:
            kind = OPPOSITE[kind]
        new_events.append((obj, kind, arg))
    return [tuple(o) for o in objects], new_events


def reverse_caption(objects, events) -> str:
    """Caption of the time-reversed clip (the time probe's negative)."""
    return caption_of(*reverse(objects, events))


def hard_negatives(objects, events, num_frames: int = 8) -> list[str]:
    """[reversed clip's caption] + [swapped events', their reversal's] when valid."""
    swapped = (objects, events[::-1])
    cands = [reverse(objects, events)]
    if valid(*swapped, num_frames):
        cands += [swapped, reverse(*swapped)]
    true, out = caption_of(objects, events), []
    for c in (caption_of(*x) for x in cands):
        if c != true and c not in out:
            out.append(c)
    return out[:MAX_NEGATIVES]


def _sample_event(rng, obj: int, colour: int):
    kind = EVENT_KINDS[int(rng.integers(len(EVENT_KINDS)))]
    if kind == "moves":
        return obj, kind, tuple(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    if kind == "turns":  # any other colour
        return obj, kind, (colour + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)
    return obj, kind, None


def _place(rng, radii, moves, n: int, tries: int = 100):
    """[(x0, y0, x1, y1)] * 2: a path per object (moves[o]: direction or None) inside
    the frame, the boxes they sweep >= GAP apart along some axis; None if none found."""
    for _ in range(tries):
        paths = []
        for r, d in zip(radii, moves):
            p0 = rng.uniform(r, n - r, size=2)
            p1 = p0.copy()
            if d is not None:
                dist = rng.uniform(*MOVE_FRAC) * n
                ax = 0 if DIRECTIONS[d][0] else 1
                sign = DIRECTIONS[d][ax]
                p0[ax] = rng.uniform(r, n - r - dist) + (dist if sign < 0 else 0.0)
                p1[ax] = p0[ax] + sign * dist
            paths.append((p0, p1))
        lo = [np.minimum(*p) - r for p, r in zip(paths, radii)]
        hi = [np.maximum(*p) + r for p, r in zip(paths, radii)]
        if np.any(np.maximum(lo[1] - hi[0], lo[0] - hi[1]) >= GAP):
            return [tuple(float(v) for v in np.concatenate(p)) for p in paths]
    return None


def render(objects, events, rng, image_size: int = 32, num_frames: int = 8) -> np.ndarray:
    """uint8 [T, S, S, 3] frames of a clip (background, then per-frame noise, from rng)."""
    n = image_size
    frames = np.repeat(background(rng, n)[None], num_frames, axis=0)
    for frame, row in zip(frames, states(objects, events, num_frames)):
        for (_, s, z, *_), st in zip(objects, row):
            if st is not None:
                frame[_mask(s, st[1], st[2], SIZE_FRAC[z] * n / 2.0, n)] = COLOUR_RGB[st[0]]
    return add_noise(frames, rng)


def generate(rng: np.random.Generator, image_size: int = 32, num_frames: int = 8) -> dict:
    """One clip: {'video': uint8 [T, S, S, 3], 'caption': str, 'hard_negatives':
    list[str] (the time-reversed caption first), 'objects': [(c, s, z, x0, y0, x1, y1)]
    * 2, 'events': [(obj, kind, arg)] * 2}."""
    if num_frames < 4 or num_frames % 4:
        raise ValueError(f"num_frames must be a positive multiple of 4, got {num_frames}")
    n = image_size
    while True:
        attrs = [
            (int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES))), int(rng.integers(len(SIZE_FRAC))))
            for _ in range(2)
        ]
        if attrs[0] == attrs[1]:
            continue
        events = [_sample_event(rng, k, attrs[k][0]) for k in range(2)]
        moves = [e[2] if e[1] == "moves" else None for e in events]
        paths = _place(rng, [SIZE_FRAC[a[2]] * n / 2.0 for a in attrs], moves, n)
        if paths is None:
            continue
        objects = [a + p for a, p in zip(attrs, paths)]
        if valid(objects, events, num_frames):
            break
    return {
        "video": render(objects, events, rng, n, num_frames),
        "caption": caption_of(objects, events),
        "hard_negatives": hard_negatives(objects, events, num_frames),
        "objects": objects,
        "events": events,
    }


def example(seed: int, split: str, index: int, image_size: int = 32, num_frames: int = 8) -> dict:
    """Clip `index` of `split`, from default_rng([seed, split_index, index])."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    return generate(rng, image_size, num_frames)
