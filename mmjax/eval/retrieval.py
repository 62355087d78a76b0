"""Retrieval R@k, zero-shot classification and the attribute-binding probe.

Captions are compared as strings: a retrieved caption is correct when it is
textually identical to the image's own caption, so duplicate captions in the
eval split (two images with the same scene description) are handled exactly.
Candidates for image->text are the *unique* captions of the split.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def caption_index(captions):
    """-> (unique captions [M], inverse [N] (caption n is unique caption inverse[n]),
    first [M] (the first row holding each unique caption))."""
    captions = [c.decode() if isinstance(c, bytes) else str(c) for c in captions]
    uniq, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(captions))[::-1]
    return uniq, inverse, first


def similarity(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Image-text scores [N, M] from image embeddings [N, E] (a dot product) or [N, Q, E]
    (one per query, BLIP-2: the best query's dot product) and text embeddings [M, E]."""
    img, txt = np.asarray(img), np.asarray(txt)
    if img.ndim == 3:
        return np.einsum("nqe,me->nqm", img, txt).max(axis=1)
    return img @ txt.T


def pair_similarity(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Scores of aligned pairs: img [N, E] or [N, Q, E] with txt [N, E] -> [N], or with
    txt [N, K, E] -> [N, K] (each image against its own K texts)."""
    img, txt = np.asarray(img), np.asarray(txt)
    one = txt.ndim == 2
    txt = txt[:, None] if one else txt
    img = img[:, None] if img.ndim == 2 else img  # [N, Q, E]
    out = np.einsum("nqe,nke->nqk", img, txt).max(axis=1)
    return out[:, 0] if one else out


def _recalls(sims: np.ndarray, inverse: np.ndarray, ks, prefix: str = "") -> dict:
    """sims [N images, M unique captions]; image n's caption is inverse[n]."""
    m = sims.shape[1]
    order_i2t = np.argsort(-sims, axis=1, kind="stable")
    rank_i2t = np.argmax(order_i2t == inverse[:, None], axis=1)  # rank of own caption
    # text -> image: for caption u, correct if a top-k image has caption u.
    order_t2i = np.argsort(-sims.T, axis=1, kind="stable")  # [M, N]
    rank_t2i = np.argmax(inverse[order_t2i] == np.arange(m)[:, None], axis=1)
    out = {}
    for k in ks:
        out[f"i2t_{prefix}r@{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i_{prefix}r@{k}"] = float(np.mean(rank_t2i < k))
    return out


def retrieval_metrics(img: np.ndarray, txt: np.ndarray, captions, ks=KS) -> dict:
    """img, txt: [N, D] L2-normalised embeddings of N (image, caption) pairs.

    Returns i2t_r@k, t2i_r@k, and the chance level of R@1 for both directions.
    """
    uniq, inverse, first = caption_index(captions)
    n, m = len(inverse), len(uniq)
    # One embedding per unique caption (identical strings embed identically).
    out = _recalls(similarity(img, txt[first]), inverse, ks)
    counts = np.bincount(inverse, minlength=m)
    out["i2t_chance@1"] = 1.0 / m
    out["t2i_chance@1"] = float(np.mean(counts / n))
    out["num_images"] = n
    out["num_captions"] = m
    return out


RERANK_SCORES = ("itm", "itm+itc")


def reranked_metrics(sims: np.ndarray, inverse: np.ndarray, score_pairs, k: int, ks=KS, scores=RERANK_SCORES) -> dict:
    """Retrieval re-ranked by the ITM head: ITC ranks all candidates, the top k are re-scored.

    sims: [N images, M unique captions] ITC similarities; inverse: [N] own caption;
    score_pairs(img_idx [P], cap_idx [P]) -> [P] match scores (ITM log-odds).
    In each direction the top k candidates by ITC are re-ordered and placed ahead of
    the rest, which keep the ITC order. The re-ordering score, per `scores`:
      "itm":     the ITM score alone (ALBEF's evaluation) -> i2t_itm_r@k, t2i_itm_r@k
      "itm+itc": ITM score + ITC similarity (BLIP's evaluation: `score + topk_sim`)
                 -> i2t_itm_itc_r@k, t2i_itm_itc_r@k
    Both come from the same ITM scores, so asking for both costs nothing more.
    """
    bad = [s for s in scores if s not in RERANK_SCORES]
    if bad or not scores:
        raise ValueError(f"rerank scores {tuple(scores)!r}; valid choices: {', '.join(RERANK_SCORES)}")
    out = {}
    for direction, s in (("i2t", sims), ("t2i", sims.T)):
        kk = min(int(k), s.shape[1])
        top = np.argsort(-s, axis=1, kind="stable")[:, :kk]  # [R, kk]
        rows = np.repeat(np.arange(s.shape[0]), kk)
        img_idx, cap_idx = (rows, top.reshape(-1)) if direction == "i2t" else (top.reshape(-1), rows)
        itm = np.asarray(score_pairs(img_idx, cap_idx), np.float64).reshape(-1, kk)
        for name in scores:
            score = itm + np.take_along_axis(s, top, axis=1).astype(np.float64) if name == "itm+itc" else itm
            new = s.astype(np.float64) - (np.abs(s).max() + 1.0) * 2  # the rest: below any top-k entry
            # top-k entries: above everything else, ordered by their score
            np.put_along_axis(new, top, score - score.min() + 1.0, axis=1)
            full = new if direction == "i2t" else new.T
            prefix = "itm_" if name == "itm" else "itm_itc_"
            out.update(
                {key: v for key, v in _recalls(full, inverse, ks, prefix=prefix).items() if key.startswith(direction)}
            )
    out["rerank_k"] = int(k)
    return out


def binding_accuracy(img: np.ndarray, own_txt: np.ndarray, neg_txt: np.ndarray, neg_valid: np.ndarray) -> dict:
    """The probe: is the own caption scored above every attribute-swapped variant?

    img, own_txt: [N, D]; neg_txt: [N, K, D]; neg_valid: [N, K] bool. Scored by the
    embeddings' dot product (ITC).
    """
    own = pair_similarity(img, own_txt)  # [N]
    neg = pair_similarity(img, neg_txt)  # [N, K]
    return binding_accuracy_scores(own, neg, neg_valid)


def binding_accuracy_scores(own: np.ndarray, neg: np.ndarray, neg_valid: np.ndarray) -> dict:
    """The probe from any pair scores (ITC similarity, ITM log-odds): own [N] (each
    image with its caption), neg [N, K] (with its swapped captions), neg_valid [N, K]."""
    neg_valid = np.asarray(neg_valid, bool)
    neg = np.where(neg_valid, neg, -np.inf)
    has = neg_valid.any(axis=1)
    correct = (np.asarray(own) > neg.max(axis=1, initial=-np.inf))[has]
    chance = np.mean(1.0 / (1.0 + neg_valid.sum(axis=1)[has])) if has.any() else float("nan")
    return {"binding_acc": float(np.mean(correct)) if correct.size else float("nan"), "binding_chance": float(chance)}


def zero_shot_accuracy(img: np.ndarray, class_txt: np.ndarray, labels: np.ndarray) -> dict:
    """img: [N, D]; class_txt: [C, D] (template-averaged, normalised); labels: [N]."""
    pred = np.argmax(similarity(img, class_txt), axis=1)
    return {"zero_shot_top1": float(np.mean(pred == labels)), "zero_shot_chance": 1.0 / class_txt.shape[0]}


def caption_metrics(predicted: list[str], references: list[str]) -> dict:
    """Greedy captions against one reference each: exact-match rate, BLEU-4 and CIDEr
    (pycocoevalcap's pure-Python scorers; CIDEr's document frequencies come from the
    references of this set, as in COCO's evaluation). Text is compared lower-cased
    and whitespace-split."""
    norm = lambda t: " ".join(str(t).lower().split())
    pred, ref = [norm(p) for p in predicted], [norm(r) for r in references]
    out = {
        "caption_exact": float(np.mean([p == r for p, r in zip(pred, ref)])) if ref else 0.0,
        "num_captions_scored": len(ref),
    }
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:  # an accelerator image without the data extra
        return out
    gts = {i: [r] for i, r in enumerate(ref)}
    res = {i: [p if p else "<empty>"] for i, p in enumerate(pred)}
    out["caption_bleu4"] = float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    out["caption_cider"] = float(Cider().compute_score(gts, res)[0])
    return out
