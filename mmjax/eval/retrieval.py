"""Retrieval R@k, zero-shot classification and the attribute-binding probe.

Captions are compared as strings: a retrieved caption is correct when it is
textually identical to the image's own caption, so duplicate captions in the
eval split (two images with the same scene description) are handled exactly.
Candidates for image->text are the *unique* captions of the split.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def retrieval_metrics(img: np.ndarray, txt: np.ndarray, captions, ks=KS) -> dict:
    """img, txt: [N, D] L2-normalised embeddings of N (image, caption) pairs.

    Returns i2t_r@k, t2i_r@k, and the chance level of R@1 for both directions.
    """
    captions = [c.decode() if isinstance(c, bytes) else str(c) for c in captions]
    uniq, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    n, m = len(captions), len(uniq)
    # One embedding per unique caption (identical strings embed identically).
    first = np.zeros(m, dtype=np.int64)
    first[inverse[::-1]] = np.arange(n)[::-1]
    txt_u = txt[first]
    sims = img @ txt_u.T  # [N, M]
    out = {}
    order_i2t = np.argsort(-sims, axis=1, kind="stable")
    rank_i2t = np.argmax(order_i2t == inverse[:, None], axis=1)  # rank of own caption
    # text -> image: for caption u, correct if a top-k image has caption u.
    order_t2i = np.argsort(-sims.T, axis=1, kind="stable")  # [M, N]
    hit = inverse[order_t2i] == np.arange(m)[:, None]
    rank_t2i = np.argmax(hit, axis=1)
    for k in ks:
        out[f"i2t_r@{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i_r@{k}"] = float(np.mean(rank_t2i < k))
    counts = np.bincount(inverse, minlength=m)
    out["i2t_chance@1"] = 1.0 / m
    out["t2i_chance@1"] = float(np.mean(counts / n))
    out["num_images"] = n
    out["num_captions"] = m
    return out


def binding_accuracy(img: np.ndarray, own_txt: np.ndarray, neg_txt: np.ndarray, neg_valid: np.ndarray) -> dict:
    """The probe: is the own caption scored above every attribute-swapped variant?

    img, own_txt: [N, D]; neg_txt: [N, K, D]; neg_valid: [N, K] bool.
    """
    own = np.sum(img * own_txt, axis=-1)  # [N]
    neg = np.einsum("nd,nkd->nk", img, neg_txt)
    neg = np.where(neg_valid, neg, -np.inf)
    has = neg_valid.any(axis=1)
    correct = (own > neg.max(axis=1))[has]
    chance = np.mean(1.0 / (1.0 + neg_valid.sum(axis=1)[has]))
    return {"binding_acc": float(np.mean(correct)) if correct.size else float("nan"), "binding_chance": float(chance)}


def zero_shot_accuracy(img: np.ndarray, class_txt: np.ndarray, labels: np.ndarray) -> dict:
    """img: [N, D]; class_txt: [C, D] (template-averaged, normalised); labels: [N]."""
    pred = np.argmax(img @ class_txt.T, axis=1)
    return {"zero_shot_top1": float(np.mean(pred == labels)), "zero_shot_chance": 1.0 / class_txt.shape[0]}


PROMPT_TEMPLATES = ("a {}.", "a picture of a {}.", "an image with a {}.")


def class_embeddings(encode_text, tokenize, names, templates=PROMPT_TEMPLATES) -> np.ndarray:
    """Averages normalised text embeddings over prompt templates, per class."""
    embs = []
    for template in templates:
        e = np.asarray(encode_text(tokenize([template.format(n) for n in names])))
        embs.append(e)
    mean = np.mean(embs, axis=0)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)
