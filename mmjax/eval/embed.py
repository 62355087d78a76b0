"""`mmjax embed`: L2-normalised embeddings of a user's images and texts from a
workdir's checkpoint, for building retrieval indexes.

    mmjax embed --workdir DIR --images a.png b.jpg --texts captions.txt --out emb.npz

The npz holds `image_emb [N, E]`, `image_paths [N]`, `text_emb [M, E]`, `texts [M]`
(float32 rows with unit norm: a dot product is the model's cosine similarity), and
`step`. Images are prepared as the eval pipeline prepares them; files that do not
decode are skipped with a warning and listed in `skipped`.
"""

from __future__ import annotations

import jax
import numpy as np

from mmjax import workdir as workdir_lib
from mmjax.parallel import mesh as mesh_lib


def _batched(fn, mesh, arrays: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    for i in range(0, len(arrays), batch_size):
        chunk = arrays[i : i + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        res = fn(mesh_lib.global_batch(mesh, {"x": chunk})["x"])
        out.append(np.asarray(res)[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _load_media(config, images=(), videos=()):
    """(pixels [N, (T,) S, S, 3], the paths that decoded): images, or videos for a video model."""
    from mmjax.data import images as images_lib

    if images and videos:
        raise ValueError("give --images or --videos, not both")
    if videos:
        return images_lib.load_videos(config.data, list(videos))
    if int(config.data.get("num_frames", 0) or 0):  # a video model takes an image as a still clip
        pixels, ok = images_lib.load_images(config.data, list(images))
        return np.repeat(pixels[:, None], int(config.data.num_frames), axis=1), ok
    return images_lib.load_images(config.data, list(images))


class Opened:
    """A workdir opened for inference on this machine (`mmjax.workdir.open_workdir`):
    its `config`, `family`, `tokenizer` (read on first use), `params` and `step`, a
    data mesh of this machine's devices (`mesh`) and eval.batch_size rounded to it
    (`batch_size`)."""

    def __init__(self, workdir: str, weights: str = "student", step: int | None = None):
        self.workdir = workdir_lib.open_workdir(workdir, weights=weights, step=step)
        self.config, self.family = self.workdir.config, self.workdir.family
        self.params, self.step = self.workdir.params, self.workdir.step
        self.mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        n_dev = self.mesh.devices.size
        self.batch_size = max(n_dev, (int(self.config.eval.batch_size) // n_dev) * n_dev)

    @property
    def tokenizer(self):
        return self.workdir.tokenizer


def _restore(workdir: str, weights: str):
    """(params, opened, step, batch size): `Opened` as the tuple `mmjax classify` takes."""
    opened = Opened(workdir, weights)
    return opened.params, opened, opened.step, opened.batch_size


def embed(
    workdir: str, *, images=(), videos=(), texts_file: str | None = None, out: str, weights: str = "student"
) -> dict:
    from mmjax.data import images as images_lib

    opened = Opened(workdir, weights)
    params, step, bs = opened.params, opened.step, opened.batch_size
    config, family = opened.config, opened.family
    if not family.can("encode"):
        raise ValueError(f"family {config.model.family!r} has no image/text encoders to embed with")
    rep = mesh_lib.replicated(opened.mesh)
    result = {"step": np.int64(step)}
    pixels, ok = _load_media(config, images, videos)
    result["image_paths"] = np.asarray(ok, dtype=str)
    result["skipped"] = np.asarray(sorted(set(map(str, tuple(images) + tuple(videos))) - set(ok)), dtype=str)
    if len(pixels):
        enc = jax.jit(lambda x: family.encode_image(params, x), out_shardings=rep)
        result["image_emb"] = _batched(enc, opened.mesh, pixels, bs).astype(np.float32)
    if texts_file:
        texts = images_lib.read_texts(texts_file)
        ids = opened.tokenizer.encode(texts, int(config.data.text_len))
        enc = jax.jit(lambda x: family.encode_text(params, x), out_shardings=rep)
        result["texts"] = np.asarray(texts, dtype=str)
        result["text_emb"] = (
            _batched(enc, opened.mesh, ids, bs).astype(np.float32) if texts else np.zeros((0, 0), np.float32)
        )
    np.savez(out, **result)
    return {
        "out": out,
        "images": len(ok),
        "skipped": len(result["skipped"]),
        "texts": len(result.get("texts", [])),
        "step": int(result["step"]),
    }


def caption(
    workdir: str,
    *,
    images=(),
    videos=(),
    weights: str = "student",
    beams: int = 1,
    max_len: int | None = None,
    length_penalty: float = 0.6,
) -> list[dict]:
    """Captions of image (or, for a video model, video) files from a captioning workdir
    (CoCa, BLIP): [{'image', 'caption'}], greedy or beam search; files that do not
    decode are skipped with a warning."""
    opened = Opened(workdir, weights)
    params, bs = opened.params, opened.batch_size
    config, family = opened.config, opened.family
    if not family.can("caption"):
        raise ValueError(f"family {config.model.family!r} does not caption; captioning families: coca, blip")
    pixels, ok = _load_media(config, images, videos)
    if not len(pixels):
        return []
    fn = jax.jit(
        lambda x: family.caption(params, x, max_len=max_len, beams=int(beams), length_penalty=length_penalty),
        out_shardings=mesh_lib.replicated(opened.mesh),
    )
    ids = _batched(fn, opened.mesh, pixels, bs)
    return [{"image": path, "caption": opened.tokenizer.decode(row)} for path, row in zip(ok, ids)]
