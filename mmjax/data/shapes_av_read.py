"""An interpreter of `shapes_av` signals (numpy + scipy): the scene's caption read back
from its audio clip alone (`read_audio`) or its depth map alone (`read_depth`).

It shares no code with the generator (`shapes_av_gen`): it restates the documented
design (docs/data.md, `shapes_av`) and imports only the vocabularies and the caption
rules of `shapes_gen`, so a generator that stops following its documentation fails the
read-back test (tests/test_shapes_av.py).

- Audio: the notes are segmented by their energy (both channels, 5 ms smoothing, a gate
  halfway between the noise floor and the peak in log power); per note the strongest
  spectral peak gives f0 and so the colour, the 2nd and 3rd harmonics' magnitudes
  relative to f0 the shape (2nd present: cross; 3rd near 1/3: square, near 1/9:
  triangle, absent: circle), the duration the size, the channels' energies the pan
  and so x; the first note is the upper object and the silence between the notes
  gives |dy|. The relation follows from (dx, dy) as `relation_of` states it.
- Depth: pixels raised above the plane, quantised to the six heights (the colour),
  8-connected components per height (the scenes keep the objects' boxes at least one
  pixel apart, so two objects never make one component); each component's footprint
  is fitted with every (shape, size) template over sub-pixel centres (the best
  intersection over union), which gives the shape, the size and the centre.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.shapes_gen import COLOURS, SHAPES, caption_of, relation_of

# The documented design, restated (docs/data.md, shapes_av)
F0_BASE = 200.0  # colour k sounds at F0_BASE * sqrt(2)**k Hz
SMALL_LARGE_S = 0.225  # a note longer than this is a large object (0.15 s / 0.30 s)
MIN_GAP_S, GAP_PER_SIDE_S = 0.02, 0.4  # the silence between the notes: 0.02 + 0.4 * |dy| / S
BACKGROUND_MM, HEIGHT_MM = 3000.0, (400.0, 300.0)  # heights 400 + 300 * colour above the plane
SIZE_FRAC = (0.22, 0.38)  # an object's diameter over the image side, by size
SQUARE_HALF, CROSS_ARM = 0.85, 1.0 / 3.0  # the square's half side, the cross's half arm width (x r)


# ---------------------------------------------------------------------------- audio


def _notes(x: np.ndarray, sample_rate: int) -> tuple[list[tuple[int, int]], float]:
    """-> ([(start, stop)] of the two longest loud runs in time order, the noise power
    per channel)."""
    power = (x**2).sum(1)
    win = max(int(0.005 * sample_rate), 1)
    smooth = np.convolve(power, np.ones(win) / win, mode="same")
    floor, peak = np.percentile(smooth, 10), smooth.max()
    loud = smooth > np.sqrt(max(floor, 1e-12) * peak)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
    runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 0.02 * sample_rate]
    runs = sorted(sorted(runs, key=lambda r: r[0] - r[1])[:2])
    return runs, float(np.mean(power[smooth <= floor])) / 2 if np.any(smooth <= floor) else 0.0


def _peak(mag: np.ndarray, freqs: np.ndarray, f: float, width: float = 15.0) -> float:
    near = np.abs(freqs - f) <= width
    return float(mag[near].max()) if near.any() else 0.0


def _timbre(mono: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """(colour, shape) of one note's steady part."""
    n = 1 << 16
    mag = np.abs(np.fft.rfft(mono * np.hanning(len(mono)), n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    band = (freqs > 0.75 * F0_BASE) & (freqs < F0_BASE * np.sqrt(2.0) ** (len(COLOURS) - 0.5))
    f_hat = freqs[band][np.argmax(mag[band])]
    pitches = F0_BASE * np.sqrt(2.0) ** np.arange(len(COLOURS))
    colour = int(np.argmin(np.abs(np.log2(f_hat / pitches))))
    f0 = pitches[colour]
    a1 = _peak(mag, freqs, f0)
    a2, a3 = _peak(mag, freqs, 2 * f0) / a1, _peak(mag, freqs, 3 * f0) / a1
    if a2 > 0.25:
        shape = SHAPES.index("cross")
    elif a3 > 0.2:
        shape = SHAPES.index("square")
    elif a3 > 0.05:
        shape = SHAPES.index("triangle")
    else:
        shape = SHAPES.index("circle")
    return colour, shape


def read_audio(wave, sample_rate: int, image_size: int) -> str:
    """int16 [n, 2] clip -> the caption it describes ('' when two notes are not found)."""
    x = np.asarray(wave, np.float64).reshape(len(wave), 2) / 32768.0
    runs, noise = _notes(x, sample_rate)
    if len(runs) != 2:
        return ""
    edge = int(0.015 * sample_rate)  # the fades
    objs = []
    for a, b in runs:
        core = x[a + edge : b - edge]
        colour, shape = _timbre(core.sum(1), sample_rate)
        size = int((b - a) / sample_rate > SMALL_LARGE_S)
        el, er = (max(float((core[:, k] ** 2).sum()) - noise * len(core), 0.0) for k in (0, 1))
        pan_x = np.arctan2(np.sqrt(er), np.sqrt(el)) / (np.pi / 2) * image_size
        objs.append((colour, shape, size, pan_x))
    gap = (runs[1][0] - runs[0][1]) / sample_rate
    dy = max(gap - MIN_GAP_S, 0.0) / GAP_PER_SIDE_S * image_size  # the second note is the lower object
    (c1, s1, z1, x1), (c2, s2, z2, x2) = objs
    rel = relation_of((x1, 0.0), (x2, dy))
    return caption_of((c1, s1, z1), (c2, s2, z2), rel)


# ---------------------------------------------------------------------------- depth


def _footprints(shape: int, r: float, cx, cy, yy, xx) -> np.ndarray:
    """bool [K, h, w]: the footprint of `shape` (radius r) at K centres (cx, cy [K]) over
    pixel centres (yy, xx [h, w])."""
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    if shape == 0:
        return dx * dx + dy * dy <= r * r
    if shape == 1:
        return (np.abs(dx) <= SQUARE_HALF * r) & (np.abs(dy) <= SQUARE_HALF * r)
    if shape == 2:  # apex up, base down, as wide as the box at the base
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    w = CROSS_ARM * r
    return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))


