"""The built-in `moving_shapes` clips: an independent interpreter reads each clip's
caption back from its pixels alone, the reversed frames read as the stored time-probe
negative, 4 sampled frames still show both events, and the TFDS records hold exactly
the generator's frames."""

import numpy as np
import pytest
from scipy import ndimage

from mmjax.data import moving_shapes_gen as m
from mmjax.data import shapes_gen as g

# --------------------------------------------------------------------- interpreter


def _shape(xs, ys) -> int:
    """Shape index of one object's pixels, from its bounding box: a square fills it, a
    triangle's mass sits low in it, a cross's lies on its two centre lines."""
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    my, mx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    if len(xs) >= 0.95 * h * w:
        return g.SHAPES.index("square")
    if (ys.mean() - my) / h > 0.085:
        return g.SHAPES.index("triangle")
    if np.mean(np.minimum(np.abs(xs - mx) / w, np.abs(ys - my) / h)) < 0.097:
        return g.SHAPES.index("cross")
    return g.SHAPES.index("circle")


def _objects(frame) -> dict:
    """{(colour, shape, size): (cx, cy)} of the objects in a uint8 [S, S, 3] frame."""
    n = frame.shape[0]
    dist = np.linalg.norm(frame[:, :, None].astype(np.float32) - g.COLOUR_RGB, axis=-1)  # [S, S, 6]
    colour = np.where(dist.min(-1) < 60, dist.argmin(-1), -1)
    out = {}
    for c in range(len(g.COLOURS)):
        comp, k = ndimage.label(colour == c)
        for i in range(1, k + 1):
            ys, xs = np.nonzero(comp == i)
            key = (c, _shape(xs, ys), int(max(np.ptp(xs), np.ptp(ys)) + 1 >= 0.28 * n))
            assert key not in out, "two identical objects in a frame"
            out[key] = (xs.mean(), ys.mean())
    return out


def _changes(a: dict, b: dict) -> list:
    """[(object key before, verb)] between two frames' objects."""
    out = []
    for k in sorted(a.keys() & b.keys()):
        dx, dy = np.subtract(b[k], a[k])
        if max(abs(dx), abs(dy)) > 0.5:
            d = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            out.append((k, f"moves {d}"))
    gone, new = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    for k in list(gone):  # same shape, size and place, another colour
        for k2 in new:
            if k2[1:] == k[1:] and np.hypot(*np.subtract(a[k], b[k2])) < 1.0:
                out.append((k, f"turns {g.COLOURS[k2[0]]}"))
                gone.remove(k)
                new.remove(k2)
                break
    return out + [(k, "disappears") for k in gone] + [(k, "appears") for k in new]


def interpret(video) -> str:
    """Caption of uint8 [T, S, S, 3] frames from their pixels alone: each change between
    consecutive frames is an event (a move over several frames is one), in order."""
    objs = [_objects(f) for f in video]
    events, moving = [], {}  # moving: (key, verb) -> last transition it moved in
    for t in range(len(objs) - 1):
        for key, verb in _changes(objs[t], objs[t + 1]):
            if moving.get((key, verb)) != t - 1:
                events.append((key, verb))
            if verb.startswith("moves"):
                moving[(key, verb)] = t
    return " then ".join(f"a {g.SIZES[z]} {g.COLOURS[c]} {g.SHAPES[s]} {verb}" for (c, s, z), verb in events)


# --------------------------------------------------------------------------- tests


def test_pixels_give_the_caption_and_reversed_frames_the_time_probe_negative():
    kinds, swapped, n = set(), 0, 200
    for i in range(n):
        ex = m.example(0, "train", i)
        v, cap, neg = ex["video"], ex["caption"], ex["hard_negatives"]
        assert v.shape == (8, 32, 32, 3) and v.dtype == np.uint8
        assert interpret(v) == cap, i
        assert interpret(v[::-1]) == neg[0] == m.reverse_caption(ex["objects"], ex["events"]), i
        # A model sampling 4 of the 8 frames (0, 2, 4, 6 or 1, 3, 5, 7) sees both events.
        assert interpret(v[0::2]) == cap and interpret(v[1::2]) == cap, i
        assert interpret(v[1::2][::-1]) == neg[0], i
        assert cap not in neg and len(set(neg)) == len(neg) <= g.MAX_NEGATIVES
        if len(neg) > 1:  # the swapped events' clip and its reversal, rendered and read back
            sw = (ex["objects"], ex["events"][::-1])
            rng = np.random.default_rng(i)
            assert [interpret(m.render(*x, rng)) for x in (sw, m.reverse(*sw))] == neg[1:], i
            swapped += 1
        kinds |= {e[1] if e[1] != "moves" else e[2] for e in ex["events"]}
        assert cap.count(" then ") == 1 and cap == cap.lower()
    assert kinds == {"appears", "disappears", "turns", "left", "right", "up", "down"}
    assert swapped > 0.9 * n  # almost always valid


