"""Pure-numpy generator of the built-in `shapes_av` dataset (no TensorFlow): the
`shapes` scene of a split and index (`shapes_gen.example`: the same image, caption,
label, hard negatives and objects) heard as a stereo clip and seen as a depth map.

**Audio** (int16 [8192, 2], 8000 Hz, 1.024 s): one note per object.

- Pitch = colour: f0 = 200 * sqrt(2)**k Hz for colour index k (6 half-octave steps,
  200 .. 1131 Hz). The issue proposed 250 Hz; at 1414 Hz the 3rd harmonic (4243 Hz) is
  above the 3800 Hz limit, so a white square, triangle and circle would all be pure
  sines. From 200 Hz every note keeps its 2nd and 3rd harmonics below 3800 Hz.
- Timbre = shape: circle a pure sine; square the odd harmonics at 1/n; triangle the
  odd harmonics at 1/n^2 (alternating signs); cross every harmonic at 1/n (a
  sawtooth); harmonics at or above 3800 Hz are left out. The note is scaled to a
  peak of 0.5 of full scale.
- Duration = size: small 0.15 s, large 0.30 s, with 10 ms raised-cosine fades in and out.
- Pan = the object's x: equal-power, left gain cos(theta), right sin(theta),
  theta = (x / image_size) * pi / 2.
- Order and gap = vertical layout: the upper object (smaller y; on a tie the
  first-named) sounds first, from 0.02 s; the second note starts
  0.02 s + 0.4 * |dy| / image_size after the first ends (the issue's gap plus a fixed
  20 ms of silence, so two notes never touch and an energy gate separates them).
- Gaussian noise of std 0.003 of full scale on both channels; int16 = round(x * 32768),
  clipped.

**Depth** (uint16 [S, S], millimetres): a background plane at 3000 mm; each object's
footprint (the image's own mask, `shapes_gen.mask`) raised by 400 + 300 * colour
index mm (depth 2600 for red .. 1100 for white); Gaussian noise of std 2 mm everywhere.
Colour is the height, shape the footprint, size its extent, layout its position.

The noise is drawn from `default_rng([seed, split_index, index, 2])`, so a record is
reproducible and independent of the others. `mmjax.data.shapes_av_read` reads both
signals back into the caption without this module.
"""

from __future__ import annotations

import numpy as np

from mmjax.data import shapes_gen

SAMPLE_RATE = 8000
NUM_SAMPLES = 8192
F0_BASE = 200.0  # colour 0's pitch, Hz; colour k: F0_BASE * sqrt(2)**k
F_MAX = 3800.0  # harmonics at or above it are left out
DURATIONS = (0.15, 0.30)  # seconds, by size (small, large)
FADE = 0.010  # raised-cosine fade in and out, seconds
START = 0.02  # the first note's onset, seconds
MIN_GAP = 0.02  # silence between the notes at dy = 0, seconds
GAP_PER_SIDE = 0.4  # extra gap per image side of |dy|, seconds
PEAK = 0.5  # a note's peak, of full scale
NOISE = 0.003  # std of the noise, of full scale
BACKGROUND_MM = 3000
HEIGHT_MM = (400, 300)  # an object's height above the plane: 400 + 300 * colour index
DEPTH_NOISE_MM = 2.0


def f0(colour: int) -> float:
    return F0_BASE * np.sqrt(2.0) ** colour


def partials(shape: int, freq: float) -> list[tuple[int, float]]:
    """[(harmonic number, signed amplitude)] of a note of shape `shape` at `freq` Hz."""
    if shape == 0:  # circle: a pure sine
        return [(1, 1.0)]
    ns = range(1, int(F_MAX / freq) + 2)
    if shape == 1:  # square: odd harmonics at 1/n
        out = [(n, 1.0 / n) for n in ns if n % 2]
    elif shape == 2:  # triangle: odd harmonics at 1/n^2, alternating
        out = [(n, (-1.0) ** ((n - 1) // 2) / n**2) for n in ns if n % 2]
    else:  # cross: every harmonic at 1/n (a sawtooth)
        out = [(n, 1.0 / n) for n in ns]
    return [(n, a) for n, a in out if n * freq < F_MAX]


def note(colour: int, shape: int, size: int) -> np.ndarray:
    """float64 [n]: one object's note, peak PEAK, faded in and out."""
    n = int(round(DURATIONS[size] * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    freq = f0(colour)
    x = sum(a * np.sin(2 * np.pi * k * freq * t) for k, a in partials(shape, freq))
    x = PEAK * x / np.max(np.abs(x))
    m = int(round(FADE * SAMPLE_RATE))
    ramp = 0.5 * (1 - np.cos(np.pi * np.arange(m) / m))
    x[:m] *= ramp
    x[n - m :] *= ramp[::-1]
    return x


def onsets(objects, image_size: int) -> list[tuple[int, float]]:
    """[(object index, onset in seconds)] in playing order: the upper object first."""
    ya, yb = objects[0][4], objects[1][4]
    order = [0, 1] if ya <= yb else [1, 0]
    second = START + DURATIONS[objects[order[0]][2]] + MIN_GAP + GAP_PER_SIDE * abs(yb - ya) / image_size
    return [(order[0], START), (order[1], second)]


def audio(objects, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """int16 [NUM_SAMPLES, 2]: the scene's clip (module docstring). `objects` as
    `shapes_gen.generate` returns them: [(colour, shape, size, cx, cy)] * 2."""
    out = np.zeros([NUM_SAMPLES, 2])
    for i, start in onsets(objects, image_size):
        c, s, z, x, _ = objects[i]
        theta = (x / image_size) * np.pi / 2
        y = note(c, s, z)
        a = int(round(start * SAMPLE_RATE))
        out[a : a + len(y)] += y[:, None] * np.array([np.cos(theta), np.sin(theta)])
    out += rng.normal(0.0, NOISE, size=out.shape)
    return np.clip(np.rint(out * 32768), -32768, 32767).astype(np.int16)


def depth(objects, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint16 [S, S]: the scene's depth map in millimetres (module docstring)."""
    n = image_size
    d = np.full([n, n], float(BACKGROUND_MM))
    for c, s, z, cx, cy in objects:
        d[shapes_gen.mask(s, cx, cy, shapes_gen.radius(z, n), n)] = BACKGROUND_MM - (HEIGHT_MM[0] + HEIGHT_MM[1] * c)
    d += rng.normal(0.0, DEPTH_NOISE_MM, size=d.shape)
    return np.clip(np.rint(d), 0, 65535).astype(np.uint16)


def example(seed: int, split: str, index: int, image_size: int = 32) -> dict:
    """`shapes_gen.example(seed, split, index, image_size)` plus 'audio' (int16
    [NUM_SAMPLES, 2] at SAMPLE_RATE) and 'depth' (uint16 [S, S], mm)."""
    ex = shapes_gen.example(seed, split, index, image_size)
    rng = np.random.default_rng([seed, shapes_gen.SPLITS.index(split), index, 2])
    return dict(ex, audio=audio(ex["objects"], image_size, rng), depth=depth(ex["objects"], image_size, rng))


def wav_bytes(wave, sample_rate: int = SAMPLE_RATE) -> bytes:
    """int16 [n, c] -> the bytes of a PCM WAV file (the stdlib's writer)."""
    import io
    import wave as wave_lib

    w = np.ascontiguousarray(np.asarray(wave, np.int16).reshape(len(wave), -1))
    buf = io.BytesIO()
    with wave_lib.open(buf, "wb") as f:
        f.setnchannels(w.shape[1])
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(w.astype("<i2").tobytes())
    return buf.getvalue()