def _fit(part: np.ndarray) -> tuple[float, int, int, float, float]:
    """The best template for one object's footprint (bool [S, S]):
    (intersection over union, shape, size, cx, cy)."""
    n = part.shape[0]
    ys, xs = np.nonzero(part)
    bx, by = (xs.min() + xs.max()) / 2 + 0.5, (ys.min() + ys.max()) / 2 + 0.5
    pad = int(np.ceil(SIZE_FRAC[-1] * n / 2)) + 2
    y0, y1 = max(int(by) - pad, 0), min(int(by) + pad + 1, n)
    x0, x1 = max(int(bx) - pad, 0), min(int(bx) + pad + 1, n)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    window = part[y0:y1, x0:x1]
    offsets = np.arange(-1.0, 1.0001, 0.25)
    ox, oy = (a.ravel() for a in np.meshgrid(offsets, offsets))
    cx, cy = bx + ox, by + oy
    best = (-1.0, 0, 0, bx, by)
    for size, frac in enumerate(SIZE_FRAC):
        for shape in range(len(SHAPES)):
            m = _footprints(shape, frac * n / 2, cx, cy, yy, xx)
            iou = (m & window).sum((1, 2)) / np.maximum((m | window).sum((1, 2)), 1)
            k = int(np.argmax(iou))
            if iou[k] > best[0]:
                best = (float(iou[k]), shape, size, float(cx[k]), float(cy[k]))
    return best


def _objects(depth: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(colour, footprint)] of the raised regions, the two largest."""
    from scipy import ndimage

    height = BACKGROUND_MM - depth.astype(np.float64)
    level = np.rint((height - HEIGHT_MM[0]) / HEIGHT_MM[1]).astype(int)
    raised = height > HEIGHT_MM[0] / 2
    found = []
    for colour in range(len(COLOURS)):
        labels, count = ndimage.label(raised & (level == colour), structure=np.ones((3, 3)))
        found += [(colour, labels == i) for i in range(1, count + 1) if (labels == i).sum() >= 3]
    found.sort(key=lambda f: -f[1].sum())
    return found[:2]


def read_depth(depth) -> str:
    """uint16 [S, S] depth map (mm) -> the caption it describes ('' when two objects are
    not found)."""
    depth = np.asarray(depth).reshape(np.shape(depth)[0], -1)
    found = _objects(depth)
    if len(found) != 2:
        return ""
    objs = []
    for colour, part in found:
        _, shape, size, cx, cy = _fit(part)
        objs.append((colour, shape, size, cx, cy))
    a, b = objs
    return caption_of(a[:3], b[:3], relation_of(a[3:], b[3:]))