def test_reversal_is_a_clip_of_the_generator():
    """The reversed clip's per-frame states are the clip's states backwards, for every
    multiple-of-4 clip length (the change frames are symmetric within each half)."""
    for t in (4, 8, 12):
        for i in range(50):
            ex = m.example(1, "validation", i, num_frames=t)
            rev = m.reverse(ex["objects"], ex["events"])
            assert m.valid(*rev, t)
            for a, b in zip(m.states(*rev, t), m.states(ex["objects"], ex["events"], t)[::-1]):
                assert [s is None for s in a] == [s is None for s in b]
                np.testing.assert_allclose([s for s in a if s], [s for s in b if s], atol=1e-9)
            if t == 12:  # 4 of 12 frames, uniform (0, 3, 6, 9) or segment centres (1, 4, 7, 10)
                assert interpret(ex["video"][0::3]) == interpret(ex["video"][1::3]) == ex["caption"]


def test_moves_are_large_and_objects_stay_apart():
    for i in range(200):
        ex = m.example(0, "test", i)
        for (_, _, z, x0, y0, x1, y1), (o, kind, _) in zip(ex["objects"], ex["events"]):
            r = g.SIZE_FRAC[z] * 32 / 2
            assert r <= min(x0, x1, y0, y1) and max(x0, x1, y0, y1) <= 32 - r
            assert (np.hypot(x1 - x0, y1 - y0) >= 8) == (kind == "moves")
        lo = [np.minimum(o[3:5], o[5:7]) - g.SIZE_FRAC[o[2]] * 16 for o in ex["objects"]]
        hi = [np.maximum(o[3:5], o[5:7]) + g.SIZE_FRAC[o[2]] * 16 for o in ex["objects"]]
        assert np.any(np.maximum(lo[1] - hi[0], lo[0] - hi[1]) >= m.GAP)


def test_determinism_and_splits():
    a, b = m.example(0, "train", 7), m.example(0, "train", 7)
    np.testing.assert_array_equal(a["video"], b["video"])
    assert a["caption"] == b["caption"] and a["hard_negatives"] == b["hard_negatives"]
    for other in (m.example(0, "validation", 7), m.example(0, "test", 7), m.example(1, "train", 7)):
        assert not np.array_equal(a["video"], other["video"])
    assert len({m.example(0, "test", i)["caption"] for i in range(50)}) == 50
    with pytest.raises(ValueError, match="multiple of 4"):
        m.example(0, "train", 0, num_frames=6)


def test_builder_records_are_the_generator_frames(tmp_path):
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    from mmjax.data.builders import MmjaxMovingShapes, MovingShapesConfig, make_config

    cfg = make_config(
        MovingShapesConfig, image_size=16, num_frames=4, num_train=8, num_validation=4, num_test=4, seed=3
    )
    assert cfg.name == "s16_t4_n8-4-4_seed3"
    b = MmjaxMovingShapes(config=cfg, data_dir=str(tmp_path))
    b.download_and_prepare()
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 8, "validation": 4, "test": 4}
    raw = b.as_dataset(split="validation", decoders={"video": tfds.decode.SkipDecoding()})
    assert raw.element_spec["video"].shape == (4,)
    for r, d in zip(raw.as_numpy_iterator(), b.as_dataset(split="validation").as_numpy_iterator()):
        ex = m.example(3, "validation", int(r["id"]), 16, 4)
        frames = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in r["video"]])
        np.testing.assert_array_equal(frames, ex["video"])
        assert d["video"].dtype == np.uint8 and d["video"].shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(d["video"], ex["video"])
        assert r["caption"].decode() == ex["caption"]
        assert [x.decode() for x in r["hard_negatives"]] == ex["hard_negatives"]
