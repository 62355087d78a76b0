"""A noisy, web-like image-text set from the `shapes` generator, for CapFilt (`mmjax data capfilt`).

Web captions are often wrong for their image. `corrupt_captions` makes that measurable:
it replaces a given fraction of captions by the caption of another random `shapes` scene
(the same vocabulary and grammar, so only the image can tell it is wrong) and records
which rows it replaced. `write_noisy_shapes` writes such a set as webdataset tars, the
layout img2dataset writes and `mmjax data convert` reads (no TensorFlow):

    python -m mmjax.data.noisy_shapes OUT --n 2000 --fraction 0.4 --seed 0
    mmjax data convert OUT --out noisy_shards

Sample k of tar t is `{t*per_tar + k:09d}.png` + `.txt` (the caption shown, corrupted or
not) + `.json` {"caption", "true_caption", "corrupted": bool, "index"}; `mmjax data convert`
keeps the `.json` as each record's "meta", and `mmjax data capfilt` carries it over, so the
share of corrupted captions among the kept web captions is read off the output records.
Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np

from mmjax.data import shapes_gen


def corrupt_captions(captions, fraction: float = 0.4, seed: int = 0, image_size: int = 32):
    """-> (captions [N] with round(fraction * N) of them replaced, corrupted bool [N]).

    The rows to replace are drawn without replacement from default_rng([seed, 0]); row i's
    replacement is the caption of the scene generated from default_rng([seed, 1, i, k]) for
    the first k = 0, 1, ... whose caption differs from row i's own."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction={fraction}: expected a number in [0, 1]")
    captions = [str(c) for c in captions]
    n = len(captions)
    rows = np.random.default_rng([seed, 0]).choice(n, size=int(round(float(fraction) * n)), replace=False)
    corrupted = np.zeros(n, bool)
    corrupted[rows] = True
    out = list(captions)
    for i in sorted(int(r) for r in rows):
        k = 0
        while out[i] == captions[i]:
            out[i] = shapes_gen.generate(np.random.default_rng([seed, 1, i, k]), image_size)["caption"]
            k += 1
    return out, corrupted


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: the same bytes every time
    tar.addfile(info, io.BytesIO(data))


def write_noisy_shapes(
    out: str, n: int, *, fraction: float = 0.4, seed: int = 0, image_size: int = 32, per_tar: int = 1000
) -> dict:
    """Writes `n` `shapes` scenes (the train split's examples 0..n-1 of generator seed
    `seed`) as webdataset tars OUT/{00000..}.tar, `fraction` of their captions corrupted
    (`corrupt_captions`) -> {"tars": [paths], "samples": n, "corrupted": count}."""
    from PIL import Image

    if n < 1 or per_tar < 1:
        raise ValueError(f"n={n}, per_tar={per_tar}: expected integers >= 1")
    scenes = [shapes_gen.example(seed, "train", i, image_size) for i in range(n)]
    shown, corrupted = corrupt_captions([s["caption"] for s in scenes], fraction, seed, image_size)
    os.makedirs(out, exist_ok=True)
    paths = []
    for t, start in enumerate(range(0, n, per_tar)):
        path = os.path.join(out, f"{t:05d}.tar")
        with tarfile.open(path + ".tmp", "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(start, min(start + per_tar, n)):
                buf = io.BytesIO()
                Image.fromarray(scenes[i]["image"]).save(buf, "PNG")
                meta = {"caption": shown[i], "true_caption": scenes[i]["caption"], "corrupted": bool(corrupted[i])}
                _add(tar, f"{i:09d}.png", buf.getvalue())
                _add(tar, f"{i:09d}.txt", shown[i].encode())
                _add(tar, f"{i:09d}.json", json.dumps(dict(meta, index=i), sort_keys=True).encode())
        os.replace(path + ".tmp", path)
        paths.append(path)
    return {"tars": paths, "samples": n, "corrupted": int(corrupted.sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.data.noisy_shapes", description=__doc__.split("\n")[0])
    p.add_argument("out", help="output directory (webdataset tars)")
    p.add_argument("--n", type=int, default=2000, help="scenes")
    p.add_argument("--fraction", type=float, default=0.4, help="share of captions replaced by another scene's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--per-tar", type=int, default=1000)
    a = p.parse_args(argv)
    kw = dict(fraction=a.fraction, seed=a.seed, image_size=a.image_size, per_tar=a.per_tar)
    print(json.dumps(write_noisy_shapes(a.out, a.n, **kw)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
