"""Metrics of other modalities bound into the image-text space (ImageBind): X -> image
and X -> text retrieval, zero-shot classification of X with text prompts, and
embedding arithmetic (X + image -> images).

Every input is an L2-normalised embedding matrix of the eval split's N records: x [N, E]
(one modality: row n is record n's sound or depth map), img [N, E], txt [N, E] (the
records' captions, several rows may hold the same caption).
"""

from __future__ import annotations

import numpy as np

from mmjax.eval.retrieval import KS, caption_index

ARITH_K = 5


def _rank(sims: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of column target[n] in row n of sims, ties broken against it."""
    own = sims[np.arange(len(sims)), target]
    return np.sum(sims > own[:, None], axis=1) + np.sum((sims == own[:, None]), axis=1) - 1


def x_to_image(x: np.ndarray, img: np.ndarray, prefix: str, ks=KS) -> dict:
    """X -> image recall: record n's own image among all N; chance@1 = 1/N."""
    rank = _rank(x @ img.T, np.arange(len(x)))
    out = {f"{prefix}2i_r@{k}": float(np.mean(rank < k)) for k in ks}
    out[f"{prefix}2i_chance@1"] = 1.0 / len(x)
    return out


def x_to_text(x: np.ndarray, txt: np.ndarray, captions, prefix: str, ks=KS) -> dict:
    """X -> text recall over the unique captions (record n's caption is the target);
    chance@1 = 1 / the number of unique captions."""
    uniq, inverse, first = caption_index(captions)
    rank = _rank(x @ txt[first].T, inverse)
    out = {f"{prefix}2t_r@{k}": float(np.mean(rank < k)) for k in ks}
    out[f"{prefix}2t_chance@1"] = 1.0 / len(uniq)
    return out


def zero_shot(x: np.ndarray, class_txt: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
    """Top-1 of the nearest class prompt embedding (class_txt [C, E]); chance 1/C."""
    pred = np.argmax(x @ class_txt.T, axis=1)
    return {
        f"{prefix}_zero_shot_top1": float(np.mean(pred == np.asarray(labels))),
        f"{prefix}_zero_shot_chance": 1.0 / len(class_txt),
    }


def arithmetic(x: np.ndarray, img: np.ndarray, prefix: str, k: int = ARITH_K) -> dict:
    """Embedding arithmetic, ImageBind's "image + sound -> image": the query is the sum
    of record i's image embedding and record j's X embedding (j = i + N/2 mod N, a
    different scene), normalised; it hits when both image i and image j are among the
    top k images. The baseline is the image-alone query (its image and j's among the
    top k only when j happens to be near i), so the gain is what X's embedding adds."""
    n = len(x)
    j = (np.arange(n) + n // 2) % n

    def both(query):
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
        top = np.argsort(-(query @ img.T), axis=1, kind="stable")[:, :k]
        return float(np.mean((top == np.arange(n)[:, None]).any(1) & (top == j[:, None]).any(1)))

    return {f"{prefix}_arith_hit@{k}": both(img + x[j]), f"{prefix}_arith_image_only@{k}": both(img.copy())}


def bind_metrics(xs: dict, img, txt, captions, labels=None, class_txt=None) -> dict:
    """Every metric above for each modality in `xs` ({modality: [N, E]})."""
    out = {}
    for m, x in xs.items():
        out.update(x_to_image(x, img, m))
        out.update(x_to_text(x, txt, captions, m))
        if labels is not None and class_txt is not None:
            out.update(zero_shot(x, class_txt, labels, m))
        if len(x) > 2:
            out.update(arithmetic(x, img, m))
    return out
